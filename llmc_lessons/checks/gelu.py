"""Checks for lesson 06 (GELU): the derivative gelu'(x), derived (Exercise 6.1), the NumPy backward (Exercise 6.2),
the backward kernel (Exercise 6.3) and the forward kernel (Exercise 6.4)."""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.checks import (CHECKED_MODE_TIP, ExerciseFailed, assert_close, exercise_kernel, forward_outputs,
                                 numerical_jacobian, passed, poisoned, rng, run_exercise)
from llmc_lessons.layers.gelu import (GELU_CUBE_COEF, GELU_SCALING_FACTOR, gelu_backward, gelu_erf_backward,
                                      gelu_erf_forward, gelu_forward)


def _gelu_backward_mistakes(dout: np.ndarray, x: np.ndarray) -> dict:
    """{what the student probably did: the dinp that mistake produces}, computed in the dtype of x."""
    k, c = x.dtype.type(GELU_SCALING_FACTOR), x.dtype.type(GELU_CUBE_COEF)
    half = x.dtype.type(0.5)
    u = k * (x + c * x ** 3)
    th = np.tanh(u)
    sech2 = 1 - th * th
    du_dx = k * (1 + 3 * c * x * x)
    return {
        "the product-rule term 0.5 * (1 + tanh(u)) is missing: d/dx [0.5 x (1 + tanh u)] has a term from "
        "differentiating x as well as one from differentiating tanh u":
            half * x * sech2 * du_dx * dout,
        "the factor (1 + 3 * 0.044715 x^2) is missing from du/dx: u = sqrt(2/pi) (x + 0.044715 x^3), so "
        "du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)":
            (half * (1 + th) + half * x * sech2 * k) * dout,
        "du/dx = sqrt(2/pi) is missing altogether (the inner derivative of tanh(u))":
            (half * (1 + th) + half * x * sech2) * dout,
        "that is the derivative of the exact erf-GELU, Phi(x) + x phi(x); GPT-2 uses the tanh approximation":
            gelu_erf_backward(dout, x),
        "sech^2(u) = 1 - tanh^2(u), not 1 + tanh^2(u)":
            (half * (1 + th) + half * x * (1 + th * th) * du_dx) * dout,
        "d tanh(u)/du is sech^2(u) = 1 - tanh^2(u), not 1 - tanh(u)":
            (half * (1 + th) + half * x * (1 - th) * du_dx) * dout,
        "the factor x in front of the second term is missing (product rule: x times d/dx of 0.5(1 + tanh u))":
            (half * (1 + th) + half * sech2 * du_dx) * dout,
        "the local derivative was not multiplied by dout (chain rule: dinp = gelu'(x) * dout)":
            half * (1 + th) + half * x * sech2 * du_dx,
        "that is gelu(x) * dout, the forward value, not its derivative":
            gelu_forward(x) * dout,
    }


def _gelu_forward_mistakes(inp: np.ndarray) -> dict:
    """{what the student probably did: the out that mistake produces}, in float64."""
    x = inp.astype(np.float64)
    k, a = GELU_SCALING_FACTOR, GELU_CUBE_COEF
    return {
        "that is the exact erf form; GPT-2 was trained with the tanh approximation": gelu_erf_forward(x),
        "the factor 1/2 is missing": x * (1 + np.tanh(k * (x + a * x ** 3))),
        "the cube term a x^3 is missing from the tanh's argument": 0.5 * x * (1 + np.tanh(k * x)),
        "the factor k = sqrt(2/pi) is missing from the tanh's argument": 0.5 * x * (1 + np.tanh(x + a * x ** 3)),
        "the factor x in front is missing: gelu(x) = 0.5 x (1 + tanh(...))": 0.5 * (1 + np.tanh(k * (x + a * x ** 3))),
    }


def check_gelu_forward(fn) -> None:
    """Exercise 6.0: fn(inp) -> the tanh-approximate GELU of every element, same shape, float32 in and out."""
    ex = "Exercise 6.0"
    gen = rng()
    inp = (gen.standard_normal((3, 5, int(gen.integers(7, 20)))) * 3).astype(np.float32)
    want = gelu_forward(inp)
    out, = forward_outputs(ex, run_exercise(ex, fn, inp.copy()), ("out",))
    assert_close(ex, "out", out, want, atol=1e-6, rtol=1e-5, known_mistakes=_gelu_forward_mistakes(inp),
                 hint="gelu(x) = 0.5 x (1 + tanh(k (x + a x^3))), k = sqrt(2/pi), a = 0.044715.")
    passed(ex, f"{inp.size} elements in [{inp.min():.1f}, {inp.max():.1f}] match, float32")

def check_gelu_derivative(fn) -> None:
    """Exercise 6.1: fn(x) -> gelu'(x), elementwise, against central differences of gelu_forward in float64."""
    ex = "Exercise 6.1"
    gen = rng()
    x = gen.standard_normal(int(gen.integers(17, 30))) * 2.0   # wide enough to reach where tanh saturates
    x[:5] = [-4.0, -1.0, 0.0, 1.0, 4.0]
    got = run_exercise(ex, fn, x.copy())
    want = np.diagonal(numerical_jacobian(gelu_forward, x))   # elementwise: the Jacobian is diagonal
    ones = np.ones_like(x)
    mistakes = {cause: wrong for cause, wrong in _gelu_backward_mistakes(ones, x).items() if "dout" not in cause}
    mistakes["that is gelu(x), the forward value, not its derivative"] = gelu_forward(x)
    assert_close(ex, "gelu'(x)", got, want, atol=1e-7, rtol=1e-6, known_mistakes=mistakes,
                 hint="gelu(x) = 0.5 x (1 + tanh u) with u = sqrt(2/pi) (x + 0.044715 x^3): the product rule gives "
                      "two terms, and d/dx tanh(u) needs the chain rule through u.")
    passed(ex, f"gelu'(x) matches finite differences at {x.size} points, tails included")


def check_gelu_backward(gelu_backward_fn) -> None:
    """Exercise 6.2: gelu_backward_fn(dout, inp) -> dinp, in NumPy, against the reference in float64."""
    ex = "Exercise 6.2"
    gen = rng()
    B, T, C4 = 3, 7, 4 * int(gen.integers(3, 9)) + 1          # awkward sizes
    x = gen.standard_normal((B, T, C4)) * 2.0                 # wide enough to reach where tanh saturates
    x.reshape(-1)[:5] = [-4.0, -1.0, 0.0, 1.0, 4.0]
    dout = gen.standard_normal((B, T, C4))
    got = run_exercise(ex, gelu_backward_fn, dout.copy(), x.copy())
    dtype = getattr(got, "dtype", None)
    if dtype is not None and dtype != np.float64:
        raise ExerciseFailed(f"{ex}: for float64 inputs your function returned {dtype}. Compute in the dtype of "
                             f"the input (no np.float32(...) casts): the gradient check runs in float64.")
    assert_close(ex, "dinp", got, gelu_backward(dout, x), atol=1e-9, rtol=1e-6,
                 known_mistakes=_gelu_backward_mistakes(dout, x),
                 hint="gelu(x) = 0.5 x (1 + tanh u) is a product of x and a function of x: the product rule gives "
                      "two terms, and the chain rule through u gives a third factor: your gelu'(x) of Exercise 6.1.")
    probe = np.array([[[-2.0, -0.5, 0.0, 0.5, 2.0]]])
    assert_close(ex, "dinp at x = -2, -0.5, 0, 0.5, 2 with dout = 1",
                 run_exercise(ex, gelu_backward_fn, np.ones_like(probe), probe.copy()),
                 gelu_backward(np.ones_like(probe), probe), atol=1e-9, rtol=1e-6,
                 known_mistakes=_gelu_backward_mistakes(np.ones_like(probe), probe))
    passed(ex, f"dinp matches the reference on a {B}x{T}x{C4} input")


def check_gelu_backward_kernel(source: str, block_sizes=(32, 128)) -> None:
    """Exercise 6.3: gelu_backward_kernel(float* dinp, const float* inp, const float* dout, int N) in `source`,
    against the reference, with NaN-poisoned output, an awkward N and several block sizes."""
    ex = "Exercise 6.3"
    kernel = exercise_kernel(ex, source, "gelu_backward_kernel")
    gen = rng()
    for block_size in block_sizes:
        N = int(gen.integers(3, 12)) * block_size + int(gen.integers(1, block_size))  # not a multiple
        x = (gen.standard_normal(N) * 2.0).astype(np.float32)
        dout = gen.standard_normal(N).astype(np.float32)
        # Each array is the front of a longer one: threads past the end (i >= N) that forget the bounds check
        # then touch memory that exists, and the NaN tail after dinp shows whether they wrote to it.
        guard = block_size
        buf = poisoned((N + guard,))
        dinp = buf[:N]
        x_pad = device.to_device(np.concatenate([x, np.ones(guard, np.float32)]))
        dout_pad = device.to_device(np.concatenate([dout, np.ones(guard, np.float32)]))
        grid = (N + block_size - 1) // block_size
        kernel((grid,), (block_size,), (dinp, x_pad[:N], dout_pad[:N], np.int32(N)))
        device.synchronize()
        # compared with the float64 result of the same float32 inputs: float32 rounding (worst where
        # 1 + tanh(u) cancels, for x < -4) stays below 1e-5, the known mistakes are off by far more
        x64, dout64 = x.astype(np.float64), dout.astype(np.float64)
        assert_close(ex, f"dinp (N={N}, block_size={block_size})", dinp, gelu_backward(dout64, x64),
                     atol=1e-5, rtol=1e-4, known_mistakes=_gelu_backward_mistakes(dout64, x64),
                     hint="one thread per element, as in lesson 00's SAXPY; the local derivative as in Exercise "
                          "6.1, times the gradient that arrives from above.")
        tail = device.to_host(buf[N:])
        if not np.all(np.isnan(tail)):
            raise ExerciseFailed(f"{ex}: the kernel wrote past the end of dinp (N={N}, block_size={block_size}): "
                                 f"the last block has threads with i >= N, and they must not write. "
                                 f"{CHECKED_MODE_TIP}")
    passed(ex, f"block sizes {tuple(block_sizes)}, awkward N, output poisoned with NaN")


def check_gelu_forward_kernel(source: str, block_sizes=(32, 128)) -> None:
    """Exercise 6.4: gelu_forward_kernel1(float* out, const float* inp, int N) in `source`, against the
    reference, with NaN-poisoned output, an awkward N and several block sizes."""
    ex = "Exercise 6.4"
    kernel = exercise_kernel(ex, source, "gelu_forward_kernel1")
    gen = rng()
    for block_size in block_sizes:
        N = int(gen.integers(3, 12)) * block_size + int(gen.integers(1, block_size))  # not a multiple
        x = (gen.standard_normal(N) * 3.0).astype(np.float32)
        # inp is the front of a longer array and out of a NaN-filled one: threads past the end (i >= N) that
        # forget the bounds check read memory that exists, and the NaN tail after out shows whether they wrote.
        guard = block_size
        buf = poisoned((N + guard,))
        x_pad = device.to_device(np.concatenate([x, np.ones(guard, np.float32)]))
        grid = (N + block_size - 1) // block_size
        kernel((grid,), (block_size,), (buf[:N], x_pad[:N], np.int32(N)))
        device.synchronize()
        # against the float64 GELU of the same float32 inputs: float32 rounding stays below 1e-6 of the scale
        assert_close(ex, f"out (N={N}, block_size={block_size})", buf[:N], gelu_forward(x.astype(np.float64)),
                     atol=1e-6, rtol=1e-5, known_mistakes=_gelu_forward_mistakes(x),
                     hint="one thread per element, as in lesson 00's SAXPY; gelu(x) = 0.5 x (1 + tanh(k (x + "
                          "a x^3))) with the constants GELU_SCALING_FACTOR (k) and GELU_CUBE_COEF (a).")
        if not np.all(np.isnan(device.to_host(buf[N:]))):
            raise ExerciseFailed(f"{ex}: the kernel wrote past the end of out (N={N}, block_size={block_size}): "
                                 f"the last block has threads with i >= N, and they must not write. "
                                 f"{CHECKED_MODE_TIP}")
    passed(ex, f"block sizes {tuple(block_sizes)}, awkward N, output poisoned with NaN")
