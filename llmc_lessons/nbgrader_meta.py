"""nbgrader's cell metadata on the lesson notebooks, so a class that grades with nbgrader can use them as they are.

The exercise generator (`llmc_lessons.exercises`) calls `mark_cells` on every notebook it writes:

    exercise cell (`# Exercise N.k: ...`)    solution cell, grade_id "exercise-N-k", editable
    the code cell right after it (its check) autograded test cell, grade_id "check-N-k", POINTS points, locked
    every other cell                         read-only (locked), grade_id = the cell's id

A Markdown cell whose worked derivation the builder replaced by a prompt (`<!-- BEGIN SOLUTION -->`) is read-only
too: the prompt is the course's text, and the exercise after it grades the derivation, as code. (nbgrader allows a
Markdown solution cell only as a manually graded answer, which would ask the teacher to grade it a second time.)

A teacher copies solutions/NN_name.ipynb into an nbgrader course as source/<assignment>/NN_name.ipynb and adds
two lines to the course's nbgrader_config.py, so that `nbgrader generate_assignment` writes the exercises'
stubs exactly as notebooks/ has them (nbgrader's own stub is Python, which would break a CUDA source string):

    from llmc_lessons.nbgrader_config import use_course_stubs
    use_course_stubs(c)
"""
from __future__ import annotations

POINTS = 1
SCHEMA_VERSION = 3


def _meta(grade_id: str, *, solution: bool = False, grade: bool = False, locked: bool = True) -> dict:
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": SCHEMA_VERSION,
            "solution": solution}
    if grade:
        meta["points"] = POINTS
    return meta


def mark_cells(nb, exercises) -> None:
    """Set nbgrader's metadata on every cell of `nb`, in place.

    exercises: [(cell index, "N.k", ...)] of the notebook's exercise cells (`exercises.exercise_cells`); the
    first code cell after each is its check. Cells need their ids (the generator sets them), which name the
    read-only cells.
    """
    roles = {}
    for index, number, *_ in exercises:
        tag = number.replace(".", "-")
        roles[index] = _meta(f"exercise-{tag}", solution=True, locked=False)
        check = next((i for i in range(index + 1, len(nb.cells)) if nb.cells[i].cell_type == "code"), None)
        if check is not None:
            roles.setdefault(check, _meta(f"check-{tag}", grade=True))
    for index, cell in enumerate(nb.cells):
        cell.metadata["nbgrader"] = roles.get(index) or _meta(cell.id)
