"""Checks for lesson 15's rotary position embeddings: the NumPy backward (Exercise 15.3) and the backward kernel
(Exercise 15.4)."""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.checks import (CHECKED_MODE_TIP, ExerciseFailed, assert_close, exercise_kernel, passed, poisoned,
                                 rng, run_exercise)
from llmc_lessons.layers.rope import precompute_freqs_cis, rope_backward, rope_forward


THETA = 100.0
"""The checks' theta: smaller than LLaMA's 10000, so that more of a head's pairs turn by large angles."""


def _rope_backward_mistakes(dout) -> dict:
    """{what the student probably did: the dinp it gives} for dout (B, T, NH, hs) in float64."""
    B, T, NH, hs = dout.shape
    half = hs // 2
    f = precompute_freqs_cis(hs, T + 1, THETA, dtype=np.float64)
    freqs_cis, next_position = f[:T], f[1:]
    cos, sin = freqs_cis[None, :, None, :, 0], freqs_cis[None, :, None, :, 1]
    d0, d1 = dout[..., :half], dout[..., half:]                  # the half-split pairs (i, i + hs/2)
    split = np.concatenate([d0 * cos + d1 * sin, -d0 * sin + d1 * cos], axis=-1)
    # the position taken from the wrong part of the thread index: (p / (hs/2)) % T forgets the NH heads
    p_over_half = (np.arange(B)[:, None, None] * T + np.arange(T)[None, :, None]) * NH + np.arange(NH)[None, None, :]
    g = freqs_cis[p_over_half % T]                               # (B, T, NH, hs/2, 2)
    c, s_ = g[..., 0], g[..., 1]
    e0, e1 = dout[..., 0::2], dout[..., 1::2]
    no_heads = np.empty_like(dout)
    no_heads[..., 0::2], no_heads[..., 1::2] = e0 * c + e1 * s_, -e0 * s_ + e1 * c
    return {
        "that is the forward rotation (by +angle); the backward turns by -angle, the inverse: the sign of sin "
        "changes": rope_forward(dout, freqs_cis),
        "the pairs are (i, i + hs/2), Hugging Face's rotate_half; LLaMA's and llm.c's pairs are neighbours, "
        "(2i, 2i + 1)": split,
        "the angle of the next position was used: position t uses row t of freqs_cis (positions count from 0, and "
        "position 0 is not turned at all)": rope_backward(dout, next_position),
        "the position was taken as (p / (hs/2)) % T: between the pair and the position in the index sit the NH heads":
            no_heads,
        "cos and sin were swapped (freqs_cis[..., 0] is cos, [..., 1] is sin)":
            rope_backward(dout, np.ascontiguousarray(freqs_cis[..., ::-1])),
    }


def check_rope_backward(fn) -> None:
    """Exercise 15.3: fn(dout (B, T, NH, hs), freqs_cis (T, hs/2, 2)) -> dinp, compared in float64."""
    ex = "Exercise 15.3"
    gen = rng()
    B, T, NH, hs = 2, int(gen.integers(5, 9)), 3, 2 * int(gen.integers(3, 7))
    dout = gen.standard_normal((B, T, NH, hs))
    f = precompute_freqs_cis(hs, T, THETA, dtype=np.float64)
    got = run_exercise(ex, fn, dout.copy(), f.copy())
    dtype = getattr(got, "dtype", None)
    if dtype is not None and dtype != np.float64:
        raise ExerciseFailed(f"{ex}: for float64 inputs your function returned {dtype}. Compute in the dtype of the "
                             f"input: the gradient check runs in float64.")
    assert_close(ex, "dinp", got, rope_backward(dout, f), atol=1e-10, rtol=1e-8,
                 known_mistakes=_rope_backward_mistakes(dout),
                 hint="the forward multiplies each pair by a 2x2 rotation matrix R; the backward multiplies dout's "
                      "pair by R transposed (see the derivation above).")
    passed(ex, f"dinp matches the reference on a {B}x{T}x{NH}x{hs} input")


def check_rope_backward_kernel(source: str, block_sizes=(32, 96)) -> None:
    """Exercise 15.4: the body of rope_backward_kernel(dinp, dout, freqs_cis, B, T, NH, hs) in `source`, at
    awkward sizes and several block sizes, dinp poisoned with NaN and followed by a NaN tail that must stay NaN."""
    ex = "Exercise 15.4"
    kernel = exercise_kernel(ex, source, "rope_backward_kernel")
    gen = rng()
    for block_size in block_sizes:
        while True:                                              # pairs not a multiple of the block size
            B, T, NH, hs = 2, int(gen.integers(5, 9)), int(gen.integers(2, 5)), 2 * int(gen.integers(3, 7))
            n = B * T * NH * hs
            if (n // 2) % block_size:
                break
        dout = gen.standard_normal((B, T, NH, hs)).astype(np.float32)
        f = precompute_freqs_cis(hs, T + 1, THETA)            # the front T rows are passed: a kernel that reads
        buf = poisoned((n + 2 * block_size,))                   # one row too far still reads a position's angles
        d_dout = device.to_device(np.concatenate([dout.reshape(-1), np.ones(2 * block_size, np.float32)]))[:n]
        d_f = device.to_device(f)[:T]
        kernel((-(-(n // 2) // block_size),), (block_size,),
               (buf[:n], d_dout, d_f, np.int32(B), np.int32(T), np.int32(NH), np.int32(hs)))
        device.synchronize()
        d64, f64 = dout.astype(np.float64), f[:T].astype(np.float64)
        assert_close(f"{ex} at block_size={block_size}", f"dinp (B, T, NH, hs) = {(B, T, NH, hs)}",
                     buf[:n].reshape(B, T, NH, hs), rope_backward(d64, f64), atol=1e-5, rtol=1e-4,
                     known_mistakes=_rope_backward_mistakes(d64),
                     hint="thread p owns the pair at floats 2p and 2p + 1; its pair index is p % (hs/2) and its "
                          "position (p / (NH * hs/2)) % T; write the inverse rotation of that pair.")
        if not np.isnan(device.to_host(buf[n:])).all():
            raise ExerciseFailed(f"{ex}: the kernel wrote past the end of dinp (block_size={block_size}): threads of "
                                 f"the last block with p >= B * T * NH * hs/2 must not write. {CHECKED_MODE_TIP}")
    passed(ex, f"block sizes {tuple(block_sizes)}, awkward shapes, dinp poisoned with NaN")
