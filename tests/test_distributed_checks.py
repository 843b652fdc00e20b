"""Lesson 17's checks pass the ring's steps and fail the stub and the plausible wrong answers, naming the slip."""
import re

import pytest

from llmc_lessons.checks import ExerciseFailed
from llmc_lessons.checks.distributed import (ALL_GATHER_MISTAKES, REDUCE_SCATTER_MISTAKES,
                                             check_ring_all_gather_step, check_ring_reduce_scatter_step)


def reduce_scatter_step(chunks, step):       # as a student writes it: in place, one chunk per rank
    N = len(chunks)
    sent = [chunks[r][(r - step) % N].copy() for r in range(N)]
    for r in range(N):
        chunks[(r + 1) % N][(r - step) % N] += sent[r]
    return chunks


def all_gather_step(chunks, step):
    N = len(chunks)
    sent = [chunks[r][(r + 1 - step) % N].copy() for r in range(N)]
    for r in range(N):
        chunks[(r + 1) % N][(r + 1 - step) % N] = sent[r]
    return chunks


def stub(chunks, step):
    raise NotImplementedError("Exercise 17.x: write it")


CHECKS = [(check_ring_reduce_scatter_step, reduce_scatter_step, "17.1", REDUCE_SCATTER_MISTAKES),
          (check_ring_all_gather_step, all_gather_step, "17.2", ALL_GATHER_MISTAKES)]


@pytest.mark.parametrize("check,answer,number,_", CHECKS)
def test_the_answer_passes_and_the_stub_fails(check, answer, number, _, capsys):
    check(answer)
    assert f"Exercise {number}: correct" in capsys.readouterr().out
    with pytest.raises(ExerciseFailed, match=f"Exercise {number} is not done yet"):
        check(stub)


@pytest.mark.parametrize("check,number,cause,wrong", [
    (check, number, cause, wrong) for check, _, number, mistakes in CHECKS for cause, wrong in mistakes.items()])
def test_each_plausible_wrong_answer_fails_naming_its_cause(check, number, cause, wrong):
    with pytest.raises(ExerciseFailed, match=f"Exercise {number}") as e:
        check(wrong)
    assert "likely cause: " + cause in str(e.value)


@pytest.mark.parametrize("check,number", [(check_ring_reduce_scatter_step, "17.1"),
                                          (check_ring_all_gather_step, "17.2")])
def test_a_whole_all_reduce_in_one_step_and_a_flat_answer_fail(check, number):
    import numpy as np

    def everything_at_once(chunks, step):         # the right final sums, but not the ring's steps
        N = len(chunks)
        total = [sum(chunks[k][c] for k in range(N)) for c in range(N)]
        return [[t.copy() for t in total] for _ in range(N)]

    with pytest.raises(ExerciseFailed, match=re.escape(f"Exercise {number}") + ".*after step 0"):
        check(everything_at_once)
    with pytest.raises(ExerciseFailed, match="list of 5 ranks"):
        check(lambda chunks, step: np.concatenate([np.concatenate(r) for r in chunks]))
