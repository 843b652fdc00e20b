"""Checks for lesson 15's RMSNorm: the NumPy backward (Exercise 15.1) and the forward kernel (Exercise 15.2)."""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.checks import (CHECKED_MODE_TIP, ExerciseFailed, assert_close, exercise_kernel, passed, poisoned,
                                 rng, run_exercise)
from llmc_lessons.layers.rmsnorm import rmsnorm_backward, rmsnorm_forward

EPS = 1e-5


def _inputs(gen, B, T, C, dtype):
    """inp with a clear mean per row (so a mean subtracted by mistake shows), weight around 1."""
    inp = gen.standard_normal((B, T, C)) * 1.5 + gen.uniform(-1.0, 1.0, (B, T, 1))
    weight = 1.0 + 0.5 * gen.standard_normal(C)
    return inp.astype(dtype), weight.astype(dtype)


def check_rmsnorm_backward(fn) -> None:
    """Exercise 15.1: fn(dout, inp, weight, rstd) -> (dinp, dweight), compared in float64."""
    ex = "Exercise 15.1"
    gen = rng()
    B, T, C = 2, 5, int(gen.integers(9, 20))
    inp, weight = _inputs(gen, B, T, C, np.float64)
    _, rstd = rmsnorm_forward(inp, weight)
    dout = gen.standard_normal((B, T, C))
    result = run_exercise(ex, fn, dout.copy(), inp.copy(), weight.copy(), rstd.copy())
    if not isinstance(result, tuple) or len(result) != 2:
        raise ExerciseFailed(f"{ex}: return the pair (dinp, dweight), got {type(result).__name__}"
                             + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""))
    dinp, dweight = result
    want_dinp, want_dweight = rmsnorm_backward(dout, inp, weight, rstd)
    r = rstd[..., None]
    norm = inp * r
    dnorm = dout * weight
    m1 = dnorm.mean(-1, keepdims=True)
    m2 = (dnorm * norm).mean(-1, keepdims=True)
    assert_close(ex, "dinp", dinp, want_dinp, atol=1e-9, rtol=1e-7, known_mistakes={
        "that is LayerNorm's backward: its - mean(dnorm) term comes from the mean, which RMSNorm does not subtract":
            r * (dnorm - m1 - norm * m2),
        "a sum over the channels where mean(dnorm * norm) belongs: the 1/C of the mean square carries into the "
        "derivative of rstd": r * (dnorm - norm * C * m2),
        "the term - norm * mean(dnorm * norm) is missing: rstd depends on every x_c of the row too":
            r * dnorm,
        "dout was used where dnorm = dout * weight belongs (weight multiplies norm in the forward pass)":
            r * (dout - norm * (dout * norm).mean(-1, keepdims=True)),
        "a sign error: the norm * mean(dnorm * norm) term must be subtracted": r * (dnorm + norm * m2),
        "the leading factor rstd is missing": dnorm - norm * m2,
    }, hint="norm_c = x_c * rstd, and rstd depends on every x_c' of the row: dinp has a direct term and one through "
            "rstd; differentiate (1/C) sum x^2 carefully (see the derivation above).")
    assert_close(ex, "dweight", dweight, want_dweight, atol=1e-9, rtol=1e-7, known_mistakes={
        "dweight used inp where norm = inp * rstd belongs": (dout * inp).sum(axis=(0, 1)),
        "dweight was averaged over (b, t) instead of summed": (dout * norm).mean(axis=(0, 1)),
    }, hint="out = norm * weight, so dweight[c] sums dout[b, t, c] * norm[b, t, c] over every (b, t).")
    passed(ex, f"dinp and dweight match the reference on a {B}x{T}x{C} input")


def check_rmsnorm_forward_kernel(source: str, block_sizes=(64, 96)) -> None:
    """Exercise 15.2: the body of rmsnorm_forward_kernel(out, rstd, inp, weight, N, C, eps) in `source`, at an
    awkward C and several block sizes, outputs poisoned with NaN and followed by a NaN tail that must stay NaN."""
    ex = "Exercise 15.2"
    kernel = exercise_kernel(ex, source, "rmsnorm_forward_kernel")
    gen = rng()
    B, T, C = 3, 5, 32 * int(gen.integers(1, 4)) + int(gen.integers(1, 32))   # not a multiple of 32
    N = B * T
    inp, weight = _inputs(gen, B, T, C, np.float32)
    x, w = inp.astype(np.float64), weight.astype(np.float64)
    want_out, want_rstd = rmsnorm_forward(x, w, EPS)
    ms = (x * x).mean(-1)
    mistakes = {   # rstd a mistake gives -> the out it gives
        "the mean was subtracted and the result divided by the standard deviation: that is LayerNorm; RMSNorm "
        "divides x itself by its root mean square": 1 / np.sqrt(x.var(-1) + EPS),
        "the sum of squares was not divided by C: the root mean square takes a mean over the C channels":
            1 / np.sqrt(C * ms + EPS),
        "that is the root mean square itself; the kernel keeps its reciprocal, rstd (rsqrtf)": np.sqrt(ms + EPS),
        "the lanes' partial sums of squares were never combined: call warpReduceSum on them":
            1 / np.sqrt((x[..., 0::32] ** 2).sum(-1) / C + EPS),
    }
    d_inp = device.to_device(np.concatenate([inp.reshape(-1), np.ones(C, np.float32)]))[:N * C]
    d_w = device.to_device(np.concatenate([weight, np.ones(32, np.float32)]))[:C]
    for block_size in block_sizes:
        out_buf, rstd_buf = poisoned((N * C + C,)), poisoned((N + 4,))
        kernel((-(-N // (block_size // 32)),), (block_size,),
               (out_buf[:N * C], rstd_buf[:N], d_inp, d_w, np.int32(N), np.int32(C), np.float32(EPS)))
        device.synchronize()
        at = f"{ex} at block_size={block_size}"
        hint = ("lane l adds the squares of its channels l, l+32, ... (c < C); warpReduceSum gives every lane the "
                "row's total; rstd and out then follow the forward formula above; one lane writes rstd[row].")
        assert_close(at, "rstd", rstd_buf[:N].reshape(B, T), want_rstd, atol=1e-6, rtol=1e-5,
                     known_mistakes=mistakes, hint=hint)
        assert_close(at, "out", out_buf[:N * C].reshape(B, T, C), want_out, atol=1e-5, rtol=1e-4, known_mistakes={
            "out was not multiplied by weight": x * want_rstd[..., None],
            **{cause: x * r[..., None] * w for cause, r in mistakes.items()}}, hint=hint)
        if not (np.isnan(device.to_host(out_buf[N * C:])).all() and np.isnan(device.to_host(rstd_buf[N:])).all()):
            raise ExerciseFailed(f"{at}: the kernel wrote past the end of out or rstd: warps with row >= N, or lanes "
                                 f"with c >= C, must not write. {CHECKED_MODE_TIP}")
    passed(ex, f"{N} rows of C={C} at block sizes {tuple(block_sizes)}: rstd and out match")
