"""Lesson 15, RMSNorm: the NumPy reference against PyTorch and finite differences."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmc_lessons import device
from llmc_lessons.checks import poisoned
from llmc_lessons.checks import rmsnorm as checks
from llmc_lessons.cuda import kernel_source, load_kernel
from llmc_lessons.device import to_device, to_host
from llmc_lessons.gradcheck import gradcheck
from llmc_lessons.layers.layernorm import layernorm_forward
from llmc_lessons.layers.rmsnorm import (residual_rmsnorm_forward_bf16, residual_rmsnorm_forward_bf16_cuda,
                                         rmsnorm_backward, rmsnorm_backward_bf16_cuda, rmsnorm_backward_cuda,
                                         rmsnorm_forward, rmsnorm_forward_bf16, rmsnorm_forward_bf16_cuda,
                                         rmsnorm_forward_cuda)
from llmc_lessons.precision import from_bf16, to_bf16

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
    for R in (1, 3):                                   # rows in R chunks: R rows of partial sums
        part_buf = poisoned((R * C + 64,))
        load_kernel("rmsnorm.cu", "rmsnorm_param_backward_kernel")(
            (-(-C // block_size), R), (block_size,), (part_buf[:R * C], d_dout, d_x, d_rstd, np.int32(N), np.int32(C)))
        np.testing.assert_allclose(to_host(part_buf[:R * C]).reshape(R, C).sum(0), dw64, atol=1e-5, rtol=1e-4)
        assert np.isnan(to_host(part_buf[R * C:])).all()
        dw_buf = poisoned((C + 64,))
        dw_buf[:C] = 1.0                               # the reduction adds into dweight
        load_kernel("rmsnorm.cu", "rmsnorm_param_reduce_kernel")(
            (-(-C // block_size),), (block_size,), (dw_buf[:C], part_buf[:R * C], np.int32(R), np.int32(C)))
        np.testing.assert_allclose(to_host(dw_buf[:C]), 1.0 + dw64, atol=1e-5, rtol=1e-4)
        assert np.isnan(to_host(dw_buf[C:])).all()


@pytest.mark.parametrize("block_size,param_block_size,B,T", [(32, 32, 3, 5), (128, 96, 4, 50), (1024, 256, 3, 5)])
def test_launchers_match_reference(block_size, param_block_size, B, T):
    gen = np.random.default_rng(block_size)
    x = (gen.standard_normal((B, T, 67)) * 3).astype(np.float32)
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


@pytest.mark.parametrize("version,N,C,block_size,max_blocks", [
    (2, 1, 8, 32, 264), (2, 37, 24, 64, 3), (2, 300, 776, 96, 7), (None, 300, 24, 256, 264),
    (1, 37, 24, 64, 264), (None, 37, 1600, 256, 264),       # C = 1600 does not fit version 2: version 1
])
def test_backward_versions_match_reference(version, N, C, block_size, max_blocks, poisoned_allocations):
    x, w, dout = _inputs(N + C, N, C)
    rstd64 = rmsnorm_forward(x[None].astype(np.float64), w.astype(np.float64))[1]
    dinp64, dw64 = rmsnorm_backward(dout[None].astype(np.float64), x[None].astype(np.float64), w.astype(np.float64),
                                    rstd64)
    args = (to_device(dout[None]), to_device(x[None]), to_device(w), to_device(rstd64.astype(np.float32)))
    runs = [tuple(to_host(a) for a in rmsnorm_backward_cuda(*args, block_size=block_size, version=version,
                                                            max_blocks=max_blocks)) for _ in range(2)]
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)                    # deterministic
    np.testing.assert_allclose(runs[0][0], dinp64, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(runs[0][1], dw64, atol=1e-4, rtol=1e-4)


def test_backward_version_2_refuses_what_does_not_fit():
    x, w = to_device(np.ones((2, 3, 12), np.float32)), to_device(np.ones(12, np.float32))
    rstd = to_device(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="version must be 1, 2 or None"):
        rmsnorm_backward_cuda(x, x, w, rstd, version=3)
    with pytest.raises(ValueError, match=r"C % 4 == 0.*\(C = 10,"):
        x10 = to_device(np.ones((2, 3, 10), np.float32))
        rmsnorm_backward_cuda(x10, x10, to_device(np.ones(10, np.float32)), rstd, version=2)
    with pytest.raises(ValueError, match=r"C <= 1024.*\(C = 1028,"):          # a multiple of 4, but too wide
        x1028 = to_device(np.ones((2, 3, 1028), np.float32))
        rmsnorm_backward_cuda(x1028, x1028, to_device(np.ones(1028, np.float32)), rstd, version=2)
    with pytest.raises(ValueError, match="16-byte aligned"):
        rmsnorm_backward_cuda(to_device(np.ones(2 * 3 * 12 + 1, np.float32))[1:].reshape(2, 3, 12), x, w, rstd,
                              version=2)
    with pytest.raises(ValueError, match="max_blocks"):
        rmsnorm_backward_cuda(x, x, w, rstd, max_blocks=0)


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


# ---------------------------------------------------------------------------------------------------------
# Exercise 15.1: the NumPy backward


def _backward(kind=None):
    def rmsnorm_backward(dout, inp, weight, rstd):
        r = rstd[..., None]
        norm = inp * r
        dnorm = dout * weight
        m2 = (dnorm * norm).mean(-1, keepdims=True)
        dinp = r * (dnorm - norm * m2)
        if kind == "layernorm":       # LayerNorm's backward, its mean term kept
            dinp = r * (dnorm - dnorm.mean(-1, keepdims=True) - norm * m2)
        elif kind == "sum":           # the 1/C of the mean square forgotten
            dinp = r * (dnorm - norm * (dnorm * norm).sum(-1, keepdims=True))
        elif kind == "direct_only":
            dinp = r * dnorm
        elif kind == "dout_not_dnorm":
            dinp = r * (dout - norm * (dout * norm).mean(-1, keepdims=True))
        dweight = (dout * (inp if kind == "dweight_inp" else norm)).sum(axis=(0, 1))
        return dinp, dweight
    return rmsnorm_backward


def test_check_backward_passes_on_solution(capsys):
    checks.check_rmsnorm_backward(_backward())
    checks.check_rmsnorm_backward(rmsnorm_backward)
    assert capsys.readouterr().out.count("Exercise 15.1: correct") == 2


def test_check_backward_fails_on_stub_and_wrong_return():
    def stub(dout, inp, weight, rstd):
        raise NotImplementedError("Exercise 15.1: write rmsnorm_backward")
    with pytest.raises(AssertionError, match="Exercise 15.1 is not done yet"):
        checks.check_rmsnorm_backward(stub)
    with pytest.raises(AssertionError, match=r"return the pair \(dinp, dweight\)"):
        checks.check_rmsnorm_backward(lambda dout, inp, weight, rstd: _backward()(dout, inp, weight, rstd)[0])


@pytest.mark.parametrize("kind,cause", [
    ("layernorm", "that is LayerNorm's backward"), ("sum", "a sum over the channels where mean"),
    ("direct_only", r"the term - norm \* mean\(dnorm \* norm\) is missing"),
    ("dout_not_dnorm", "dout was used where dnorm"),
    ("dweight_inp", "dweight used inp where norm"),
])
def test_check_backward_names_mistakes(kind, cause):
    with pytest.raises(AssertionError, match="likely cause: " + cause):
        checks.check_rmsnorm_backward(_backward(kind))


# ---------------------------------------------------------------------------------------------------------
# Exercise 15.2: the forward kernel's body

HEAD = """#include "common.cuh"
extern "C" __global__ void rmsnorm_forward_kernel(float* out, float* rstd, const float* inp, const float* weight,
                                                  int N, int C, float eps) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) { return; }
    const float* x = inp + row * C;
    float* o = out + row * C;
"""
GOOD = HEAD + """    float sumsq = 0.0f;
    for (int c = lane; c < C; c += 32) { sumsq += x[c] * x[c]; }
    sumsq = warpReduceSum(sumsq);
    float s = rsqrtf(sumsq / C + eps);
    for (int c = lane; c < C; c += 32) { o[c] = x[c] * s * weight[c]; }
    if (lane == 0) { rstd[row] = s; }
}
"""


def test_check_kernel_passes_on_solution_and_package_source(capsys):
    checks.check_rmsnorm_forward_kernel(GOOD)
    checks.check_rmsnorm_forward_kernel(kernel_source("rmsnorm.cu"))
    assert capsys.readouterr().out.count("Exercise 15.2: correct") == 2


def test_check_kernel_fails_on_stub():
    stub = HEAD + "    // TODO (Exercise 15.2): the row's sum of squares, rstd, out and rstd[row]\n}\n"
    with pytest.raises(AssertionError, match="(?s)Exercise 15.2 .*never written") as e:
        checks.check_rmsnorm_forward_kernel(stub)
    assert "still has its `// TODO (Exercise 15.2)` comment" in str(e.value)


@pytest.mark.parametrize("old,new,cause", [
    ("float sumsq = 0.0f;\n    for (int c = lane; c < C; c += 32) { sumsq += x[c] * x[c]; }",
     "float m = 0.0f;\n    for (int c = lane; c < C; c += 32) { m += x[c]; }\n    m = warpReduceSum(m) / C;\n"
     "    float sumsq = 0.0f;\n    for (int c = lane; c < C; c += 32) { sumsq += (x[c] - m) * (x[c] - m); }",
     "that is LayerNorm"),
    ("sumsq / C + eps", "sumsq + eps", "was not divided by C"),
    ("rsqrtf(sumsq / C + eps)", "sqrtf(sumsq / C + eps)", "root mean square itself"),
    ("sumsq = warpReduceSum(sumsq);", "", "never combined"),
    ("x[c] * s * weight[c]", "x[c] * s", "not multiplied by weight"),
    ("if (row >= N) { return; }", "", "wrote past the end|NaN"),
])
def test_check_kernel_names_mistakes(old, new, cause):
    assert old in GOOD
    with pytest.raises(AssertionError, match=cause):
        checks.check_rmsnorm_forward_kernel(GOOD.replace(old, new))


def test_the_notebook_kernels_are_the_package_kernels():
    from conftest import notebook_cuda_source
    for variable, file, name in (("rmsnorm_src", "rmsnorm.cu", "rmsnorm_forward_kernel"),
                                 ("rope_src", "rope.cu", "rope_backward_kernel"),
                                 ("swiglu_src", "swiglu.cu", "swiglu_backward_kernel")):
        body = notebook_cuda_source("15_rmsnorm_rope_swiglu.ipynb", variable)
        start = f'extern "C" __global__ void {name}('
        package = kernel_source(file)
        package = package[package.index(start):]
        assert body[body.index(start):].strip() == package[:package.index("\n}\n") + 2].strip(), variable


# ---------------------------------------------------------------------------------------------------------
# bf16 kernels: outputs allocated full of NaN (poisoned_allocations), against the float64 reference of the
# same bf16 inputs


@pytest.mark.parametrize("B,T,C,block_size", [(2, 7, 45, 32), (1, 5, 768, 128), (4, 50, 100, 96)])
def test_bf16_forward_matches_reference(B, T, C, block_size, poisoned_allocations):
    gen = np.random.default_rng(C)
    x = to_bf16((gen.standard_normal((B, T, C)) * 2 + 0.5).astype(np.float32))
    w = gen.standard_normal(C).astype(np.float32)
    out, rstd = rmsnorm_forward_bf16_cuda(to_device(x), to_device(w), block_size=block_size)
    want_out, want_rstd = rmsnorm_forward_bf16(x, w)
    np.testing.assert_allclose(to_host(rstd), want_rstd, rtol=1e-5)
    np.testing.assert_allclose(from_bf16(to_host(out)), from_bf16(want_out), rtol=2 ** -7, atol=1e-6)
    assert np.mean(to_host(out) == want_out) > 0.98            # most round to the same bits


@pytest.mark.parametrize("N,C,block_size", [(1, 8, 32), (37, 24, 64), (300, 776, 256), (37, 1600, 96),
                                              (300, 1600, 512)])
def test_residual_rmsnorm_forward_bf16_matches_reference(N, C, block_size, poisoned_allocations):
    gen = np.random.default_rng(N * C)
    x = to_bf16((gen.standard_normal((1, N, C)) * 2 + 0.5).astype(np.float32))
    y = to_bf16(gen.standard_normal((1, N, C)).astype(np.float32))
    w = (gen.standard_normal(C) + 1).astype(np.float32)
    residual, out, rstd = residual_rmsnorm_forward_bf16_cuda(to_device(x), to_device(y), to_device(w),
                                                             block_size=block_size)
    want_residual, want_out, want_rstd = residual_rmsnorm_forward_bf16(x, y, w)
    np.testing.assert_array_equal(to_host(residual), want_residual)       # added in float32, rounded once
    np.testing.assert_allclose(to_host(rstd), want_rstd, rtol=1e-5)
    np.testing.assert_allclose(from_bf16(to_host(out)), from_bf16(want_out), rtol=2 ** -7, atol=1e-6)
    assert np.mean(to_host(out) == want_out) > 0.98                       # most round to the same bits


def test_residual_rmsnorm_forward_bf16_rejects_bad_input():
    x, w = to_device(np.ones((2, 3, 8), np.uint16)), to_device(np.ones(8, np.float32))
    with pytest.raises(ValueError, match="shape"):
        residual_rmsnorm_forward_bf16_cuda(x, to_device(np.ones((2, 3, 16), np.uint16)), w)
    with pytest.raises(TypeError, match="dtype uint16"):
        residual_rmsnorm_forward_bf16_cuda(x, to_device(np.ones((2, 3, 8), np.float32)), w)
    with pytest.raises(ValueError, match="multiple of 8"):
        x12 = to_device(np.ones((2, 3, 12), np.uint16))
        residual_rmsnorm_forward_bf16_cuda(x12, x12, to_device(np.ones(12, np.float32)))
    with pytest.raises(ValueError, match="C must be <= 2048"):
        x2056 = to_device(np.ones((1, 1, 2056), np.uint16))
        residual_rmsnorm_forward_bf16_cuda(x2056, x2056, to_device(np.ones(2056, np.float32)))
    with pytest.raises(ValueError, match="16-byte aligned"):
        residual_rmsnorm_forward_bf16_cuda(x, x, to_device(np.ones(9, np.float32))[1:])
    with pytest.raises(ValueError, match="eps"):
        residual_rmsnorm_forward_bf16_cuda(x, x, w, eps=-1.0)
    with pytest.raises(ValueError, match="multiple of 32"):
        residual_rmsnorm_forward_bf16_cuda(x, x, w, block_size=48)


def _bf16_backward(N, C, seed, **launch):
    """The bf16 backward of fresh inputs (1, N, C) into random dinp and dweight (a bf16 gradient, as in the bf16
    step): (dinp, dinp_bf16, dweight's values) after one launch, twice (bit-equal), and the float64 reference's
    (dinp, dweight) including the starting values."""
    gen = np.random.default_rng(seed)
    x = to_bf16((gen.standard_normal((1, N, C)) * 2 + 0.5).astype(np.float32))
    dout = to_bf16(gen.standard_normal((1, N, C)).astype(np.float32))
    w = (gen.standard_normal(C) + 1).astype(np.float32)
    rstd = rmsnorm_forward_bf16(x, w)[1]
    dinp0, dw0 = gen.standard_normal((1, N, C)).astype(np.float32), to_bf16(gen.standard_normal(C))
    runs = []
    for _ in range(2):
        d_dinp, d_dw = to_device(dinp0.copy()), to_device(dw0.copy())     # to_device may return the array itself
        dinp_bf16 = rmsnorm_backward_bf16_cuda(d_dinp, to_device(dout), to_device(x), to_device(w), to_device(rstd),
                                               d_dw, **launch)
        runs.append((to_host(d_dinp), to_host(dinp_bf16), from_bf16(to_host(d_dw))))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)                    # deterministic: the same bits on every run
    dinp64, dw64 = rmsnorm_backward(from_bf16(dout).astype(np.float64), from_bf16(x).astype(np.float64),
                                    w.astype(np.float64), rstd.astype(np.float64))
    return runs[0], (dinp0 + dinp64, from_bf16(dw0) + dw64)


@pytest.mark.parametrize("N,C,block_size,max_blocks", [
    (1, 8, None, 256), (37, 24, 64, 3), (300, 776, 96, 7), (37, 776, None, 256), (300, 24, 32, 1),
    (1, 1600, 128, 5), (37, 1600, 64, 2), (300, 1600, None, 256),
])
def test_bf16_backward_matches_reference(N, C, block_size, max_blocks, poisoned_allocations):
    (dinp, dinp_bf16, dweight), (want_dinp, want_dw) = _bf16_backward(N, C, N + C, block_size=block_size,
                                                                      max_blocks=max_blocks)
    np.testing.assert_allclose(dinp, want_dinp, atol=1e-5, rtol=1e-5)          # accumulated into
    np.testing.assert_array_equal(dinp_bf16, to_bf16(dinp))                     # its bf16 copy
    np.testing.assert_allclose(dweight, want_dw, atol=2e-4, rtol=2 ** -8)      # accumulated into, rounded once


def test_bf16_backward_launch_shapes_agree():
    """Every grid splits the rows differently (other partial sums, added in another order): close, not equal."""
    (dinp, _, dw), _ = _bf16_backward(300, 776, 5)
    for launch in ({"max_blocks": 1}, {"block_size": 32, "max_blocks": 11}, {"block_size": 512}):
        (dinp2, _, dw2), _ = _bf16_backward(300, 776, 5, **launch)
        np.testing.assert_array_equal(dinp2, dinp)           # a row's dinp does not depend on the grid
        np.testing.assert_allclose(dw2, dw, atol=1e-4, rtol=2 ** -7)        # one bf16 rounding either side


@pytest.mark.skipif(not device.on_gpu(), reason="the emulator has no registers to run out of")
def test_a_block_bigger_than_the_compiled_kernel_takes_is_a_clear_error():
    """The kernel holds two rows a warp in registers; the most threads a block of it takes, as compiled for this GPU,
    is read after a first launch (C = 264 keeps the shared memory of every block size below its limit)."""
    _bf16_backward(300, 264, 5, block_size=256)
    most, regs = load_kernel("rmsnorm.cu", "rmsnorm_backward_bf16_kernel")._thread_limit
    if most == 1024:
        pytest.skip(f"compiled for this GPU the kernel takes 1024 threads a block ({regs} registers a thread)")
    with pytest.raises(ValueError, match=rf"takes at most {most} threads a block on this GPU \(its {regs} registers"):
        _bf16_backward(300, 264, 5, block_size=most + 32)
    _bf16_backward(300, 264, 5, block_size=most)      # the most it takes runs, after the refusal too


def test_bf16_launchers_reject_bad_input():
    x, w = to_device(np.ones((2, 3, 8), np.uint16)), to_device(np.ones(8, np.float32))
    rstd, dw = to_device(np.ones((2, 3), np.float32)), to_device(np.zeros(8, np.uint16))
    dinp = to_device(np.zeros((2, 3, 8), np.float32))
    with pytest.raises(TypeError, match="dtype uint16"):
        rmsnorm_forward_bf16_cuda(to_device(np.ones((2, 3, 8), np.float32)), w)
    with pytest.raises(ValueError, match="shape"):
        rmsnorm_forward_bf16_cuda(x, to_device(np.ones(9, np.float32)))
    with pytest.raises(TypeError, match="dtype float32"):
        rmsnorm_backward_bf16_cuda(to_device(np.ones((2, 3, 8), np.uint16)), x, x, w, rstd, dw)
    with pytest.raises(TypeError, match="dtype uint16"):
        rmsnorm_backward_bf16_cuda(dinp, dinp, x, w, rstd, dw)
    with pytest.raises(TypeError, match="dweight must hold bf16 bits"):      # the bf16 step's gradients are bf16
        rmsnorm_backward_bf16_cuda(dinp, x, x, w, rstd, to_device(np.zeros(8, np.float32)))
    with pytest.raises(ValueError, match="multiple of 8"):
        x12 = to_device(np.ones((2, 3, 12), np.uint16))
        rmsnorm_backward_bf16_cuda(to_device(np.zeros((2, 3, 12), np.float32)), x12, x12,
                                   to_device(np.ones(12, np.float32)), rstd, to_device(np.zeros(12, np.float32)))
    with pytest.raises(ValueError, match="C must be <= 2048"):
        x2056 = to_device(np.ones((1, 1, 2056), np.uint16))
        rmsnorm_backward_bf16_cuda(to_device(np.zeros((1, 1, 2056), np.float32)), x2056, x2056,
                                   to_device(np.ones(2056, np.float32)), to_device(np.ones((1, 1), np.float32)),
                                   to_device(np.zeros(2056, np.float32)))
    with pytest.raises(ValueError, match="16-byte aligned"):
        rmsnorm_backward_bf16_cuda(to_device(np.zeros(2 * 3 * 8 + 1, np.float32))[1:].reshape(2, 3, 8), x, x, w, rstd,
                                   dw)
    with pytest.raises(ValueError, match="shape"):
        rmsnorm_backward_bf16_cuda(dinp, x, x, w, to_device(np.ones((3, 2), np.float32)), dw)
    with pytest.raises(ValueError, match="shared memory"):
        x2048 = to_device(np.ones((1, 1, 2048), np.uint16))
        rmsnorm_backward_bf16_cuda(to_device(np.zeros((1, 1, 2048), np.float32)), x2048, x2048,
                                   to_device(np.ones(2048, np.float32)), to_device(np.ones((1, 1), np.float32)),
                                   to_device(np.zeros(2048, np.uint16)), block_size=1024)
    with pytest.raises(ValueError, match="max_blocks"):
        rmsnorm_backward_bf16_cuda(dinp, x, x, w, rstd, dw, max_blocks=0)
    with pytest.raises(ValueError, match="multiple of 32"):
        rmsnorm_backward_bf16_cuda(dinp, x, x, w, rstd, dw, block_size=48)
