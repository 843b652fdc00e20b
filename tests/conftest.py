"""Shared fixtures.

The backend comes from the environment only: LLMC_DEVICE=cpu|gpu as the user set it (unset: the GPU when
CuPy finds one, else the CPU). Nothing here sets it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    """Parts that passing checks keep (llmc_lessons.parts) go to a folder of this run, never into the repository;
    the notebooks that nbval runs inherit it, so lesson 10 finds the parts that lessons 02 to 09 kept.
    On a GPU, the package's whole cache (files.cache_dir: prepared tokens, compiled emulator kernels, cuBLASLt's
    algorithm choices) is a folder of this run too: the algorithms that the tests measure while other test
    processes load the GPU must not become the choices of the user's benchmarks."""
    if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("LLMC_PARTS"):
        return                                   # a pytest-xdist worker shares the folders of the run that started it
    config._llmc_parts = os.environ["LLMC_PARTS"] = tempfile.mkdtemp(prefix="llmc_parts-")
    try:
        from llmc_lessons import device
        on_gpu = device.on_gpu()
    except Exception:  # noqa: BLE001  (a bad LLMC_DEVICE: the header and the tests say so)
        on_gpu = False
    if on_gpu:
        config._llmc_cache = os.environ["LLMC_CACHE"] = tempfile.mkdtemp(prefix="llmc_cache-")


def pytest_unconfigure(config):
    for folder in ("_llmc_parts", "_llmc_cache"):
        shutil.rmtree(getattr(config, folder, ""), ignore_errors=True)


@pytest.fixture(autouse=True)
def parts_folder(monkeypatch, request):
    """Each test keeps parts in a folder of its own (made when a passing check first writes there): what one test's
    checks keep never reaches another's gradient checks or models."""
    test = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:16]
    monkeypatch.setenv("LLMC_PARTS", os.path.join(os.environ["LLMC_PARTS"], "tests", test))


def pytest_report_header(config):
    try:
        from llmc_lessons import device
        return f"llmc_lessons backend: {device.describe()}"
    except Exception as e:  # noqa: BLE001  (e.g. a bad LLMC_DEVICE: the tests will say so too)
        return f"llmc_lessons backend: unavailable ({type(e).__name__}: {e})"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (holds solutions/, notebooks/, README.md)."""
    return ROOT


@pytest.fixture(autouse=True)
def reference_answers_allowed(monkeypatch):
    """The tests of a check hand it the package's own reference as the right answer (and variants of it as wrong
    ones), which a check refuses from a student (llmc_lessons.checks.REFERENCES). That refusal is tested in
    tests/test_delegation.py, which overrides this fixture to keep it on."""
    import llmc_lessons.checks as checks   # imported here, so a check first imported inside a test sees it too
    monkeypatch.setattr(checks, "REFERENCES", {})


@pytest.fixture
def current_env_kernel(tmp_path_factory, monkeypatch) -> str:
    """A kernelspec named 'python3' that runs this very interpreter, found before any user-installed one.

    A user-level 'python3' kernelspec (common after `pip install --user jupyter`) may point at another Python
    that lacks this package; JUPYTER_PATH comes first in Jupyter's search path, so this one wins.
    Returns the kernel name to pass to nbclient.
    """
    base = tmp_path_factory.mktemp("jupyter")
    spec_dir = base / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(base))
    return "python3"


def notebook_cuda_source(notebook: str, variable: str) -> str:
    """The CUDA source a solution notebook assigns to `variable` (a raw string), solution markers removed."""
    import re
    nb = json.loads((ROOT / "solutions" / notebook).read_text())
    cell = next("".join(c["source"]) for c in nb["cells"] if f"{variable} = r'''" in "".join(c["source"]))
    body = re.search(variable + r" = r'''(.*)'''", cell, re.S).group(1)
    return re.sub(r"\n *// (BEGIN|END) SOLUTION", "", body)


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """While the test runs, every array allocated with the backend's empty/empty_like starts as NaN (bf16 NaN,
    0x7FC0, for uint16; -1 for other signed integers, all ones for other unsigned ones), so an output element a kernel forgets to write shows up."""
    import numpy as np

    from llmc_lessons import device
    xp = device.xp
    empty, empty_like = xp.empty, xp.empty_like

    def fill(a):
        a[...] = (0x7FC0 if a.dtype == np.uint16 else np.nan if a.dtype.kind == "f"
                  else np.iinfo(a.dtype).max if a.dtype.kind == "u" else -1)
        return a

    monkeypatch.setattr(xp, "empty", lambda *a, **kw: fill(empty(*a, **kw)))
    monkeypatch.setattr(xp, "empty_like", lambda *a, **kw: fill(empty_like(*a, **kw)))
