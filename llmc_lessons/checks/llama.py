"""Checks for lesson 16 (the LLaMA-style model): Exercise 16.1, repkv_forward, the copy of each key/value head to
the query heads of its group; Exercise 16.2, repkv_backward, the gradient of those copies; Exercise 16.3, the sum
in repkv_backward_kernel.

Each check runs the student's code on fresh random inputs of several head counts (NH = 6 query heads sharing
NKV = 2 or 3 key/value heads, one shared by all, and NKV = NH), compares with the package's reference, and names
the mistake when the answer equals one it knows.
"""
from __future__ import annotations

import numpy as np

from llmc_lessons.checks import (ExerciseFailed, assert_close, exercise_kernel, passed, poisoned, randn, rng,
                                 run_exercise)
from llmc_lessons.device import to_host
from llmc_lessons.layers.attention import repkv_backward, repkv_forward

EX1, EX2, EX3 = "Exercise 16.1", "Exercise 16.2", "Exercise 16.3"
CASES = ((2, 5, 6, 2, 3), (1, 7, 6, 3, 4), (1, 4, 4, 1, 2), (2, 3, 2, 2, 3))   # B, T, NH, NKV, hs

FORWARD_MISTAKES = {
    "tiled": "wrong head grouping: the copies of each key/value head are spread out (query head h got key/value "
             "head h % NKV), so query heads of different groups share one",
    "channels": "each channel was repeated instead of each head: a head's hs channels must stay together, in "
                "order, in every copy",
    "v_from_k": "the values were copied from the keys' columns",
}
BACKWARD_MISTAKES = {
    "first_copy": "the key/value gradients come from one copy only: every query head of the group read the head, "
                  "and each of those reads sends back a gradient",
    "mean": "the copies' gradients were averaged: look again at what the backward of a copy (a fork) does with "
            "the gradients that come back",
    "tiled": "the gradients were summed over the wrong copies (those of query heads h with the same h % NKV): "
             "a key/value head's copies are the query heads of its own group",
    "channels": "the sum ran over neighbouring channels instead of over the heads of a group",
}


def _parts(x, NH, NKV, hs):
    """(B, T, (NH + 2 NKV) hs) -> q (B, T, NH, hs), k and v (B, T, NKV, hs)."""
    B, T, _ = x.shape
    C, K = NH * hs, NKV * hs
    return (x[:, :, :C].reshape(B, T, NH, hs), x[:, :, C:C + K].reshape(B, T, NKV, hs),
            x[:, :, C + K:].reshape(B, T, NKV, hs))


def _forward_variant(qkv, NH, NKV, mistake):
    """repkv_forward with one named mistake."""
    B, T, W = qkv.shape
    hs = W // (NH + 2 * NKV)
    group = NH // NKV
    q, k, v = _parts(qkv, NH, NKV, hs)
    if mistake == "v_from_k":
        v = k
    if mistake == "tiled":
        k, v = np.tile(k, (1, 1, group, 1)), np.tile(v, (1, 1, group, 1))
    elif mistake == "channels":
        return np.concatenate([q.reshape(B, T, -1), np.repeat(k.reshape(B, T, -1), group, axis=-1),
                               np.repeat(v.reshape(B, T, -1), group, axis=-1)], axis=2)
    else:
        k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    return np.concatenate([a.reshape(B, T, -1) for a in (q, k, v)], axis=2)


def _backward_variant(d, NH, NKV, mistake):
    """repkv_backward with one named mistake."""
    B, T, W = d.shape
    hs = W // (3 * NH)
    group = NH // NKV
    dq, dk, dv = _parts(d, NH, NH, hs)                    # each (B, T, NH, hs)

    def reduce(x):
        if mistake == "channels":
            return x.reshape(B, T, NKV * hs, group).sum(-1).reshape(B, T, NKV, hs)
        if mistake == "tiled":
            return x.reshape(B, T, group, NKV, hs).sum(2)
        grouped = x.reshape(B, T, NKV, group, hs)
        return {"first_copy": grouped[:, :, :, 0], "mean": grouped.mean(3)}[mistake]
    return np.concatenate([dq.reshape(B, T, -1)] + [reduce(x).reshape(B, T, -1) for x in (dk, dv)], axis=2)


def _got(exercise, fn, x, NH, NKV, shape, what):
    got = run_exercise(exercise, fn, x.copy(), NH, NKV)
    if got is None:
        raise ExerciseFailed(f"{exercise}: your function returned None. Did it forget to `return` the result?")
    got = np.asarray(to_host(got), dtype=np.float64)
    if got.shape != shape:
        raise ExerciseFailed(f"{exercise}: the result must have shape {what} = {shape} (NH = {NH}, NKV = {NKV}), "
                             f"got {got.shape}.")
    return got


def check_repkv_forward(fn) -> None:
    """Exercise 16.1: fn(qkv, NH, NKV) -> (B, T, 3C) must match the reference repkv_forward."""
    gen = rng()
    for B, T, NH, NKV, hs in CASES:
        qkv = gen.standard_normal((B, T, (NH + 2 * NKV) * hs))
        expected = repkv_forward(qkv, NH, NKV)
        got = _got(EX1, fn, qkv, NH, NKV, expected.shape, "(B, T, 3 NH hs)")
        assert_close(EX1, "qkv expanded", got, expected, atol=1e-12, rtol=1e-12,
                     known_mistakes={why: _forward_variant(qkv, NH, NKV, m) for m, why in FORWARD_MISTAKES.items()},
                     hint=f"column block h of the k part (and of the v part) must hold the key (value) head of "
                          f"query head h's group. This test had B={B}, T={T}, NH={NH}, NKV={NKV}, hs={hs}")
    passed(EX1, "every query head reads the key/value head of its group, for NKV = 1, 2, 3 and NH")


def check_repkv_backward(fn) -> None:
    """Exercise 16.2: fn(dqkv_rep, NH, NKV) -> (B, T, (NH + 2 NKV) hs) must match the reference repkv_backward."""
    gen = rng()
    for B, T, NH, NKV, hs in CASES:
        d = gen.standard_normal((B, T, 3 * NH * hs))
        expected = repkv_backward(d, NH, NKV)
        got = _got(EX2, fn, d, NH, NKV, expected.shape, "(B, T, (NH + 2 NKV) hs)")
        known = {} if NKV == NH else \
            {why: _backward_variant(d, NH, NKV, m) for m, why in BACKWARD_MISTAKES.items()}
        assert_close(EX2, "dqkv", got, expected, atol=1e-10, rtol=1e-9, known_mistakes=known,
                     hint=f"this test had B={B}, T={T}, NH={NH}, NKV={NKV}, hs={hs}: the k part of dqkv has NKV "
                          f"heads, and each gathers what came back to its copies")
    passed(EX2, "each key/value head gets the gradients of all its group's copies")


def check_repkv_backward_kernel(source) -> None:
    """Exercise 16.3: repkv_backward_kernel in `source` (CUDA text, or a loaded kernel), launched with one thread per
    element of dinp (B, T, (NH + 2 NKV) hs), must write repkv_backward's result."""
    kernel = exercise_kernel(EX3, source, "repkv_backward_kernel") if isinstance(source, str) else source
    gen = rng()
    for (B, T, NH, NKV, hs), block_size in zip(CASES[:3], (64, 100, 32)):
        d = randn(gen, B, T, 3 * NH * hs)
        out = poisoned((B, T, (NH + 2 * NKV) * hs))
        grid = (-(-out.size // block_size),)
        run_exercise(EX3, kernel, grid, (block_size,), (out, d, np.int32(B), np.int32(T), np.int32(NH),
                                                        np.int32(NKV), np.int32(hs)))
        host = np.asarray(to_host(d), dtype=np.float64)
        known = {why: _backward_variant(host, NH, NKV, m) for m, why in BACKWARD_MISTAKES.items()}
        assert_close(EX3, "dinp", out, repkv_backward(host, NH, NKV), atol=1e-5, rtol=1e-5, known_mistakes=known,
                     hint=f"a key or value thread adds what came back to each copy of its head; this launch had "
                          f"B={B}, T={T}, NH={NH}, NKV={NKV}, hs={hs}, block_size={block_size}")
    passed(EX3, "every key/value element sums its group's copies, at three shapes and block sizes")
