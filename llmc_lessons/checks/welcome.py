"""Checks for lesson 00: the first kernel (SAXPY) and its launch configuration."""
from __future__ import annotations

import numpy as np

from llmc_lessons.checks import (CHECKED_MODE_TIP, ExerciseFailed, assert_close, exercise_kernel, passed, randn,
                                 rng, run_exercise)
from llmc_lessons.device import to_host, xp

GUARD = 64  # NaN-filled elements after the output: a kernel that writes there has no working bounds check


def saxpy_reference(a: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N,), (N,) -> (N,): a * x + y."""
    return a * x + y


def check_saxpy_kernel(src: str, name: str = "saxpy_kernel") -> None:
    """Exercise 0.2: compile the student's kernel; launch it at awkward sizes and two block sizes."""
    ex = "Exercise 0.2"
    kernel = exercise_kernel(ex, src, name)
    gen = rng()
    for n, block in [(1000, 128), (37, 32), (3000, 256)]:
        x, y = randn(gen, n), randn(gen, n)
        a = np.float32(gen.uniform(0.5, 2.0))
        buf = xp.full(n + GUARD, np.nan, dtype=np.float32)
        out = buf[:n]
        grid = (n + block - 1) // block
        kernel((grid,), (block,), (out, x, y, a, np.int32(n)))
        tail = to_host(buf[n:])
        if not np.all(np.isnan(tail)):
            raise ExerciseFailed(f"{ex} (out): with N = {n} and {grid} blocks of {block} threads, the kernel wrote "
                                 f"past the end of out (element {n + int(np.argmax(~np.isnan(tail)))}). The last "
                                 f"block has threads whose index i >= N: they must do nothing. {CHECKED_MODE_TIP}")
        expected = saxpy_reference(a, to_host(x), to_host(y))
        threads_only = np.full(n, np.nan, np.float32)
        threads_only[:min(block, n)] = expected[:min(block, n)]
        assert_close(ex, "out", out, expected, atol=1e-6, rtol=1e-6,
                     known_mistakes={"i = threadIdx.x only: every block computes the same first elements; "
                                     "add blockIdx.x * blockDim.x": threads_only,
                                     "a * (x + y) instead of a * x + y": a * (to_host(x) + to_host(y)),
                                     "x + a * y instead of a * x + y": to_host(x) + a * to_host(y)},
                     hint=f"N = {n}, {grid} blocks of {block} threads. Thread i should write out[i] = a * x[i] + y[i].")
    passed(ex, "the kernel is right at N = 1000, 37 and 3000 with 128, 32 and 256 threads per block")


def check_num_blocks(num_blocks) -> None:
    """Exercise 0.1: the number of blocks that covers N elements: ceil(N / block_size)."""
    ex = "Exercise 0.1"
    for n, bs in [(1000, 128), (1024, 128), (1, 256), (37, 32), (32, 32), (8193, 1024)]:
        got = run_exercise(ex, num_blocks, n, bs)
        want = -(-n // bs)
        if not isinstance(got, (int, np.integer)):
            raise ExerciseFailed(f"{ex}: num_blocks({n}, {bs}) returned {got!r} of type {type(got).__name__}; a "
                                 f"grid size must be an int (use // for integer division, not /).")
        if got != want:
            why = ""
            if got == n // bs:
                why = " That is N // block_size, which rounds down and leaves the last elements without a thread."
            elif got == n // bs + 1:
                why = " That is N // block_size + 1, which launches a useless extra block when N divides evenly."
            raise ExerciseFailed(f"{ex}: num_blocks({n}, {bs}) returned {got}, expected {want}: the fewest blocks "
                                 f"of {bs} threads that cover {n} elements.{why}")
    passed(ex)
