"""Build the student notebooks (notebooks/) from the solution notebooks (solutions/), and check they agree.

    python -m llmc_lessons.exercises build       # write notebooks/NN_name.ipynb for every solutions/*.ipynb
    python -m llmc_lessons.exercises build --force   # ... even over notebooks that hold a student's work
    python -m llmc_lessons.exercises check       # exit 1, naming the files, if notebooks/ is out of date
    python -m llmc_lessons.exercises normalize   # strip outputs and normalise solutions/*.ipynb in place
    python -m llmc_lessons.exercises list        # every exercise (and derivation) of every lesson
    python -m llmc_lessons.exercises report FOLDER   # run a student's notebooks (copies): which exercises pass

An exercise is a code cell of a solution notebook with one line `# Exercise N.k: <what to write>` (N the
lesson's number, the NN of its file name; k = 1, 2, ... in order of appearance, a first one may be N.0, the
lesson's forward) and one or more regions

    ### BEGIN SOLUTION          (Python: becomes `raise NotImplementedError("Exercise N.k: ...")`)
    ...
    ### END SOLUTION

    // BEGIN SOLUTION           (inside a CUDA source string: becomes `// TODO (Exercise N.k): ...`)
    ...
    // END SOLUTION

each replaced at the indentation of its BEGIN line. A Markdown cell may hold a worked derivation between

    <!-- BEGIN SOLUTION -->
    ...
    <!-- END SOLUTION -->

which becomes one blockquote line asking the student to derive it (`> **Derive it (Exercise N.k).** ...`, N.k the
first exercise after the cell, whose check tests the result). A line that looks like a marker but is not exactly
one (`## BEGIN SOLUTION`, `// begin solution`, `BEGIN SOLUTIONS`, `<!-- begin solution -->`, a code cell's marker
in Markdown, ...) is an error, so that a misspelled marker can never ship an answer. Everything else is kept. Outputs and execution counts
are cleared, cell ids are derived from the notebook's name and the cell's position, and metadata is cut to
what Jupyter needs, so that the generated files (and their diffs) depend on the solution's text only.
`build` and `normalize` put the setup cell (`llmc_lessons.setup_cell`) first, and every cell carries
nbgrader's metadata (`llmc_lessons.nbgrader_meta`).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import nbformat

from llmc_lessons import nbgrader_meta, setup_cell
from llmc_lessons.files import atomic_write

__all__ = ["ExerciseError", "Exercise", "exercise_cells", "derivation_cells", "to_student", "normalize", "dumps",
           "lesson_number", "build", "check", "normalize_solutions", "find_root", "student_work", "report",
           "format_report", "main"]

EXERCISE_RE = re.compile(r"^[ \t]*#[ \t]*Exercise[ \t]+(\d+)\.(\d+)[ \t]*:[ \t]*(\S.*?)[ \t]*$")
LOOSE_EXERCISE_RE = re.compile(r"^[ \t]*#+[ \t]*Exercise\b", re.IGNORECASE)
MARKER_RE = re.compile(r"^([ \t]*)(###|//)[ \t]*(BEGIN|END)[ \t]+SOLUTION\b(.*)$")
MD_MARKER_RE = re.compile(r"^[ \t]*<!--[ \t]*(BEGIN|END)[ \t]+SOLUTION[ \t]*-->[ \t]*$")   # in Markdown cells
# anything a teacher may have meant as a marker: any comment style and case, SOLUTIONS, BEGIN_SOLUTION, ...
NEAR_MARKER_RE = re.compile(r"^[ \t]*(?:#+|/[/*]+|\*+|--|;+|%+|<!-*)?[ \t]*(BEGIN|END)[ \t_-]*SOLUTIONS?\b",
                            re.IGNORECASE)
# the line a Markdown region becomes, and the tag of its cell in the student's notebook: they find it again there
DERIVATION_RE = re.compile(r"^> \*\*Derive it \(Exercise (\d+)\.(\d+)\)\.\*\*")
DERIVATION_TAG = "derivation"
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


class ExerciseError(ValueError):
    """A solution notebook breaks the exercise rules; the message names the notebook and the cell."""


class Exercise(tuple):
    """(cell index, "N.k", description): one exercise of a notebook."""
    __slots__ = ()

    def __new__(cls, index: int, number: str, description: str):
        return super().__new__(cls, (index, number, description))

    index = property(lambda self: self[0])
    number = property(lambda self: self[1])
    description = property(lambda self: self[2])

    def __repr__(self):
        return f"Exercise(index={self[0]}, number={self[1]!r}, description={self[2]!r})"


def _source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _where(name: str, index: int, cell, line: int | None = None) -> str:
    first = next((ln.strip() for ln in _source(cell).splitlines() if ln.strip()), "")
    first = first if len(first) <= 60 else first[:57] + "..."
    at = f", line {line}" if line is not None else ""
    return f"{name}, cell {index} ({cell.get('cell_type', '?')} cell starting {first!r}){at}"


def lesson_number(name: str) -> int | None:
    """The lesson number of a notebook file name: 3 for '03_layernorm.ipynb', None without an NN_ prefix."""
    m = re.match(r"^(\d+)_", Path(name).name)
    return int(m.group(1)) if m else None


def _parse_cell(name: str, index: int, cell):
    """Return (header or None, regions) of a code cell, raising ExerciseError on malformed markers.

    header: (line number, N, k, description); regions: [(kind, begin line, end line, indent)] with 0-based lines.
    """
    lines = _source(cell).split("\n")
    headers, regions, open_region = [], [], None
    for i, line in enumerate(lines):
        m = EXERCISE_RE.match(line)
        if m:
            headers.append((i, int(m.group(1)), int(m.group(2)), m.group(3)))
        m = MARKER_RE.match(line)
        if not m:
            near = NEAR_MARKER_RE.match(line)
            if near:
                which = near.group(1).upper()
                raise ExerciseError(f"{_where(name, index, cell, i + 1)}: {line.strip()!r} looks like a solution "
                                    f"marker but is not one, so the answer would reach the students; write "
                                    f"'### {which} SOLUTION' (Python) or '// {which} SOLUTION' (CUDA source), "
                                    f"in capitals")
            continue
        indent, comment, which, rest = m.groups()
        kind = "python" if comment == "###" else "cuda"
        label = f"{comment} {which} SOLUTION"
        if rest.strip():
            raise ExerciseError(f"{_where(name, index, cell, i + 1)}: '{label}' must stand alone on its line, "
                                f"found extra text {rest.strip()!r}")
        if which == "BEGIN":
            if open_region is not None:
                raise ExerciseError(f"{_where(name, index, cell, i + 1)}: '{label}' opens a region inside the "
                                    f"region opened at line {open_region[1] + 1}: regions cannot be nested "
                                    f"(close the first one with its END SOLUTION line)")
            open_region = (kind, i, indent)
        else:
            if open_region is None:
                raise ExerciseError(f"{_where(name, index, cell, i + 1)}: '{label}' has no BEGIN SOLUTION "
                                    f"line before it")
            if open_region[0] != kind:
                want = "### END SOLUTION" if open_region[0] == "python" else "// END SOLUTION"
                raise ExerciseError(f"{_where(name, index, cell, i + 1)}: '{label}' closes the region opened "
                                    f"at line {open_region[1] + 1}, which needs '{want}'")
            regions.append((kind, open_region[1], i, open_region[2]))
            open_region = None
    if open_region is not None:
        label = "### BEGIN SOLUTION" if open_region[0] == "python" else "// BEGIN SOLUTION"
        raise ExerciseError(f"{_where(name, index, cell, open_region[1] + 1)}: '{label}' is never closed "
                            f"(its END SOLUTION line is missing)")
    if len(headers) > 1:
        nums = ", ".join(f"{h[1]}.{h[2]}" for h in headers)
        raise ExerciseError(f"{_where(name, index, cell)}: one cell holds several exercise headers ({nums}); "
                            f"give each exercise its own cell, followed by its check cell")
    header = headers[0] if headers else None
    if regions and header is None:
        near = next((ln.strip() for ln in lines if LOOSE_EXERCISE_RE.match(ln)), None)
        extra = f" ({near!r} is not of that form)" if near else ""
        raise ExerciseError(f"{_where(name, index, cell, regions[0][1] + 1)}: a SOLUTION region in a cell "
                            f"without a '# Exercise N.k: <description>' line{extra}; add that line to the cell")
    if header is not None and not regions:
        raise ExerciseError(f"{_where(name, index, cell, header[0] + 1)}: 'Exercise {header[1]}.{header[2]}' "
                            f"has no '### BEGIN SOLUTION' / '// BEGIN SOLUTION' region for students to fill in")
    return header, regions


def _parse_markdown(name: str, index: int, cell) -> list[tuple[int, int]]:
    """The `<!-- BEGIN SOLUTION -->` ... `<!-- END SOLUTION -->` regions of a Markdown cell as [(begin line, end
    line)], 0-based, raising ExerciseError on malformed markers."""
    regions, open_at = [], None
    for i, line in enumerate(_source(cell).split("\n")):
        m = MD_MARKER_RE.match(line)
        if not m:
            near = NEAR_MARKER_RE.match(line)
            if near:
                which = near.group(1).upper()
                raise ExerciseError(f"{_where(name, index, cell, i + 1)}: {line.strip()!r} looks like a solution "
                                    f"marker but is not one, so the answer would reach the students; in a Markdown "
                                    f"cell write '<!-- {which} SOLUTION -->', in capitals, alone on its line")
            continue
        if m.group(1) == "BEGIN":
            if open_at is not None:
                raise ExerciseError(f"{_where(name, index, cell, i + 1)}: '<!-- BEGIN SOLUTION -->' opens a region "
                                    f"inside the region opened at line {open_at + 1}: regions cannot be nested "
                                    f"(close the first one with '<!-- END SOLUTION -->')")
            open_at = i
        else:
            if open_at is None:
                raise ExerciseError(f"{_where(name, index, cell, i + 1)}: '<!-- END SOLUTION -->' has no "
                                    f"'<!-- BEGIN SOLUTION -->' line before it")
            regions.append((open_at, i))
            open_at = None
    if open_at is not None:
        raise ExerciseError(f"{_where(name, index, cell, open_at + 1)}: '<!-- BEGIN SOLUTION -->' is never closed "
                            f"(its '<!-- END SOLUTION -->' line is missing)")
    return regions


def _scan(nb, name: str):
    """Validate every cell of `nb`; return [(index, header, regions)] for its exercise cells, in order."""
    return _scan_all(nb, name)[0]


def _scan_all(nb, name: str):
    """Validate every cell of `nb`; return ([(index, header, regions)] for its exercise cells, [(index, "N.k",
    regions)] for its Markdown cells with solution regions, N.k the exercise after the cell), both in order."""
    lesson = lesson_number(name)
    found, derivations = [], []
    expected_k = 1
    for index, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") == "markdown":
            regions = _parse_markdown(name, index, cell)
            if regions:
                derivations.append((index, regions))
            continue
        if cell.get("cell_type") != "code":
            for i, line in enumerate(_source(cell).split("\n")):
                if NEAR_MARKER_RE.match(line):
                    raise ExerciseError(f"{_where(name, index, cell, i + 1)}: a solution marker "
                                        f"{line.strip()!r} in a {cell.get('cell_type')} cell, which the builder "
                                        f"copies as it is: solutions belong in code and Markdown cells")
            continue
        header, regions = _parse_cell(name, index, cell)
        if header is None:
            continue
        _, n, k, _ = header
        if lesson is None:
            raise ExerciseError(f"{_where(name, index, cell)}: exercise {n}.{k} is in a notebook whose name "
                                f"does not start with a lesson number 'NN_'")
        if n != lesson:
            raise ExerciseError(f"{_where(name, index, cell)}: exercise {n}.{k} is numbered for lesson {n}, but "
                                f"this notebook is lesson {lesson}: call it Exercise {lesson}.{expected_k}")
        if k == 0 and not found:         # a lesson's forward may come first, as N.0, before N.1
            found.append((index, header, regions))
            continue
        if k != expected_k:
            why = "duplicates an earlier number" if k < expected_k else "skips a number"
            raise ExerciseError(f"{_where(name, index, cell)}: exercise {n}.{k} {why}; exercises are numbered "
                                f"{lesson}.1, {lesson}.2, ... in order of appearance (a first one may be "
                                f"{lesson}.0), so this one should be Exercise {lesson}.{expected_k}")
        expected_k += 1
        found.append((index, header, regions))
    checked = []
    for index, regions in derivations:
        after = next((f"{h[1]}.{h[2]}" for i, h, _ in found if i > index), None)
        if after is None:
            cell = nb["cells"][index]
            raise ExerciseError(f"{_where(name, index, cell, regions[0][0] + 1)}: a Markdown SOLUTION region with "
                                f"no exercise after it: the student is asked to derive it and write the result in "
                                f"the next exercise, so put the region before the exercise that checks it")
        checked.append((index, after, regions))
    return found, checked


def exercise_cells(nb, name: str = "notebook") -> list[Exercise]:
    """Every exercise of `nb` as (cell index, "N.k", description), validating the notebook on the way.

    `name` (the file name, e.g. '03_layernorm.ipynb') gives the lesson number and names the notebook in errors.
    """
    return [Exercise(index, f"{h[1]}.{h[2]}", h[3]) for index, h, _ in _scan(nb, name)]


def derivation_cells(nb, name: str = "notebook") -> list[tuple[int, str]]:
    """[(cell index, "N.k")] of `nb`'s Markdown cells with a derivation (a solution region), N.k the exercise after
    the cell that checks it, validating the notebook on the way."""
    return [(index, number) for index, number, _ in _scan_all(nb, name)[1]]


def _stub(kind: str, indent: str, number: str, description: str) -> str:
    if kind == "markdown":
        return (f"> **Derive it (Exercise {number}).** The worked derivation is in the solution notebook. Work "
                f"it out on paper first, then write the result as code in Exercise {number} below; its check "
                f"tells you which term is wrong, if one is.")
    if kind == "python":
        return f"{indent}raise NotImplementedError({json.dumps(f'Exercise {number}: {description}', ensure_ascii=False)})"
    return f"{indent}// TODO (Exercise {number}): {description}"


def _cell_id(stem: str, index: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]", "-", stem)[:54] or "cell"
    return f"{safe}-{index:03d}"


def normalize(nb, name: str = "notebook"):
    """A copy of `nb` with outputs and execution counts cleared, deterministic cell ids, and trimmed metadata.

    Notebook metadata keeps the kernelspec and the language name; cell metadata keeps only `tags`, plus
    nbgrader's (`nbgrader_meta.mark_cells`).
    """
    nb = copy.deepcopy(nb)
    stem = Path(name).stem
    meta = nb.get("metadata", {})
    lang = (meta.get("language_info") or {}).get("name", "python")
    kernelspec = meta.get("kernelspec") or KERNELSPEC
    nb["metadata"] = {"kernelspec": {k: kernelspec[k] for k in ("display_name", "language", "name") if k in kernelspec},
                      "language_info": {"name": lang}}
    nb["nbformat"], nb["nbformat_minor"] = 4, 5
    cells = []
    for index, cell in enumerate(nb.get("cells", [])):
        new = {"cell_type": cell["cell_type"], "id": _cell_id(stem, index),
               "metadata": {"tags": list(cell["metadata"]["tags"])} if cell.get("metadata", {}).get("tags") else {},
               "source": _source(cell)}
        if cell["cell_type"] == "code":
            new["execution_count"], new["outputs"] = None, []
        elif cell.get("attachments"):
            new["attachments"] = cell["attachments"]
        cells.append(nbformat.from_dict(new))
    try:
        found = exercise_cells(nb, name)
    except ExerciseError:  # build, check and normalize_solutions scan first and report it
        found = []
    if not found:  # a student's notebook: the exercise cells keep their header line, their answers are stubs
        found = _headers(cells)
    nb["cells"] = cells
    nb = nbformat.from_dict(nb)
    nbgrader_meta.mark_cells(nb, found)
    return nb


def _headers(cells) -> list[tuple[int, str]]:
    """[(index, "N.k")] of the code cells with a `# Exercise N.k: ...` line, solution or student notebook alike."""
    return [(index, f"{m.group(1)}.{m.group(2)}") for index, cell in enumerate(cells) if cell["cell_type"] == "code"
            for m in [next(filter(None, map(EXERCISE_RE.match, _source(cell).split("\n"))), None)] if m]


def to_student(nb, name: str = "notebook"):
    """The student version of a solution notebook: every SOLUTION region replaced by its stub (a Markdown one by
    the prompt to derive it, its cell tagged DERIVATION_TAG), normalised."""
    found, derivations = _scan_all(nb, name)
    nb = normalize(nb, name)
    for index, header, regions in found:
        _, n, k, description = header
        lines = _source(nb.cells[index]).split("\n")
        for kind, begin, end, indent in reversed(regions):
            lines[begin:end + 1] = [_stub(kind, indent, f"{n}.{k}", description)]
        nb.cells[index]["source"] = "\n".join(lines)
    for index, number, regions in derivations:
        lines = _source(nb.cells[index]).split("\n")
        for begin, end in reversed(regions):   # a paragraph of its own: blank lines where text touches it
            before = [""] if begin > 0 and lines[begin - 1].strip() else []
            after = [""] if end + 1 < len(lines) and lines[end + 1].strip() else []
            lines[begin:end + 1] = before + [_stub("markdown", "", number, "")] + after
        nb.cells[index]["source"] = "\n".join(lines)
        tags = nb.cells[index].metadata.setdefault("tags", [])
        if DERIVATION_TAG not in tags:
            tags.append(DERIVATION_TAG)
    return nb


def dumps(nb) -> str:
    """The notebook as the text written to disk: nbformat's JSON (indent 1, sorted keys), one trailing newline."""
    text = nbformat.writes(nb, version=4)
    return text if text.endswith("\n") else text + "\n"


def _read(path: Path):
    try:
        return nbformat.read(str(path), as_version=4)
    except Exception as e:
        raise ExerciseError(f"{path}: not a readable notebook ({type(e).__name__}: {e})") from None


def has_outputs(nb) -> bool:
    """True when any code cell of `nb` stores outputs or an execution count."""
    return any(c.get("cell_type") == "code" and (c.get("outputs") or c.get("execution_count") is not None)
               for c in nb.get("cells", []))


def find_root(root: str | Path | None = None) -> Path:
    """The repository root: `root` if given, else the current directory or the package's parent, with solutions/."""
    if root is not None:
        root = Path(root)
        if not (root / "solutions").is_dir():
            raise FileNotFoundError(f"{root} has no solutions/ directory")
        return root
    for cand in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (cand / "solutions").is_dir():
            return cand
    raise FileNotFoundError("no solutions/ directory here or beside the package: run this from the repository "
                            "root, or pass --root")


def _solutions(root: Path) -> list[Path]:
    return sorted((root / "solutions").glob("*.ipynb"))


def _student_text(path: Path) -> str:
    nb = _read(path)
    _scan(nb, path.name)  # errors name the cells as the file numbers them, before the setup cell goes first
    nb = to_student(setup_cell.with_setup_cell(nb), path.name)
    nbformat.validate(nb)
    return dumps(nb)


def student_work(path: Path, generated: str | None = None) -> str | None:
    """Why the notebook at `path` looks like a student's work (a reason, as a phrase), or None when it is as
    `build` writes it (or equals `generated`, the text about to be written).

    A student's work: a file that is not a readable notebook, a notebook that stores outputs or execution
    counts, one saved by Jupyter or edited (not in the builder's normalised form), or one whose exercise
    stub (`_stub`'s text up to the number: `raise NotImplementedError("Exercise N.k`, `// TODO (Exercise N.k`)
    has been replaced, or one whose prompt to derive a result (`> **Derive it (Exercise N.k).** ...`, in a Markdown
    cell tagged DERIVATION_TAG) was replaced or edited.
    """
    text = path.read_text(encoding="utf-8", errors="replace")
    if text == generated:
        return None
    try:
        nb = nbformat.reads(text, as_version=4)
        normal = dumps(normalize(nb, path.name))
    except Exception:
        return "it is not a readable notebook"
    if has_outputs(nb):
        return "it stores outputs or execution counts (it was run)"
    if text != normal:
        return "it was saved by Jupyter or edited (its metadata or cell ids are not the builder's)"
    for index, cell in enumerate(nb.cells):
        src = _source(cell)
        if cell.get("cell_type") == "markdown":
            if DERIVATION_TAG not in cell.get("metadata", {}).get("tags", []):
                continue
            prompts = [(line, m) for line in src.split("\n") for m in [DERIVATION_RE.match(line)] if m]
            if not prompts or any(line != _stub("markdown", "", f"{m.group(1)}.{m.group(2)}", "")
                                  for line, m in prompts):
                return f"the prompt to derive it (cell {index}) was replaced or edited"
            continue
        if cell.get("cell_type") != "code":
            continue
        for line in src.split("\n"):
            m = EXERCISE_RE.match(line)
            if m:
                number = f"{m.group(1)}.{m.group(2)}"
                stubs = [_stub(kind, "", number, "") for kind in ("python", "cuda")]
                if not any(stub[:stub.index(number) + len(number)] in src for stub in stubs):
                    return f"the stub of Exercise {number} (cell {index}) was replaced by an answer"
    return None


def build(root: str | Path | None = None, force: bool = False) -> list[Path]:
    """Write notebooks/<name> for every solutions/<name>; remove notebooks/*.ipynb without a solution.

    All solutions are converted, and every notebook about to be replaced or removed is inspected, before
    anything is written: an error leaves notebooks/ untouched. A notebook holding a student's work (see
    `student_work`) is neither replaced nor removed unless `force`; an empty solutions/ is refused. Every
    file is written atomically. Returns the paths that changed.
    """
    root = find_root(root)
    out_dir = root / "notebooks"
    solutions = _solutions(root)
    if not solutions:
        raise ExerciseError(f"{root / 'solutions'} holds no notebooks: building from it would remove every "
                            f"notebook in notebooks/; nothing was changed")
    texts = {p.name: _student_text(p) for p in solutions}
    writes = [(out_dir / name, text) for name, text in texts.items()
              if not (out_dir / name).exists() or (out_dir / name).read_text(encoding="utf-8") != text]
    removals = [p for p in sorted(out_dir.glob("*.ipynb")) if p.name not in texts]
    if not force:
        at_risk = [(p, student_work(p, t)) for p, t in writes if p.exists()]
        at_risk += [(p, student_work(p)) for p in removals]
        kept = [f"  notebooks/{p.name}: {why}" for p, why in at_risk if why]
        if kept:
            raise ExerciseError("these notebooks hold a student's work, which build would replace or remove; "
                                "nothing was changed (save them elsewhere, or pass --force to overwrite them):\n"
                                + "\n".join(kept))
    out_dir.mkdir(exist_ok=True)
    for target, text in writes:
        atomic_write(target, text.encode("utf-8"))
    for extra in removals:
        extra.unlink()
    return [t for t, _ in writes] + removals


def check(root: str | Path | None = None) -> list[str]:
    """Problems that keep notebooks/ and solutions/ from being in sync, one sentence each (empty: all good).

    A problem: a student notebook missing, different from what `build` would write, or without a solution; a
    solution notebook that stores outputs; a solution notebook that breaks the exercise rules.
    """
    root = find_root(root)
    problems = []
    names = set()
    for path in _solutions(root):
        names.add(path.name)
        rel = f"solutions/{path.name}"
        try:
            nb = _read(path)
            if has_outputs(nb):
                problems.append(f"{rel} stores outputs or execution counts: run "
                                f"`python -m llmc_lessons.exercises normalize` (solutions are kept without outputs)")
            text = _student_text(path)
        except ExerciseError as e:
            problems.append(str(e))
            continue
        target = root / "notebooks" / path.name
        if not target.exists():
            problems.append(f"notebooks/{path.name} is missing: run `python -m llmc_lessons.exercises build`")
        elif target.read_text(encoding="utf-8") != text:
            problems.append(f"notebooks/{path.name} is out of date with {rel} (or was edited by hand): run "
                            f"`python -m llmc_lessons.exercises build`")
    for extra in sorted((root / "notebooks").glob("*.ipynb")):
        if extra.name not in names:
            problems.append(f"notebooks/{extra.name} has no solutions/{extra.name}: remove it, or run "
                            f"`python -m llmc_lessons.exercises build`, which removes it")
    return problems


def normalize_solutions(root: str | Path | None = None) -> list[Path]:
    """Rewrite every solutions/*.ipynb normalised (no outputs, deterministic ids); return the paths that changed.

    Every notebook is read and validated before any is rewritten, so an error leaves solutions/ untouched.
    """
    root = find_root(root)
    texts = {}
    for path in _solutions(root):
        nb = _read(path)
        _scan(nb, path.name)  # validate the exercise markers too
        texts[path] = dumps(normalize(setup_cell.with_setup_cell(nb), path.name))
    changed = [p for p, text in texts.items() if p.read_text(encoding="utf-8") != text]
    for path in changed:
        atomic_write(path, texts[path].encode("utf-8"))
    return changed


REPORT_RESULTS = ("pass", "fail", "timed out", "not reached")
NOWHERE = "http://127.0.0.1:9"   # the discard port: a download through this proxy fails at once


def _error_line(cell) -> str | None:
    """The first line of the error a code cell raised when it ran ("ename: evalue"), or None if it raised none."""
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            first = (out.get("evalue") or "").strip().split("\n")[0]
            return first if out.get("ename") in ("ExerciseFailed", "AssertionError") else f"{out.get('ename')}: {first}"
    return None


def _run_for_report(nb, workdir: Path, time_limit: float, kernel_name: str):
    """Run `nb`'s code cells in order in a fresh kernel (cwd `workdir`), carrying on after errors, for at most
    `time_limit` seconds in all. Returns (the last cell index that ran to its end, or -1; (cell index, why) where
    it stopped early, or None)."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    env = dict(os.environ)
    course = str(Path(__file__).resolve().parent.parent)   # the kernel imports this very course
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [course, env.get("PYTHONPATH")]))
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        env[name] = NOWHERE
    env["no_proxy"] = env["NO_PROXY"] = ""
    client = NotebookClient(nb, kernel_name=kernel_name, allow_errors=True, timeout=int(time_limit) + 1,
                            resources={"metadata": {"path": str(workdir)}})
    client.reset_execution_trackers()
    start, done = time.monotonic(), -1
    with client.setup_kernel(env=env):
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            left = time_limit - (time.monotonic() - start)
            if left <= 0:
                return done, (index, "timed out")
            client.timeout = max(1, math.ceil(left))
            try:
                client.execute_cell(cell, index)
            except CellTimeoutError:
                return done, (index, "timed out")
            except DeadKernelError:
                return done, (index, "the kernel died")
            done = index
    return done, None


def report(folder: str | Path, time_limit: float = 600.0, kernel_name: str = "python3") -> list[tuple[str, str, str, str]]:
    """How far a student got: run every notebook of `folder` in a fresh kernel and judge each exercise.

    Returns rows (notebook, "N.k", result, message), one per exercise (a code cell with a `# Exercise N.k:` line; its
    check is the next code cell), result one of REPORT_RESULTS: "pass" (both cells ran clean), "fail" (message: the
    first line of the check's error, else of the exercise cell's), "timed out" (the notebook's `time_limit`, in
    seconds, ran out in one of its two cells), "not reached" (the notebook stopped before it). Each notebook runs as
    a copy in memory, with a new empty folder as its working directory: nothing in `folder` is written. The kernel
    imports this course, and its HTTP proxies point nowhere, so a download fails instead of waiting.
    """
    folder = Path(folder)
    paths = sorted(folder.glob("*.ipynb")) if folder.is_dir() else []
    if not paths:
        raise FileNotFoundError(f"{folder} holds no notebooks (*.ipynb)")
    rows = []
    for path in paths:
        nb = _read(path)
        code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
        found = _headers(nb.cells)
        if not found:
            continue
        with tempfile.TemporaryDirectory(prefix="llmc-report-") as workdir:
            done, stopped = _run_for_report(nb, Path(workdir), time_limit, kernel_name)
        for index, number in found:
            check = next((i for i in code if i > index), None)
            cells = [index] + ([check] if check is not None else [])
            if stopped is not None and stopped[0] in cells:
                result, message = ("timed out", f"after {time_limit:g} s") if stopped[1] == "timed out" else \
                    ("not reached", f"{stopped[1]} in cell {stopped[0]}")
            elif cells[-1] > done:
                why = f"{stopped[1]} in cell {stopped[0]}" if stopped else ""
                result, message = "not reached", why
            else:
                errors = [e for e in (_error_line(nb.cells[i]) for i in reversed(cells)) if e]
                result, message = ("fail", errors[0]) if errors else ("pass", "")
            rows.append((path.name, number, result, message))
    return rows


def format_report(rows) -> str:
    """The rows of `report` as a table, one line per exercise."""
    head = ("notebook", "exercise", "result", "message")
    widths = [max([len(head[k])] + [len(r[k]) for r in rows]) for k in range(3)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths + [0])).rstrip()]
    for row in rows:
        message = row[3] if len(row[3]) <= 100 else row[3][:97] + "..."
        lines.append("  ".join(v.ljust(w) for v, w in zip(row[:3], widths)) + "  " + message)
    counts = ", ".join(f"{sum(r[2] == k for r in rows)} {k}" for k in REPORT_RESULTS)
    return "\n".join(lines + [f"{len(rows)} exercises: {counts}"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmc_lessons.exercises",
                                     description="Generate the student notebooks from the solution notebooks.")
    parser.add_argument("command", choices=["build", "check", "normalize", "list", "report"],
                        help="build: write notebooks/ from solutions/; check: exit 1 if notebooks/ is out of "
                             "date; normalize: strip outputs from solutions/; list: show every exercise; report: "
                             "run a student's notebooks (copies) and show which exercises pass")
    parser.add_argument("folder", nargs="?", help="report: the folder of the student's notebooks")
    parser.add_argument("--time-limit", type=float, default=600.0,
                        help="report: seconds each notebook may run in all (default 600)")
    parser.add_argument("--kernel", default="python3", help="report: the Jupyter kernel to run them in")
    parser.add_argument("--root", default=None, help="the repository root (default: the current directory)")
    parser.add_argument("--force", action="store_true", help="build: replace or remove notebooks even where they "
                        "hold a student's work (outputs, edits, answers typed in)")
    args = parser.parse_args(argv)
    try:
        if args.command == "report":
            if args.folder is None:
                parser.error("report needs the folder of the student's notebooks")
            if not args.time_limit > 0:
                parser.error(f"--time-limit must be a positive number of seconds, got {args.time_limit:g}")
            print(format_report(report(args.folder, args.time_limit, args.kernel)))
            return 0
        if args.folder is not None:
            parser.error(f"{args.command} takes no folder (only report does)")
        root = find_root(args.root)
        if args.command == "build":
            changed = build(root, force=args.force)
            n = len(_solutions(root))
            print(f"{n} notebook(s) in solutions/; {len(changed)} file(s) in notebooks/ changed")
            for p in changed:
                print(f"  {p.relative_to(root)}")
        elif args.command == "normalize":
            changed = normalize_solutions(root)
            print(f"{len(changed)} solution notebook(s) rewritten")
            for p in changed:
                print(f"  {p.relative_to(root)}")
        elif args.command == "list":
            for path in _solutions(root):
                nb = _read(path)
                derivations = dict(derivation_cells(nb, path.name))
                for ex in exercise_cells(nb, path.name):
                    for index in sorted(i for i, number in derivations.items() if number == ex.number):
                        print(f"{path.name}  cell {index:>3}  (derivation, checked by Exercise {ex.number})")
                    print(f"{path.name}  cell {ex.index:>3}  Exercise {ex.number}: {ex.description}")
        else:
            problems = check(root)
            if problems:
                print(f"notebooks/ is NOT in sync with solutions/ ({len(problems)} problem(s)):", file=sys.stderr)
                for p in problems:
                    print(f"  - {p}", file=sys.stderr)
                return 1
            print(f"notebooks/ is in sync with solutions/ ({len(_solutions(root))} notebook(s))")
    except (ExerciseError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
