"""results/ is evidence with an index: every record a document names exists, every record is in the index, and
every name follows the layout <folder>/<topic>-<device>-<date>[-<what>].<ext> (results/README.md)."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
FOLDERS = ("bench", "kernels", "train", "tests", "lessons", "profile", "env")
# a record's name as the documents write it: a folder of results/, then <topic>-<device>-<date>...
RECORD = re.compile(r"(?:results/)?((?:" + "|".join(FOLDERS) + r")/[a-z0-9]+-[a-z0-9]+-\d{4}-\d\d-\d\d[\w.*-]*)")
# any <topic>-<device>-<date> name, to catch one written without its folder
DATED = re.compile(r"[\w./:-]*-(?:h100|h200|cpu)-\d{4}-\d\d-\d\d[\w.*-]*")
HISTORY = re.compile(r"[0-9a-f]{7,40}:results/")   # `git show <commit>:results/<name>`: a record that left the tree
LAYOUT = re.compile(r"(?P<folder>[a-z]+)/(?P<topic>[a-z0-9]+)-(?P<device>[a-z0-9]+)-\d{4}-\d\d-\d\d(-[a-z0-9-]+)?"
                    r"\.(json|log|md|jsonl|summary\.json|console\.txt)")


def documents():
    """(name, text) of README.md, docs/*.md, results/README.md and the sources of solutions/*.ipynb."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), RESULTS / "README.md"]:
        yield path.relative_to(ROOT).as_posix(), path.read_text()
    for path in sorted((ROOT / "solutions").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        yield path.relative_to(ROOT).as_posix(), "\n".join("".join(c["source"]) for c in cells)


def names(text):
    """The record names a text gives (without results/), and the dated names it gives without a folder."""
    found, loose = [], []
    for m in DATED.finditer(text):
        token = m.group(0).rstrip(".")
        if HISTORY.match(token):
            continue
        r = RECORD.fullmatch(token)
        (found if r else loose).append(r.group(1) if r else token)
    return found, loose


def records():
    return sorted(p.relative_to(RESULTS).as_posix() for p in RESULTS.rglob("*")
                  if p.is_file() and p.name != "README.md" and "gpu-run" not in p.parts)


def test_every_record_a_document_names_exists():
    missing, loose = [], []
    for doc, text in documents():
        found, bad = names(text)
        missing += [f"{doc}: {n}" for n in found if not list(RESULTS.glob(n))]
        loose += [f"{doc}: {n}" for n in bad]
    assert not missing, f"records named but not under results/: {missing}"
    assert not loose, f"record names without their folder (write results/<folder>/<name>): {loose}"


def test_every_record_is_in_the_index():
    index = set(names((RESULTS / "README.md").read_text())[0])
    absent = [r for r in records() if r not in index]
    assert not absent, f"records not listed in results/README.md: {absent}"


def test_every_record_follows_the_layout():
    bad = [r for r in records() if not (m := LAYOUT.fullmatch(r)) or m["folder"] not in FOLDERS]
    assert not bad, f"records not named <folder>/<topic>-<device>-<date>[-<what>].<ext>: {bad}"


def test_the_checks_catch_a_missing_record_and_a_name_without_its_folder():
    found, loose = names("see `results/bench/bench-h100-2026-01-01.json`, `bench-h100-2026-12-06.log` and "
                         "`2c380ed:results/bench-ln2-h100-2026-11-24.log`.")
    assert found == ["bench/bench-h100-2026-01-01.json"] and not list(RESULTS.glob(found[0]))
    assert loose == ["bench-h100-2026-12-06.log"]
