"""Lesson 07, residual and the transformer block: residual reference and kernel, the whole block's gradient
check, the kernel path against the NumPy path, bad input, and the exercise checks."""
from __future__ import annotations

import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.checks import block as checks
from llmc_lessons.checks import poisoned
from llmc_lessons.cuda import load_kernel
from llmc_lessons.device import to_device, to_host
from llmc_lessons.gradcheck import gradcheck
from llmc_lessons.layers.block import (BLOCK_PARAMETER_NAMES, attention_branch_backward, block_backward,
                                       block_backward_cuda, block_forward, block_forward_cuda, block_parameter_shapes,
                                       init_block_params, mlp_backward)
from llmc_lessons.layers.gelu import gelu_backward
from llmc_lessons.layers.layernorm import layernorm_backward
from llmc_lessons.layers.matmul import matmul_backward
from llmc_lessons.layers.residual import residual_backward, residual_forward, residual_forward_cuda

# ---------------------------------------------------------------------------------------------------------
# residual


def test_residual_reference_and_gradcheck():
    gen = np.random.default_rng(0)
    a, b = gen.standard_normal((2, 3, 5)), gen.standard_normal((2, 3, 5))
    np.testing.assert_array_equal(residual_forward(a, b), a + b)
    d1, d2 = residual_backward(a)
    np.testing.assert_array_equal(d1, a)
    np.testing.assert_array_equal(d2, a)
    assert d1 is not a and d2 is not a and not np.shares_memory(d1, d2)   # fresh arrays
    gradcheck(lambda inp1, inp2: residual_forward(inp1, inp2),
              lambda dy, inp1, inp2: dict(zip(("inp1", "inp2"), residual_backward(dy))),
              {"inp1": a, "inp2": b}, title="residual").assert_ok()
    with pytest.raises(ValueError, match="must match"):
        residual_forward(a, b[:, :2])


@pytest.mark.parametrize("block_size", [32, 96, 256])
def test_residual_kernel_poisoned_awkward(block_size):
    gen = np.random.default_rng(block_size)
    N = 4 * block_size + 13
    a = gen.standard_normal(N).astype(np.float32)
    b = gen.standard_normal(N).astype(np.float32)
    buf = poisoned((N + block_size,))
    pa = to_device(np.concatenate([a, np.ones(block_size, np.float32)]))
    pb = to_device(np.concatenate([b, np.ones(block_size, np.float32)]))
    load_kernel("residual.cu", "residual_forward_kernel")((-(-N // block_size),), (block_size,),
                                                          (buf[:N], pa[:N], pb[:N], np.int32(N)))
    np.testing.assert_array_equal(to_host(buf[:N]), a + b)
    assert np.isnan(to_host(buf[N:])).all()


@pytest.mark.parametrize("block_size", [32, 256])
def test_residual_launcher(block_size):
    gen = np.random.default_rng(5)
    a = gen.standard_normal((3, 7, 11)).astype(np.float32)
    b = gen.standard_normal((3, 7, 11)).astype(np.float32)
    out = residual_forward_cuda(to_device(a), to_device(b), block_size=block_size)
    assert out.shape == a.shape
    np.testing.assert_array_equal(to_host(out), a + b)


def test_residual_launcher_rejects_bad_input():
    a = to_device(np.ones((2, 3, 4), np.float32))
    with pytest.raises(TypeError, match="dtype float32"):
        residual_forward_cuda(a, to_device(np.ones((2, 3, 4))))
    with pytest.raises(ValueError, match="shape"):
        residual_forward_cuda(a, to_device(np.ones((2, 3, 5), np.float32)))
    with pytest.raises(ValueError, match="C-contiguous"):
        residual_forward_cuda(to_device(np.ones((4, 8), np.float32))[:, ::2], to_device(np.ones((4, 4), np.float32)))
    with pytest.raises(ValueError, match="multiple of 32"):
        residual_forward_cuda(a, a, block_size=48)
    with pytest.raises(TypeError):
        residual_forward_cuda([1.0], [2.0])


# ---------------------------------------------------------------------------------------------------------
# the block: NumPy reference


def _block(gen, B, T, C, NH, dtype=np.float64, std=0.3):
    p = init_block_params(C, gen, dtype=dtype, std=std)
    x = gen.standard_normal((B, T, C)).astype(dtype)
    return x, p


def test_block_gradcheck_float64_all_parameters():
    B, T, C, NH = 2, 5, 8, 2
    x, p = _block(np.random.default_rng(1), B, T, C, NH)

    def forward(x, **p):
        return block_forward(x, p, NH)[0]

    def backward(dy, x, **p):
        _, cache = block_forward(x, p, NH)
        dx, grads = block_backward(dy, cache, p, NH)
        return {"x": dx, **grads}

    report = gradcheck(forward, backward, {"x": x, **p}, title="block").assert_ok()
    assert [r.name for r in report.rows] == ["x", *BLOCK_PARAMETER_NAMES]
    assert all(r.checked == np.prod(r.shape) for r in report.rows)   # every element checked


def test_block_is_identity_when_projections_are_zero():
    """With attproj and fcproj zero, both branches add nothing: out = x and dx = dout (the skip paths alone)."""
    gen = np.random.default_rng(2)
    x, p = _block(gen, 2, 4, 12, 3)
    for name in ("attprojw", "attprojb", "fcprojw", "fcprojb"):
        p[name] = np.zeros_like(p[name])
    out, cache = block_forward(x, p, 3)
    np.testing.assert_array_equal(out, x)
    dout = gen.standard_normal(x.shape)
    dx, grads = block_backward(dout, cache, p, 3)
    np.testing.assert_allclose(dx, dout, atol=1e-15)
    assert not grads["qkvw"].any() and not grads["fcw"].any()       # nothing flows back into a zeroed branch
    assert grads["fcprojw"].any() and grads["attprojw"].any()


def test_block_reference_preserves_dtype_and_cache_contents():
    x, p = _block(np.random.default_rng(3), 1, 3, 8, 2, dtype=np.float32)
    out, cache = block_forward(x, p, 2)
    assert out.dtype == np.float32
    assert set(cache) == {"x", "ln1", "ln1_mean", "ln1_rstd", "qkv", "atty", "att", "residual2",
                          "ln2", "ln2_mean", "ln2_rstd", "fch", "fch_gelu"}
    dx, grads = block_backward(np.ones_like(out), cache, p, 2)
    assert dx.dtype == np.float32 and list(grads) == list(BLOCK_PARAMETER_NAMES)
    assert all(grads[n].shape == s and grads[n].dtype == np.float32 for n, s in block_parameter_shapes(8).items())


def test_block_rejects_bad_input():
    x, p = _block(np.random.default_rng(4), 1, 3, 8, 2)
    with pytest.raises(ValueError, match="NH must be a positive int dividing C"):
        block_forward(x, p, 3)
    with pytest.raises(KeyError, match="fcw"):
        block_forward(x, {k: v for k, v in p.items() if k != "fcw"}, 2)
    bad = dict(p, qkvw=p["qkvw"].T.copy())
    with pytest.raises(ValueError, match=r"p\['qkvw'\] must have shape \(24, 8\)"):
        block_forward(x, bad, 2)
    with pytest.raises(ValueError, match=r"\(B, T, C\)"):
        block_forward(x[0], p, 2)
    _, cache = block_forward(x, p, 2)
    with pytest.raises(ValueError, match="dout must have"):
        block_backward(np.ones((1, 3, 9)), cache, p, 2)


# ---------------------------------------------------------------------------------------------------------
# the block: the kernel path against the NumPy path, float32


@pytest.mark.parametrize("B,T,C,NH,matmul_version", [(2, 7, 24, 3, "cublas"), (1, 5, 12, 2, 2)])
def test_block_kernels_match_numpy(B, T, C, NH, matmul_version):
    gen = np.random.default_rng(B * T + C)
    x, p = _block(gen, B, T, C, NH, dtype=np.float32, std=0.2)
    out, cache = block_forward(x, p, NH)
    d_p = {k: to_device(v) for k, v in p.items()}
    d_out, d_cache = block_forward_cuda(to_device(x), d_p, NH, matmul_version=matmul_version)
    np.testing.assert_allclose(to_host(d_out), out, atol=2e-5, rtol=1e-4)
    for name in cache:
        np.testing.assert_allclose(to_host(d_cache[name]), cache[name], atol=2e-5, rtol=1e-4, err_msg=name)
    dout = gen.standard_normal(x.shape).astype(np.float32)
    dx, grads = block_backward(dout, cache, p, NH)
    d_dx, d_grads = block_backward_cuda(to_device(dout), d_cache, d_p, NH, matmul_version=matmul_version)
    np.testing.assert_allclose(to_host(d_dx), dx, atol=5e-5, rtol=1e-3)
    assert list(d_grads) == list(BLOCK_PARAMETER_NAMES)
    for name in BLOCK_PARAMETER_NAMES:
        scale = float(np.abs(grads[name]).max())
        np.testing.assert_allclose(to_host(d_grads[name]), grads[name], atol=1e-4 * scale + 1e-6, rtol=1e-3,
                                   err_msg=name)


@pytest.mark.skipif(not device.on_gpu(), reason="only a GPU backend refuses NumPy arrays")
def test_block_cuda_rejects_numpy_on_gpu():
    x, p = _block(np.random.default_rng(6), 1, 3, 8, 2, dtype=np.float32)
    with pytest.raises(TypeError):
        block_forward_cuda(x, p, 2)


# ---------------------------------------------------------------------------------------------------------
# Exercise 7.1: the gradient at the two residual forks


def _forks(kind):
    def fn(dout, cache, p, NH):
        dresidual2_skip, dfcproj = residual_backward(dout)
        dres2_mlp, g_mlp = mlp_backward(dfcproj, cache, p)
        dresidual2 = {"no_skip2": dres2_mlp, "no_mlp": dresidual2_skip}.get(kind, dresidual2_skip + dres2_mlp)
        if kind == "dout_to_attention":
            dresidual2_for_attn = dout
        else:
            dresidual2_for_attn = dresidual2
        dx_skip, dattproj = residual_backward(dresidual2_for_attn)
        dx_attn, g_attn = attention_branch_backward(dattproj, cache, p, NH)
        if kind == "no_skip1":
            dx = dx_attn
        elif kind == "no_attention":
            dx = dresidual2
        elif kind == "dout_to_attention":
            dx = dresidual2 + dx_attn
        else:
            dx = dx_skip + dx_attn
        if kind == "missing_key":
            g_mlp.pop("ln2b")
        return dx, {**g_attn, **g_mlp}
    return fn


def test_check_forks_passes_on_solution_and_package(capsys):
    checks.check_block_backward_forks(_forks("good"))
    checks.check_block_backward_forks(block_backward)
    assert capsys.readouterr().out.count("Exercise 7.1: correct") == 2


def test_check_forks_fails_on_stub():
    def stub(dout, cache, p, NH):
        raise NotImplementedError("Exercise 7.1: combine the gradients at the forks")
    with pytest.raises(AssertionError, match="Exercise 7.1 is not done yet"):
        checks.check_block_backward_forks(stub)


@pytest.mark.parametrize("kind,cause", [
    ("no_skip2", "at fork 2 the skip-path gradient is missing"),
    ("no_skip1", "at fork 1 the skip-path gradient is missing"),
    ("no_attention", "attention branch's gradient is missing"),
    ("no_mlp", "MLP branch's gradient is missing"),
    ("dout_to_attention", "given dout instead of dresidual2"),
    ("missing_key", r"grads lacks \['ln2b'\]"),
])
def test_check_forks_catches_mistakes(kind, cause):
    with pytest.raises(AssertionError, match=cause):
        checks.check_block_backward_forks(_forks(kind))


def test_check_forks_catches_wrong_return_form():
    with pytest.raises(AssertionError, match=r"must return a pair \(dx, grads\)"):
        checks.check_block_backward_forks(lambda dout, cache, p, NH: block_backward(dout, cache, p, NH)[0])


# ---------------------------------------------------------------------------------------------------------
# Exercise 7.2: the MLP branch backward


def _mlp(kind):
    def fn(dfcproj, cache, p):
        c = cache
        dfch_gelu, dfcprojw, dfcprojb = matmul_backward(dfcproj, c["fch" if kind == "fch_for_proj" else "fch_gelu"],
                                                        p["fcprojw"])
        if kind == "order":  # fc backward before the gelu backward: shapes do not fit
            dln2, dfcw, dfcb = matmul_backward(dfch_gelu, c["ln2"], p["fcw"])
            dfch = gelu_backward(dln2, c["fch"])
        if kind == "no_gelu":
            dfch = dfch_gelu
        elif kind == "gelu_output":
            dfch = gelu_backward(dfch_gelu, c["fch_gelu"])
        else:
            dfch = gelu_backward(dfch_gelu, c["fch"])
        dln2, dfcw, dfcb = matmul_backward(dfch, c["residual2" if kind == "residual2_for_fc" else "ln2"], p["fcw"])
        dres2, dln2w, dln2b = layernorm_backward(dln2, c["ln2" if kind == "ln2_as_inp" else "residual2"], p["ln2w"],
                                                 c["ln2_mean"], c["ln2_rstd"])
        if kind == "sign":
            dres2 = -dres2
        return dres2, dict(fcprojw=dfcprojw, fcprojb=dfcprojb, fcw=dfcw, fcb=dfcb, ln2w=dln2w, ln2b=dln2b)
    return fn


def test_check_mlp_passes_on_solution_and_package(capsys):
    checks.check_mlp_backward(_mlp("good"))
    checks.check_mlp_backward(mlp_backward)
    assert capsys.readouterr().out.count("Exercise 7.2: correct") == 2


def test_check_mlp_fails_on_stub():
    def stub(dfcproj, cache, p):
        raise NotImplementedError("Exercise 7.2: the MLP branch backward")
    with pytest.raises(AssertionError, match="Exercise 7.2 is not done yet"):
        checks.check_mlp_backward(stub)


@pytest.mark.parametrize("kind,cause", [
    ("no_gelu", "the gelu backward is missing"),
    ("gelu_output", "gelu_backward was given fch_gelu"),
    ("fch_for_proj", "the fcproj backward used fch instead of fch_gelu"),
    ("residual2_for_fc", "the fc backward used residual2 instead of ln2"),
    ("ln2_as_inp", "layernorm_backward was given ln2"),
    ("order", "walk the forward in reverse"),
    ("sign", "sign error"),
])
def test_check_mlp_catches_mistakes(kind, cause):
    with pytest.raises(AssertionError, match=cause):
        checks.check_mlp_backward(_mlp(kind))
