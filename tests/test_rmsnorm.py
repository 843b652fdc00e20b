"""Lesson 15, RMSNorm: the NumPy reference against PyTorch and finite differences."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmc_lessons.gradcheck import gradcheck
from llmc_lessons.layers.layernorm import layernorm_forward
from llmc_lessons.layers.rmsnorm import rmsnorm_backward, rmsnorm_forward

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
