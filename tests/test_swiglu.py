"""Lesson 15, SwiGLU: the NumPy reference against PyTorch and finite differences."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmc_lessons import device
from llmc_lessons.checks import poisoned
from llmc_lessons.cuda import load_kernel
from llmc_lessons.device import to_device, to_host
from llmc_lessons.gradcheck import gradcheck
from llmc_lessons.layers.swiglu import (sigmoid, swiglu_backward, swiglu_backward_cuda, swiglu_forward,
                                        swiglu_forward_cuda)

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
    np.testing.assert_allclose(s, [0.0, 1 / (1 + np.exp(30.0)), 0.5, 1 / (1 + np.exp(-30.0)), 1.0], rtol=1e-15, atol=1e-300)
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
