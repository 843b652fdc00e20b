"""Lesson 15, RMSNorm: the NumPy reference against PyTorch and finite differences."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmc_lessons import device
from llmc_lessons.checks import poisoned
from llmc_lessons.cuda import load_kernel
from llmc_lessons.device import to_device, to_host
from llmc_lessons.gradcheck import gradcheck
from llmc_lessons.layers.layernorm import layernorm_forward
from llmc_lessons.layers.rmsnorm import (rmsnorm_backward, rmsnorm_backward_cuda, rmsnorm_forward,
                                         rmsnorm_forward_cuda)

# ---------------------------------------------------------------------------------------------------------
# NumPy reference


def test_forward_and_backward_match_torch_autograd():
    gen = np.random.default_rng(0)
    x, w, dout = gen.standard_normal((2, 5, 13)) * 3, gen.standard_normal(13), gen.standard_normal((2, 5, 13))
    out, rstd = rmsnorm_forward(x, w)
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    tout = tx * torch.rsqrt(tx.pow(2).mean(-1, keepdim=True) + 1e-5) * tw
    tout.backward(torch.tensor(dout))
    np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-12, atol=1e-12)
    assert rstd.shape == (2, 5)
    dinp, dweight = rmsnorm_backward(dout, x, w, rstd)
    np.testing.assert_allclose(dinp, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dweight, tw.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_backward_gradcheck_float64():
    gen = np.random.default_rng(1)
    x, w = gen.standard_normal((2, 3, 11)), gen.standard_normal(11)

    def forward(inp, weight):
        return rmsnorm_forward(inp, weight)[0]

    def backward(dout, inp, weight):
        dinp, dweight = rmsnorm_backward(dout, inp, weight, rmsnorm_forward(inp, weight)[1])
        return {"inp": dinp, "weight": dweight}

    gradcheck(forward, backward, {"inp": x, "weight": w}, title="rmsnorm").assert_ok()


def test_equals_layernorm_on_rows_of_mean_zero():
    gen = np.random.default_rng(2)
    x = gen.standard_normal((3, 4, 16))
    x -= x.mean(axis=-1, keepdims=True)                   # mean 0: the root mean square is the std
    w = gen.standard_normal(16)
    np.testing.assert_allclose(rmsnorm_forward(x, w)[0], layernorm_forward(x, w, np.zeros(16))[0], rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_preserves_dtype(dtype):
    x = np.random.default_rng(3).standard_normal((2, 3, 8)).astype(dtype)
    w = np.ones(8, dtype)
    out, rstd = rmsnorm_forward(x, w)
    dinp, dweight = rmsnorm_backward(np.ones_like(x), x, w, rstd)
    assert {out.dtype, rstd.dtype, dinp.dtype, dweight.dtype} == {np.dtype(dtype)}


def test_reference_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, T, C\)"):
        rmsnorm_forward(np.ones((3, 4)), np.ones(4))
    with pytest.raises(ValueError, match="weight must have shape"):
        rmsnorm_forward(np.ones((2, 3, 4)), np.ones(5))
    with pytest.raises(ValueError, match="rstd must have shape"):
        rmsnorm_backward(np.ones((2, 3, 4)), np.ones((2, 3, 4)), np.ones(4), np.ones((2, 4)))


# ---------------------------------------------------------------------------------------------------------
# Kernels, launched directly: outputs poisoned with NaN, each the front of a longer array whose NaN tail must
# stay NaN, inputs the front of longer arrays too


def _front(a: np.ndarray, pad: int):
    return to_device(np.concatenate([a.reshape(-1), np.ones(pad, a.dtype)]))[:a.size]


def _inputs(seed, N, C):
    gen = np.random.default_rng(seed)
    x = (gen.standard_normal((N, C)) * 2 + 0.5).astype(np.float32)     # not mean 0: a mean would show
    w = (gen.standard_normal(C) + 1).astype(np.float32)
    dout = gen.standard_normal((N, C)).astype(np.float32)
    return x, w, dout


@pytest.mark.parametrize("block_size,N,C", [(32, 7, 45), (64, 13, 100), (256, 11, 768 + 3)])
def test_kernels_match_reference(block_size, N, C):
    x, w, dout = _inputs(block_size + C, N, C)
    out64, rstd64 = rmsnorm_forward(x[None].astype(np.float64), w.astype(np.float64))
    dinp64, dw64 = rmsnorm_backward(dout[None].astype(np.float64), x[None].astype(np.float64), w.astype(np.float64),
                                    rstd64)
    rows = block_size // 32
    grid = (-(-N // rows),)
    d_x, d_w, d_dout = _front(x, 64), _front(w, 64), _front(dout, 64)
    out_buf, rstd_buf = poisoned((N * C + 64,)), poisoned((N + 64,))
    load_kernel("rmsnorm.cu", "rmsnorm_forward_kernel")(
        grid, (block_size,), (out_buf[:N * C], rstd_buf[:N], d_x, d_w, np.int32(N), np.int32(C), np.float32(1e-5)))
    np.testing.assert_allclose(to_host(out_buf[:N * C]).reshape(N, C), out64[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(to_host(rstd_buf[:N]), rstd64[0], rtol=1e-5)
    assert np.isnan(to_host(out_buf[N * C:])).all() and np.isnan(to_host(rstd_buf[N:])).all()
    d_rstd = _front(rstd64[0].astype(np.float32), 64)
    dinp_buf = poisoned((N * C + 64,))
    load_kernel("rmsnorm.cu", "rmsnorm_backward_kernel")(
        grid, (block_size,), (dinp_buf[:N * C], d_dout, d_x, d_w, d_rstd, np.int32(N), np.int32(C)))
    np.testing.assert_allclose(to_host(dinp_buf[:N * C]).reshape(N, C), dinp64[0], atol=1e-5, rtol=1e-4)
    assert np.isnan(to_host(dinp_buf[N * C:])).all()
    dw_buf = poisoned((C + 64,))
    load_kernel("rmsnorm.cu", "rmsnorm_param_backward_kernel")(
        (-(-C // block_size),), (block_size,), (dw_buf[:C], d_dout, d_x, d_rstd, np.int32(N), np.int32(C)))
    np.testing.assert_allclose(to_host(dw_buf[:C]), dw64, atol=1e-5, rtol=1e-4)
    assert np.isnan(to_host(dw_buf[C:])).all()


@pytest.mark.parametrize("block_size,param_block_size", [(32, 32), (128, 96), (1024, 256)])
def test_launchers_match_reference(block_size, param_block_size):
    gen = np.random.default_rng(block_size)
    x = (gen.standard_normal((3, 5, 67)) * 3).astype(np.float32)
    w = gen.standard_normal(67).astype(np.float32)
    dout = gen.standard_normal(x.shape).astype(np.float32)
    out, rstd = rmsnorm_forward_cuda(to_device(x), to_device(w), block_size=block_size)
    out64, rstd64 = rmsnorm_forward(x.astype(np.float64), w.astype(np.float64))
    np.testing.assert_allclose(to_host(out), out64, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(to_host(rstd), rstd64, rtol=1e-5)
    dinp, dweight = rmsnorm_backward_cuda(to_device(dout), to_device(x), to_device(w), rstd, block_size=block_size,
                                          param_block_size=param_block_size)
    dinp64, dw64 = rmsnorm_backward(dout.astype(np.float64), x.astype(np.float64), w.astype(np.float64), rstd64)
    np.testing.assert_allclose(to_host(dinp), dinp64, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(to_host(dweight), dw64, atol=1e-4, rtol=1e-4)


def test_launchers_handle_empty_batches():
    out, rstd = rmsnorm_forward_cuda(to_device(np.ones((0, 3, 8), np.float32)), to_device(np.ones(8, np.float32)))
    assert out.shape == (0, 3, 8) and rstd.shape == (0, 3)
    dinp, dweight = rmsnorm_backward_cuda(out, out, to_device(np.ones(8, np.float32)), rstd)
    assert dinp.shape == (0, 3, 8) and not to_host(dweight).any()


def test_launchers_reject_bad_input():
    x, w = to_device(np.ones((2, 3, 8), np.float32)), to_device(np.ones(8, np.float32))
    rstd = to_device(np.ones((2, 3), np.float32))
    with pytest.raises(TypeError, match="dtype float32"):
        rmsnorm_forward_cuda(to_device(np.ones((2, 3, 8))), w)
    with pytest.raises(ValueError, match="C-contiguous"):
        rmsnorm_forward_cuda(to_device(np.ones((2, 3, 16), np.float32))[..., ::2], w)
    with pytest.raises(ValueError, match="shape"):
        rmsnorm_forward_cuda(x, to_device(np.ones(9, np.float32)))
    with pytest.raises(ValueError, match="shape"):
        rmsnorm_backward_cuda(x, x, w, to_device(np.ones((3, 2), np.float32)))
    with pytest.raises(ValueError, match="multiple of 32"):
        rmsnorm_forward_cuda(x, w, block_size=48)
    with pytest.raises(ValueError, match="eps"):
        rmsnorm_forward_cuda(x, w, eps=0.0)
    with pytest.raises(TypeError, match="param_block_size"):
        rmsnorm_backward_cuda(x, x, w, rstd, param_block_size=64.0)


@pytest.mark.skipif(not device.on_gpu(), reason="only a GPU backend refuses NumPy arrays")
def test_launchers_reject_numpy_on_gpu():
    with pytest.raises(TypeError, match="CuPy"):
        rmsnorm_forward_cuda(np.ones((1, 2, 8), np.float32), np.ones(8, np.float32))
