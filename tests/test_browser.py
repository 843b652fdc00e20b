"""What a student sees in JupyterLab, in a real browser: JupyterLab on a free local port, headless Chromium driven
by Playwright, a few cells of lesson 05's student notebook run in it. Checked: the equations are typeset by
MathJax (no raw $...$ left), figures are drawn, the attention widget is there and redraws when its slider moves,
and an unfinished exercise's check shows its short message.

Needs Debian's `chromium` (apt-get install chromium) and the `playwright` package (no browser download); skips
with the reason when either is missing.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from llmc_lessons import exercises

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "llmc-browser-test"
TIMEOUT_MS = 60_000

pytestmark = [pytest.mark.slow, pytest.mark.notebook]


def lesson_05_excerpt():
    """Cells of lesson 05's student notebook: the setup cell, the title (equations), the imports, a figure, the
    attention widget with the text above it, then the lesson's first exercise (unfinished) and its check.

    Returns the notebook, the positions in it of the check, the widget and the figure, and the exercise's number."""
    name = "05_attention.ipynb"
    student = nbformat.read(str(ROOT / "notebooks" / name), as_version=4)
    solution = nbformat.read(str(ROOT / "solutions" / name), as_version=4)
    first = exercises.exercise_cells(solution, name)[0]
    exercise = first.index
    check = next(i for i in range(exercise + 1, len(student.cells)) if student.cells[i].cell_type == "code")
    widget = next(i for i, c in enumerate(student.cells) if "widgets.interact(" in c.source)
    figure = next(i for i, c in enumerate(student.cells) if c.cell_type == "code" and "plt.show()" in c.source
                  and "def " not in c.source and i != widget)
    keep = sorted({0, 1, 2, widget - 1, widget, figure}) + [exercise, check]  # Lab's run-all stops at an error
    nb = nbformat.v4.new_notebook(metadata=student.metadata)
    nb.cells = [student.cells[i] for i in keep]
    return nb, keep.index(check), keep.index(widget), keep.index(figure), first.number


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """JupyterLab serving tmp_path/work on a free port (token auth, no browser); yields its base URL."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    pytest.importorskip("playwright", reason="the playwright package is not installed (pip install playwright)")
    work, settings = tmp_path / "work", tmp_path / "settings"
    work.mkdir()
    # Every cell rendered (no windowing), and no news or update checks.
    for plugin, values in (("notebook-extension/tracker", {"windowingMode": "none"}),
                           ("apputils-extension/notification", {"fetchNews": "false", "checkForUpdates": False})):
        path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "IPYTHONDIR": str(tmp_path / "ipython"),
           "LLMC_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
           f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={work}",
           f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
           "--LabApp.expose_app_in_browser=True"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp_path / "lab.log", "w")
    server = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield base, work
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


KERNEL_READY = """() => {
    const widget = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const kernel = widget && widget.sessionContext && widget.sessionContext.session
                   && widget.sessionContext.session.kernel;
    return !!kernel && kernel.connectionStatus === 'connected' && kernel.status === 'idle';
}"""
RUN_ALL = "async () => { await window.jupyterapp.commands.execute('notebook:run-all-cells'); }"
ALL_RAN = """() => {
    const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(p => p.textContent);
    return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p));
}"""


def test_a_student_sees_equations_figures_the_widget_and_exercise_messages(lab, tmp_path):
    from playwright.sync_api import sync_playwright
    base, work = lab
    nb, check, widget, figure, number = lesson_05_excerpt()
    nbformat.write(nb, str(work / "lesson.ipynb"))

    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(tmp_path / "chromium-profile"),
                                                       executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(f"{base}/lab/tree/lesson.ipynb?token={TOKEN}")
            page.wait_for_selector(".jp-Notebook .jp-Cell")
            page.wait_for_function(KERNEL_READY)
            page.evaluate(RUN_ALL)
            page.wait_for_function(ALL_RAN, timeout=TIMEOUT_MS)
            cells = page.locator(".jp-Notebook .jp-Cell")

            # Equations: MathJax typeset them, and no $ is left in the rendered text.
            page.wait_for_selector(".jp-MarkdownCell mjx-container")
            rendered = page.locator(".jp-MarkdownCell .jp-RenderedMarkdown")
            assert rendered.count() >= 2
            for i in range(rendered.count()):
                assert "$" not in rendered.nth(i).inner_text(), rendered.nth(i).inner_text()[:300]

            # A figure in an output.
            cells.nth(figure).locator(".jp-OutputArea-output img").first.wait_for()

            # The attention widget: a head dropdown, a slider, and a heat map redrawn when the slider moves.
            box = cells.nth(widget)
            box.locator(".widget-dropdown select").wait_for()
            image = box.locator(".jp-OutputArea-output img").first
            image.wait_for()
            before = image.get_attribute("src")
            handle = box.locator(".widget-slider .noUi-handle, .widget-hslider .noUi-handle").first
            handle.focus()
            page.keyboard.press("ArrowRight")
            page.wait_for_function("([cell, before]) => { const img = document.querySelectorAll("
                                   "'.jp-Notebook .jp-Cell')[cell].querySelector('.jp-OutputArea-output img'); "
                                   "return img && img.getAttribute('src') !== before; }", arg=[widget, before])
            assert "1.25" in box.locator(".widget-readout").first.inner_text()

            # The unfinished exercise: its check shows the short message.
            error = cells.nth(check).locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            error.first.wait_for()
            text = error.first.inner_text()
            assert text.startswith("ExerciseFailed") and f"Exercise {number} is not done yet" in text, text[-1000:]
            assert len(text.splitlines()) <= 5 and "Traceback" not in text and ".py" not in text, text  # no frames
        except Exception:
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)  # what the browser showed
            print(f"screenshot: {tmp_path / 'page.png'}; prompts:",
                  page.evaluate("() => [...document.querySelectorAll('.jp-InputArea-prompt')].map(p => p.textContent)"))
            raise
        finally:
            browser.close()
