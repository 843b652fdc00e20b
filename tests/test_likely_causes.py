"""Common slips get a likely cause that names them: a student's plausible wrong answer, as they would write it."""
from __future__ import annotations

import re

import pytest

from llmc_lessons.checks import ExerciseFailed
from llmc_lessons.checks.crossentropy import check_crossentropy_softmax_backward
from llmc_lessons.checks.layernorm import check_layernorm_backward


def _layernorm_backward_with(reduce_a, reduce_b):
    def layernorm_backward(dout, inp, weight, mean, rstd):
        norm = (inp - mean[..., None]) * rstd[..., None]
        dnorm = dout * weight
        dinp = rstd[..., None] * (dnorm - reduce_a(dnorm) - norm * reduce_b(dnorm * norm))
        return dinp, (dout * norm).sum(axis=(0, 1)), dout.sum(axis=(0, 1))
    return layernorm_backward


def mean(a):
    return a.mean(-1, keepdims=True)


def total(a):
    return a.sum(-1, keepdims=True)


@pytest.mark.parametrize("reduce_a,reduce_b,cause", [
    (total, total, "a sum over the channels where the mean belongs"),
    (total, mean, "a sum over the channels where mean(dnorm) belongs"),
    (mean, total, "a sum over the channels where mean(dnorm * norm) belongs"),
])
def test_3_2_a_sum_instead_of_a_mean(reduce_a, reduce_b, cause):
    with pytest.raises(ExerciseFailed, match="likely cause: " + re.escape(cause)):
        check_layernorm_backward(_layernorm_backward_with(reduce_a, reduce_b))


def test_3_2_the_means_pass(capsys):
    check_layernorm_backward(_layernorm_backward_with(mean, mean))
    assert "Exercise 3.2: correct" in capsys.readouterr().out


def every_row_gets_every_target(dlosses, probs, targets, V):
    dlogits = probs.copy()
    dlogits[..., V:] = 0.0
    dlogits[..., targets] -= 1.0          # indexes columns only: the same columns for every (b, t)
    return dlogits * dlosses[..., None]


def target_is_the_position(dlosses, probs, targets, V):
    dlogits = probs.copy()
    dlogits[..., V:] = 0.0
    B, T = targets.shape
    for b in range(B):
        for t in range(T):
            dlogits[b, t, t] -= 1.0
    return dlogits * dlosses[..., None]


@pytest.mark.parametrize("answer,cause", [
    (every_row_gets_every_target, "the -1 went to every target column of the batch in every row"),
    (target_is_the_position, "the -1 went to column t"),
])
def test_8_2_a_wrong_one_hot_index(answer, cause):
    with pytest.raises(ExerciseFailed, match="likely cause: " + cause):
        check_crossentropy_softmax_backward(answer)
