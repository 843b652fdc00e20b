"""The forward exercises (Exercise N.0 of lessons 02 to 08): each check passes the answer as a student would write
it, fails the untouched stub, and names the likely cause of each plausible wrong answer."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from llmc_lessons.checks import ExerciseFailed
from llmc_lessons.checks.attention import check_attention_forward
from llmc_lessons.checks.block import check_residual_forward
from llmc_lessons.checks.crossentropy import check_crossentropy_forward, check_softmax_forward
from llmc_lessons.checks.encoder import check_encoder_forward
from llmc_lessons.checks.gelu import check_gelu_forward
from llmc_lessons.checks.layernorm import check_layernorm_forward
from llmc_lessons.checks.matmul import check_matmul_forward

K, A = math.sqrt(2.0 / math.pi), 0.044715


# ---------------------------------------------------------------------------------------------------------
# Answers, right and wrong, as a student would write them


def encoder_forward(inp, wte, wpe, wrong=None):
    T = inp.shape[1]
    if wrong == "by token":
        return wte[inp] + wpe[inp]
    if wrong == "no wpe":
        return wte[inp]
    return wte[inp] + wpe[:T]


def layernorm_forward(inp, weight, bias, eps=1e-5, wrong=None):
    mean = inp.mean(axis=-1)
    xmu = inp - mean[..., None]
    var = (xmu ** 2).sum(-1) / (inp.shape[-1] - 1) if wrong == "unbiased" else (xmu ** 2).mean(-1)
    rstd = 1 / (np.sqrt(var) + eps) if wrong == "eps outside" else 1 / np.sqrt(var + eps)
    if wrong == "axis":
        mean, rstd = inp.mean(axis=0), rstd
    out = xmu * rstd[..., None] * weight + bias
    if wrong == "tuple":
        return out
    if wrong == "swapped":
        out = xmu * rstd[..., None] * bias + weight
    return out, mean, rstd


def matmul_forward(inp, weight, bias=None, wrong=None):
    out = inp @ (weight if wrong == "untransposed" else weight.T)
    if bias is not None and wrong != "no bias":
        out = out + bias
    return out


def matmul_forward_bias_required(inp, weight, bias):
    return inp @ weight.T + bias


def attention_forward(qkv, NH, wrong=None):
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // NH
    q, k, v = (qkv[:, :, i * C:(i + 1) * C].reshape(B, T, NH, hs).transpose(0, 2, 1, 3) for i in range(3))
    scale = {"no scale": 1.0, "1/hs": 1.0 / hs}.get(wrong, 1.0 / math.sqrt(hs))
    preatt = (q @ k.transpose(0, 1, 3, 2)) * scale
    if wrong != "no mask":
        preatt = np.where(np.tril(np.ones((T, T), dtype=bool)), preatt, -np.inf)
    e = np.exp(preatt - preatt.max(axis=-1, keepdims=True))
    att = e / e.sum(axis=-1, keepdims=True)
    out = (att @ v).reshape(B, T, C) if wrong == "heads" else (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
    return out, att


def gelu_forward(x, wrong=None):
    if wrong == "erf":
        erf = np.vectorize(math.erf, otypes=[np.float32])
        return (0.5 * x * (1 + erf(x / math.sqrt(2.0)))).astype(x.dtype)
    if wrong == "no half":
        return x * (1 + np.tanh(K * (x + A * x ** 3)))
    if wrong == "float64 constant":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + A * x ** 3)))
    return 0.5 * x * (1 + np.tanh(K * (x + A * x ** 3)))


def residual_forward(inp1, inp2, wrong=None):
    if wrong == "in place":
        inp1 += inp2
        return inp1
    return inp1 + inp2


def softmax_forward(logits, V, wrong=None):
    probs = np.zeros_like(logits)
    x = logits[..., :V]
    if wrong == "no max":
        with np.errstate(over="ignore", invalid="ignore"):
            e = np.exp(x)
    elif wrong == "all columns":
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    else:
        e = np.exp(x - x.max(-1, keepdims=True))
    with np.errstate(invalid="ignore"):
        probs[..., :V] = e / e.sum(-1, keepdims=True)
    return probs


def crossentropy_forward(probs, targets, wrong=None):
    B, T = targets.shape
    b, t = np.indices((B, T))
    if wrong == "largest":
        return -np.log(probs.max(-1))
    if wrong == "mean":
        return -np.log(probs[b, t, targets]).mean()
    if wrong == "log10":
        return -np.log10(probs[b, t, targets])
    return -np.log(probs[b, t, targets])


def stub(*args, **kwargs):
    raise NotImplementedError("Exercise N.0: write it")


def wrong(fn, how):
    def answer(*args):
        return fn(*args, wrong=how)
    return answer


CHECKS = {
    "Exercise 2.0": (check_encoder_forward, encoder_forward, {
        "by token": "wpe is indexed by the token id", "no wpe": "the position embedding wpe is missing"}),
    "Exercise 3.0": (check_layernorm_forward, layernorm_forward, {
        "unbiased": "divides by C - 1", "eps outside": "eps is added outside the square root",
        "tuple": r"return the tuple \(out, mean, rstd\)",
        "axis": r"expected shape \(3, 5\)", "swapped": "weight and bias are swapped"}),
    "Exercise 4.0": (check_matmul_forward, matmul_forward, {
        "untransposed": "weight is not transposed", "no bias": "the bias is missing"}),
    "Exercise 5.0": (check_attention_forward, attention_forward, {
        "no mask": "the causal mask is missing", "no scale": "the 1/sqrt\\(hs\\) scale is missing",
        "1/hs": "the scale is 1/hs", "heads": "without moving the head axis back"}),
    "Exercise 6.0": (check_gelu_forward, gelu_forward, {
        "erf": "the exact erf form", "no half": "the factor 1/2 is missing",
        "float64 constant": "float32 in, float64 out"}),
    "Exercise 7.0": (check_residual_forward, residual_forward, {"in place": "changed an input in place"}),
    "Exercise 8.0": (check_softmax_forward, softmax_forward, {
        "no max": "exp overflowed", "all columns": "the padded columns V..Vp-1 were included"}),
    "Exercise 8.0 (loss)": (check_crossentropy_forward, crossentropy_forward, {
        "largest": "the log of the row's largest probability", "mean": r"expected shape \(2, \d\), got \(\)",
        "log10": "log10 where the natural log belongs"}),
}


def number(exercise):
    """'Exercise 8.0' of 'Exercise 8.0 (loss)': Exercise 8.0 asks for two functions, each with a check."""
    return exercise.split(" (")[0]


@pytest.mark.parametrize("exercise", CHECKS)
def test_the_answer_passes(exercise, capsys):
    check, answer, _ = CHECKS[exercise]
    check(answer)
    assert f"{number(exercise)}: correct" in capsys.readouterr().out


@pytest.mark.parametrize("exercise", CHECKS)
def test_the_stub_fails(exercise):
    check = CHECKS[exercise][0]
    with pytest.raises(ExerciseFailed, match=re.escape(f"{number(exercise)} is not done yet")):
        check(stub)


MISTAKES = [(exercise, how, cause) for exercise, (_, _, mistakes) in CHECKS.items() for how, cause in mistakes.items()]


@pytest.mark.parametrize("exercise,how,cause", MISTAKES, ids=[f"{e[9:]}-{h}" for e, h, _ in MISTAKES])
def test_a_plausible_wrong_answer_fails_and_is_named(exercise, how, cause):
    check, answer, _ = CHECKS[exercise]
    with pytest.raises(ExerciseFailed, match="(?s)" + re.escape(number(exercise)) + ".*" + cause):
        check(wrong(answer, how))


def test_matmul_forward_without_a_default_bias_is_told_why():
    with pytest.raises(ExerciseFailed, match="give bias a default of None"):
        check_matmul_forward(matmul_forward_bias_required)
