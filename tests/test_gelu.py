"""Lesson 06, GELU: references, gradient check, every kernel, bad input, and the exercise checks."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.checks import gelu as checks
from llmc_lessons.checks import poisoned
from llmc_lessons.cuda import kernel_source, load_kernel
from llmc_lessons.device import to_device, to_host
from llmc_lessons.gradcheck import gradcheck
from llmc_lessons.layers.gelu import (gelu_backward, gelu_backward_cuda, gelu_erf_backward, gelu_erf_forward,
                                      gelu_forward, gelu_forward_cuda)

K = math.sqrt(2 / math.pi)


def _scalar_gelu(x):
    return 0.5 * x * (1 + math.tanh(K * (x + 0.044715 * x ** 3)))


# ---------------------------------------------------------------------------------------------------------
# NumPy reference


def test_forward_matches_scalar_formula_and_limits():
    x = np.random.default_rng(0).standard_normal((3, 5, 7)) * 3
    want = np.vectorize(_scalar_gelu)(x)
    np.testing.assert_allclose(gelu_forward(x), want, rtol=1e-14, atol=1e-15)
    big = np.array([-30.0, 0.0, 30.0])
    np.testing.assert_allclose(gelu_forward(big), [0.0, 0.0, 30.0], atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_preserves_dtype(dtype):
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(dtype)
    out = gelu_forward(x)
    dinp = gelu_backward(np.ones_like(x), x)
    assert out.dtype == dtype and dinp.dtype == dtype and out.shape == x.shape == dinp.shape
    if dtype == np.float32:  # float32 result close to the float64 one
        np.testing.assert_allclose(out, gelu_forward(x.astype(np.float64)), atol=1e-6, rtol=1e-5)


def test_backward_gradcheck_float64():
    x = np.random.default_rng(2).standard_normal((2, 3, 11)) * 2
    gradcheck(lambda inp: gelu_forward(inp), lambda dy, inp: {"inp": gelu_backward(dy, inp)},
              {"inp": x}, title="gelu").assert_ok()


def test_erf_gelu_backward_gradcheck_and_difference_is_small():
    x = np.random.default_rng(3).standard_normal(40) * 2
    gradcheck(lambda inp: gelu_erf_forward(inp), lambda dy, inp: {"inp": gelu_erf_backward(dy, inp)},
              {"inp": x}, title="erf gelu").assert_ok()
    grid = np.linspace(-6, 6, 2001)
    diff = np.abs(gelu_forward(grid) - gelu_erf_forward(grid)).max()
    assert 1e-5 < diff < 1e-3  # the tanh approximation is close to, but not the same as, x Phi(x)


def test_backward_rejects_mismatched_shapes_and_ints():
    with pytest.raises(ValueError, match="dout has shape"):
        gelu_backward(np.ones(3), np.ones(4))
    with pytest.raises(TypeError, match="float32 or float64"):
        gelu_forward(np.arange(4))


# ---------------------------------------------------------------------------------------------------------
# Kernels, launched directly with poisoned outputs and a NaN tail that must stay NaN


def _padded(a: np.ndarray, pad: int):
    """`a` as the front of a longer backend array (so a missing bounds check touches owned memory)."""
    buf = to_device(np.concatenate([a.reshape(-1), np.ones(pad, a.dtype)]))
    return buf, buf[:a.size]


@pytest.mark.parametrize("block_size", [32, 96, 256])
def test_forward_kernel1_and_backward_kernel(block_size):
    gen = np.random.default_rng(block_size)
    N = 5 * block_size + 17                       # not a multiple of the block size
    x = (gen.standard_normal(N) * 3).astype(np.float32)
    dout = gen.standard_normal(N).astype(np.float32)
    _, d_x = _padded(x, block_size)
    _, d_dout = _padded(dout, block_size)
    grid = (-(-N // block_size),)
    out_buf = poisoned((N + block_size,))
    load_kernel("gelu.cu", "gelu_forward_kernel1")(grid, (block_size,), (out_buf[:N], d_x, np.int32(N)))
    np.testing.assert_allclose(to_host(out_buf[:N]), gelu_forward(x), atol=1e-6, rtol=1e-5)
    assert np.isnan(to_host(out_buf[N:])).all()
    dinp_buf = poisoned((N + block_size,))
    load_kernel("gelu.cu", "gelu_backward_kernel")(grid, (block_size,), (dinp_buf[:N], d_x, d_dout, np.int32(N)))
    np.testing.assert_allclose(to_host(dinp_buf[:N]), gelu_backward(dout, x), atol=1e-5, rtol=1e-5)
    assert np.isnan(to_host(dinp_buf[N:])).all()


@pytest.mark.parametrize("block_size", [32, 128])
def test_forward_kernel2_float4(block_size):
    gen = np.random.default_rng(7 + block_size)
    N4 = 3 * block_size + 5                       # float4s: not a multiple of the block size
    x = (gen.standard_normal(4 * N4) * 3).astype(np.float32)
    out = poisoned((4 * N4,))
    load_kernel("gelu.cu", "gelu_forward_kernel2")((-(-N4 // block_size),), (block_size,),
                                                    (out, to_device(x), np.int32(N4)))
    np.testing.assert_allclose(to_host(out), gelu_forward(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("block_size,version", [(32, 1), (128, 1), (64, 2), (256, 2)])
def test_launchers_match_reference(block_size, version):
    gen = np.random.default_rng(block_size + version)
    x = (gen.standard_normal((3, 5, 4 * 13)) * 3).astype(np.float32)     # 780 elements
    dout = gen.standard_normal(x.shape).astype(np.float32)
    out = gelu_forward_cuda(to_device(x), block_size=block_size, version=version)
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_allclose(to_host(out), gelu_forward(x), atol=1e-6, rtol=1e-5)
    dinp = gelu_backward_cuda(to_device(dout), to_device(x), block_size=block_size)
    np.testing.assert_allclose(to_host(dinp), gelu_backward(dout, x), atol=1e-5, rtol=1e-5)


def test_launchers_reject_bad_input():
    x = to_device(np.ones((2, 3, 4), np.float32))
    with pytest.raises(TypeError, match="dtype float32"):
        gelu_forward_cuda(to_device(np.ones((2, 3, 4))))
    with pytest.raises(ValueError, match="C-contiguous"):
        gelu_forward_cuda(to_device(np.ones((4, 6), np.float32))[:, ::2])
    with pytest.raises(ValueError, match="shape"):
        gelu_backward_cuda(to_device(np.ones((2, 3, 5), np.float32)), x)
    with pytest.raises(TypeError):
        gelu_forward_cuda([1.0, 2.0])
    with pytest.raises(ValueError, match="multiple of 32"):
        gelu_forward_cuda(x, block_size=100)
    with pytest.raises(TypeError, match="block_size must be an int"):
        gelu_backward_cuda(x, x, block_size=128.0)
    with pytest.raises(ValueError, match="multiple of 4"):
        gelu_forward_cuda(to_device(np.ones(7, np.float32)), version=2)
    with pytest.raises(ValueError, match="version"):
        gelu_forward_cuda(x, version=3)


@pytest.mark.skipif(not device.on_gpu(), reason="only a GPU backend refuses NumPy arrays")
def test_launchers_reject_numpy_on_gpu():
    with pytest.raises(TypeError, match="CuPy"):
        gelu_forward_cuda(np.ones(8, np.float32))


# ---------------------------------------------------------------------------------------------------------
# Exercise 6.2: the NumPy backward


def _solution(dout, inp):
    return gelu_backward(dout, inp)


def _stub(dout, inp):
    raise NotImplementedError("Exercise 6.2: write gelu_backward")


def _wrong(kind):
    def fn(dout, x):
        u = K * (x + 0.044715 * x ** 3)
        th = np.tanh(u)
        sech2 = 1 - th ** 2
        du = K * (1 + 3 * 0.044715 * x ** 2)
        if kind == "no_product_term":
            g = 0.5 * x * sech2 * du
        elif kind == "no_cubic_factor":
            g = 0.5 * (1 + th) + 0.5 * x * sech2 * K
        elif kind == "erf":
            return gelu_erf_backward(dout, x)
        elif kind == "sign":
            g = -(0.5 * (1 + th) + 0.5 * x * sech2 * du)
        elif kind == "sech_plus":
            g = 0.5 * (1 + th) + 0.5 * x * (1 + th ** 2) * du
        elif kind == "no_dout":
            return 0.5 * (1 + th) + 0.5 * x * sech2 * du
        elif kind == "float32":  # computing in float32 is not float64-accurate: flagged too
            return gelu_backward(dout.astype(np.float32), x.astype(np.float32))
        return g * dout
    return fn


def test_check_gelu_backward_passes_on_solution(capsys):
    checks.check_gelu_backward(_solution)
    assert "Exercise 6.2: correct" in capsys.readouterr().out


def test_check_gelu_backward_fails_on_stub():
    with pytest.raises(AssertionError, match="Exercise 6.2 is not done yet"):
        checks.check_gelu_backward(_stub)


@pytest.mark.parametrize("kind,cause", [
    ("no_product_term", "product-rule term"), ("no_cubic_factor", r"1 \+ 3 \* 0.044715"),
    ("erf", "erf-GELU"), ("sign", "sign error"), ("sech_plus", r"not 1 \+ tanh"),
    ("no_dout", "multiplied by dout"), ("float32", "returned float32"),
])
def test_check_gelu_backward_catches_mistakes(kind, cause):
    with pytest.raises(AssertionError, match=cause):
        checks.check_gelu_backward(_wrong(kind))


# ---------------------------------------------------------------------------------------------------------
# Exercise 6.3: the backward kernel body

_BODY = re.compile(r"(gelu_backward_kernel\(.*?\{)(.*?)(\n\}\n)", re.S)


def _kernel_with_body(body: str) -> str:
    src = kernel_source("gelu.cu")
    m = _BODY.search(src)
    assert m, "gelu_backward_kernel not found in gelu.cu"
    return src[:m.start(2)] + "\n" + body + src[m.end(2):]


GOOD = """
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < N) {
        float x = inp[i];
        float u = GELU_SCALING_FACTOR * (x + GELU_CUBE_COEF * x * x * x);
        float th = tanhf(u);
        float local_grad = 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * GELU_SCALING_FACTOR
                           * (1.0f + 3.0f * GELU_CUBE_COEF * x * x);
        dinp[i] = local_grad * dout[i];
    }"""


def test_check_kernel_passes_on_solution_and_package_source(capsys):
    checks.check_gelu_backward_kernel(kernel_source("gelu.cu"))
    checks.check_gelu_backward_kernel(_kernel_with_body(GOOD))
    assert capsys.readouterr().out.count("Exercise 6.3: correct") == 2


def test_check_kernel_fails_on_stub():
    stub = _kernel_with_body("    // TODO (Exercise 6.3): compute dinp[i] for the element this thread owns")
    with pytest.raises(AssertionError, match="Exercise 6.3 is not done yet"):
        checks.check_gelu_backward_kernel(stub)
    # the generator's stub, if the TODO text were edited away, leaves dinp unwritten: NaN
    with pytest.raises(AssertionError, match="never written"):
        checks.check_gelu_backward_kernel(_kernel_with_body("    // nothing"))


@pytest.mark.parametrize("old,new,cause", [
    ("if (i < N) {", "{", "wrote past the end"),
    ("blockIdx.x * blockDim.x + threadIdx.x", "threadIdx.x", "never written"),
    ("blockIdx.x * blockDim.x + threadIdx.x", "blockIdx.x * blockDim.x + threadIdx.x + 1", "Exercise 6.3"),
    ("0.5f * (1.0f + th) + ", "", "product-rule term"),
    ("(1.0f - th * th)", "(1.0f + th * th)", r"not 1 \+ tanh"),
    (" * (1.0f + 3.0f * GELU_CUBE_COEF * x * x)", "", "is missing from du/dx"),
    ("dinp[i] = local_grad * dout[i];", "dinp[i] = -local_grad * dout[i];", "sign error"),
    ("dinp[i] = local_grad * dout[i];", "dinp[i] = local_grad;", "multiplied by dout"),
])
def test_check_kernel_catches_mistakes(old, new, cause):
    assert old in GOOD
    with pytest.raises(AssertionError, match=cause):
        checks.check_gelu_backward_kernel(_kernel_with_body(GOOD.replace(old, new)))


# ---------------------------------------------------------------------------------------------------------
# Exercise 6.4: the forward kernel body

_FORWARD_BODY = re.compile(r"(gelu_forward_kernel1\(.*?\{)(.*?)(\n\}\n)", re.S)


def _forward_kernel_with_body(body: str) -> str:
    src = kernel_source("gelu.cu")
    m = _FORWARD_BODY.search(src)
    assert m, "gelu_forward_kernel1 not found in gelu.cu"
    return src[:m.start(2)] + "\n" + body + src[m.end(2):]


FORWARD_GOOD = """
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < N) {
        float x = inp[i];
        out[i] = 0.5f * x * (1.0f + tanhf(GELU_SCALING_FACTOR * (x + GELU_CUBE_COEF * x * x * x)));
    }"""


def test_forward_kernel_check_passes_on_solution_and_package_source(capsys):
    checks.check_gelu_forward_kernel(kernel_source("gelu.cu"))
    checks.check_gelu_forward_kernel(_forward_kernel_with_body(FORWARD_GOOD))
    assert capsys.readouterr().out.count("Exercise 6.4: correct") == 2


def test_forward_kernel_check_fails_on_stub():
    stub = _forward_kernel_with_body("    // TODO (Exercise 6.4): gelu_forward_kernel1, one thread per element")
    with pytest.raises(AssertionError, match="Exercise 6.4 is not done yet"):
        checks.check_gelu_forward_kernel(stub)
    with pytest.raises(AssertionError, match="never written"):
        checks.check_gelu_forward_kernel(_forward_kernel_with_body("    // nothing"))


@pytest.mark.parametrize("old,new,cause", [
    ("if (i < N) {", "{", "wrote past the end"),
    ("blockIdx.x * blockDim.x + threadIdx.x", "threadIdx.x", "never written"),
    ("blockIdx.x * blockDim.x + threadIdx.x", "blockIdx.x * blockDim.x + threadIdx.x + 1", "Exercise 6.4"),
    ("0.5f * x * (1.0f", "x * (1.0f", "factor 1/2 is missing"),
    (" + GELU_CUBE_COEF * x * x * x", "", "cube term"),
    ("GELU_SCALING_FACTOR * (x", "(x", r"k = sqrt\(2/pi\) is missing"),
    ("0.5f * x * (1.0f", "0.5f * (1.0f", "factor x in front is missing"),
    ("GELU_CUBE_COEF * x * x * x", "0.5f * x * x * x", "Exercise 6.4"),      # a wrong constant
])
def test_forward_kernel_check_catches_mistakes(old, new, cause):
    assert old in FORWARD_GOOD
    with pytest.raises(AssertionError, match=cause):
        checks.check_gelu_forward_kernel(_forward_kernel_with_body(FORWARD_GOOD.replace(old, new)))
