"""Checks for lesson 15's SwiGLU: the NumPy backward (Exercise 15.5) and the backward kernel (Exercise 15.6)."""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.checks import (CHECKED_MODE_TIP, ExerciseFailed, assert_close, exercise_kernel, passed, poisoned,
                                 rng, run_exercise)
from llmc_lessons.layers.swiglu import sigmoid, swiglu_backward


def _swiglu_backward_mistakes(dout, inp) -> dict:
    """{what the student probably did: the dinp (..., 2H) it gives}, in float64."""
    H = dout.shape[-1]
    up, gate = inp[..., :H], inp[..., H:]
    s = sigmoid(gate)
    silu, dsilu = gate * s, s * (1 + gate * (1 - s))
    swapped_up, swapped_gate = gate, up                       # silu applied to the first half
    s2 = sigmoid(swapped_gate)
    return {
        "that is the derivative of sigmoid, s (1 - s); silu(g) = g * s(g) is a product of two functions of g "
        "(step 2 of the derivation)": np.concatenate([dout * silu, dout * up * s * (1 - s)], -1),
        "one term of silu' is missing: the one from differentiating the factor g of g * s(g) (step 2)":
            np.concatenate([dout * silu, dout * up * gate * s * (1 - s)], -1),
        "one term of silu' is missing: the term from differentiating s(g) (step 2)":
            np.concatenate([dout * silu, dout * up * s], -1),
        "gate and up are swapped: in llm.c's layout the first half of inp is up, the second half the gate that "
        "goes through silu": np.concatenate([dout * swapped_up * s2 * (1 + swapped_gate * (1 - s2)),
                                              dout * swapped_gate * s2], -1),
        "gate and up are swapped when they are read from inp: the first half of inp is up, the second the gate":
            np.concatenate([dout * swapped_gate * s2, dout * swapped_up * s2 * (1 + swapped_gate * (1 - s2))], -1),
        "the two halves of dinp are in the wrong order: dinp[..., :H] is dup, dinp[..., H:] is dgate":
            np.concatenate([dout * up * dsilu, dout * silu], -1),
        "the local derivatives were not multiplied by dout (chain rule)": np.concatenate([silu, up * dsilu], -1),
    }


def check_swiglu_backward(fn) -> None:
    """Exercise 15.5: fn(dout (B, T, H), inp (B, T, 2H)) -> dinp (B, T, 2H), compared in float64."""
    ex = "Exercise 15.5"
    gen = rng()
    B, T, H = 2, 5, int(gen.integers(5, 14))
    inp = gen.standard_normal((B, T, 2 * H)) * 3
    dout = gen.standard_normal((B, T, H))
    got = run_exercise(ex, fn, dout.copy(), inp.copy())
    dtype = getattr(got, "dtype", None)
    if dtype is not None and dtype != np.float64:
        raise ExerciseFailed(f"{ex}: for float64 inputs your function returned {dtype}. Compute in the dtype of the "
                             f"input: the gradient check runs in float64.")
    assert_close(ex, "dinp", got, swiglu_backward(dout, inp), atol=1e-10, rtol=1e-8,
                 known_mistakes=_swiglu_backward_mistakes(dout, inp),
                 hint="out = up * silu(gate) is a product: d/dup and d/dgate each keep the other factor; silu itself "
                      "is a product g * sigmoid(g) (see the derivation above).")
    passed(ex, f"dinp matches the reference on a {B}x{T}x{2 * H} input")


def check_swiglu_backward_kernel(source: str, block_sizes=(32, 128)) -> None:
    """Exercise 15.6: the body of swiglu_backward_kernel(dinp, dout, inp, N, H) in `source`, at awkward sizes and
    several block sizes, dinp poisoned with NaN and followed by a NaN tail that must stay NaN."""
    ex = "Exercise 15.6"
    kernel = exercise_kernel(ex, source, "swiglu_backward_kernel")
    gen = rng()
    for block_size in block_sizes:
        N, H = int(gen.integers(3, 8)), int(gen.integers(20, 70))
        if (N * H) % block_size == 0:                           # not a multiple of the block size
            H += 1
        inp = (gen.standard_normal((N, 2 * H)) * 3).astype(np.float32)
        dout = gen.standard_normal((N, H)).astype(np.float32)
        # Each array is the front of a longer one, long enough for the rows the last block's extra threads
        # would reach without the bounds check: their writes land in dinp's NaN tail, which must stay NaN.
        guard = 2 * (block_size + H)
        buf = poisoned((2 * N * H + guard,))
        d_inp = device.to_device(np.concatenate([inp.reshape(-1), np.ones(guard, np.float32)]))[:inp.size]
        d_dout = device.to_device(np.concatenate([dout.reshape(-1), np.ones(guard, np.float32)]))[:dout.size]
        kernel((-(-(N * H) // block_size),), (block_size,), (buf[:2 * N * H], d_dout, d_inp, np.int32(N), np.int32(H)))
        device.synchronize()
        i64, d64 = inp.astype(np.float64), dout.astype(np.float64)
        assert_close(f"{ex} at block_size={block_size}", f"dinp (N, 2H) = {(N, 2 * H)}",
                     buf[:2 * N * H].reshape(N, 2 * H), swiglu_backward(d64, i64), atol=1e-5, rtol=1e-4,
                     known_mistakes=_swiglu_backward_mistakes(d64, i64),
                     hint="thread k owns column j = k % H of row r = k / H: up at inp[r * 2H + j], the gate H floats "
                          "further; it writes dup and dgate at the same two places of dinp.")
        if not np.isnan(device.to_host(buf[2 * N * H:])).all():
            raise ExerciseFailed(f"{ex}: the kernel wrote past the end of dinp (block_size={block_size}): threads of "
                                 f"the last block with k >= N * H must not write. {CHECKED_MODE_TIP}")
    passed(ex, f"block sizes {tuple(block_sizes)}, awkward N and H, dinp poisoned with NaN")
