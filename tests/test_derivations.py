"""The derivation exercises: a student writes a derived Jacobian or gradient as code, and its check compares it with
float64 finite differences. Each check passes on the solution notebook's answer, fails on the stub, on a call to the
package's answer and on each plausible wrong answer, naming the wrong term."""
from __future__ import annotations

from pathlib import Path

import nbformat
import numpy as np
import pytest

from llmc_lessons import exercises
from llmc_lessons.checks import REFERENCES, ExerciseFailed, numerical_jacobian
from llmc_lessons.checks.layernorm import check_layernorm_jacobian

ROOT = Path(__file__).resolve().parent.parent


def solution(notebook: str, exercise: str):
    """The function the solution notebook's cell for `exercise` defines, run with NumPy as `np`."""
    nb = nbformat.read(str(ROOT / "solutions" / notebook), as_version=4)
    index = next(e.index for e in exercises.exercise_cells(nb, notebook) if f"Exercise {e.number}" == exercise)
    namespace = {"np": np}
    exec(nb.cells[index].source, namespace)
    return next(v for k, v in namespace.items() if callable(v) and getattr(v, "__module__", None) is None
                and not k.startswith("_"))


def test_numerical_jacobian_of_a_known_map():
    x = np.array([0.5, -1.0, 2.0])
    J = numerical_jacobian(lambda v: np.array([v[0] * v[1], np.sin(v[2]), v.sum()]), x)
    want = np.array([[-1.0, 0.5, 0.0], [0.0, 0.0, np.cos(2.0)], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(J, want, atol=1e-8)
    assert numerical_jacobian(lambda v: v[:, None] * 2.0, np.ones(2)).shape == (2, 1, 2)


# ---------------------------------------------------------------------------------------------------------
# Exercise 3.1: LayerNorm's Jacobian dn_i/dx_j

def _ln(x, eps):
    C = x.shape[0]
    mu = x.mean()
    r = 1.0 / np.sqrt(((x - mu) ** 2).mean() + eps)
    return C, mu, r, (x - mu) * r


def _ln_wrong(kind):
    def layernorm_jacobian(x, eps=1e-5):
        C, mu, r, n = _ln(x, eps)
        eye, outer = np.eye(C), np.outer(n, n)
        return {"no_mean": r * (eye - outer / C), "no_var": r * (eye - 1 / C), "diag": r * eye,
                "sign_var": r * (eye - 1 / C + outer / C), "no_r": eye - 1 / C - outer / C,
                "var_no_1_over_C": r * (eye - 1 / C - outer),
                "x_minus_mu": r * (eye - 1 / C - np.outer(x - mu, x - mu) / C),
                "row": r * (eye - 1 / C - outer / C)[0]}[kind]
    return layernorm_jacobian


def test_3_1_passes_on_the_solution(capsys):
    check_layernorm_jacobian(solution("03_layernorm.ipynb", "Exercise 3.1"))
    assert "Exercise 3.1: correct" in capsys.readouterr().out


def test_3_1_fails_on_the_stub():
    def layernorm_jacobian(x, eps=1e-5):
        raise NotImplementedError("Exercise 3.1: layernorm_jacobian")
    with pytest.raises(ExerciseFailed, match="Exercise 3.1 is not done yet"):
        check_layernorm_jacobian(layernorm_jacobian)


@pytest.mark.parametrize("kind, cause", [
    ("no_mean", "the term -1/C is missing: mu depends on every x_j"),
    ("no_var", "the term -n_i n_j / C is missing: rstd depends on every x_j"),
    ("diag", "only the diagonal"), ("sign_var", "a sign error in the term from rstd"),
    ("no_r", r"the leading factor r \(rstd\) is missing"), ("var_no_1_over_C", "the term from rstd lacks its 1/C"),
    ("x_minus_mu", r"uses \(x_i - mu\)\(x_j - mu\) where n_i n_j belongs"),
    ("row", r"J\): expected shape \(\d+, \d+\), got \(\d+,\)"),
])
def test_3_1_names_the_wrong_term(kind, cause):
    with pytest.raises(ExerciseFailed, match=f"(?s)Exercise 3.1 .*{cause}"):
        check_layernorm_jacobian(_ln_wrong(kind))


# ---------------------------------------------------------------------------------------------------------
# Every derivation exercise: finite differences are no answer either

DERIVATIONS = {"Exercise 3.1": (check_layernorm_jacobian, lambda x, eps=1e-5: x)}


@pytest.mark.parametrize("exercise", sorted(DERIVATIONS))
def test_a_numerical_answer_is_refused(exercise, monkeypatch):
    import llmc_lessons.checks as checks
    from llmc_lessons import gradcheck
    monkeypatch.setattr(checks, "REFERENCES", REFERENCES)   # conftest turns the refusal off for other tests
    assert "numerical_grad" in REFERENCES[exercise]
    check, _ = DERIVATIONS[exercise]

    def numerically(*args, **kwargs):
        return gradcheck.numerical_grad(lambda: 0.0, np.zeros(2))
    with pytest.raises(ExerciseFailed, match=f"{exercise}: your answer calls the package's own numerical_grad"):
        check(numerically)
