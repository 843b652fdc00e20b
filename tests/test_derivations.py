"""The derivation exercises: a student writes a derived Jacobian or gradient as code, and its check compares it with
float64 finite differences. Each check passes on the solution notebook's answer, fails on the stub, on a call to the
package's answer and on each plausible wrong answer, naming the wrong term."""
from __future__ import annotations

import math
from pathlib import Path

import nbformat
import numpy as np
import pytest

from llmc_lessons import exercises
from llmc_lessons.checks import REFERENCES, ExerciseFailed, numerical_jacobian
from llmc_lessons.checks.attention import ATTENTION_STEPS, check_attention_step, check_softmax_backward
from llmc_lessons.checks.crossentropy import check_crossentropy_grad
from llmc_lessons.checks.encoder import check_encoder_jacobian
from llmc_lessons.checks.gelu import check_gelu_derivative
from llmc_lessons.checks.layernorm import LAYERNORM_STEPS, check_layernorm_jacobian, check_layernorm_step
from llmc_lessons.checks.matmul import check_linear_jacobians
from llmc_lessons.layers.gelu import GELU_SCALING_FACTOR as K
from llmc_lessons.layers.gelu import gelu_erf_backward, gelu_forward

ROOT = Path(__file__).resolve().parent.parent


def solution(notebook: str, exercise: str):
    """The function the solution notebook's cell for `exercise` defines, run with NumPy as `np`."""
    nb = nbformat.read(str(ROOT / "solutions" / notebook), as_version=4)
    index = next(e.index for e in exercises.exercise_cells(nb, notebook) if f"Exercise {e.number}" == exercise)
    namespace = {"np": np, "math": math}
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
# Exercise 2.1: which table rows each position of the encoder reads

def _enc_wrong(kind):
    def encoder_jacobian(inp, V, maxT):
        B, T = inp.shape
        b, t = np.indices((B, T))
        J_wte, J_wpe = np.zeros((B, T, V)), np.zeros((B, T, maxT))
        J_wte[b, t, inp] = 1.0
        J_wpe[b, t, t] = 1.0
        if kind == "position":
            J_wte = np.zeros((B, T, V))
            J_wte[b, t, b * T + t] = 1.0
        elif kind == "every_token":
            J_wte = np.zeros((B, T, V))
            J_wte[:, :, inp] = 1.0
        elif kind == "counts":                                 # how often the token occurs in the batch
            J_wte[b, t, inp] = np.bincount(inp.ravel(), minlength=V)[inp]
        elif kind == "wpe_b":
            J_wpe = np.zeros((B, T, maxT))
            J_wpe[b, t, b] = 1.0
        elif kind == "wpe_all":
            J_wpe = np.zeros((B, T, maxT))
            J_wpe[:, :, :T] = 1.0
        elif kind == "wpe_b0":
            J_wpe = np.zeros((B, T, maxT))
            J_wpe[0, np.arange(T), np.arange(T)] = 1.0
        elif kind == "transposed":
            J_wte = J_wte.transpose(2, 0, 1)
        return J_wte, J_wpe
    return encoder_jacobian


def test_2_1_passes_on_the_solution(capsys):
    check_encoder_jacobian(solution("02_embeddings.ipynb", "Exercise 2.1"))
    assert "Exercise 2.1: correct" in capsys.readouterr().out


def test_2_1_fails_on_the_stub():
    def encoder_jacobian(inp, V, maxT):
        raise NotImplementedError("Exercise 2.1: encoder_jacobian")
    with pytest.raises(ExerciseFailed, match="Exercise 2.1 is not done yet"):
        check_encoder_jacobian(encoder_jacobian)


@pytest.mark.parametrize("kind, cause", [
    ("position", r"the column is the position b\*T \+ t, not the token id"),
    ("every_token", "every position got a 1 at every token of the batch"),
    ("counts", "a repeated token got its count"),
    ("wpe_b", "the column is the sequence index b, not the position t"),
    ("wpe_all", "a 1 at every used position"), ("wpe_b0", r"only the first sequence \(b = 0\)"),
    ("transposed", r"J_wte\): expected shape \(3, \d, \d+\), got \(\d+, 3, \d\)"),
])
def test_2_1_names_the_wrong_entry(kind, cause):
    with pytest.raises(ExerciseFailed, match=f"(?s)Exercise 2.1 .*{cause}"):
        check_encoder_jacobian(_enc_wrong(kind))


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
# Exercises 3.4 to 3.9 (optional): LayerNorm's backward one intermediate at a time

def _solution_steps(notebook, prefix, steps):
    nb = nbformat.read(str(ROOT / "solutions" / notebook), as_version=4)
    namespace = {"np": np, "math": math}
    for e in exercises.exercise_cells(nb, notebook):
        exec(nb.cells[e.index].source, namespace)
    return {step: namespace[prefix + step] for step in steps}


def test_3_4_to_3_9_pass_on_the_solution_in_order(capsys):
    for step, fn in _solution_steps("03_layernorm.ipynb", "layernorm_", LAYERNORM_STEPS).items():
        check_layernorm_step(step, fn)
    out = capsys.readouterr().out
    assert [f"Exercise 3.{k}: correct" in out for k in range(4, 10)] == [True] * 6


@pytest.mark.parametrize("step", LAYERNORM_STEPS)
def test_3_4_to_3_9_fail_on_the_stub(step):
    def stub(*args):
        raise NotImplementedError(f"layernorm_{step}")
    with pytest.raises(ExerciseFailed, match=r"Exercise 3.\d is not done yet"):
        check_layernorm_step(step, stub)


def _C(x):
    return x.shape[-1]


@pytest.mark.parametrize("step, wrong, cause", [
    ("dnorm", lambda dout, weight: dout, "dout alone"),
    ("dnorm", lambda dout, weight: -dout * weight, "sign error"),
    ("drstd", lambda dnorm, xmu: dnorm * xmu, r"expected shape \(2, 3, 1\), got \(2, 3, \d+\).*sums over them"),
    ("drstd", lambda dnorm, xmu: (dnorm * xmu * ((xmu ** 2).mean(-1, keepdims=True) + 1e-5) ** -0.5).sum(
        -1, keepdims=True), "norm where xmu belongs"),
    ("dvar", lambda drstd, var, eps: -0.5 * drstd * (var + eps) ** -0.5, "the power is -1/2"),
    ("dvar", lambda drstd, var, eps: 0.5 * drstd * (var + eps) ** -1.5, "sign error"),
    ("dxmu", lambda dnorm, rstd, dvar, xmu: dnorm * rstd, "the path through var is missing"),
    ("dxmu", lambda dnorm, rstd, dvar, xmu: dvar * 2 * xmu / _C(xmu), "the path through norm is missing"),
    ("dxmu", lambda dnorm, rstd, dvar, xmu: dnorm * rstd + dvar * 2 * xmu, "the 1/C of var's mean is missing"),
    ("dxmu", lambda dnorm, rstd, dvar, xmu: dnorm * rstd + dvar * xmu / _C(xmu), "the factor 2"),
    ("dmean", lambda dxmu: dxmu.sum(-1, keepdims=True), "the sign: xmu = inp - mean"),
    ("dmean", lambda dxmu: -dxmu, r"expected shape \(2, 3, 1\)"),
    ("dinp", lambda dxmu, dmean: dxmu, "the path through mean is missing"),
    ("dinp", lambda dxmu, dmean: dxmu + dmean, "the 1/C of the mean is missing"),
    ("dinp", lambda dxmu, dmean: dxmu - dmean / _C(dxmu), "the sign of the path through mean"),
])
def test_3_4_to_3_9_name_the_wrong_term(step, wrong, cause):
    with pytest.raises(ExerciseFailed, match=rf"(?s)Exercise 3.{4 + LAYERNORM_STEPS.index(step)} .*{cause}"):
        check_layernorm_step(step, wrong)


def test_an_unknown_layernorm_step_is_a_clear_error():
    with pytest.raises(ValueError, match="step must be one of"):
        check_layernorm_step("dbias", lambda *a: None)


# ---------------------------------------------------------------------------------------------------------
# Exercise 4.1: one position's Jacobians of the linear layer

def _lin_wrong(kind):
    def linear_jacobians(x, weight):
        OC, C = weight.shape
        eye = np.eye(OC)
        J_x, J_w, J_b = weight.copy(), eye[:, :, None] * x, eye
        if kind == "J_x_transposed":
            J_x = weight.T
        elif kind == "J_x_is_x":
            J_x = np.tile(x, (OC, 1))
        elif kind == "J_w_no_delta":
            J_w = np.tile(x, (OC, OC, 1))
        elif kind == "J_w_weight":
            J_w = eye[:, :, None] * weight[:, None, :]
        elif kind == "J_b_ones":
            J_b = np.ones((OC, OC))
        elif kind == "J_b_vector":
            J_b = np.ones(OC)
        elif kind == "J_w_two_axes":
            J_w = np.tile(x, (OC, 1))
        return J_x, J_w, J_b
    return linear_jacobians


def test_4_1_passes_on_the_solution(capsys):
    check_linear_jacobians(solution("04_matmul.ipynb", "Exercise 4.1"))
    assert "Exercise 4.1: correct" in capsys.readouterr().out


def test_4_1_fails_on_the_stub():
    def linear_jacobians(x, weight):
        raise NotImplementedError("Exercise 4.1: linear_jacobians")
    with pytest.raises(ExerciseFailed, match="Exercise 4.1 is not done yet"):
        check_linear_jacobians(linear_jacobians)


@pytest.mark.parametrize("kind, cause", [
    ("J_x_transposed", "J_x is transposed"), ("J_x_is_x", "that is x broadcast"),
    ("J_w_no_delta", "J_w\\[o, p, c\\] is x_c for every p"), ("J_w_weight", "weight\\[o, c\\] where x_c belongs"),
    ("J_b_ones", "every entry is 1"), ("J_b_vector", r"J_b \(C=4, OC=4\)\): expected shape \(4, 4\), got \(4,\)"),
    ("J_w_two_axes", r"J_w \(C=4, OC=4\)\): expected shape \(4, 4, 4\), got \(4, 4\).*J_w \(OC, OC, C\)"),
])
def test_4_1_names_the_wrong_term(kind, cause):
    with pytest.raises(ExerciseFailed, match=f"(?s)Exercise 4.1 .*{cause}"):
        check_linear_jacobians(_lin_wrong(kind))


def test_4_1_a_transposed_J_x_of_a_non_square_weight_is_named_by_its_shape():
    def linear_jacobians(x, weight):
        OC, C = weight.shape
        if OC == C:
            return weight.copy(), np.eye(OC)[:, :, None] * x, np.eye(OC)
        return weight.T, np.eye(OC)[:, :, None] * x, np.eye(OC)
    with pytest.raises(ExerciseFailed, match=r"J_x \(C=\d, OC=\d\)\): expected shape \(\d, \d\), got \(\d, \d\) "
                                             r"\(that is the transposed shape"):
        check_linear_jacobians(linear_jacobians)


# ---------------------------------------------------------------------------------------------------------
# Exercise 5.1: the softmax's backward inside attention

def _sm_wrong(kind):
    def softmax_backward(datt, att):
        row = (att * datt).sum(axis=-1, keepdims=True)
        return {"no_row_term": att * datt, "diagonal_only": att * (1 - att) * datt,
                "sum_of_datt": att * (datt - datt.sum(axis=-1, keepdims=True)),
                "columns": att * (datt - (att * datt).sum(axis=-2, keepdims=True)), "no_att_factor": datt - row,
                "sign": -att * (datt - row), "scaled": att * (datt - row) / np.sqrt(5),
                "transposed": (att * (datt - row)).swapaxes(-1, -2)}[kind]
    return softmax_backward


def test_5_1_passes_on_the_solution(capsys):
    check_softmax_backward(solution("05_attention.ipynb", "Exercise 5.1"))
    assert "Exercise 5.1: correct" in capsys.readouterr().out


def test_5_1_fails_on_the_stub():
    def softmax_backward(datt, att):
        raise NotImplementedError("Exercise 5.1: softmax_backward")
    with pytest.raises(ExerciseFailed, match="Exercise 5.1 is not done yet"):
        check_softmax_backward(softmax_backward)


@pytest.mark.parametrize("kind, cause", [
    ("no_row_term", "the row term - sum_j att_j datt_j is missing"), ("diagonal_only", "only the diagonal"),
    ("sum_of_datt", "the row term sums datt alone"), ("columns", r"summed down the columns \(axis -2\)"),
    ("no_att_factor", "the leading factor att_i is missing"), ("sign", "sign error"),
    ("scaled", "times the expected one: a missing or extra scale factor"), ("transposed", "elements are wrong"),
])
def test_5_1_names_the_wrong_term(kind, cause):
    with pytest.raises(ExerciseFailed, match=f"(?s)Exercise 5.1 .*{cause}"):
        check_softmax_backward(_sm_wrong(kind))


# ---------------------------------------------------------------------------------------------------------
# Exercises 5.4 to 5.8 (optional): attention's backward one intermediate at a time

def _tr(x):
    return x.swapaxes(-1, -2)


def _row_term(att, datt):
    return (att * datt).sum(-1, keepdims=True)


def test_5_4_to_5_8_pass_on_the_solution_in_order(capsys):
    for step, fn in _solution_steps("05_attention.ipynb", "attention_", ATTENTION_STEPS).items():
        check_attention_step(step, fn)
    out = capsys.readouterr().out
    assert [f"Exercise 5.{k}: correct" in out for k in range(4, 9)] == [True] * 5


@pytest.mark.parametrize("step", ATTENTION_STEPS)
def test_5_4_to_5_8_fail_on_the_stub(step):
    def stub(*args):
        raise NotImplementedError(f"attention_{step}")
    with pytest.raises(ExerciseFailed, match=r"Exercise 5.\d is not done yet"):
        check_attention_step(step, stub)


@pytest.mark.parametrize("step, wrong, cause", [
    ("datt", lambda dy, v: v @ _tr(dy), "datt is transposed"),
    ("datt", lambda dy, v: _tr(v) @ dy, r"expected shape \(1, 2, \d, \d\), got \(1, 2, 3, 3\)"),
    ("dv", lambda dy, att: att @ dy, "att was not transposed"),
    ("dpreatt", lambda datt, att, hs: att * (datt - _row_term(att, datt)), "the scale 1/sqrt\\(hs\\) is missing"),
    ("dpreatt", lambda datt, att, hs: att * datt / math.sqrt(hs), "the softmax's row term"),
    ("dpreatt", lambda datt, att, hs: (datt - _row_term(att, datt)) / math.sqrt(hs), "factor att_i is missing"),
    ("dpreatt", lambda datt, att, hs: att * (datt - _row_term(att, datt)) * math.sqrt(hs), "multiplied by sqrt"),
    ("dq", lambda dpreatt, k: _tr(dpreatt) @ k, "dpreatt was transposed"),
    ("dq", lambda dpreatt, k: -dpreatt @ k, "sign error"),
    ("dk", lambda dpreatt, q: dpreatt @ q, "dpreatt was not transposed"),
])
def test_5_4_to_5_8_name_the_wrong_term(step, wrong, cause):
    with pytest.raises(ExerciseFailed, match=rf"(?s)Exercise 5.{4 + ATTENTION_STEPS.index(step)} .*{cause}"):
        check_attention_step(step, wrong)


def test_an_unknown_attention_step_is_a_clear_error():
    with pytest.raises(ValueError, match="step must be one of"):
        check_attention_step("dqkv", lambda *a: None)


# ---------------------------------------------------------------------------------------------------------
# Exercise 6.1: GELU's derivative

def _gelu_wrong(kind):
    def gelu_grad(x):
        th = np.tanh(K * (x + 0.044715 * x ** 3))
        sech2, du = 1 - th * th, K * (1 + 3 * 0.044715 * x * x)
        return {"no_product_term": 0.5 * x * sech2 * du, "no_cubic": 0.5 * (1 + th) + 0.5 * x * sech2 * K,
                "no_inner": 0.5 * (1 + th) + 0.5 * x * sech2, "erf": gelu_erf_backward(np.ones_like(x), x),
                "sech_plus": 0.5 * (1 + th) + 0.5 * x * (1 + th * th) * du,
                "one_minus_tanh": 0.5 * (1 + th) + 0.5 * x * (1 - th) * du,
                "no_x": 0.5 * (1 + th) + 0.5 * sech2 * du, "forward": gelu_forward(x),
                "sign": -(0.5 * (1 + th) + 0.5 * x * sech2 * du)}[kind]
    return gelu_grad


def test_6_1_passes_on_the_solution(capsys):
    check_gelu_derivative(solution("06_gelu.ipynb", "Exercise 6.1"))
    assert "Exercise 6.1: correct" in capsys.readouterr().out


def test_6_1_fails_on_the_stub():
    def gelu_grad(x):
        raise NotImplementedError("Exercise 6.1: gelu_grad")
    with pytest.raises(ExerciseFailed, match="Exercise 6.1 is not done yet"):
        check_gelu_derivative(gelu_grad)


@pytest.mark.parametrize("kind, cause", [
    ("no_product_term", r"the product-rule term 0.5 \* \(1 \+ tanh\(u\)\) is missing"),
    ("no_cubic", r"the factor \(1 \+ 3 \* 0.044715 x\^2\) is missing"), ("no_inner", "du/dx = sqrt\\(2/pi\\) is missing"),
    ("erf", "the exact erf-GELU"), ("sech_plus", r"not 1 \+ tanh\^2"), ("one_minus_tanh", r"not 1 - tanh\(u\)"),
    ("no_x", "the factor x in front of the second term is missing"), ("forward", "the forward value"),
    ("sign", "sign error"),
])
def test_6_1_names_the_wrong_term(kind, cause):
    with pytest.raises(ExerciseFailed, match=f"(?s)Exercise 6.1 .*likely cause:[^\n]*{cause}"):
        check_gelu_derivative(_gelu_wrong(kind))


# ---------------------------------------------------------------------------------------------------------
# Exercise 8.1: dlogits of the mean cross-entropy

def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _ce_wrong(kind):
    def crossentropy_grad(logits, targets):
        N, V = logits.shape
        p = _softmax(logits)
        onehot = np.zeros((N, V))
        onehot[np.arange(N), targets] = 1.0
        shifted = np.zeros((N, V))
        shifted[np.arange(N), np.minimum(targets + 1, V - 1)] = 1.0
        every = np.zeros((N, V))
        every[:, targets] = 1.0                              # logits[:, targets]: every row gets every target
        return {"no_onehot": p / N, "only_onehot": -onehot / N, "no_1_over_N": p - onehot,
                "axis0": (_softmax(logits, axis=0) - onehot) / N, "dprobs": -onehot / np.where(onehot > 0, p, 1) / N,
                "unnormalised": (np.exp(logits) - onehot) / N, "off_by_one": (p - shifted) / N,
                "every_target": (p - every) / N, "sign": (onehot - p) / N, "sum_not_mean": (p - onehot) * 2}[kind]
    return crossentropy_grad


def test_8_1_passes_on_the_solution(capsys):
    check_crossentropy_grad(solution("08_softmax_crossentropy.ipynb", "Exercise 8.1"))
    assert "Exercise 8.1: correct" in capsys.readouterr().out


def test_8_1_fails_on_the_stub():
    def crossentropy_grad(logits, targets):
        raise NotImplementedError("Exercise 8.1: crossentropy_grad")
    with pytest.raises(ExerciseFailed, match="Exercise 8.1 is not done yet"):
        check_crossentropy_grad(crossentropy_grad)


@pytest.mark.parametrize("kind, cause", [
    ("no_onehot", "the one-hot was never subtracted"), ("only_onehot", "only the one-hot"),
    ("no_1_over_N", "the 1/N is missing"), ("axis0", "the softmax was taken over the wrong axis"),
    ("dprobs", "-1/p at the target: that is dL/dprobs"), ("unnormalised", r"exp\(x\) was not divided"),
    ("off_by_one", r"column target \+ 1"), ("every_target", "every target column in every row"),
    ("sign", "sign error"), ("sum_not_mean", "times the expected one: a missing or extra scale factor"),
])
def test_8_1_names_the_wrong_term(kind, cause):
    with pytest.raises(ExerciseFailed, match=f"(?s)Exercise 8.1 .*likely cause:[^\n]*{cause}"):
        check_crossentropy_grad(_ce_wrong(kind))


# ---------------------------------------------------------------------------------------------------------
# Every derivation exercise: finite differences are no answer either

DERIVATIONS = {"Exercise 2.1": check_encoder_jacobian, "Exercise 3.1": check_layernorm_jacobian,
               "Exercise 4.1": check_linear_jacobians, "Exercise 5.1": check_softmax_backward, "Exercise 6.1": check_gelu_derivative,
               "Exercise 8.1": check_crossentropy_grad}


@pytest.mark.parametrize("exercise", sorted(DERIVATIONS))
def test_a_numerical_answer_is_refused(exercise, monkeypatch):
    import llmc_lessons.checks as checks
    from llmc_lessons import gradcheck
    monkeypatch.setattr(checks, "REFERENCES", REFERENCES)   # conftest turns the refusal off for other tests
    assert "numerical_grad" in REFERENCES[exercise]
    check = DERIVATIONS[exercise]

    def numerically(*args, **kwargs):
        return gradcheck.numerical_grad(lambda: 0.0, np.zeros(2))
    with pytest.raises(ExerciseFailed, match=f"{exercise}: your answer calls the package's own numerical_grad"):
        check(numerically)
