"""Checks for lesson 12: counting the bytes a kernel must move, and the fused residual + LayerNorm kernel."""
from __future__ import annotations

import numpy as np

from llmc_lessons.checks import (ExerciseFailed, assert_close, exercise_kernel, passed, poisoned, randn, rng,
                                 run_exercise)
from llmc_lessons.device import to_host
from llmc_lessons.layers.layernorm import fused_residual_layernorm_forward


def check_layernorm_bytes(fn) -> None:
    """Exercise 12.1: fn(N, C) -> the fewest bytes layernorm_forward moves (float32, each array once)."""
    ex = "Exercise 12.1"
    for N, C in [(8192, 768), (37, 45), (1, 1)]:
        got = run_exercise(ex, fn, N, C)
        want = 4 * (N * C + 2 * C + N * C + 2 * N)
        mistakes = {
            "mean and rstd are outputs too: 2 floats per row": 4 * (2 * N * C + 2 * C),
            "weight and bias are read once, not once per row": 4 * (2 * N * C + 2 * N * C + 2 * N),
            "that counts bits: a float32 is 4 bytes, not 32": 32 * (2 * N * C + 2 * C + 2 * N),
            "that counts elements: multiply by 4 bytes per float32": 2 * N * C + 2 * C + 2 * N,
            "the weight and bias are inputs too: 2 * C floats": 4 * (2 * N * C + 2 * N),
            "the input row is read once and the output written once: 2 * N * C floats, not 3": 4 * (3 * N * C + 2 * C + 2 * N),
        }
        if got != want:
            cause = next((c for c, v in mistakes.items() if got == v), None)
            raise ExerciseFailed(f"{ex}: layernorm_bytes({N}, {C}) returned {got!r}, expected {want:,} bytes."
                                 + (f"\n  likely cause: {cause}" if cause else "")
                                 + "\n  hint: list every array layernorm_forward reads and every array it writes, "
                                   "with its shape; each is moved once, at 4 bytes a float32.")
    passed(ex, "8192 x 768 moves 50.4 MB; at 3 TB/s that takes 17 us")


def check_fused_residual_layernorm_kernel(src: str, name: str = "fused_residual_layernorm_forward_kernel") -> None:
    """Exercise 12.2: the student's fused kernel against the composed reference, outputs poisoned with NaN."""
    ex = "Exercise 12.2"
    kernel = exercise_kernel(ex, src, name)
    gen = rng()
    for (B, T, C), block in [((2, 7, 45), 64), ((3, 5, 100), 128), ((1, 3, 31), 96)]:
        a, b = randn(gen, B, T, C), randn(gen, B, T, C)
        w, bias = randn(gen, C), randn(gen, C)
        res, out = poisoned((B, T, C)), poisoned((B, T, C))
        mean, rstd = poisoned((B, T)), poisoned((B, T))
        N = B * T
        kernel((-(-N // (block // 32)),), (block,), (res, out, mean, rstd, a, b, w, bias, np.int32(N), np.int32(C),
                                                     np.float32(1e-5)))
        want = fused_residual_layernorm_forward(*(to_host(x).astype(np.float64) for x in (a, b, w, bias)))
        hint = f"B*T = {N} rows of C = {C}, {block // 32} warps (rows) per block"
        assert_close(ex, "residual", res, want[0], atol=1e-5, hint=hint,
                     known_mistakes={"residual = inp1 only: add inp2": to_host(a)})
        assert_close(ex, "mean", mean, want[2], atol=1e-5, rtol=1e-4, hint=hint)
        assert_close(ex, "rstd", rstd, want[3], atol=1e-4, rtol=1e-4, hint=hint)
        assert_close(ex, "out", out, want[1], atol=1e-4, rtol=1e-4, hint=hint)
    passed(ex, "one pass computes the residual and its LayerNorm at three shapes and block sizes")
