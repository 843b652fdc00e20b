"""Lesson 15, SwiGLU: the NumPy reference against PyTorch and finite differences."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmc_lessons.gradcheck import gradcheck
from llmc_lessons.layers.swiglu import sigmoid, swiglu_backward, swiglu_forward

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
