"""The lesson notebooks: notebooks/ is generated from solutions/, and every student notebook fails only where
the student has work to do.

(a) notebooks/ is in sync with solutions/ (`python -m llmc_lessons.exercises check`).
(b) Every student notebook, executed top to bottom with errors allowed, raises in exercise cells and their
    check cells only; every exercise's check fails on the stub, naming the exercise ("Exercise N.k").
    What a failed check shows is what a student needs: a short message, no frame of the package's code, and no
    line of the answer.
(c) The solution notebooks run clean under `pytest --nbval-lax` through the README's test command, which
    collects solutions/*.ipynb and never notebooks/*.ipynb (checked below on the configuration).
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from llmc_lessons import exercises

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted(p.name for p in (ROOT / "solutions").glob("*.ipynb"))
CELL_TIMEOUT_S = 300
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# ---------------------------------------------------------------------------------------------------------
# Running a student notebook and judging where it failed

def execute(nb, cwd: Path, kernel_name: str):
    """Run every cell of `nb` in a fresh kernel with cwd `cwd`, carrying on after errors; return the result."""
    from nbclient import NotebookClient
    nb = nbformat.from_dict(nb)
    NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=kernel_name, allow_errors=True,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def errors(cell) -> str:
    """The text of every error a code cell raised ('' when it ran clean)."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            parts.append(f"{out.get('ename')}: {out.get('evalue')}\n" + "\n".join(out.get("traceback", [])))
    return ANSI.sub("", "\n".join(parts))


def shown(cell) -> str:
    """The error text Jupyter shows under a code cell: its traceback, as IPython formatted it."""
    return ANSI.sub("", "\n".join(ln for out in cell.get("outputs", []) if out.get("output_type") == "error"
                                  for ln in out.get("traceback", [])))


def _first_line(cell) -> str:
    return next((ln.strip() for ln in cell.source.splitlines() if ln.strip()), "")[:70]


def failure_problems(executed, found) -> list[str]:
    """What is wrong with where an executed student notebook failed, one sentence each (empty: all good).

    found: the notebook's exercises, [(cell index, "N.k", description)] from its solution notebook. A check
    cell is the first code cell after an exercise cell.
    """
    cells = executed.cells
    code = [i for i, c in enumerate(cells) if c.cell_type == "code"]
    exercise_at = {e[0]: e[1] for e in found}
    allowed, problems = {}, []
    for index, number, _ in found:
        allowed[index] = number
        later = [i for i in code if i > index]
        check = later[0] if later else None
        if check is None or check in exercise_at:
            problems.append(f"Exercise {number} (cell {index}) has no check cell of its own right after it")
            continue
        allowed[check] = number
        if not errors(cells[check]):
            problems.append(f"the check of Exercise {number} (cell {check}: {_first_line(cells[check])!r}) passed "
                            f"on the unfinished stub: it cannot tell a student who has not done the exercise")
        text = errors(cells[index]) + errors(cells[check])
        if text and f"Exercise {number}" not in text:
            last = text.strip().splitlines()[0] if text.strip() else ""
            problems.append(f"Exercise {number} failed without naming itself ('Exercise {number}' is not in "
                            f"the error: {last!r})")
    for i in code:
        text = errors(cells[i])
        if text and i not in allowed:
            problems.append(f"cell {i} ({_first_line(cells[i])!r}) raised, but it is neither an exercise nor "
                            f"an exercise's check: {text.strip().splitlines()[0]}")
    return problems


MAX_SHOWN_LINES = 25
PACKAGE_FRAME = re.compile(r"llmc_lessons[/\\][\w/\\]+\.py")


def answer_lines(solution, student) -> dict[int, set[str]]:
    """Per exercise cell: the lines of code that the solution has and the student's notebook does not."""
    out = {}
    for i, (sol, stu) in enumerate(zip(solution.cells, student.cells)):
        theirs = {ln.strip() for ln in stu.source.splitlines()}
        mine = {ln.strip() for ln in sol.source.splitlines()} - theirs
        mine = {ln for ln in mine if len(ln) >= 8 and not ln.startswith(("#", "//"))}
        if sol.cell_type == "code" and mine:
            out[i] = mine
    return out


def shown_error_problems(executed, answers: dict[int, set[str]]) -> list[str]:
    """What is wrong with the errors an executed student notebook shows, one sentence each (empty: all good):
    each is short, shows no frame of the package's code, and shows no line of any exercise's answer."""
    problems = []
    every_answer = set().union(*answers.values()) if answers else set()
    for i, cell in enumerate(executed.cells):
        text = shown(cell) if cell.cell_type == "code" else ""
        if not text:
            continue
        where = f"cell {i} ({_first_line(cell)!r})"
        lines = text.strip().splitlines()
        if len(lines) > MAX_SHOWN_LINES:
            problems.append(f"{where} shows {len(lines)} lines of error (at most {MAX_SHOWN_LINES}): {lines[0]}")
        frame = PACKAGE_FRAME.search(text)
        if frame:
            problems.append(f"{where} shows a frame of the package's code ({frame.group(0)}): {lines[0]}")
        leaked = sorted(ln for ln in every_answer if ln in text)
        if leaked:
            problems.append(f"{where} shows a line of an answer: {leaked[0]!r}")
    return problems


# ---------------------------------------------------------------------------------------------------------
# (a) and (b) on the course itself

def test_notebooks_are_in_sync_with_solutions():
    problems = exercises.check(ROOT)
    assert not problems, ("notebooks/ does not match solutions/:\n  - " + "\n  - ".join(problems)
                          + "\nRun `python -m llmc_lessons.exercises build` (and `... normalize`).")


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("name", SOLUTIONS)
def test_student_notebook_fails_only_at_exercises(name, current_env_kernel):
    student = ROOT / "notebooks" / name
    if not student.exists():
        pytest.fail(f"notebooks/{name} is missing: run `python -m llmc_lessons.exercises build`")
    solution = nbformat.read(str(ROOT / "solutions" / name), as_version=4)
    found = exercises.exercise_cells(solution, name)
    unexecuted = nbformat.read(str(student), as_version=4)
    executed = execute(unexecuted, ROOT / "notebooks", current_env_kernel)
    problems = failure_problems(executed, found) + shown_error_problems(executed, answer_lines(solution, unexecuted))
    assert not problems, f"notebooks/{name}:\n  - " + "\n  - ".join(problems)


# ---------------------------------------------------------------------------------------------------------
# (c) the README's test command collects solution notebooks, never student ones

def readme_test_command() -> str:
    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()]
    found = [ln for ln in lines if ln.startswith(".venv/bin/python -m pytest")]
    assert len(found) == 1, f"README.md should hold exactly one test command line, found {found}"
    return found[0]


def test_readme_test_command_runs_solutions_with_nbval_and_ci_uses_it_verbatim():
    cmd = readme_test_command()
    args = shlex.split(cmd)
    assert "--nbval-lax" in args and "solutions" in args and "tests" in args
    assert not any(a.startswith("notebooks") for a in args), "student notebooks must not run under nbval"
    assert "--dist" in args and args[args.index("--dist") + 1] == "loadfile", \
        "nbval cells of one notebook must stay on one xdist worker, in order (they share one kernel)"
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert cmd in ci, ".ci/run must run the README's test command verbatim"


def test_pytest_never_recurses_into_student_notebooks():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "notebooks" in cfg["norecursedirs"]
    assert "notebooks" not in cfg["testpaths"] and "solutions" in cfg["testpaths"]


@pytest.mark.slow
def test_collection_from_the_root_takes_solution_notebooks_only(tmp_path):
    """A real collection from the repository root, on a copy with a notebook in each of the two folders."""
    for folder in ("solutions", "notebooks"):
        (tmp_path / folder).mkdir()
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]),
                       str(tmp_path / folder / "99_probe.ipynb"))
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "--nbval-lax",
                          "-p", "no:cacheprovider", "-p", "no:xdist", "."],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = res.stdout + res.stderr
    assert "solutions/99_probe.ipynb::Cell 0" in out, out
    assert "notebooks/99_probe.ipynb" not in out, out


# ---------------------------------------------------------------------------------------------------------
# The judge itself, on synthetic notebooks (so it is tested before any lesson exists)

def fake_run(cells):
    """An 'executed' notebook from (source, error text or None) pairs, without running anything."""
    nb = nbformat.v4.new_notebook()
    for src, err in cells:
        c = nbformat.v4.new_code_cell(src)
        if err:
            ename, _, evalue = err.partition(": ")
            c.outputs = [nbformat.v4.new_output("error", ename=ename, evalue=evalue, traceback=[f"\x1b[31m{err}"])]
        nb.cells.append(c)
    return nb


EX = [(1, "3.1", "write it")]


def test_judge_accepts_failure_in_the_check_cell():
    nb = fake_run([("import numpy", None), ("# Exercise 3.1: write it", None),
                   ("check()", "AssertionError: Exercise 3.1 is not done yet"), ("after()", None)])
    assert failure_problems(nb, EX) == []


def test_judge_accepts_failure_in_the_exercise_cell_then_its_check():
    nb = fake_run([("import numpy", None), ("# Exercise 3.1: write it", "NotImplementedError: Exercise 3.1: write it"),
                   ("check(ids)", "NameError: name 'ids' is not defined")])
    assert failure_problems(nb, EX) == []


def test_judge_rejects_a_failure_elsewhere():
    nb = fake_run([("import numpy", None), ("# Exercise 3.1: write it", None),
                   ("check()", "AssertionError: Exercise 3.1 (out): 3 of 9 elements are wrong"),
                   ("plot(x)", "ValueError: bad plot")])
    [p] = failure_problems(nb, EX)
    assert "cell 3" in p and "ValueError: bad plot" in p and "neither an exercise" in p


def test_judge_rejects_a_check_that_passes_on_the_stub():
    nb = fake_run([("import numpy", None), ("# Exercise 3.1: write it", None), ("check()", None)])
    [p] = failure_problems(nb, EX)
    assert "passed on the unfinished stub" in p


def test_judge_rejects_a_failure_that_does_not_name_the_exercise():
    nb = fake_run([("import numpy", None), ("# Exercise 3.1: write it", None), ("check()", "KeyError: 'x'")])
    [p] = failure_problems(nb, EX)
    assert "without naming itself" in p


def test_judge_rejects_an_exercise_without_check_cell():
    nb = fake_run([("import numpy", None), ("# Exercise 3.1: write it", None)])
    [p] = failure_problems(nb, EX)
    assert "no check cell" in p


def test_judge_of_shown_errors_accepts_a_short_message():
    nb = fake_run([("x = 1", None), ("check()", "ExerciseFailed: Exercise 3.1 (dx): 3 of 9 elements are wrong")])
    assert shown_error_problems(nb, {0: {"return 3 * x"}}) == []


def test_judge_of_shown_errors_rejects_frames_answers_and_length():
    frame = "ExerciseFailed: Exercise 3.1\nFile /x/llmc_lessons/checks/layernorm.py:40, in check()\n  want = 3 * x"
    [p] = shown_error_problems(fake_run([("check()", frame)]), {})
    assert "frame of the package's code (llmc_lessons/checks/layernorm.py)" in p
    [p] = shown_error_problems(fake_run([("check()", "ExerciseFailed: want = -(-n // bs)")]), {1: {"-(-n // bs)"}})
    assert "a line of an answer: '-(-n // bs)'" in p
    [p] = shown_error_problems(fake_run([("check()", "ExerciseFailed: x" + "\n  y" * 30)]), {})
    assert "shows 31 lines of error" in p


def test_answer_lines_are_what_the_solution_has_and_the_student_does_not():
    sol = synthetic_solution()
    found = answer_lines(sol, exercises.to_student(sol, "07_synthetic.ipynb"))
    assert found == {2: {"return 3 * x"}, 5: {"n_tokens = 4"}, 7: {"out[i] = 2.0f * inp[i];"}}


def test_judge_skips_markdown_between_exercise_and_check():
    nb = fake_run([("import numpy", None), ("# Exercise 3.1: write it", None)])
    nb.cells.append(nbformat.v4.new_markdown_cell("Now check it."))
    nb.cells.append(fake_run([("check()", "AssertionError: Exercise 3.1 is not done yet")]).cells[0])
    assert failure_problems(nb, EX) == []


SYNTHETIC = [
    ("md", "# A tiny lesson\nEverything a real lesson does, in three exercises."),
    ("code", "import numpy as np\nfrom llmc_lessons import device\n"
             "from llmc_lessons.checks import assert_close, poisoned, run_exercise, passed\n"
             "from llmc_lessons.cuda import RawKernel"),
    ("code", "def scale_forward(x):\n    # Exercise 7.1: multiply x by 3\n    ### BEGIN SOLUTION\n"
             "    return 3 * x\n    ### END SOLUTION"),
    ("md", "The check:"),
    ("code", "x = np.arange(5.0)\nassert_close('Exercise 7.1', 'out', run_exercise('Exercise 7.1', scale_forward, x), 3 * x)\n"
             "passed('Exercise 7.1')"),
    ("code", "# Exercise 7.2: the number of tokens\n### BEGIN SOLUTION\nn_tokens = 4\n### END SOLUTION"),
    ("code", "assert n_tokens == 4, 'Exercise 7.2: n_tokens should be 4'"),
    ("code", "# Exercise 7.3: write out[i] = 2 * inp[i]\nsrc = r'''\n"
             "extern \"C\" __global__ void twice(float* out, const float* inp, int n) {\n"
             "    int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
             "    if (i < n) {\n        // BEGIN SOLUTION\n        out[i] = 2.0f * inp[i];\n        // END SOLUTION\n"
             "    }\n}\n'''"),
    ("code", "n = 45\ninp = device.to_device(np.arange(n, dtype=np.float32))\nout = poisoned((n,))\n"
             "RawKernel(src, 'twice')((2,), (32,), (out, inp, np.int32(n)))\n"
             "assert_close('Exercise 7.3', 'out', out, 2 * device.to_host(inp))\npassed('Exercise 7.3')"),
    ("code", "print('the rest of the lesson uses the reference, so it runs')"),
]


def synthetic_solution():
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_markdown_cell(t) if k == "md" else nbformat.v4.new_code_cell(t) for k, t in SYNTHETIC]
    return nb


@pytest.mark.notebook
@pytest.mark.slow
def test_judge_on_a_real_run_of_a_synthetic_lesson(tmp_path, current_env_kernel):
    """Solution runs clean; its student version fails exactly at the three checks; a broken one is caught."""
    name = "07_synthetic.ipynb"
    sol = synthetic_solution()
    found = exercises.exercise_cells(sol, name)
    assert [f[1] for f in found] == ["7.1", "7.2", "7.3"]

    ran = execute(exercises.normalize(sol, name), tmp_path, current_env_kernel)
    assert [i for i, c in enumerate(ran.cells) if errors(c)] == []

    student = exercises.to_student(sol, name)
    student.cells.append(nbformat.v4.new_code_cell("raise RuntimeError('a bug outside any exercise')"))
    ran = execute(student, tmp_path, current_env_kernel)
    assert [i for i, c in enumerate(ran.cells) if errors(c)] == [4, 5, 6, 8, 10]
    assert "is not done yet" in errors(ran.cells[4])
    assert "elements are NaN" in errors(ran.cells[8])
    problems = failure_problems(ran, found)
    assert len(problems) == 1 and "cell 10" in problems[0] and "a bug outside any exercise" in problems[0]
    assert shown_error_problems(ran, answer_lines(sol, student)) == []
