"""What a student installs (`pip install -e .`, no extras) is enough to run the course: no module of the package
imports a test tool (pytest, nbval, xdist, nbclient, PyYAML, playwright) or nbgrader at import time, and no
lesson imports one."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llmc_lessons"
TEST_ONLY = {"pytest", "_pytest", "nbval", "xdist", "nbclient", "yaml", "playwright", "nbgrader", "hypothesis"}


def top_level_imports(path: Path) -> set[str]:
    """The top-level package names a module imports outside any function (what `import module` runs)."""
    names, todo = set(), list(ast.parse(path.read_text(encoding="utf-8")).body)
    while todo:
        node = todo.pop()
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_test_tool(path):
    assert top_level_imports(path) & TEST_ONLY == set()


@pytest.mark.parametrize("path", sorted((PACKAGE.parent / "solutions").glob("*.ipynb")), ids=lambda p: p.name)
def test_no_lesson_imports_a_test_tool(path):
    import nbformat
    imported = set()
    for cell in nbformat.read(str(path), as_version=4).cells:
        if cell.cell_type == "code":
            for node in ast.walk(ast.parse(cell.source)):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    imported.add(node.module.split(".")[0])
    assert imported & TEST_ONLY == set()
