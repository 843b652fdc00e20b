"""The setup cell that opens every notebook (llmc_lessons.setup_cell): present everywhere, in step with the README's
"Open in Colab" links and pyproject.toml, and, run in a fresh virtual environment without the course, it clones and
installs the course (from a local copy instead of GitHub) and then does nothing on a second run (slow)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat
import pytest

from llmc_lessons import setup_cell

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "solutions").glob("*.ipynb")) + sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_notebook_opens_with_the_setup_cell(path):
    cells = nbformat.read(str(path), as_version=4).cells
    assert cells[0].cell_type == "code" and cells[0].source == setup_cell.SOURCE
    assert not any(setup_cell.is_setup_cell(c) for c in cells[1:])


def test_readme_colab_links_and_project_urls_name_the_repository():
    owner_name = setup_cell.REPOSITORY.removeprefix("https://github.com/")
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", owner_name)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"https://colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/notebooks/(\S+?)\)",
                       readme)
    assert sorted(name for _, name in links) == sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert {repo for repo, _ in links} == {owner_name}
    assert f'Repository = "{setup_cell.REPOSITORY}"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def test_with_setup_cell_replaces_an_old_version_and_is_idempotent():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(setup_cell.FIRST_LINE + "\nold()"),
                                         nbformat.v4.new_markdown_cell("# Lesson")])
    once = setup_cell.with_setup_cell(nb)
    assert [c.source for c in once.cells] == [setup_cell.SOURCE, "# Lesson"]
    assert [c.source for c in setup_cell.with_setup_cell(once).cells] == [setup_cell.SOURCE, "# Lesson"]


def _copy_checkout(dest: Path) -> None:
    """The working tree's files (tracked and untracked, not ignored) as a fresh one-commit git repository."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    git = ["git", "-c", "user.name=course", "-c", "user.email=course@example.invalid"]
    for args in (["init", "--quiet"], ["add", "-A"], ["commit", "--quiet", "-m", "course"]):
        subprocess.run(git + args, cwd=dest, check=True)


@pytest.mark.slow
def test_setup_cell_installs_the_course_in_a_fresh_environment_then_does_nothing(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout of the course")
    source = tmp_path / "course-source"
    _copy_checkout(source)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The course's dependencies, pip and setuptools come from the environment running the tests (no downloads);
    # the course itself is not importable there: no PYTHONPATH, and a .pth line does not run that directory's
    # own .pth files (an editable install's among them).
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({setup_cell.REPOSITORY_ENV: str(source), "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0",
                "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    probe = "\nimport os, llmc_lessons; print('COURSE', llmc_lessons.__file__); print('CWD', os.getcwd())"

    work = tmp_path / "content"  # Colab's working directory
    work.mkdir()
    assert subprocess.run([python, "-c", "import llmc_lessons"], cwd=work, env=env, capture_output=True).returncode
    first = subprocess.run([python, "-c", setup_cell.SOURCE + probe], cwd=work, env=env, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    clone = work / "llmc-lessons"
    assert "installed the course" in first.stdout
    assert f"COURSE {clone / 'llmc_lessons' / '__init__.py'}" in first.stdout
    assert f"CWD {clone / 'notebooks'}" in first.stdout

    # Installed now: the cell does nothing, even with nowhere to install from.
    env[setup_cell.REPOSITORY_ENV] = str(tmp_path / "nowhere")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    second = subprocess.run([python, "-c", setup_cell.SOURCE + probe], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "installed the course" not in second.stdout and f"CWD {elsewhere}" in second.stdout
    assert list(elsewhere.iterdir()) == []
