"""Checks for lesson 17: one step of the ring's reduce-scatter (Exercise 17.1) and of its all-gather (17.2), on
simulated ranks (lists of NumPy arrays), step by step against the package's ring and, at the end, against NumPy."""
from __future__ import annotations

import numpy as np

from llmc_lessons.checks import ExerciseFailed, assert_close, passed, rng, run_exercise
from llmc_lessons.distributed import ring_all_gather_step, ring_reduce_scatter_step


def _ranks(gen, N: int, L: int) -> list:
    """N ranks' data of L numbers each, cut into N chunks of unequal sizes (L is not a multiple of N)."""
    return [np.array_split(gen.standard_normal(L), N) for _ in range(N)]


def _flat(ex: str, chunks, N: int, sizes) -> np.ndarray:
    """The ranks' chunks as one (N, L) array, after checking they are N lists of N chunks of the right sizes."""
    if not isinstance(chunks, (list, tuple)) or len(chunks) != N:
        raise ExerciseFailed(f"{ex}: return the new chunks as a list of {N} ranks (each a list of {N} chunks), got "
                             f"{type(chunks).__name__}{f' of length {len(chunks)}' if hasattr(chunks, '__len__') else ''}")
    for r, rank in enumerate(chunks):
        if not isinstance(rank, (list, tuple)) or len(rank) != N or \
                [np.shape(c) for c in rank] != [(n,) for n in sizes]:
            raise ExerciseFailed(f"{ex}: rank {r}'s entry must be a list of {N} chunks of sizes {list(sizes)}, like "
                                 f"its input: return the chunks, do not concatenate or drop any")
    return np.stack([np.concatenate([np.asarray(c, dtype=np.float64) for c in rank]) for rank in chunks])


def _step_by_step(ex, fn, reference, start, mistakes: dict, what: str, hint: str):
    """Run fn for steps 0..N-2 from `start`, comparing every step with `reference`; returns the final chunks."""
    N = len(start)
    sizes = [c.size for c in start[0]]
    state = start
    for step in range(N - 1):
        given = [[c.copy() for c in rank] for rank in state]
        got = run_exercise(ex, fn, given, step)
        want = reference(state, step)
        known = {cause: _flat(ex, wrong(state, step), N, sizes) for cause, wrong in mistakes.items()}
        assert_close(ex, f"{what}, after step {step}: data", _flat(ex, got, N, sizes),
                     _flat(ex, want, N, sizes), atol=1e-12, rtol=1e-12, known_mistakes=known,
                     hint=hint + " (data[r, i]: element i of rank r's chunks laid end to end)")
        state = want
    return state


# -- plausible wrong answers, as a student would write them ------------------------------------------------

def _ring_step(send_index, receive, direction=1):
    def step_fn(chunks, step):
        N = len(chunks)
        new = [[c.copy() for c in rank] for rank in chunks]
        for r in range(N):
            c = send_index(r, step, N)
            to = (r + direction) % N
            new[to][c] = receive(new[to][c], chunks[r][c])
        return new
    return step_fn


def _add(mine, received):
    return mine + received


def _replace(mine, received):
    return received.copy()


REDUCE_SCATTER_MISTAKES = {
    "the chunk index is off by one: at step s, rank r sends the chunk it finished accumulating at step s - 1":
        _ring_step(lambda r, s, N: (r - s - 1) % N, _add),
    "the chunk index is off by one the other way: rank r sends a chunk its left neighbour has not yet added into":
        _ring_step(lambda r, s, N: (r - s + 1) % N, _add),
    "the receiving rank replaces its chunk with the one it received instead of adding it: a reduce-scatter sums":
        _ring_step(lambda r, s, N: (r - s) % N, _replace),
    "the chunks travel to the left neighbour (r - 1), against the ring's direction":
        _ring_step(lambda r, s, N: (r - s) % N, _add, direction=-1),
    "the chunk index moves the wrong way with the step (r + s): the partial sums do not travel around the ring":
        _ring_step(lambda r, s, N: (r + s) % N, _add),
}

ALL_GATHER_MISTAKES = {
    "the chunk index is off by one: at step 0 each rank sends the chunk whose complete sum the reduce-scatter left "
    "it":
        _ring_step(lambda r, s, N: (r - s) % N, _replace),
    "the chunk index is off by one the other way":
        _ring_step(lambda r, s, N: (r + 2 - s) % N, _replace),
    "the receiving rank adds the chunk it received to its own: after the reduce-scatter the chunk is already a "
    "sum, so the all-gather copies it":
        _ring_step(lambda r, s, N: (r + 1 - s) % N, _add),
    "the chunks travel to the left neighbour (r - 1), against the ring's direction":
        _ring_step(lambda r, s, N: (r + 1 - s) % N, _replace, direction=-1),
}


def check_ring_reduce_scatter_step(fn) -> None:
    """Exercise 17.1: fn(chunks, step) -> the chunks after step `step` of the ring reduce-scatter."""
    ex = "Exercise 17.1"
    gen = rng()
    for N, L in ((5, 13), (4, 23), (3, 11), (2, 7)):   # at 5 ranks the wrong answers differ from each other
        start = _ranks(gen, N, L)
        final = _step_by_step(ex, fn, ring_reduce_scatter_step, start, REDUCE_SCATTER_MISTAKES,
                              f"{N} ranks", "in a step every rank sends one chunk to its right neighbour; section 2 "
                              "says which chunk rank r sends at step s, and what the receiver does with it")
        total = [sum(start[k][c] for k in range(N)) for c in range(N)]
        for r in range(N):      # against NumPy: rank r now holds the sum of chunk (r + 1) % N
            c = (r + 1) % N
            assert_close(ex, f"{N} ranks: rank {r}'s chunk {c} after the reduce-scatter", final[r][c], total[c])
    passed(ex, "at 2, 3, 4 and 5 ranks, every step matches the ring and rank r ends with the sum of chunk r + 1")


def check_ring_all_gather_step(fn) -> None:
    """Exercise 17.2: fn(chunks, step) -> the chunks after step `step` of the ring all-gather."""
    ex = "Exercise 17.2"
    gen = rng()
    for N, L in ((5, 17), (4, 23), (3, 10), (2, 5)):
        start = _ranks(gen, N, L)
        summed = start
        for step in range(N - 1):
            summed = ring_reduce_scatter_step(summed, step)
        final = _step_by_step(ex, fn, ring_all_gather_step, summed, ALL_GATHER_MISTAKES, f"{N} ranks",
                              "in a step every rank passes one complete chunk to its right neighbour; section 2 says "
                              "which chunk rank r sends at step s, and what the receiver does with it")
        total = np.sum([np.concatenate(rank) for rank in start], axis=0)
        for r in range(N):      # against NumPy: every rank holds the whole sum
            assert_close(ex, f"{N} ranks: rank {r}'s data after the all-gather", np.concatenate(final[r]), total)
    passed(ex, "at 2, 3, 4 and 5 ranks, every step matches the ring and every rank ends with the whole sum")
