"""The first cell of every lesson notebook: on Colab or Kaggle it installs the course; where it is installed it
does nothing (no network).

The exercise generator (`llmc_lessons.exercises`) puts SOURCE first in every solution and student notebook, so
this module is its one home. REPOSITORY is where the cell clones the course from; a class that works from its
own fork sets it there (and in pyproject.toml's [project.urls] and the README's "Open in Colab" links, which
tests/test_setup_cell.py keeps in step), then runs `python -m llmc_lessons.exercises normalize` and `build`.
"""
from __future__ import annotations

import copy

import nbformat

REPOSITORY = "https://github.com/llmc-lessons/llmc-lessons"
"""The course's git repository on GitHub (https://github.com/OWNER/NAME)."""

REPOSITORY_ENV = "LLMC_LESSONS_REPO"
"""An environment variable that replaces REPOSITORY in the cell (a fork's URL, or a local checkout's path)."""

FIRST_LINE = "# Setup: on Colab or Kaggle, install the course (where it is installed already, this does nothing)."

SOURCE = f'''{FIRST_LINE}
import importlib.util
if importlib.util.find_spec("llmc_lessons") is None:
    import os, subprocess, sys
    if os.path.isdir("../llmc_lessons"):  # a checkout of the course that is not installed yet
        course = os.path.abspath("..")
    else:  # Colab or Kaggle: clone the course beside the notebook, then work in its notebooks/
        repo = os.environ.get("{REPOSITORY_ENV}", "{REPOSITORY}")
        course = os.path.abspath("llmc-lessons")
        if not os.path.isdir(course):
            subprocess.run(["git", "clone", "--depth", "1", "--quiet", repo, course], check=True)
        os.chdir(os.path.join(course, "notebooks"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-e", course], check=True)
    sys.path.insert(0, course)  # importable now, without restarting the kernel
    print(f"installed the course from {{course}}; working directory {{os.getcwd()}}")'''


def is_setup_cell(cell) -> bool:
    """True when `cell` is a code cell that starts with the setup cell's first line (of any version)."""
    src = cell.get("source", "")
    src = "".join(src) if isinstance(src, list) else src
    return cell.get("cell_type") == "code" and src.startswith(FIRST_LINE)


def with_setup_cell(nb):
    """A copy of `nb` whose first cell is the current setup cell (replacing an older one, or inserted)."""
    nb = copy.deepcopy(nb)
    cells = list(nb.get("cells", []))
    if cells and is_setup_cell(cells[0]):
        cells = cells[1:]
    nb["cells"] = [nbformat.v4.new_code_cell(SOURCE)] + cells
    return nbformat.from_dict(nb)
