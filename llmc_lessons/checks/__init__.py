"""The checks that exercise cells call, and the tools they are built from.

Each lesson has its own module here (`checks.layernorm`, ...) with one `check_*` function per exercise.
They all use the helpers below so every failure reads the same way: which exercise, which output, the
first wrong element, expected vs got, and the likely cause. A failure is an ExerciseFailed (an AssertionError)
that Jupyter shows as its message alone: the frames of the check's own code would bury the message, and could
show the expected answer.

While a check runs the student's function, the package's own version of what the exercise asks for (REFERENCES)
is replaced by a sentinel: an answer that calls it fails and is told so.

A passing answer to an exercise that implements a layer is kept as the student's part (llmc_lessons.parts).
"""
from __future__ import annotations

import inspect
import sysconfig
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from llmc_lessons import parts
from llmc_lessons.device import to_host, xp

PACKAGE_DIR = Path(__file__).resolve().parent.parent
PACKAGE = PACKAGE_DIR.name

REFERENCES = {
    "Exercise 0.3": ("numerical_grad", "gradcheck"),
    "Exercise 1.1": ("token_file_bytes",), "Exercise 1.2": ("get_batch",), "Exercise 2.0": ("encoder_forward",),
    "Exercise 2.1": ("encoder_backward", "numerical_grad"), "Exercise 2.2": ("encoder_backward",),
    "Exercise 3.0": ("layernorm_forward",),
    "Exercise 3.1": ("layernorm_backward", "numerical_grad"), "Exercise 3.2": ("layernorm_backward",),
    "Exercise 4.0": ("matmul_forward",),
    "Exercise 4.1": ("matmul_backward", "numerical_grad"), "Exercise 4.2": ("matmul_backward",),
    "Exercise 5.0": ("attention_forward", "causal_softmax"),
    "Exercise 5.1": ("attention_backward", "numerical_grad"), "Exercise 5.2": ("attention_backward",),
    "Exercise 6.0": ("gelu_forward",), "Exercise 6.1": ("gelu_backward", "numerical_grad"),
    "Exercise 6.2": ("gelu_backward",), "Exercise 7.0": ("residual_forward",), "Exercise 7.1": ("block_backward",),
    "Exercise 7.2": ("mlp_backward",), "Exercise 8.0": ("softmax_forward", "crossentropy_forward"),
    "Exercise 8.1": ("crossentropy_softmax_backward", "numerical_grad"),
    "Exercise 8.2": ("crossentropy_softmax_backward",), "Exercise 9.1": ("adamw_update",),
    "Exercise 10.1": ("num_parameters",), "Exercise 10.3": ("next_token_probs",),
    "Exercise 11.1": ("learning_rate",), "Exercise 11.2": ("training_step",),
    "Exercise 13.1": ("online_softmax_update",), "Exercise 14.1": ("to_bf16",),
    "Exercise 15.1": ("rmsnorm_backward",), "Exercise 15.3": ("rope_backward",), "Exercise 15.5": ("swiglu_backward",),
    "Exercise 16.1": ("repkv_forward",), "Exercise 16.2": ("repkv_backward",),
    "Exercise 17.1": ("ring_reduce_scatter_step",), "Exercise 17.2": ("ring_all_gather_step",),
}
"""The package functions that compute what an exercise asks a student to write, by name (found wherever the
package keeps them when the check runs). Calling one is no answer."""


class ExerciseFailed(AssertionError):
    """A check's verdict: what is wrong, where, the likely cause and a hint. Jupyter shows the message alone.
    A verdict on a kernel handed in with its `// TODO (Exercise N.k)` comment still there ends with a note."""

    def __init__(self, message: str):
        if _todo_left is not None and message.startswith(_todo_left):
            message += (f"\n  note: the kernel still has its `// TODO ({_todo_left})` comment. If {_todo_left} is "
                        f"not done yet, write your code there, run that cell, then run this check again.")
        super().__init__(message)

    def _render_traceback_(self) -> list[str]:   # IPython calls this instead of formatting the frames
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}"]


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


class _DelegatedCall(Exception):
    """Raised by a sentinel that stands in for a package reference while the student's function runs."""


def _their_frames(tb) -> list[str]:
    """The frames of `tb` in the student's own code (not the package's, not Python's or a library's), formatted."""
    skip = (str(PACKAGE_DIR), *{sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")})
    return [f"  line {f.lineno} of {f.name}: {(f.line or '').strip()}"
            for f in traceback.extract_tb(tb) if not f.filename.startswith(skip)]


@contextmanager
def _references_replaced(exercise: str, fn: Callable, calls: list):
    """Replace the package functions REFERENCES names for `exercise` by sentinels that record a call and raise,
    in every module of the package and in the namespace `fn` reads its globals from (a notebook's)."""
    modules = parts.package_namespaces()

    def sentinel_for(name):
        def sentinel(*args, **kwargs):
            calls.append(name)
            raise _DelegatedCall(name)
        return sentinel

    replacements = {}                                  # id(function) -> (function, its sentinel)
    for ns in modules:
        for name in REFERENCES.get(exercise, ()):
            f = ns.get(name)
            if callable(f) and getattr(f, "__module__", "").startswith(PACKAGE) and id(f) not in replacements:
                replacements[id(f)] = (f, sentinel_for(name))
    with parts.rebound(modules + [getattr(fn, "__globals__", {})], replacements):
        yield


_answers: dict = {}
"""{exercise: the student's function or kernel source under check}, for the exercises whose answer is a part."""


def _hand_in(exercise: str, answer) -> None:
    specs = parts.BY_EXERCISE.get(exercise)
    if specs and (isinstance(answer, str) if specs[0].is_kernel else inspect.isfunction(answer)):
        _answers[exercise] = answer


def run_exercise(exercise: str, fn: Callable, *args, **kwargs):
    """Call the student's function. An untouched stub, an error inside it, or a call to the package's own answer
    becomes an ExerciseFailed that says what to do."""
    _hand_in(exercise, fn)
    calls: list[str] = []
    try:
        with _references_replaced(exercise, fn, calls):
            result = fn(*args, **kwargs)
    except NotImplementedError as e:
        raise ExerciseFailed(f"{exercise} is not done yet ({e}). Write your answer in the exercise cell "
                             f"above, run that cell, then run this check again.") from None
    except Exception as e:
        if not calls:
            where = "\n".join(_their_frames(e.__traceback__)[-3:])
            raise ExerciseFailed(f"{exercise}: your code raised {type(e).__name__}: {e}"
                                 + (f"\n{where}" if where else "")) from e   # a check may add a hint by cause
    if calls:
        raise ExerciseFailed(f"{exercise}: your answer calls the package's own {calls[0]}, which computes what "
                             f"this exercise asks you to write (the check compares your code with it). Write it "
                             f"yourself, from the derivation above.")
    return result


CHECKED_MODE_TIP = ("On a CPU, `os.environ['LLMC_CHECK'] = '1'` before this check runs every launch under "
                    "AddressSanitizer, which names the line of any read or write outside an array, and of two "
                    "threads touching one address with no __syncthreads between them.")

_todo_left: str | None = None
"""The exercise whose kernel was last handed in with its `// TODO (Exercise N.k)` comment still in the source."""


def exercise_kernel(exercise: str, source: str, name: str):
    """The student's kernel from the CUDA `source` of an exercise cell, compiled, as a RawKernel. A kernel that
    still has its `// TODO (Exercise N.k)` comment is checked like any other; a failure then names the TODO."""
    global _todo_left
    from llmc_lessons.cuda import CompileError, RawKernel
    _hand_in(exercise, source)
    _todo_left = exercise if f"TODO ({exercise})" in source else None
    try:
        return RawKernel(source, name).compile()
    except (CompileError, ValueError, NotImplementedError) as e:   # the compiler's, or the emulator's CUDA subset
        raise ExerciseFailed(f"{exercise}: {e}") from None


TRACE_TIP = ("See the launch this check traced, warp by warp: `from llmc_lessons import memview; memview.show()`, or "
             "line by line: `from llmc_lessons.cuda import trace; print(trace.last)`.")


def trace_of(run: Callable):
    """The Trace (llmc_lessons.cuda.trace) of the last launch that `run()` makes, recorded by the emulator (on a GPU
    too); None where the emulator cannot build a traced kernel here (no C++ compiler with -fsanitize=thread), so
    that a check of memory behaviour is skipped there rather than failed."""
    from llmc_lessons.cuda import CompileError, trace
    from llmc_lessons.cuda.emulator import compiler
    try:
        compiler()
        with trace.recording() as traces:
            run()
    except CompileError as e:
        if "-fsanitize=thread" in str(e):
            return None
        raise
    except RuntimeError as e:   # only the compiler's absence (a KernelError is a RuntimeError too)
        if "needs a C++ compiler" in str(e):
            return None
        raise
    return traces[-1]


def assert_coalesced(exercise: str, got, reference, names, hint: str) -> None:
    """Fail unless the student's launch (Trace `got`) moves about as few sectors of global memory for each array in
    `names` as the reference kernel's launch on the same inputs (Trace `reference`)."""
    for name in names:
        g, r = got.traffic(name), reference.traffic(name)
        if g["sectors"] <= 1.25 * r["sectors"] + 2:
            continue
        def per(t):
            return (f"{t['sectors'] / max(1, t['requests']):.1f} sectors a request, "
                    f"{t['bytes_used'] / max(1, 32 * t['sectors']):.0%} of their bytes used")
        raise ExerciseFailed(
            f"{exercise}: the values are right, but the warps' accesses to {name} are not coalesced: {g['requests']} "
            f"requests moved {g['sectors']} sectors of 32 bytes ({per(g)}), where the reference kernel moves "
            f"{r['sectors']} ({per(r)}) on the same launch. A warp's 32 threads run each load and store together: "
            f"when neighbouring threads touch neighbouring floats, one request moves 4 sectors. {hint}\n"
            f"  {TRACE_TIP}")


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
    """Raise an ExerciseFailed that teaches unless |got - expected| <= atol + rtol * |expected| everywhere.

    known_mistakes: {"what the student probably did": the array that mistake produces}; when `got` matches
    one, the message names it. hint: a sentence added to any failure.
    """
    if got is None:
        raise ExerciseFailed(f"{exercise} ({name}): got None. Did your function forget to `return` its result?")
    try:
        got = np.asarray(to_host(got), dtype=np.float64)
    except (TypeError, ValueError):
        raise ExerciseFailed(f"{exercise} ({name}): expected an array of numbers, got {type(got).__name__}"
                             f"{' ' + repr(got)[:60] if not hasattr(got, 'shape') else ''}.") from None
    expected = np.asarray(to_host(expected), dtype=np.float64)
    tail = f"\n  hint: {hint}" if hint else ""
    if got.shape != expected.shape:
        extra = ""
        if got.shape == expected.shape[::-1] and got.ndim == 2:
            extra = " (that is the transposed shape: a wrong axis or a missing transpose?)"
        raise ExerciseFailed(f"{exercise} ({name}): expected shape {expected.shape}, got {got.shape}{extra}.{tail}")
    nan_unwritten = np.isnan(got) & ~np.isnan(expected)
    bad = nan_unwritten | ~np.isclose(got, expected, atol=atol, rtol=rtol, equal_nan=True)
    if not bad.any():
        return
    first = np.argwhere(bad)[0] if got.ndim else ()
    at = f"{name}{_fmt_index(first)}" if got.ndim else name
    g, e = got[tuple(first)], expected[tuple(first)]
    lines = [f"{exercise} ({name}): {int(bad.sum())} of {bad.size} elements are wrong.",
             f"  first wrong element {at}: expected {e:.6g}, got {g:.6g}"]
    wrong_values = np.abs(got - expected)[bad & ~nan_unwritten]   # the wrong elements that are not NaN
    if wrong_values.size:
        lines.append(f"  max abs error {wrong_values.max():.3g} among the {wrong_values.size} wrong elements that "
                     f"are not NaN (allowed: {atol:g} + {rtol:g} * |expected|)")
    cause = _likely_cause(got, expected, known_mistakes, atol, rtol)
    if cause:
        lines.append(f"  likely cause: {cause}")
    elif nan_unwritten.any():
        lines.append(f"  likely cause: {int(nan_unwritten.sum())} elements are NaN. Outputs are filled with NaN "
                     f"before the launch, so these were never written: check the index arithmetic, the bounds "
                     f"check, and that the grid covers every element. {CHECKED_MODE_TIP}")
    raise ExerciseFailed("\n".join(lines) + tail)


def forward_outputs(exercise: str, result, names: tuple[str, ...], dtype=np.float32) -> tuple:
    """The arrays a forward exercise's function returned, named `names` (one name: the result itself), each
    checked to be an array of `dtype`: a forward keeps the dtype it is given, float32 in the model."""
    arrays = (result,) if len(names) == 1 else result
    if len(names) > 1 and (not isinstance(result, tuple) or len(result) != len(names)):
        raise ExerciseFailed(f"{exercise}: return the tuple ({', '.join(names)}), got {type(result).__name__}"
                             + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""))
    for name, a in zip(names, arrays):
        have = getattr(a, "dtype", None)
        if have is not None and have != np.dtype(dtype):
            raise ExerciseFailed(f"{exercise} ({name}): {np.dtype(dtype)} in, {have} out. The model runs in "
                                 f"{np.dtype(dtype)}: a NumPy float64 constant (np.sqrt(2 / np.pi), np.float64(...)) "
                                 f"or a dtype=np.float64 promotes the result; a Python float (math.sqrt, 1e-5) does "
                                 f"not.")
    return arrays


def numerical_jacobian(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """J[i..., j...] = d f(x)[i...] / d x[j...] by central differences in float64 (the step and formula of
    `gradcheck.numerical_grad`, all outputs at once: two calls of f per input element), of shape
    f(x).shape + x.shape: what a derivation exercise's answer is checked against."""
    x = np.array(x, dtype=np.float64)
    flat, eps, columns = x.reshape(-1), 1e-6, []
    for j in range(flat.size):
        old = flat[j]
        flat[j] = old + eps
        plus = np.array(f(x), dtype=np.float64)
        flat[j] = old - eps
        minus = np.array(f(x), dtype=np.float64)
        flat[j] = old
        columns.append((plus - minus) / (2 * eps))
    out_shape = columns[0].shape if columns else np.shape(f(x))
    return np.stack(columns, axis=-1).reshape(out_shape + x.shape) if columns else np.zeros(out_shape + x.shape)


def passed(exercise: str, detail: str = "") -> None:
    """Print the line a passing check shows, and keep the answer when it is a part (and a line that says so)."""
    print(f"{exercise}: correct{' - ' + detail if detail else ''}")
    if exercise in _answers:
        print(parts.record(exercise, _answers.pop(exercise)))
