"""Checks for lesson 00: the first kernel (SAXPY), its launch configuration, and the student's gradient checker."""
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


def _curvy_loss(gen: np.random.Generator, shape, scale: float):
    """A scalar loss with curvature, its float32 input x and its exact float64 gradient at x. The loss computes
    in the dtype of what it is given, as a layer does: float32 in, float32 out."""
    w = gen.standard_normal(shape)

    def loss(x):
        x = np.asarray(x)
        return scale * np.sum(w.astype(x.dtype) * np.sin(2 * x) + x ** 3 / 3)

    x = gen.standard_normal(shape).astype(np.float32)
    x64 = x.astype(np.float64)
    return loss, x, scale * (2 * w * np.cos(2 * x64) + x64 ** 2)


def _relative_error(ex, grad_check, loss, x, grad, seed) -> float:
    got = run_exercise(ex, grad_check, loss, x.copy(), grad.copy(), seed)
    try:
        return float(got)
    except (TypeError, ValueError):
        raise ExerciseFailed(f"{ex}: grad_check returned {got!r} ({type(got).__name__}); it must return the "
                             f"relative error, one number.") from None


def _small(err: float) -> bool:
    return bool(np.isfinite(err) and 0 <= err < 1e-6)


def check_gradient_checker(grad_check) -> None:
    """Exercise 0.3: a correct gradient must score below 1e-6 at every scale of the loss, with a float32 input;
    a wrong one (two elements swapped) must score above 1e-3, at a loss scale as small as 1e-4."""
    ex = "Exercise 0.3"
    gen = rng()
    for scale in (1.0, 1e4, 1e-4):
        for seed in range(5):
            loss, x, grad = _curvy_loss(gen, (3, 5), scale)
            err = _relative_error(ex, grad_check, loss, x, grad, seed)
            # a random direction nearly at right angles to the gradient leaves a tiny derivative, and even a right
            # checker's relative error is then large (it failed a right answer in 3 of 3000 runs of this check):
            # two more directions (seeds) must then both pass
            if not _small(err) and not all(_small(_relative_error(ex, grad_check, loss, x, grad, s))
                                           for s in (seed + 100, seed + 200)):
                raise ExerciseFailed(
                    f"{ex}: for a CORRECT gradient your checker reports a relative error of {err:.3g} (loss scale "
                    f"{scale:g}, seed {seed}, x of dtype float32); it should be below 1e-6.\n"
                    f"  likely cause: in float64 a central difference with eps near 1e-6 is off by about 1e-10; a "
                    f"one-sided difference by about 1e-6, eps = 1e-2 by about 1e-4, eps = 1e-12 by about 1e-4, "
                    f"float32 anywhere (x, the direction, the nudged x) by about 1e-3, and an error that is not "
                    f"divided by the size of the derivative grows with the loss's scale.")
        wrong = [_relative_error(ex, grad_check, *_curvy_loss_wrong(gen, scale), seed) for seed in range(5)]
        if not np.median(wrong) > 1e-3:
            raise ExerciseFailed(
                f"{ex}: for a WRONG gradient (two of its 15 elements swapped) your checker reports relative errors "
                f"of {', '.join(f'{e:.2g}' for e in wrong)} (loss scale {scale:g}, seeds 0 to 4); they should be "
                f"far above 1e-3.\n  likely cause: a direction v of equal elements sees only the gradient's sum, "
                f"which a swap does not change (draw v at random); or the error is absolute, and tiny only "
                f"because the loss is small (divide by the size of the derivative).")
    passed(ex, "correct gradients score below 1e-6 at loss scales 1e-4 to 1e4 from float32 inputs; a wrong one "
               "scores above 1e-3")


def _curvy_loss_wrong(gen: np.random.Generator, scale: float):
    """_curvy_loss with a wrong gradient: its largest and smallest elements swapped."""
    loss, x, grad = _curvy_loss(gen, (3, 5), scale)
    flat = grad.reshape(-1)
    i, j = int(np.argmax(flat)), int(np.argmin(flat))
    flat[i], flat[j] = flat[j], flat[i]
    return loss, x, grad
