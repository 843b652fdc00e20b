"""Packaging: pyproject.toml and environment.yml agree, package data is declared, and a wheel carries it."""
from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
ENV = yaml.safe_load((ROOT / "environment.yml").read_text())

# conda-forge names of PyPI packages, where they differ
PIP_TO_CONDA = {}
# conda packages with no PyPI counterpart in pyproject.toml: the interpreter, pip, and the emulator's compiler
CONDA_ONLY = {"python", "pip", "cxx-compiler"}


def split_requirement(req: str) -> tuple[str, str, str]:
    """'numpy>=1.24; python_version < "3.11"' -> ('numpy', '>=1.24', 'python_version < "3.11"')."""
    req, _, marker = req.partition(";")
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*(.*?)\s*$", req)
    name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
    return name, m.group(2).replace(" ", ""), marker.strip()


def conda_requirement(spec: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*?)\s*$", spec)
    return re.sub(r"[-_.]+", "-", m.group(1)).lower(), m.group(2).replace(" ", "")


def pip_requirements(include_extras=("test",)) -> dict[str, str]:
    """name -> version specifier of the dependencies conda must provide (Python 3.11, so no 3.10-only markers)."""
    reqs = list(PYPROJECT["project"]["dependencies"])
    for extra in include_extras:
        reqs += PYPROJECT["project"]["optional-dependencies"][extra]
    out = {}
    for r in reqs:
        name, spec, marker = split_requirement(r)
        if marker and "python_version < '3.11'" in marker.replace('"', "'"):
            continue
        out[PIP_TO_CONDA.get(name, name)] = spec
    return out


def conda_requirements() -> tuple[dict[str, str], list[str]]:
    conda, pip = {}, []
    for dep in ENV["dependencies"]:
        if isinstance(dep, dict):
            pip += dep.get("pip", [])
        else:
            name, spec = conda_requirement(dep)
            conda[name] = spec
    return conda, pip


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    conda, _ = conda_requirements()
    want = pip_requirements()
    have = {k: v for k, v in conda.items() if k not in CONDA_ONLY}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    assert not missing and not extra, (f"environment.yml lacks {missing} and has {extra} beyond pyproject.toml's "
                                       f"dependencies + [test]; keep the two lists in step")
    differ = {k: (want[k], have[k]) for k in want if want[k] != have[k]}
    assert not differ, f"version bounds differ (pyproject, environment.yml): {differ}"


def test_environment_yml_is_conda_forge_python_311_with_a_compiler_and_the_editable_install():
    conda, pip = conda_requirements()
    assert ENV["channels"] == ["conda-forge"]
    assert conda["python"] == "=3.11"
    assert "cxx-compiler" in conda and "pip" in conda
    assert pip == ["-e .[test]"]


def test_pyproject_metadata_and_extras():
    project = PYPROJECT["project"]
    assert project["name"] == "llmc-lessons"
    assert project["requires-python"] == ">=3.10"
    deps = {split_requirement(r)[0] for r in project["dependencies"]}
    assert {"numpy", "matplotlib", "ipywidgets", "tiktoken", "jupyterlab", "tqdm", "nbformat"} <= deps
    assert not deps & {"cupy", "cupy-cuda12x", "cupy-cuda13x", "torch"}, "the package must work without them"
    extras = {k: {split_requirement(r)[0] for r in v} for k, v in project["optional-dependencies"].items()}
    assert {"pytest", "pytest-xdist", "nbval", "nbclient", "ipykernel"} <= extras["test"]
    assert extras["cuda12"] == {"cupy-cuda12x"} and extras["cuda13"] == {"cupy-cuda13x"}
    assert extras["torch"] == {"torch"}
    assert "torch" not in extras["test"], "a bare `torch` requirement would pull a multi-GB CUDA build in CI"
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "llmc_lessons.__version__"}


def test_every_imported_third_party_module_is_a_declared_dependency():
    """The package's own imports (not the tests') need only the declared dependencies, CuPy and torch aside."""
    declared = set(pip_requirements(include_extras=()))
    optional = {"cupy", "cupy-backends", "torch", "ziglang", "tiktoken-ext", "ipython", "pytest",
                "nbgrader"}  # guarded or lazy
    stdlib = set(sys.stdlib_module_names)
    found = set()
    for path in (ROOT / "llmc_lessons").rglob("*.py"):
        for m in re.finditer(r"^\s*(?:import|from)\s+([A-Za-z_][A-Za-z0-9_]*)", path.read_text(), re.M):
            found.add(m.group(1))
    third = {re.sub(r"_", "-", n).lower() for n in found if n not in stdlib and n != "llmc_lessons"}
    undeclared = third - declared - optional
    assert not undeclared, f"llmc_lessons imports {sorted(undeclared)}, which pyproject.toml does not list"


PACKAGE_DATA = PYPROJECT["tool"]["setuptools"]["package-data"]["llmc_lessons"]


@pytest.mark.parametrize("folder, required", [("kernels", ["*.cu", "*.cuh"]), ("cuda", ["*.h", "*.cpp"]),
                                              ("assets", ["*"])])
def test_package_data_is_declared_for_every_data_file(folder, required):
    for pattern in required:
        assert f"{folder}/{pattern}" in PACKAGE_DATA, f"pyproject.toml must declare llmc_lessons/{folder}/{pattern}"
    files = [p for p in (ROOT / "llmc_lessons" / folder).iterdir() if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert files, f"llmc_lessons/{folder} holds no data files"
    for p in files:
        rel = f"{folder}/{p.name}"
        assert any(fnmatch.fnmatch(rel, pat) for pat in PACKAGE_DATA), f"{rel} is not covered by package-data"


def _setuptools_version():
    try:
        import setuptools
        return tuple(int(x) for x in setuptools.__version__.split(".")[:2])
    except Exception:  # noqa: BLE001
        return None


@pytest.mark.slow
@pytest.mark.skipif((_setuptools_version() or (0,)) < (77, 0), reason="building the wheel offline needs setuptools>=77")
def test_wheel_carries_kernels_runtime_and_assets(tmp_path):
    """Build the wheel offline from a copy of the sources and look inside it."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "llmc_lessons", src / "llmc_lessons", ignore=shutil.ignore_patterns("__pycache__"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    [wheel] = list((tmp_path / "dist").glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("kernels", "cuda", "assets"):
        for p in (ROOT / "llmc_lessons" / folder).iterdir():
            if p.is_file() and p.suffix != ".pyc":
                assert f"llmc_lessons/{folder}/{p.name}" in names, f"the wheel lacks llmc_lessons/{folder}/{p.name}"
    assert "llmc_lessons/__main__.py" in names and "llmc_lessons/exercises.py" in names
    assert not any(n.startswith(("tests/", "solutions/", "notebooks/")) for n in names)
