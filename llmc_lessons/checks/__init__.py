"""The checks that exercise cells call, and the tools they are built from.

Each lesson has its own module here (`checks.layernorm`, ...) with one `check_*` function per exercise.
They all use the helpers below so every failure reads the same way: which exercise, which output, the
first wrong element, expected vs got, and the likely cause. A failure is an AssertionError.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from llmc_lessons.device import to_host, xp


def rng(seed=None) -> np.random.Generator:
    """A NumPy generator: fresh entropy by default, so a check sees new inputs each run."""
    return np.random.default_rng(seed)


def randn(gen: np.random.Generator, *shape, scale: float = 1.0, dtype=np.float32):
    """Standard-normal values of `shape` as a backend array (CuPy on a GPU)."""
    return xp.asarray((gen.standard_normal(shape) * scale).astype(dtype))


def poisoned(shape, dtype=np.float32):
    """A backend array full of NaN (or -1 for integers): any element a kernel does not write stays visible."""
    fill = np.nan if np.issubdtype(np.dtype(dtype), np.floating) else -1
    return xp.full(shape, fill, dtype=dtype)


def run_exercise(exercise: str, fn: Callable, *args, **kwargs):
    """Call the student's function; an untouched stub becomes a failure that says what to do."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as e:
        raise AssertionError(f"{exercise} is not done yet ({e}). Write your answer in the exercise cell "
                             f"above, run that cell, then run this check again.") from None


def exercise_kernel(exercise: str, source: str, name: str):
    """The student's kernel from the CUDA `source` of an exercise cell, as a RawKernel. An untouched stub (its
    `// TODO (Exercise N.k)` still there) becomes a failure that says what to do."""
    from llmc_lessons.cuda import RawKernel
    if f"TODO ({exercise})" in source:
        raise AssertionError(f"{exercise} is not done yet: the kernel still has its TODO. Write your code in the CUDA "
                             f"source above, run that cell, then run this check again.")
    return RawKernel(source, name)


def _fmt_index(idx) -> str:
    return "[" + ", ".join(str(int(i)) for i in idx) + "]"


def _likely_cause(got: np.ndarray, expected: np.ndarray, known_mistakes, atol, rtol) -> str | None:
    """Name a likely cause by comparing `got` with transformations of `expected` and known wrong answers."""
    def close(a, b):
        return a.shape == b.shape and np.allclose(a, b, atol=atol, rtol=rtol, equal_nan=True)

    for cause, wrong in (known_mistakes or {}).items():
        if close(got, np.asarray(to_host(wrong), dtype=np.float64)):
            return cause
    if np.any(expected) and close(got, -expected):
        return "the result is the negative of the expected one: a sign error"
    if not np.any(got) and np.any(expected):
        return "every element is zero: the result was never computed or written"
    mask = np.abs(expected) > 1e-6
    if mask.sum() >= 2:
        ratio = got[mask] / expected[mask]
        r = float(np.median(ratio))
        if np.isfinite(r) and abs(r - 1) > 1e-3 and np.allclose(ratio, r, rtol=1e-3, atol=0):
            return f"every element is {r:.4g} times the expected one: a missing or extra scale factor"
    for axis in range(expected.ndim):
        for shift in (1, -1):
            if expected.shape[axis] > 1:
                a = np.take(got, range(max(shift, 0), expected.shape[axis] + min(shift, 0)), axis=axis)
                b = np.take(expected, range(max(-shift, 0), expected.shape[axis] + min(-shift, 0)), axis=axis)
                if close(a, b):
                    return f"the result is the expected one shifted by {shift} along axis {axis}: an off-by-one index"
    return None


def assert_close(exercise: str, name: str, got, expected, atol: float = 1e-5, rtol: float = 1e-4,
                 known_mistakes: Mapping[str, object] | None = None, hint: str | None = None) -> None:
    """Raise an AssertionError that teaches unless |got - expected| <= atol + rtol * |expected| everywhere.

    known_mistakes: {"what the student probably did": the array that mistake produces}; when `got` matches
    one, the message names it. hint: a sentence added to any failure.
    """
    if got is None:
        raise AssertionError(f"{exercise} ({name}): got None. Did your function forget to `return` its result?")
    got = np.asarray(to_host(got), dtype=np.float64)
    expected = np.asarray(to_host(expected), dtype=np.float64)
    tail = f"\n  hint: {hint}" if hint else ""
    if got.shape != expected.shape:
        extra = ""
        if got.shape == expected.shape[::-1] and got.ndim == 2:
            extra = " (that is the transposed shape: a wrong axis or a missing transpose?)"
        raise AssertionError(f"{exercise} ({name}): expected shape {expected.shape}, got {got.shape}{extra}.{tail}")
    nan_unwritten = np.isnan(got) & ~np.isnan(expected)
    bad = nan_unwritten | ~np.isclose(got, expected, atol=atol, rtol=rtol, equal_nan=True)
    if not bad.any():
        return
    first = np.argwhere(bad)[0] if got.ndim else ()
    at = f"{name}{_fmt_index(first)}" if got.ndim else name
    g, e = got[tuple(first)], expected[tuple(first)]
    lines = [f"{exercise} ({name}): {int(bad.sum())} of {bad.size} elements are wrong.",
             f"  first wrong element {at}: expected {e:.6g}, got {g:.6g}"]
    finite = ~np.isnan(got)
    if finite.any():
        lines.append(f"  max abs error {np.nanmax(np.abs(got - expected)):.3g} "
                     f"(allowed: {atol:g} + {rtol:g} * |expected|)")
    cause = _likely_cause(got, expected, known_mistakes, atol, rtol)
    if cause:
        lines.append(f"  likely cause: {cause}")
    elif nan_unwritten.any():
        lines.append(f"  likely cause: {int(nan_unwritten.sum())} elements are NaN. Outputs are filled with NaN "
                     f"before the launch, so these were never written: check the index arithmetic, the bounds "
                     f"check, and that the grid covers every element.")
    raise AssertionError("\n".join(lines) + tail)


def passed(exercise: str, detail: str = "") -> None:
    """Print the one line a passing check shows."""
    print(f"{exercise}: correct{' - ' + detail if detail else ''}")
