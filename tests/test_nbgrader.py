"""nbgrader's metadata on the lessons (llmc_lessons.nbgrader_meta): valid by nbgrader's rules on every notebook, and
`nbgrader generate_assignment` + `nbgrader autograde` grading lesson 00 right (slow; skipped without nbgrader)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from llmc_lessons import exercises

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "solutions").glob("*.ipynb")) + sorted((ROOT / "notebooks").glob("*.ipynb"))
KEYS = {"grade", "grade_id", "locked", "schema_version", "solution"}
GRADE_ID = re.compile(r"^[a-zA-Z0-9_\-]+$")  # nbgrader's rule for grade_id


def problems(nb, name: str) -> list[str]:
    """Every way `nb`'s cell metadata breaks nbgrader's schema 3 or the course's grading plan."""
    solution = nbformat.read(str(ROOT / "solutions" / name), as_version=4)  # a student notebook's cells line up
    found = exercises.exercise_cells(solution, name)
    out, seen = [], set()
    for index, cell in enumerate(nb.cells):
        meta = cell.metadata.get("nbgrader")
        if meta is None:
            out.append(f"cell {index} has no nbgrader metadata")
            continue
        keys = set(meta) - {"points"}
        if keys != KEYS:
            out.append(f"cell {index}: nbgrader keys {sorted(meta)}")
            continue
        gid = meta["grade_id"]
        if not GRADE_ID.match(gid) or gid in seen:
            out.append(f"cell {index}: grade_id {gid!r} is not of [a-zA-Z0-9_-] or not unique")
        seen.add(gid)
        if meta["schema_version"] != 3:
            out.append(f"cell {index}: schema_version {meta['schema_version']}")
        if meta["solution"] and meta["locked"]:
            out.append(f"cell {index}: a solution cell cannot be locked")
        if meta["grade"] != ("points" in meta):
            out.append(f"cell {index}: points belong exactly to grade cells")
        if meta["grade"] and not (meta["locked"] and cell.cell_type == "code" and meta["points"] > 0):
            out.append(f"cell {index}: an autograded test cell must be a locked code cell with points")
    solutions = [i for i, c in enumerate(nb.cells) if c.metadata.get("nbgrader", {}).get("solution")]
    if solutions != [e.index for e in found]:
        out.append(f"solution cells {solutions} are not the exercise cells {[e.index for e in found]}")
    for index, _ in exercises.derivation_cells(solution, name):   # the exercise after it grades the derivation
        if not nb.cells[index].metadata["nbgrader"]["locked"]:
            out.append(f"cell {index}: a derivation's Markdown cell must be read-only")
    for e in found:
        check = next(i for i in range(e.index + 1, len(nb.cells)) if nb.cells[i].cell_type == "code")
        if nb.cells[check].metadata["nbgrader"].get("grade_id") != f"check-{e.number.replace('.', '-')}":
            out.append(f"Exercise {e.number}: cell {check} right after it is not its autograded check")
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_cell_carries_valid_nbgrader_metadata(path):
    nb = nbformat.read(str(path), as_version=4)
    assert problems(nb, path.name) == []


# ---------------------------------------------------------------------------------------------------------
# A class with nbgrader: release lesson 00, grade a right and a wrong submission

WRONG_NUM_BLOCKS = "def num_blocks(n, block_size):\n    return n // block_size   # misses the last, partial block"


def nbgrader(course: Path, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}  # nbgrader runs alembic
    done = subprocess.run([sys.executable, "-m", "nbgrader", *args, "--CourseDirectory.root=" + str(course)],
                          cwd=course, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.notebook
def test_nbgrader_releases_a_lesson_with_derivations_as_the_course_does(tmp_path):
    pytest.importorskip("nbgrader", reason="nbgrader is not installed (pip install nbgrader)")
    name = "03_layernorm.ipynb"
    solution = nbformat.read(str(ROOT / "solutions" / name), as_version=4)
    assert exercises.derivation_cells(solution, name), "lesson 03 has no Markdown derivation to release"
    course = tmp_path / "course"
    (course / "source" / "layernorm").mkdir(parents=True)
    shutil.copy(ROOT / "solutions" / name, course / "source" / "layernorm")
    (course / "nbgrader_config.py").write_text(
        "c = get_config()\n"
        "c.CourseDirectory.course_id = 'llmc'\n"
        "from llmc_lessons.nbgrader_config import use_course_stubs\n"
        "use_course_stubs(c)\n")
    nbgrader(course, "generate_assignment", "layernorm", "--create")
    release = nbformat.read(str(course / "release" / "layernorm" / name), as_version=4)
    student = nbformat.read(str(ROOT / "notebooks" / name), as_version=4)
    assert [c.source for c in release.cells] == [c.source for c in student.cells]


@pytest.mark.slow
@pytest.mark.notebook
def test_nbgrader_releases_and_autogrades_lesson_00(tmp_path):
    pytest.importorskip("nbgrader", reason="nbgrader is not installed (pip install nbgrader)")
    from nbgrader.api import Gradebook

    course = tmp_path / "course"
    (course / "source" / "welcome").mkdir(parents=True)
    shutil.copy(ROOT / "solutions" / "00_welcome.ipynb", course / "source" / "welcome")
    (course / "nbgrader_config.py").write_text(
        "c = get_config()\n"
        "c.CourseDirectory.course_id = 'llmc'\n"
        "from llmc_lessons.nbgrader_config import use_course_stubs\n"
        "use_course_stubs(c)\n")
    nbgrader(course, "generate_assignment", "welcome", "--create")

    release = nbformat.read(str(course / "release" / "welcome" / "00_welcome.ipynb"), as_version=4)
    student = nbformat.read(str(ROOT / "notebooks" / "00_welcome.ipynb"), as_version=4)
    assert [c.source for c in release.cells] == [c.source for c in student.cells]  # the course's own stubs

    solution = nbformat.read(str(ROOT / "solutions" / "00_welcome.ipynb"), as_version=4)
    right = nbformat.from_dict(json.loads(json.dumps(release)))
    wrong = nbformat.from_dict(json.loads(json.dumps(release)))
    for index, number, _ in exercises.exercise_cells(solution, "00_welcome.ipynb"):
        right.cells[index].source = solution.cells[index].source
        wrong.cells[index].source = WRONG_NUM_BLOCKS if number == "0.1" else solution.cells[index].source
    for who, nb in (("ada", right), ("bob", wrong)):
        (course / "submitted" / who / "welcome").mkdir(parents=True)
        nbformat.write(nb, str(course / "submitted" / who / "welcome" / "00_welcome.ipynb"))
    nbgrader(course, "autograde", "welcome", "--create")

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        scores = {who: gb.find_submission_notebook("00_welcome", "welcome", who).score for who in ("ada", "bob")}
        total = gb.find_notebook("00_welcome", "welcome").max_score
    assert total == 3
    assert scores == {"ada": 3, "bob": 2}
