"""Checks for lesson 14: rounding float32 to bf16 to nearest-even, and stochastic rounding."""
from __future__ import annotations

import numpy as np

from llmc_lessons.checks import ExerciseFailed, passed, rng, run_exercise
from llmc_lessons.precision import to_bf16

EDGES = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 2.0 - 2**-9, 0.0, -0.0, 1e-40, -1e-40,
                  3.3895e38, 3.4e38, np.inf, -np.inf], dtype=np.float32)
NANS = np.array([0x7FC00000, 0x7FFFFFFF, 0xFFC00001, 0x7F800001], dtype=np.uint32).view(np.float32)


def _bits(x) -> str:
    return f"0x{int(np.asarray(x, np.float32).view(np.uint32)):08X}"


def check_to_bf16(fn) -> None:
    """Exercise 14.1: fn(x float32 array) -> uint16 bits, round to nearest even, NaN -> 0x7FFF, as CUDA."""
    ex = "Exercise 14.1"
    gen = rng()
    x = np.concatenate([EDGES, NANS, (gen.standard_normal(3000) * 10.0 ** gen.integers(-8, 8, 3000)).astype(np.float32)])
    got = run_exercise(ex, fn, x.copy())
    if not isinstance(got, np.ndarray) or got.shape != x.shape:
        raise ExerciseFailed(f"{ex}: return a NumPy array of the input's shape {x.shape}, got {type(got).__name__}"
                             f"{getattr(got, 'shape', '')}")
    if got.dtype != np.uint16:
        raise ExerciseFailed(f"{ex}: return the bits as uint16 (a bf16 number is 16 bits), got {got.dtype}")
    want = to_bf16(x)
    bad = np.flatnonzero(got != want)
    if bad.size == 0:
        passed(ex, "ties to even, infinities, overflow and NaN all match CUDA's __float2bfloat16")
        return
    i = bad[0]
    u = x.view(np.uint32)
    cause = None
    if np.isnan(x[i]):
        cause = ("a NaN input must give a NaN, and CUDA gives 0x7FFF; adding the rounding increment to a NaN's "
                 "bits can carry into the sign or exponent: test for NaN first")
    elif np.array_equal(got[~np.isnan(x)], (u >> 16).astype(np.uint16)[~np.isnan(x)]):
        cause = "the low 16 bits are simply dropped: that rounds toward zero, not to nearest"
    elif np.array_equal(got[~np.isnan(x)], ((u + 0x8000) >> 16).astype(np.uint16)[~np.isnan(x)]):
        cause = "adding 0x8000 rounds ties away from zero (half up): ties must go to the even neighbour (add 0x7FFF + the lowest kept bit)"
    raise ExerciseFailed(f"{ex}: {bad.size} of {x.size} values round wrong. First: x = {x[i]!r} (bits {_bits(x[i])}): "
                         f"expected 0x{int(want[i]):04X}, got 0x{int(got[i]):04X}."
                         + (f"\n  likely cause: {cause}" if cause else ""))


def check_stochastic_round(fn) -> None:
    """Exercise 14.2: fn(x float32, noise uint32 in [0, 2^16)) -> uint16 bits = (bits(x) + noise) >> 16."""
    ex = "Exercise 14.2"
    gen = rng()
    x = (gen.standard_normal(2000) * 3).astype(np.float32)
    noise = gen.integers(0, 2**16, x.size).astype(np.uint32)
    got = run_exercise(ex, fn, x.copy(), noise.copy())
    u = x.view(np.uint32)
    want = ((u + noise) >> 16).astype(np.uint16)
    if not isinstance(got, np.ndarray) or got.shape != x.shape or got.dtype != np.uint16:
        raise ExerciseFailed(f"{ex}: return uint16 bits of the input's shape {x.shape}")
    if np.array_equal(got, want):
        # and the point of it: the expected value is exact
        many = np.full(20000, 1.0 + 2**-9, np.float32)   # a quarter of the way from 1.0 to the next bf16
        noise = gen.integers(0, 2**16, many.size).astype(np.uint32)
        bits = run_exercise(ex, fn, many.copy(), noise.copy())
        want = ((many.view(np.uint32) + noise) >> 16).astype(np.uint16)
        if not (isinstance(bits, np.ndarray) and bits.shape == many.shape and np.array_equal(bits, want)):
            raise ExerciseFailed(f"{ex}: right on 2000 random values, but not on {many.size} copies of 1 + 2^-9: "
                                 f"the answer must hold for any array size and any noise, not only the first test's")
        mean = float((bits.astype(np.uint32) << 16).view(np.float32).mean())
        passed(ex, f"1 + 2^-9 rounds up about a quarter of the time: mean {mean:.5f}, exact {1 + 2**-9:.5f}")
        return
    i = int(np.flatnonzero(got != want)[0])
    cause = None
    if np.array_equal(got, to_bf16(x)):
        cause = "that is round-to-nearest: stochastic rounding adds the random bits to the dropped half, then truncates"
    elif np.array_equal(got, (u >> 16).astype(np.uint16)):
        cause = ("every value is truncated: the noise is ignored, or added after the shift, where it is lost; add "
                 "it to the full 32 bits, below the 16 that are kept")
    raise ExerciseFailed(f"{ex}: x = {x[i]!r} with noise {int(noise[i])}: expected 0x{int(want[i]):04X}, "
                         f"got 0x{int(got[i]):04X}." + (f"\n  likely cause: {cause}" if cause else ""))
