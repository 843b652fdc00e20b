"""The fused residual + LayerNorm kernel against the composition of the two course layers."""
import numpy as np
import pytest

from llmc_lessons.checks import poisoned
from llmc_lessons.cuda import load_kernel
from llmc_lessons.device import to_device, to_host
from llmc_lessons.gradcheck import gradcheck
from llmc_lessons.layers.layernorm import (fused_residual_layernorm_forward, fused_residual_layernorm_forward_cuda,
                                           layernorm_backward)


def inputs(seed, B, T, C):
    g = np.random.default_rng(seed)
    return [g.standard_normal(s).astype(np.float32) for s in ((B, T, C), (B, T, C), (C,), (C,))]


@pytest.mark.parametrize("B,T,C,block", [(2, 7, 45, 32), (3, 5, 100, 128), (1, 9, 768, 96), (2, 1, 3, 1024)])
def test_kernel_matches_the_composed_reference(B, T, C, block):
    a, b, w, bias = inputs(B * T + C, B, T, C)
    got = fused_residual_layernorm_forward_cuda(*(to_device(x) for x in (a, b, w, bias)), block_size=block)
    want = fused_residual_layernorm_forward(*(x.astype(np.float64) for x in (a, b, w, bias)))
    for g, ww in zip(got, want):
        assert g.shape == ww.shape and g.dtype == np.float32
        np.testing.assert_allclose(to_host(g), ww, rtol=1e-4, atol=1e-4)


def test_every_output_element_is_written():
    B, T, C = 3, 11, 37
    a, b, w, bias = (to_device(x) for x in inputs(1, B, T, C))
    outs = [poisoned((B, T, C)), poisoned((B, T, C)), poisoned((B, T)), poisoned((B, T))]
    N = B * T
    load_kernel("layernorm.cu", "fused_residual_layernorm_forward_kernel")(
        (-(-N // 2),), (64,), (*outs, a, b, w, bias, np.int32(N), np.int32(C), np.float32(1e-5)))
    assert not any(np.isnan(to_host(o)).any() for o in outs)


def test_reference_backward_through_the_fusion_float64():
    # the fused forward is residual then layernorm, so its input gradient is layernorm's, reaching both inputs
    a, b, w, bias = (x.astype(np.float64) for x in inputs(2, 2, 3, 5))

    def forward(inp1, inp2, weight, bias):
        return fused_residual_layernorm_forward(inp1, inp2, weight, bias)[1]

    def backward(dout, inp1, inp2, weight, bias):
        residual, _, mean, rstd = fused_residual_layernorm_forward(inp1, inp2, weight, bias)
        dres, dw, db = layernorm_backward(dout, residual, weight, mean, rstd)
        return {"inp1": dres, "inp2": dres, "weight": dw, "bias": db}

    gradcheck(forward, backward, dict(inp1=a, inp2=b, weight=w, bias=bias)).assert_ok()


def test_bad_input():
    a, b, w, bias = (to_device(x) for x in inputs(3, 2, 3, 8))
    with pytest.raises(ValueError, match="shape"):
        fused_residual_layernorm_forward_cuda(a, b[:, :2], w, bias)
    with pytest.raises(TypeError, match="float32"):
        fused_residual_layernorm_forward_cuda(a, b.astype(np.float64), w, bias)
    with pytest.raises(ValueError, match="multiple of 32"):
        fused_residual_layernorm_forward_cuda(a, b, w, bias, block_size=48)
