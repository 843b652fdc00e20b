"""For an nbgrader course's nbgrader_config.py: `generate_assignment` writes the course's own stubs.

    from llmc_lessons.nbgrader_config import use_course_stubs
    use_course_stubs(c)

nbgrader's own stub is Python, which would break a kernel exercise's CUDA source string. The cells' metadata comes
from `llmc_lessons.nbgrader_meta`. nbgrader is imported only inside `use_course_stubs`: the course runs without it.
"""
from __future__ import annotations

from llmc_lessons.exercises import to_student


def use_course_stubs(c) -> None:
    """In an nbgrader_config.py: make `generate_assignment` stub the exercises as the course does."""
    from nbgrader.converters import GenerateAssignment
    from nbgrader.preprocessors import ClearSolutions

    class ClearCourseSolutions(ClearSolutions):
        """ClearSolutions whose stubs are the course's: `raise NotImplementedError("Exercise N.k: ...")` in
        Python, `// TODO (Exercise N.k): ...` inside CUDA source, the prompt to derive it in Markdown (cells
        matched by id)."""

        def preprocess(self, nb, resources):
            student = to_student(nb, resources["unique_key"] + ".ipynb")
            self._student = {cell.id: cell.source for cell in student.cells}
            return super().preprocess(nb, resources)

        def _replace_solution_region(self, cell, language):
            stubbed = self._student.get(cell.get("id"), cell.source)
            replaced = stubbed != cell.source
            cell.source = stubbed
            # a Markdown cell's derivation became the course's prompt: that cell stays read-only, not an answer
            return replaced and cell.cell_type == "code"

    default = GenerateAssignment.class_traits()["preprocessors"].default()
    c.GenerateAssignment.preprocessors = [ClearCourseSolutions if p is ClearSolutions else p for p in default]
