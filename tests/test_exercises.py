"""The exercise generator: solutions/*.ipynb -> notebooks/*.ipynb, on small synthetic notebooks."""
from __future__ import annotations

import ast
import json
import re

import nbformat
import pytest

from llmc_lessons import exercises as ex
from llmc_lessons.exercises import ExerciseError

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def notebook(*cells):
    """A notebook from ('md', text) / ('code', text) pairs, with outputs and noisy metadata like a real one."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python", "version": "3.11.7"},
                   "widgets": {"state": {}}}
    for i, (kind, text) in enumerate(cells):
        if kind == "md":
            nb.cells.append(nbformat.v4.new_markdown_cell(text))
        else:
            c = nbformat.v4.new_code_cell(text, execution_count=i + 1)
            c.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hi\n")]
            c.metadata = {"collapsed": False, "tags": ["keep"]} if i == 1 else {"scrolled": True}
            nb.cells.append(c)
    return nb


PY_EXERCISE = '''\
def layernorm_forward(inp, weight, bias, eps=1e-5):
    # Exercise 3.1: compute mean and rstd over the last axis
    mean = inp.mean(-1, keepdims=True)
    ### BEGIN SOLUTION
    var = ((inp - mean) ** 2).mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    ### END SOLUTION
    return (inp - mean) * rstd * weight + bias'''

CUDA_EXERCISE = '''\
# Exercise 3.2: write the body of the kernel
src = r"""
extern "C" __global__ void scale(float* out, const float* inp, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        // BEGIN SOLUTION
        out[i] = 2.0f * inp[i];
        // END SOLUTION
    }
}
"""'''


def lesson():
    return notebook(("md", "# Lesson 3\n\n`### BEGIN SOLUTION` in Markdown is only text."),
                    ("code", "import numpy as np"),
                    ("code", PY_EXERCISE),
                    ("code", "check_layernorm_forward(layernorm_forward)"),
                    ("md", "Now the kernel."),
                    ("code", CUDA_EXERCISE),
                    ("code", "check_scale(src)"))


def student_source(nb, index):
    return nb.cells[index].source


# ---------------------------------------------------------------------------------------------------------
# Finding exercises and replacing regions

def test_exercise_cells_lists_index_number_description():
    found = ex.exercise_cells(lesson(), "03_layernorm.ipynb")
    assert found == [(2, "3.1", "compute mean and rstd over the last axis"), (5, "3.2", "write the body of the kernel")]
    assert found[1].index == 5 and found[1].number == "3.2" and found[1].description.startswith("write")


def test_python_region_becomes_raise_at_its_indentation():
    nb = ex.to_student(lesson(), "03_layernorm.ipynb")
    src = student_source(nb, 2)
    assert src.splitlines() == [
        "def layernorm_forward(inp, weight, bias, eps=1e-5):",
        "    # Exercise 3.1: compute mean and rstd over the last axis",
        "    mean = inp.mean(-1, keepdims=True)",
        '    raise NotImplementedError("Exercise 3.1: compute mean and rstd over the last axis")',
        "    return (inp - mean) * rstd * weight + bias",
    ]
    assert "var" not in src and "SOLUTION" not in src
    ast.parse(src)


def test_cuda_region_becomes_todo_comment_at_its_indentation():
    nb = ex.to_student(lesson(), "03_layernorm.ipynb")
    lines = student_source(nb, 5).splitlines()
    assert "        // TODO (Exercise 3.2): write the body of the kernel" in lines
    assert not any("2.0f" in ln or "SOLUTION" in ln for ln in lines)
    assert lines[0] == "# Exercise 3.2: write the body of the kernel"
    assert lines[-3:] == ["    }", "}", '"""']
    ast.parse(student_source(nb, 5))


def test_top_level_region_and_several_regions_in_one_cell():
    code = ("# Exercise 1.1: encode and decode\n"
            "### BEGIN SOLUTION\n"
            "ids = enc.encode(text)\n"
            "### END SOLUTION\n"
            "print(len(ids))\n"
            "for t in ids[:3]:\n"
            "    ### BEGIN SOLUTION\n"
            "    print(enc.decode([t]))\n"
            "    ### END SOLUTION\n"
            "k = r'''\n"
            "  // BEGIN SOLUTION\n"
            "  x = 1;\n"
            "  // END SOLUTION\n"
            "'''\n")
    nb = ex.to_student(notebook(("code", code)), "01_tokens.ipynb")
    assert nb.cells[0].source == (
        "# Exercise 1.1: encode and decode\n"
        'raise NotImplementedError("Exercise 1.1: encode and decode")\n'
        "print(len(ids))\n"
        "for t in ids[:3]:\n"
        '    raise NotImplementedError("Exercise 1.1: encode and decode")\n'
        "k = r'''\n"
        "  // TODO (Exercise 1.1): encode and decode\n"
        "'''\n")
    ast.parse(nb.cells[0].source)


def test_description_with_quotes_and_backslashes_gives_valid_python():
    code = '# Exercise 2.1: return "dwte" and \\ "dwpe" — both\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION'
    nb = ex.to_student(notebook(("code", code)), "02_embeddings.ipynb")
    tree = ast.parse(nb.cells[0].source)
    raise_node = tree.body[0]
    assert isinstance(raise_node, ast.Raise)
    assert raise_node.exc.args[0].value == 'Exercise 2.1: return "dwte" and \\ "dwpe" — both'


def test_markers_tolerate_spacing_and_tabs():
    code = "# Exercise 4.1:   tidy  \n\t###   BEGIN SOLUTION\n\tx = 1\n\t### END   SOLUTION\n"
    nb = ex.to_student(notebook(("code", code)), "04_matmul.ipynb")
    assert nb.cells[0].source == '# Exercise 4.1:   tidy  \n\traise NotImplementedError("Exercise 4.1: tidy")\n'


def test_markdown_cells_and_non_exercise_cells_are_kept_verbatim():
    sol = lesson()
    nb = ex.to_student(sol, "03_layernorm.ipynb")
    for i in (0, 1, 3, 4, 6):
        assert nb.cells[i].source == sol.cells[i].source
    assert len(nb.cells) == len(sol.cells)
    assert [c.cell_type for c in nb.cells] == [c.cell_type for c in sol.cells]


def test_to_student_does_not_modify_the_solution():
    sol = lesson()
    before = json.dumps(sol, sort_keys=True)
    ex.to_student(sol, "03_layernorm.ipynb")
    assert json.dumps(sol, sort_keys=True) == before


# ---------------------------------------------------------------------------------------------------------
# Normalisation and the written text

def test_outputs_counts_metadata_and_ids_are_normalised():
    nb = ex.to_student(lesson(), "03_layernorm.ipynb")
    assert nb.metadata == {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    assert nb.nbformat == 4 and nb.nbformat_minor == 5
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None
    kept = [{k: v for k, v in c.metadata.items() if k != "nbgrader"} for c in nb.cells]  # tests/test_nbgrader.py
    assert kept[1] == {"tags": ["keep"]}
    assert all(m == {} for i, m in enumerate(kept) if i != 1)
    ids = [c.id for c in nb.cells]
    assert ids == [f"03_layernorm-{i:03d}" for i in range(len(nb.cells))]
    nbformat.validate(nb)


def test_missing_kernelspec_gets_the_default():
    nb = notebook(("code", "x = 1"))
    nb.metadata = {}
    assert ex.normalize(nb, "05_attention.ipynb").metadata["kernelspec"] == KERNELSPEC


def test_dumps_is_deterministic_indent_1_with_trailing_newline():
    a = ex.dumps(ex.to_student(lesson(), "03_layernorm.ipynb"))
    b = ex.dumps(ex.to_student(lesson(), "03_layernorm.ipynb"))
    assert a == b
    assert a.endswith("}\n") and not a.endswith("\n\n")
    assert a.startswith('{\n "cells": [\n  {\n')
    assert json.loads(a)["cells"][2]["id"] == "03_layernorm-002"


def test_normalize_keeps_solutions_complete_and_strips_outputs():
    sol = lesson()
    assert ex.has_outputs(sol)
    nb = ex.normalize(sol, "03_layernorm.ipynb")
    assert not ex.has_outputs(nb)
    assert nb.cells[2].source == PY_EXERCISE


# ---------------------------------------------------------------------------------------------------------
# Errors: each names the notebook and the cell

def error_for(code, name="03_layernorm.ipynb", *more):
    nb = notebook(("md", "intro"), ("code", code), *more)
    with pytest.raises(ExerciseError) as info:
        ex.to_student(nb, name)
    msg = str(info.value)
    assert name in msg and "cell 1" in msg, msg
    return msg


def test_error_begin_without_end():
    msg = error_for("# Exercise 3.1: a\n### BEGIN SOLUTION\nx = 1\n")
    assert "never closed" in msg and "line 2" in msg


def test_error_end_without_begin():
    msg = error_for("# Exercise 3.1: a\nx = 1\n### END SOLUTION\n")
    assert "no BEGIN SOLUTION" in msg and "line 3" in msg


def test_error_nested_regions():
    msg = error_for("# Exercise 3.1: a\n### BEGIN SOLUTION\n// BEGIN SOLUTION\n// END SOLUTION\n### END SOLUTION")
    assert "nested" in msg


def test_error_python_begin_closed_by_cuda_end():
    msg = error_for("# Exercise 3.1: a\n### BEGIN SOLUTION\nx = 1\n// END SOLUTION\n")
    assert "### END SOLUTION" in msg


def test_error_region_without_exercise_line():
    msg = error_for("### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n")
    assert "# Exercise N.k: <description>" in msg


def test_error_region_with_malformed_exercise_line_names_it():
    msg = error_for("# Exercise 3.1 compute x\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n")
    assert "'# Exercise 3.1 compute x' is not of that form" in msg


def test_error_exercise_line_without_region():
    msg = error_for("# Exercise 3.1: a\nx = 1\n")
    assert "no '### BEGIN SOLUTION'" in msg


def test_error_two_exercises_in_one_cell():
    msg = error_for("# Exercise 3.1: a\n# Exercise 3.2: b\n### BEGIN SOLUTION\n### END SOLUTION")
    assert "several exercise headers" in msg


def test_error_extra_text_on_marker_line():
    msg = error_for("# Exercise 3.1: a\n### BEGIN SOLUTION here\nx = 1\n### END SOLUTION")
    assert "alone on its line" in msg


def test_error_lesson_number_differs_from_file_prefix():
    msg = error_for("# Exercise 4.1: a\n### BEGIN SOLUTION\n### END SOLUTION", "03_layernorm.ipynb")
    assert "lesson 4" in msg and "lesson 3" in msg and "Exercise 3.1" in msg


def test_error_numbers_out_of_order():
    msg = error_for("# Exercise 3.2: a\n### BEGIN SOLUTION\n### END SOLUTION")
    assert "skips a number" in msg and "Exercise 3.1" in msg


def test_error_duplicated_number():
    code = "# Exercise 3.1: a\n### BEGIN SOLUTION\n### END SOLUTION"
    nb = notebook(("code", code), ("code", "check()"), ("code", code))
    with pytest.raises(ExerciseError, match=r"03_x.ipynb, cell 2 .*duplicates an earlier number.*Exercise 3.2"):
        ex.to_student(nb, "03_x.ipynb")


def test_a_lesson_may_start_at_exercise_n_0_and_only_there():
    first = "# Exercise 3.0: the forward\n### BEGIN SOLUTION\n### END SOLUTION"
    then = "# Exercise 3.1: a\n### BEGIN SOLUTION\n### END SOLUTION"
    nb = notebook(("code", first), ("code", "check()"), ("code", then))
    assert [e.number for e in ex.exercise_cells(nb, "03_x.ipynb")] == ["3.0", "3.1"]
    late = notebook(("code", then), ("code", "check()"), ("code", first))
    with pytest.raises(ExerciseError, match=r"cell 2 .*duplicates an earlier number.*Exercise 3.2"):
        ex.to_student(late, "03_x.ipynb")


def test_error_exercise_in_notebook_without_lesson_number():
    msg = error_for("# Exercise 3.1: a\n### BEGIN SOLUTION\n### END SOLUTION", "scratch.ipynb")
    assert "NN_" in msg


def test_notebook_without_exercises_needs_no_lesson_number():
    nb = ex.to_student(notebook(("code", "x = 1")), "scratch.ipynb")
    assert nb.cells[0].source == "x = 1"


# ---------------------------------------------------------------------------------------------------------
# build / check / normalize on a repository laid out in a temporary directory

@pytest.fixture
def repo(tmp_path):
    (tmp_path / "solutions").mkdir()
    nbformat.write(lesson(), str(tmp_path / "solutions" / "03_layernorm.ipynb"))
    nbformat.write(notebook(("code", "print('welcome')")), str(tmp_path / "solutions" / "00_welcome.ipynb"))
    return tmp_path


def test_build_then_check_is_clean_and_build_is_idempotent(repo):
    changed = ex.build(repo)
    assert sorted(p.name for p in changed) == ["00_welcome.ipynb", "03_layernorm.ipynb"]
    text = (repo / "notebooks" / "03_layernorm.ipynb").read_text()
    assert "raise NotImplementedError" in text and "rstd = 1.0" not in text
    ex.normalize_solutions(repo)
    assert ex.check(repo) == []
    assert ex.build(repo) == []


def test_check_reports_stale_missing_extra_and_outputs(repo):
    ex.build(repo)
    ex.normalize_solutions(repo)
    stale = repo / "notebooks" / "03_layernorm.ipynb"
    older = nbformat.reads(stale.read_text().replace("Exercise 3.1", "Exercise 3.9"), as_version=4)
    stale.write_text(ex.dumps(ex.normalize(older, stale.name)))   # as the builder wrote an older solution
    (repo / "notebooks" / "00_welcome.ipynb").unlink()
    (repo / "notebooks" / "99_old.ipynb").write_text(ex.dumps(ex.normalize(notebook(), "99_old.ipynb")))
    nbformat.write(lesson(), str(repo / "solutions" / "03_layernorm.ipynb"))  # with outputs again
    problems = ex.check(repo)
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert "notebooks/03_layernorm.ipynb is out of date" in text
    assert "notebooks/00_welcome.ipynb is missing" in text
    assert "notebooks/99_old.ipynb has no solutions/99_old.ipynb" in text
    assert "solutions/03_layernorm.ipynb stores outputs" in text
    ex.build(repo)   # a notebook as the builder wrote it is not a student's work: removed
    assert not (repo / "notebooks" / "99_old.ipynb").exists()


def test_check_reports_a_broken_solution(repo):
    ex.build(repo)
    ex.normalize_solutions(repo)
    bad = notebook(("code", "# Exercise 3.1: a\n### BEGIN SOLUTION\n"))
    nbformat.write(ex.normalize(bad, "03_layernorm.ipynb"), str(repo / "solutions" / "03_layernorm.ipynb"))
    problems = ex.check(repo)
    assert len(problems) == 1 and "never closed" in problems[0] and "03_layernorm.ipynb" in problems[0]


def test_build_with_a_broken_solution_writes_nothing(repo):
    nbformat.write(notebook(("code", "// END SOLUTION")), str(repo / "solutions" / "05_attention.ipynb"))
    with pytest.raises(ExerciseError, match="05_attention.ipynb, cell 0"):
        ex.build(repo)
    assert not (repo / "notebooks").exists() or not list((repo / "notebooks").iterdir())


def test_normalize_solutions_strips_outputs_in_place(repo):
    changed = ex.normalize_solutions(repo)
    assert len(changed) == 2
    nb = nbformat.read(str(repo / "solutions" / "03_layernorm.ipynb"), as_version=4)
    assert not ex.has_outputs(nb) and nb.cells[3].source == PY_EXERCISE  # after the setup cell
    assert ex.normalize_solutions(repo) == []


def test_cli_exit_codes_and_messages(repo, capsys):
    root = ["--root", str(repo)]
    assert ex.main(["build", *root]) == 0
    assert "2 file(s) in notebooks/ changed" in capsys.readouterr().out
    assert ex.main(["check", *root]) == 1  # the solutions still store outputs
    assert "stores outputs" in capsys.readouterr().err
    assert ex.main(["normalize", *root]) == 0
    assert ex.main(["check", *root]) == 0
    assert "in sync" in capsys.readouterr().out
    assert ex.main(["list", *root]) == 0
    assert "Exercise 3.2: write the body of the kernel" in capsys.readouterr().out
    (repo / "notebooks" / "00_welcome.ipynb").unlink()
    assert ex.main(["check", *root]) == 1
    assert "00_welcome.ipynb is missing" in capsys.readouterr().err
    nbformat.write(notebook(("code", "### END SOLUTION")), str(repo / "solutions" / "04_matmul.ipynb"))
    assert ex.main(["build", *root]) == 2
    assert "error: " in capsys.readouterr().err


def test_find_root_without_solutions_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no solutions/ directory"):
        ex.find_root(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# An answer never ships; a student's work is never lost


@pytest.mark.parametrize("marker", ["## BEGIN SOLUTION", "// begin solution", "#BEGIN SOLUTION", "# BEGIN SOLUTION",
                                    "BEGIN SOLUTIONS", "### BEGIN SOLUTIONS", "### BEGIN_SOLUTION",
                                    "/* BEGIN SOLUTION */", "### Begin Solution", "//BEGIN-SOLUTION"])
def test_a_near_miss_marker_is_an_error_naming_notebook_cell_and_line(marker):
    nb = notebook(("md", "intro"), ("code", f"def f():\n    # Exercise 3.1: f\n    {marker}\n    return 42\n"))
    with pytest.raises(ExerciseError, match=r"03_x.ipynb, cell 1 .*, line 3: .* looks like a solution marker"):
        ex.to_student(nb, "03_x.ipynb")


def test_a_near_miss_end_marker_is_an_error_not_an_unclosed_region():
    nb = notebook(("code", "# Exercise 3.1: f\n### BEGIN SOLUTION\nx = 42\n## END SOLUTION\n"))
    with pytest.raises(ExerciseError, match=r"line 4: '## END SOLUTION' looks like a solution marker"):
        ex.to_student(nb, "03_x.ipynb")


def test_a_marker_outside_a_code_or_markdown_cell_is_an_error():
    nb = notebook()
    nb.cells.append(nbformat.v4.new_raw_cell("Lesson\n### BEGIN SOLUTION\nthe answer\n### END SOLUTION"))
    with pytest.raises(ExerciseError, match=r"cell 0 .*, line 2: a solution marker '### BEGIN SOLUTION' in a "
                                            r"raw cell"):
        ex.to_student(nb, "03_x.ipynb")


def test_a_code_cells_marker_in_markdown_is_an_error():
    nb = notebook(("md", "Lesson\n### BEGIN SOLUTION\nthe answer\n### END SOLUTION"))
    with pytest.raises(ExerciseError, match=r"cell 0 .*, line 2: '### BEGIN SOLUTION' looks like a solution marker"):
        ex.to_student(nb, "03_x.ipynb")


def test_marker_words_inside_code_are_fine():
    nb = notebook(("code", 'print("BEGIN SOLUTION")\n# the END SOLUTION line closes a region'))
    assert ex.to_student(nb, "03_x.ipynb").cells[0].source == nb.cells[0].source


def test_build_and_check_refuse_a_near_miss_marker_and_write_nothing(repo):
    ex.build(repo)
    before = {p.name: p.read_text() for p in (repo / "notebooks").iterdir()}
    nbformat.write(notebook(("code", "# Exercise 4.1: m\n// begin solution\nanswer = 1\n// end solution")),
                   str(repo / "solutions" / "04_matmul.ipynb"))
    with pytest.raises(ExerciseError, match="04_matmul.ipynb, cell 0"):
        ex.build(repo)
    assert {p.name: p.read_text() for p in (repo / "notebooks").iterdir()} == before
    assert any("looks like a solution marker" in p for p in ex.check(repo))


def test_build_refuses_an_empty_solutions_folder(repo):
    ex.build(repo)
    for p in (repo / "solutions").iterdir():
        p.unlink()
    with pytest.raises(ExerciseError, match="holds no notebooks"):
        ex.build(repo, force=True)
    assert len(list((repo / "notebooks").iterdir())) == 2


def _answered(text):
    nb = nbformat.reads(text, as_version=4)
    stub = 'raise NotImplementedError("Exercise 3.1: compute mean and rstd over the last axis")'
    assert stub in nb.cells[3].source   # cell 0 is the setup cell
    nb.cells[3].source = nb.cells[3].source.replace(stub, "rstd = 1.0  # my answer")
    return ex.dumps(nb)


def _run(text):
    nb = nbformat.reads(text, as_version=4)
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", name="stdout", text="hi\n")]
    nb.cells[2].execution_count = 1
    return ex.dumps(nb)


def _saved_by_jupyter(text):
    nb = nbformat.reads(text, as_version=4)
    nb.metadata["language_info"]["version"] = "3.11.7"
    return ex.dumps(nb)


@pytest.mark.parametrize("work, why", [
    (_answered, "the stub of Exercise 3.1 (cell 3) was replaced by an answer"),
    (_run, "it stores outputs or execution counts"),
    (_saved_by_jupyter, "it was saved by Jupyter or edited"),
    (lambda text: text[: len(text) // 2], "it is not a readable notebook"),
])
def test_build_never_overwrites_a_students_work_without_force(repo, work, why, capsys):
    ex.build(repo)
    student = repo / "notebooks" / "03_layernorm.ipynb"
    student.write_text(work(student.read_text()))
    mine = student.read_text()
    changed = lesson()
    changed.cells[0].source = "# Lesson 3, revised"
    nbformat.write(changed, str(repo / "solutions" / "03_layernorm.ipynb"))
    with pytest.raises(ExerciseError, match=re.escape(f"notebooks/03_layernorm.ipynb: {why}")) as e:
        ex.build(repo)
    assert "--force" in str(e.value) and student.read_text() == mine
    assert ex.main(["build", "--root", str(repo)]) == 2 and "03_layernorm.ipynb" in capsys.readouterr().err
    assert ex.main(["build", "--root", str(repo), "--force"]) == 0
    assert "# Lesson 3, revised" in student.read_text() and ex.check(repo) != []   # solutions store outputs


def test_build_replaces_a_stale_generated_notebook_and_keeps_a_worked_orphan(repo):
    ex.build(repo)
    changed = lesson()
    changed.cells[0].source = "# Lesson 3, revised"
    nbformat.write(changed, str(repo / "solutions" / "03_layernorm.ipynb"))
    orphan = repo / "notebooks" / "07_old.ipynb"
    orphan.write_text(_run((repo / "notebooks" / "03_layernorm.ipynb").read_text()))
    with pytest.raises(ExerciseError, match="notebooks/07_old.ipynb: it stores outputs"):
        ex.build(repo)
    orphan.unlink()
    assert [p.name for p in ex.build(repo)] == ["03_layernorm.ipynb"]   # as the builder wrote it: replaced


def test_writes_are_atomic(repo, monkeypatch):
    ex.build(repo)
    student = repo / "notebooks" / "03_layernorm.ipynb"
    before = student.read_text()
    changed = lesson()
    changed.cells[0].source = "# Lesson 3, revised"
    nbformat.write(changed, str(repo / "solutions" / "03_layernorm.ipynb"))

    def disk_full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("os.replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ex.build(repo)
    assert student.read_text() == before
    assert [p.name for p in (repo / "notebooks").iterdir() if p.name.endswith(".tmp")] == []


def test_normalize_checks_every_notebook_before_rewriting_any(repo):
    broken = notebook(("code", "# Exercise 5.1: a\n### BEGIN SOLUTION\n"))
    nbformat.write(broken, str(repo / "solutions" / "05_z.ipynb"))
    before = {p.name: p.read_text() for p in (repo / "solutions").iterdir()}
    with pytest.raises(ExerciseError, match="05_z.ipynb"):
        ex.normalize_solutions(repo)
    assert {p.name: p.read_text() for p in (repo / "solutions").iterdir()} == before


# ---------------------------------------------------------------------------------------------------------
# Markdown solution regions: a worked derivation hidden from the student, who is asked to derive it

DERIVATION = ("## The backward pass\n\nThe chain rule gives:\n<!-- BEGIN SOLUTION -->\n"
              "$$\\frac{\\partial L}{\\partial x} = 2x$$\n\nbecause the derivative of x^2 is 2x.\n"
              "<!-- END SOLUTION -->\nThe boxed result follows.")


def derivation_lesson():
    return notebook(("md", DERIVATION), ("code", "import numpy as np"),
                    ("code", "# Exercise 3.1: dx of x**2\ndef dx(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n"
                             "    ### END SOLUTION"),
                    ("code", "check_dx(dx)"))


def test_a_markdown_region_becomes_a_prompt_naming_the_exercise_after_it():
    sol = derivation_lesson()
    nb = ex.to_student(sol, "03_x.ipynb")
    text = nb.cells[0].source
    assert "2x" not in text and "derivative of x^2" not in text and "SOLUTION" not in text
    assert text.startswith("## The backward pass\n\nThe chain rule gives:\n\n> **Derive it (Exercise 3.1).**")
    assert text.endswith("if one is.\n\nThe boxed result follows.")   # a paragraph of its own
    assert ex.DERIVATION_RE.match(text.split("\n")[4])
    assert nb.cells[0].metadata["tags"] == [ex.DERIVATION_TAG] and "tags" not in sol.cells[0].metadata
    assert nb.cells[2].source.endswith('raise NotImplementedError("Exercise 3.1: dx of x**2")')


def test_several_markdown_regions_and_several_cells_each_name_the_next_exercise():
    two = "a\n\n<!-- BEGIN SOLUTION -->\nANSWER_A\n<!-- END SOLUTION -->\n\nb\n\n<!-- BEGIN SOLUTION -->\nANSWER_B\n<!-- END SOLUTION -->"
    sol = notebook(("md", two), ("code", "# Exercise 5.1: f\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION"),
                   ("code", "check()"), ("md", "<!-- BEGIN SOLUTION -->\nANSWER_C\n<!-- END SOLUTION -->"),
                   ("code", "# Exercise 5.2: g\n### BEGIN SOLUTION\ny = 2\n### END SOLUTION"), ("code", "check()"))
    nb = ex.to_student(sol, "05_x.ipynb")
    assert nb.cells[0].source.count("> **Derive it (Exercise 5.1).**") == 2
    assert "ANSWER_A" not in nb.cells[0].source and "ANSWER_B" not in nb.cells[0].source
    assert nb.cells[3].source.startswith("> **Derive it (Exercise 5.2).**") and "ANSWER_C" not in nb.cells[3].source


@pytest.mark.parametrize("text, error", [
    ("x\n<!-- BEGIN SOLUTION -->\nanswer", r"cell 0 .*, line 2: '<!-- BEGIN SOLUTION -->' is never closed"),
    ("x\nanswer\n<!-- END SOLUTION -->", r"cell 0 .*, line 3: '<!-- END SOLUTION -->' has no '<!-- BEGIN SOLUTION"),
    ("<!-- BEGIN SOLUTION -->\n<!-- BEGIN SOLUTION -->\na\n<!-- END SOLUTION -->",
     r"line 2: '<!-- BEGIN SOLUTION -->' opens a region inside the region opened at line 1"),
    ("<!-- begin solution -->\na\n<!-- END SOLUTION -->", r"line 1: '<!-- begin solution -->' looks like a solution "
                                                          r"marker but is not one"),
    ("<!-- BEGIN SOLUTIONS -->\na\n<!-- END SOLUTION -->", r"line 1: .* looks like a solution marker"),
    ("<!--BEGIN SOLUTION--> the answer\n<!-- END SOLUTION -->", r"line 1: .* looks like a solution marker"),
    ("### BEGIN SOLUTION\na\n### END SOLUTION", r"line 1: '### BEGIN SOLUTION' looks like a solution marker .* "
                                                r"in a Markdown cell write '<!-- BEGIN SOLUTION -->'"),
])
def test_unbalanced_or_misspelled_markdown_markers_are_errors_naming_notebook_and_cell(text, error):
    nb = notebook(("md", text), ("code", "# Exercise 3.1: f\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION"))
    with pytest.raises(ExerciseError, match=r"03_x.ipynb, cell 0 \(markdown cell starting .*\)" + ".*" + error
                       if not error.startswith("cell") else r"03_x.ipynb, " + error):
        ex.to_student(nb, "03_x.ipynb")


def test_a_markdown_region_with_no_exercise_after_it_is_an_error():
    nb = notebook(("code", "# Exercise 3.1: f\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION"),
                  ("md", "Why:\n<!-- BEGIN SOLUTION -->\nbecause\n<!-- END SOLUTION -->"))
    with pytest.raises(ExerciseError, match=r"03_x.ipynb, cell 1 .*, line 2: a Markdown SOLUTION region with no "
                                            r"exercise after it"):
        ex.to_student(nb, "03_x.ipynb")


def test_the_markdown_marker_in_a_code_cell_is_a_near_miss():
    nb = notebook(("code", "# Exercise 3.1: f\nsrc = '''\n<!-- BEGIN SOLUTION -->\nx\n<!-- END SOLUTION -->\n'''"))
    with pytest.raises(ExerciseError, match=r"line 3: '<!-- BEGIN SOLUTION -->' looks like a solution marker"):
        ex.to_student(nb, "03_x.ipynb")


def test_a_derivation_cell_is_read_only_for_nbgrader_in_both_notebooks():
    sol = ex.normalize(derivation_lesson(), "03_x.ipynb")
    student = ex.to_student(derivation_lesson(), "03_x.ipynb")
    for nb in (sol, student):
        meta = nb.cells[0].metadata["nbgrader"]
        assert not meta["solution"] and not meta["grade"] and meta["locked"] and meta["grade_id"] == nb.cells[0].id
        assert nb.cells[2].metadata["nbgrader"]["grade_id"] == "exercise-3-1"
        assert nb.cells[3].metadata["nbgrader"]["grade_id"] == "check-3-1"
    assert ex.dumps(ex.normalize(student, "03_x.ipynb")) == ex.dumps(student)   # normal form is stable
    assert ex.derivation_cells(derivation_lesson(), "03_x.ipynb") == [(0, "3.1")]


def test_list_shows_each_derivation_before_its_exercise(derivation_repo, capsys):
    assert ex.main(["list", "--root", str(derivation_repo)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "03_x.ipynb  cell   0  (derivation, checked by Exercise 3.1)", "03_x.ipynb  cell   2  Exercise 3.1: dx of x**2"]


@pytest.fixture
def derivation_repo(tmp_path):
    (tmp_path / "solutions").mkdir()
    nbformat.write(derivation_lesson(), str(tmp_path / "solutions" / "03_x.ipynb"))
    return tmp_path


def _prompt_edited(nb):
    nb.cells[1].source = nb.cells[1].source.replace("Work it out on paper first", "d/dx x^2 = 2x, I think")


def _prompt_deleted(nb):
    lines = nb.cells[1].source.split("\n")
    nb.cells[1].source = "\n".join(ln for ln in lines if not ex.DERIVATION_RE.match(ln)) + "\nMy derivation: 2x."


@pytest.mark.parametrize("work, why", [
    (_prompt_edited, "the prompt to derive it (cell 1) was replaced or edited"),
    (_prompt_deleted, "the prompt to derive it (cell 1) was replaced or edited"),
])
def test_build_keeps_a_derivation_the_student_wrote(derivation_repo, work, why):
    ex.build(derivation_repo)
    ex.normalize_solutions(derivation_repo)
    assert ex.check(derivation_repo) == []
    student = derivation_repo / "notebooks" / "03_x.ipynb"
    nb = nbformat.reads(student.read_text(), as_version=4)   # cell 0 is the setup cell
    work(nb)
    student.write_text(ex.dumps(nb))
    changed = derivation_lesson()
    changed.cells[1].source = "import numpy as np  # revised"
    nbformat.write(changed, str(derivation_repo / "solutions" / "03_x.ipynb"))
    with pytest.raises(ExerciseError, match=re.escape(f"notebooks/03_x.ipynb: {why}")):
        ex.build(derivation_repo)
    assert ex.student_work(student) is not None


# ---------------------------------------------------------------------------------------------------------
# report: a teacher's view of a student's notebooks folder (runs copies in a fresh kernel)

def _student(*cells):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": dict(KERNELSPEC)})
    nb.cells = [nbformat.v4.new_markdown_cell(text) if kind == "md" else nbformat.v4.new_code_cell(text)
                for kind, text in cells]
    return nb


CHECK = ("class ExerciseFailed(AssertionError):\n    pass\n\n"
         "def check(ex, ok, why):\n    if not ok:\n        raise ExerciseFailed(f'{ex} ({why}): 3 of 9 elements are wrong.\\n  hint: more')\n"
         "    print(f'{ex}: correct')")


@pytest.mark.notebook
def test_report_runs_copies_and_judges_every_exercise(tmp_path, current_env_kernel, capsys):
    folder = tmp_path / "student"
    folder.mkdir()
    first = _student(("code", CHECK), ("code", "# Exercise 3.1: f\ndef f():\n    return 2"),
                     ("code", "check('Exercise 3.1', f() == 2, 'f')"), ("md", "Next."),
                     ("code", '# Exercise 3.2: g\ndef g():\n    raise NotImplementedError("Exercise 3.2: g")'),
                     ("code", "try:\n    g()\nexcept NotImplementedError:\n"
                              "    raise ExerciseFailed('Exercise 3.2 is not done yet (g)') from None"),
                     ("code", "# Exercise 3.3: h\nh = 1 / 0"), ("code", "check('Exercise 3.3', h == 0, 'h')"),
                     ("code", "# Exercise 3.4: k\nk = 5"), ("code", "check('Exercise 3.4', k == 4, 'k')"))
    slow = _student(("code", "# Exercise 4.1: spin\nimport time\ntime.sleep(60)"), ("code", "print('checked')"),
                    ("code", "# Exercise 4.2: never\nx = 1"), ("code", "print(x)"))
    for name, nb in (("03_x.ipynb", first), ("04_y.ipynb", slow)):
        nbformat.write(nb, str(folder / name))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    rows = ex.report(folder, time_limit=8, kernel_name=current_env_kernel)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before   # the student's files are untouched
    assert [r[:3] for r in rows] == [("03_x.ipynb", "3.1", "pass"), ("03_x.ipynb", "3.2", "fail"),
                                     ("03_x.ipynb", "3.3", "fail"), ("03_x.ipynb", "3.4", "fail"),
                                     ("04_y.ipynb", "4.1", "timed out"), ("04_y.ipynb", "4.2", "not reached")]
    messages = dict(((r[0], r[1]), r[3]) for r in rows)
    assert messages["03_x.ipynb", "3.2"] == "Exercise 3.2 is not done yet (g)"
    assert messages["03_x.ipynb", "3.3"].startswith("NameError: name 'h' is not defined")   # the check's error first
    assert messages["03_x.ipynb", "3.4"] == "Exercise 3.4 (k): 3 of 9 elements are wrong."
    table = ex.format_report(rows)
    assert table.splitlines()[0].split() == ["notebook", "exercise", "result", "message"]
    assert "6 exercises: 1 pass, 3 fail, 1 timed out, 1 not reached" in table


def test_report_refuses_a_folder_without_notebooks_and_bad_arguments(tmp_path, capsys):
    assert ex.main(["report", str(tmp_path)]) == 2
    assert "holds no notebooks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ex.main(["report"])
    with pytest.raises(SystemExit):
        ex.main(["report", str(tmp_path), "--time-limit", "0"])
    with pytest.raises(SystemExit):
        ex.main(["check", str(tmp_path)])
