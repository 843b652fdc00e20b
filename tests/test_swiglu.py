"""Lesson 15, SwiGLU: the NumPy reference against PyTorch and finite differences."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmc_lessons import device
from llmc_lessons.checks import poisoned
from llmc_lessons.checks import swiglu as checks
from llmc_lessons.cuda import kernel_source, load_kernel
from llmc_lessons.device import to_device, to_host
from llmc_lessons.gradcheck import gradcheck
from llmc_lessons.layers.swiglu import (sigmoid, swiglu_backward, swiglu_backward_bf16, swiglu_backward_bf16_cuda,
                                        swiglu_backward_cuda, swiglu_forward, swiglu_forward_bf16,
                                        swiglu_forward_bf16_cuda, swiglu_forward_cuda)
from llmc_lessons.precision import from_bf16, to_bf16

# ---------------------------------------------------------------------------------------------------------
# NumPy reference


def test_forward_and_backward_match_torch_autograd():
    gen = np.random.default_rng(0)
    x, dout = gen.standard_normal((2, 5, 2 * 7)) * 3, gen.standard_normal((2, 5, 7))
    tx = torch.tensor(x, requires_grad=True)
    tout = tx[..., :7] * torch.nn.functional.silu(tx[..., 7:])   # llm.c's layout: up, then gate
    tout.backward(torch.tensor(dout))
    np.testing.assert_allclose(swiglu_forward(x), tout.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(swiglu_backward(dout, x), tx.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_backward_gradcheck_float64():
    x = np.random.default_rng(1).standard_normal((2, 3, 2 * 9)) * 2
    gradcheck(swiglu_forward, lambda dy, inp: {"inp": swiglu_backward(dy, inp)}, {"inp": x},
              title="swiglu").assert_ok()


def test_sigmoid_is_stable_at_large_inputs():
    x = np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        s = sigmoid(x)
    want = [0.0, 1 / (1 + np.exp(30.0)), 0.5, 1 / (1 + np.exp(-30.0)), 1.0]
    np.testing.assert_allclose(s, want, rtol=1e-15, atol=1e-300)
    assert sigmoid(x.astype(np.float32)).dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_preserves_dtype(dtype):
    x = np.random.default_rng(2).standard_normal((2, 3, 8)).astype(dtype)
    out = swiglu_forward(x)
    assert out.shape == (2, 3, 4) and out.dtype == dtype
    assert swiglu_backward(np.ones_like(out), x).dtype == dtype


def test_reference_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2H"):
        swiglu_forward(np.ones((2, 3, 5)))
    with pytest.raises(ValueError, match="dout must have shape"):
        swiglu_backward(np.ones((2, 3, 3)), np.ones((2, 3, 8)))
    with pytest.raises(TypeError, match="float32 or float64"):
        swiglu_forward(np.arange(8))


# ---------------------------------------------------------------------------------------------------------
# Kernels, launched directly: outputs poisoned with NaN, each the front of a longer array whose NaN tail must
# stay NaN


@pytest.mark.parametrize("block_size,N,H", [(32, 5, 37), (128, 7, 100), (256, 3, 171)])
def test_kernels_match_reference(block_size, N, H):
    gen = np.random.default_rng(block_size + H)
    x = (gen.standard_normal((N, 2 * H)) * 4).astype(np.float32)        # both tails of the sigmoid
    dout = gen.standard_normal((N, H)).astype(np.float32)
    x_pad = to_device(np.concatenate([x.reshape(-1), np.ones(block_size, np.float32)]))[:x.size]
    dout_pad = to_device(np.concatenate([dout.reshape(-1), np.ones(block_size, np.float32)]))[:dout.size]
    grid = (-(-(N * H) // block_size),)
    out_buf = poisoned((N * H + block_size,))
    load_kernel("swiglu.cu", "swiglu_forward_kernel")(grid, (block_size,), (out_buf[:N * H], x_pad, np.int32(N),
                                                                             np.int32(H)))
    np.testing.assert_allclose(to_host(out_buf[:N * H]).reshape(N, H), swiglu_forward(x.astype(np.float64)),
                               atol=1e-5, rtol=1e-5)
    assert np.isnan(to_host(out_buf[N * H:])).all()
    dinp_buf = poisoned((2 * N * H + block_size,))
    load_kernel("swiglu.cu", "swiglu_backward_kernel")(grid, (block_size,), (dinp_buf[:2 * N * H], dout_pad, x_pad,
                                                                              np.int32(N), np.int32(H)))
    np.testing.assert_allclose(to_host(dinp_buf[:2 * N * H]).reshape(N, 2 * H),
                               swiglu_backward(dout.astype(np.float64), x.astype(np.float64)), atol=1e-5, rtol=1e-5)
    assert np.isnan(to_host(dinp_buf[2 * N * H:])).all()


@pytest.mark.parametrize("block_size", [32, 96, 1024])
def test_launchers_match_reference(block_size):
    gen = np.random.default_rng(block_size)
    x = (gen.standard_normal((3, 5, 2 * 29)) * 3).astype(np.float32)
    dout = gen.standard_normal((3, 5, 29)).astype(np.float32)
    np.testing.assert_allclose(to_host(swiglu_forward_cuda(to_device(x), block_size=block_size)),
                               swiglu_forward(x.astype(np.float64)), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(to_host(swiglu_backward_cuda(to_device(dout), to_device(x), block_size=block_size)),
                               swiglu_backward(dout.astype(np.float64), x.astype(np.float64)), atol=1e-5, rtol=1e-5)


def test_kernels_saturate_without_nan():
    x = to_device(np.array([[[1.0, 2.0, -100.0, 100.0]]], np.float32))          # up = 1, 2; gate = -100, 100
    np.testing.assert_allclose(to_host(swiglu_forward_cuda(x)), [[[0.0, 200.0]]], atol=1e-6)
    dinp = to_host(swiglu_backward_cuda(to_device(np.ones((1, 1, 2), np.float32)), x))
    np.testing.assert_allclose(dinp, [[[0.0, 100.0, 0.0, 2.0]]], atol=1e-5)


def test_launchers_reject_bad_input():
    x = to_device(np.ones((2, 3, 8), np.float32))
    with pytest.raises(TypeError, match="dtype float32"):
        swiglu_forward_cuda(to_device(np.ones((2, 3, 8))))
    with pytest.raises(ValueError, match="even"):
        swiglu_forward_cuda(to_device(np.ones((2, 3, 7), np.float32)))
    with pytest.raises(ValueError, match="shape"):
        swiglu_forward_cuda(to_device(np.ones((6, 8), np.float32)))
    with pytest.raises(ValueError, match="shape"):
        swiglu_backward_cuda(to_device(np.ones((2, 3, 8), np.float32)), x)
    with pytest.raises(ValueError, match="C-contiguous"):
        swiglu_forward_cuda(to_device(np.ones((2, 3, 16), np.float32))[..., ::2])
    with pytest.raises(TypeError, match="block_size"):
        swiglu_forward_cuda(x, block_size="256")


@pytest.mark.skipif(not device.on_gpu(), reason="only a GPU backend refuses NumPy arrays")
def test_launchers_reject_numpy_on_gpu():
    with pytest.raises(TypeError, match="CuPy"):
        swiglu_forward_cuda(np.ones((1, 2, 8), np.float32))


# ---------------------------------------------------------------------------------------------------------
# Exercise 15.5: the NumPy backward


def _backward(kind=None):
    def swiglu_backward(dout, inp):
        H = dout.shape[-1]
        up, gate = inp[..., :H], inp[..., H:]
        if kind == "swap":
            up, gate = gate, up
        s = 1 / (1 + np.exp(-gate))
        dsilu = s * (1 + gate * (1 - s))
        if kind == "sigmoid":
            dsilu = s * (1 - s)
        elif kind == "no_product_rule":
            dsilu = s
        dup, dgate = dout * gate * s, dout * up * dsilu
        if kind == "order":
            return np.concatenate([dgate, dup], axis=-1)
        if kind == "swap":
            return np.concatenate([dgate, dup], axis=-1)     # the swapped roles, written back in place
        if kind == "no_dout":
            return np.concatenate([gate * s, up * dsilu], axis=-1)
        return np.concatenate([dup, dgate], axis=-1)
    return swiglu_backward


def test_check_backward_passes_on_solution(capsys):
    checks.check_swiglu_backward(_backward())
    checks.check_swiglu_backward(swiglu_backward)
    assert capsys.readouterr().out.count("Exercise 15.5: correct") == 2


def test_check_backward_fails_on_stub():
    def stub(dout, inp):
        raise NotImplementedError("Exercise 15.5: write swiglu_backward")
    with pytest.raises(AssertionError, match="Exercise 15.5 is not done yet"):
        checks.check_swiglu_backward(stub)


@pytest.mark.parametrize("kind,cause", [
    ("sigmoid", "the derivative of sigmoid"), ("no_product_rule", "the term from differentiating s"),
    ("swap", "gate and up are swapped"), ("order", "the wrong order"), ("no_dout", "not multiplied by dout"),
])
def test_check_backward_names_mistakes(kind, cause):
    with pytest.raises(AssertionError, match="likely cause: .*" + cause):
        checks.check_swiglu_backward(_backward(kind))


# ---------------------------------------------------------------------------------------------------------
# Exercise 15.6: the backward kernel's body

HEAD = """extern "C" __global__ void swiglu_backward_kernel(float* dinp, const float* dout, const float* inp,
                                                  int N, int H) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
"""
GOOD = HEAD + """    if (k >= N * H) { return; }
    int r = k / H;
    int j = k % H;
    float up = inp[r * 2 * H + j];
    float gate = inp[r * 2 * H + H + j];
    float s = 1.0f / (1.0f + expf(-gate));
    dinp[r * 2 * H + j] = dout[k] * gate * s;
    dinp[r * 2 * H + H + j] = dout[k] * up * s * (1.0f + gate * (1.0f - s));
}
"""


def test_check_kernel_passes_on_solution_and_package_source(capsys):
    checks.check_swiglu_backward_kernel(GOOD)
    checks.check_swiglu_backward_kernel(kernel_source("swiglu.cu"))
    assert capsys.readouterr().out.count("Exercise 15.6: correct") == 2


def test_check_kernel_fails_on_stub():
    stub = HEAD + "    // TODO (Exercise 15.6): dup and dgate of the element this thread owns\n}\n"
    with pytest.raises(AssertionError, match="(?s)Exercise 15.6 .*never written"):
        checks.check_swiglu_backward_kernel(stub)


@pytest.mark.parametrize("old,new,cause", [
    ("s * (1.0f + gate * (1.0f - s))", "s * (1.0f - s)", "the derivative of sigmoid"),
    ("float up = inp[r * 2 * H + j];\n    float gate = inp[r * 2 * H + H + j];",
     "float gate = inp[r * 2 * H + j];\n    float up = inp[r * 2 * H + H + j];", "gate and up are swapped"),
    ("dout[k] * up * s * (1.0f + gate * (1.0f - s))", "dout[k] * up * s", "the term from differentiating s"),
    ("if (k >= N * H) { return; }", "", "wrote past the end"),
    ("int r = k / H;", "int r = k / (2 * H);", "Exercise 15.6"),
])
def test_check_kernel_names_mistakes(old, new, cause):
    assert old in GOOD
    with pytest.raises(AssertionError, match=cause):
        checks.check_swiglu_backward_kernel(GOOD.replace(old, new))


# ---------------------------------------------------------------------------------------------------------
# bf16 kernels: outputs allocated full of NaN (poisoned_allocations), against the float64 reference of the
# same bf16 inputs, rounded once


@pytest.mark.parametrize("block_size,shape", [(32, (2, 5, 2 * 37)), (128, (1, 7, 2 * 100)), (256, (3, 3, 2 * 171))])
def test_bf16_kernels_match_reference(block_size, shape, poisoned_allocations):
    gen = np.random.default_rng(block_size)
    x = to_bf16((gen.standard_normal(shape) * 4).astype(np.float32))
    dout = to_bf16(gen.standard_normal(shape[:-1] + (shape[-1] // 2,)).astype(np.float32))
    for got, want in ((swiglu_forward_bf16_cuda(to_device(x), block_size=block_size), swiglu_forward_bf16(x)),
                      (swiglu_backward_bf16_cuda(to_device(dout), to_device(x), block_size=block_size),
                       swiglu_backward_bf16(dout, x))):
        got = to_host(got)
        np.testing.assert_allclose(from_bf16(got), from_bf16(want), rtol=2 ** -7, atol=1e-6)
        assert np.mean(got == want) > 0.98


def test_bf16_launchers_reject_bad_input():
    with pytest.raises(TypeError, match="dtype uint16"):
        swiglu_forward_bf16_cuda(to_device(np.ones((2, 3, 8), np.float32)))
    with pytest.raises(ValueError, match="shape"):
        swiglu_backward_bf16_cuda(to_device(np.ones((2, 3, 3), np.uint16)), to_device(np.ones((2, 3, 8), np.uint16)))
