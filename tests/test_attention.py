"""Lesson 05, attention: references, gradient check, every kernel, bad input, and the exercise checks."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.checks import attention as checks
from llmc_lessons.cuda import RawKernel, kernel_source, load_kernel
from llmc_lessons.device import to_device, to_host, xp
from llmc_lessons.gradcheck import gradcheck
from llmc_lessons.layers.attention import (attention_backward, attention_backward_cuda, attention_forward,
                                           attention_forward_cuda, causal_softmax)

ROOT = Path(__file__).resolve().parents[1]


def _loops_attention(qkv, NH):
    """Attention with plain Python loops, written independently of the vectorised reference."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // NH
    out = np.zeros((B, T, C))
    att = np.zeros((B, NH, T, T))
    for b in range(B):
        for h in range(NH):
            for t in range(T):
                q = qkv[b, t, h * hs:(h + 1) * hs]
                s = np.array([q @ qkv[b, t2, C + h * hs:C + (h + 1) * hs] / math.sqrt(hs) for t2 in range(t + 1)])
                p = np.exp(s - s.max())
                p /= p.sum()
                att[b, h, t, :t + 1] = p
                for t2 in range(t + 1):
                    out[b, t, h * hs:(h + 1) * hs] += p[t2] * qkv[b, t2, 2 * C + h * hs:2 * C + (h + 1) * hs]
    return out, att


# ---------------------------------------------------------------------------------------------------------
# NumPy reference


def test_forward_matches_loops():
    qkv = np.random.default_rng(1).standard_normal((2, 7, 3 * 12))
    out, att = attention_forward(qkv, 3)
    out_ref, att_ref = _loops_attention(qkv, 3)
    np.testing.assert_allclose(out, out_ref, atol=1e-12)
    np.testing.assert_allclose(att, att_ref, atol=1e-12)
    assert np.allclose(att.sum(-1), 1.0)
    assert not np.triu(att[0, 0], k=1).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_preserves_dtype(dtype):
    qkv = np.random.default_rng(2).standard_normal((1, 5, 18)).astype(dtype)
    out, att = attention_forward(qkv, 2)
    assert out.dtype == dtype and att.dtype == dtype and out.shape == (1, 5, 6) and att.shape == (1, 2, 5, 5)
    dqkv = attention_backward(np.ones_like(out), qkv, att, 2)
    assert dqkv.dtype == dtype and dqkv.shape == qkv.shape


def test_causal_softmax_large_scores_do_not_overflow():
    x = np.array([[[1000.0, 0.0], [1000.0, 999.0]]], dtype=np.float32)
    p = causal_softmax(x)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p[0], [[1, 0], [1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1))]], rtol=1e-6)


@pytest.mark.parametrize("B,T,NH,hs", [(2, 5, 2, 3), (1, 7, 3, 2)])
def test_backward_gradcheck(B, T, NH, hs):
    qkv = np.random.default_rng(3).standard_normal((B, T, 3 * NH * hs))

    def forward(qkv):
        return attention_forward(qkv, NH)[0]

    def backward(dout, qkv):
        return {"qkv": attention_backward(dout, qkv, attention_forward(qkv, NH)[1], NH)}

    gradcheck(forward, backward, {"qkv": qkv}, title="attention").assert_ok()


def test_reference_rejects_bad_shapes():
    with pytest.raises(ValueError, match="3C"):
        attention_forward(np.zeros((1, 4, 10)), 2)
    with pytest.raises(ValueError, match="NH"):
        attention_forward(np.zeros((1, 4, 15)), 2)
    qkv = np.zeros((1, 4, 12))
    with pytest.raises(ValueError, match="dout"):
        attention_backward(np.zeros((1, 4, 3)), qkv, np.zeros((1, 2, 4, 4)), 2)
    with pytest.raises(ValueError, match="att"):
        attention_backward(np.zeros((1, 4, 4)), qkv, np.zeros((1, 2, 4, 5)), 2)


# ---------------------------------------------------------------------------------------------------------
# Kernels, one by one, with NaN-poisoned outputs, at awkward sizes and two or more launch configurations


def _rand(gen, *shape):
    return to_device(gen.standard_normal(shape).astype(np.float32))


def _nan(*shape):
    return xp.full(shape, np.nan, dtype=np.float32)


def _heads(x, NH):
    """(B, T, C) host array -> (B, NH, T, hs)."""
    B, T, C = x.shape
    return np.ascontiguousarray(x.reshape(B, T, NH, C // NH).transpose(0, 2, 1, 3))


@pytest.mark.parametrize("T,block_size", [(13, 32), (37, 100), (37, 7)])
def test_naive_kernel(T, block_size):
    gen = np.random.default_rng(T + block_size)
    B, NH, hs = 2, 3, 5
    C = NH * hs
    qkv = _rand(gen, B, T, 3 * C)
    out, att = _nan(B, T, C), _nan(B, NH, T, T)
    n = B * T * NH
    load_kernel("attention.cu", "attention_forward_kernel1")(
        ((n + block_size - 1) // block_size,), (block_size,),
        (out, att, qkv, np.int32(B), np.int32(T), np.int32(C), np.int32(NH)))
    out_ref, att_ref = attention_forward(to_host(qkv).astype(np.float64), NH)
    np.testing.assert_allclose(to_host(att), att_ref, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(to_host(out), out_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [32, 96])
def test_permute_and_unpermute_kernels(block_size):
    gen = np.random.default_rng(block_size)
    B, T, NH, hs = 2, 13, 3, 5
    C = NH * hs
    n = B * NH * T * hs
    grid = ((n + block_size - 1) // block_size,)
    sizes = (np.int32(B), np.int32(T), np.int32(NH), np.int32(hs))
    qkv = _rand(gen, B, T, 3 * C)
    q, k, v = _nan(B, NH, T, hs), _nan(B, NH, T, hs), _nan(B, NH, T, hs)
    load_kernel("attention.cu", "permute_kernel")(grid, (block_size,), (q, k, v, qkv) + sizes)
    host = to_host(qkv)
    for got, j in ((q, 0), (k, 1), (v, 2)):
        np.testing.assert_array_equal(to_host(got), _heads(host[:, :, j * C:(j + 1) * C], NH))
    # unpermute: (B, NH, T, hs) -> (B, T, C), and its backward, the other way round
    x = _rand(gen, B, NH, T, hs)
    out = _nan(B, T, C)
    load_kernel("attention.cu", "unpermute_kernel")(grid, (block_size,), (out, x) + sizes)
    np.testing.assert_array_equal(_heads(to_host(out), NH), to_host(x))
    dout = _rand(gen, B, T, C)
    dinp = _nan(B, NH, T, hs)
    load_kernel("attention.cu", "unpermute_kernel_backward")(grid, (block_size,), (dinp, dout) + sizes)
    np.testing.assert_array_equal(to_host(dinp), _heads(to_host(dout), NH))
    # permute backward: dq, dk, dv -> one (B, T, 3C) array
    dq, dk, dv = _rand(gen, B, NH, T, hs), _rand(gen, B, NH, T, hs), _rand(gen, B, NH, T, hs)
    dqkv = _nan(B, T, 3 * C)
    load_kernel("attention.cu", "permute_kernel_backward")(grid, (block_size,), (dqkv, dq, dk, dv) + sizes)
    for got, j in ((dq, 0), (dk, 1), (dv, 2)):
        np.testing.assert_array_equal(_heads(to_host(dqkv)[:, :, j * C:(j + 1) * C], NH), to_host(got))


@pytest.mark.parametrize("T,block_size", [(13, 64), (37, 128), (70, 96)])
def test_softmax_forward_kernel(T, block_size):
    gen = np.random.default_rng(T)
    N = 5
    preatt = _rand(gen, N, T, T)
    att = _nan(N, T, T)
    warps = block_size // 32
    load_kernel("attention.cu", "softmax_forward_kernel")(
        ((N * T + warps - 1) // warps,), (block_size,), (att, np.float32(0.3), preatt, np.int32(N), np.int32(T)))
    np.testing.assert_allclose(to_host(att), causal_softmax(to_host(preatt).astype(np.float64), 0.3),
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("T,block_size", [(13, 64), (37, 128), (70, 32)])
def test_softmax_backward_kernel(T, block_size):
    gen = np.random.default_rng(T)
    N, scale = 4, 0.4
    att = to_device(causal_softmax(gen.standard_normal((N, T, T))).astype(np.float32))
    datt = _rand(gen, N, T, T)
    dpreatt = _nan(N, T, T)
    warps = block_size // 32
    load_kernel("attention.cu", "softmax_autoregressive_backward_kernel")(
        ((N * T + warps - 1) // warps,), (block_size,), (dpreatt, datt, att, np.int32(N), np.int32(T),
                                                         np.float32(scale)))
    a, d = to_host(att).astype(np.float64), to_host(datt).astype(np.float64)
    expected = scale * a * (d - (a * d).sum(-1, keepdims=True))
    np.testing.assert_allclose(to_host(dpreatt), expected, atol=1e-6, rtol=1e-5)
    assert not np.triu(to_host(dpreatt)[0], k=1).any()


@pytest.mark.parametrize("version,block_size", [("naive", 64), ("naive", 45), ("cublas", 32), ("cublas", 160)])
@pytest.mark.parametrize("B,T,NH,hs", [(2, 13, 3, 5), (1, 37, 2, 7)])
def test_forward_launchers(version, block_size, B, T, NH, hs):
    qkv = _rand(np.random.default_rng(T), B, T, 3 * NH * hs)
    out, att = attention_forward_cuda(qkv, NH, version=version, block_size=block_size)
    out_ref, att_ref = attention_forward(to_host(qkv).astype(np.float64), NH)
    np.testing.assert_allclose(to_host(att), att_ref, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(to_host(out), out_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [32, 128])
@pytest.mark.parametrize("B,T,NH,hs", [(2, 13, 3, 5), (1, 37, 2, 7)])
def test_backward_launcher(block_size, B, T, NH, hs):
    gen = np.random.default_rng(block_size + T)
    qkv64 = gen.standard_normal((B, T, 3 * NH * hs)).astype(np.float32).astype(np.float64)
    _, att64 = attention_forward(qkv64, NH)
    dout64 = gen.standard_normal((B, T, NH * hs)).astype(np.float32).astype(np.float64)
    qkv, att, dout = (to_device(a.astype(np.float32)) for a in (qkv64, att64, dout64))
    dqkv = attention_backward_cuda(dout, qkv, att, NH, block_size=block_size)
    np.testing.assert_allclose(to_host(dqkv), attention_backward(dout64, qkv64, att64, NH), atol=2e-5, rtol=1e-4)


def test_launchers_reject_bad_input():
    qkv = xp.zeros((1, 4, 18), dtype=np.float32)
    with pytest.raises(TypeError, match="float32"):
        attention_forward_cuda(qkv.astype(np.float64), 2)
    with pytest.raises(ValueError, match="C-contiguous"):
        attention_forward_cuda(xp.zeros((1, 4, 36), dtype=np.float32)[:, :, ::2], 2)
    with pytest.raises(ValueError, match="NH"):
        attention_forward_cuda(qkv, 4)
    with pytest.raises(ValueError, match="NH"):
        attention_forward_cuda(qkv, 2.0)
    with pytest.raises(ValueError, match="3C"):
        attention_forward_cuda(xp.zeros((1, 4, 10), dtype=np.float32), 2)
    with pytest.raises(ValueError, match="shape"):
        attention_forward_cuda(xp.zeros((4, 18), dtype=np.float32), 2)
    with pytest.raises(ValueError, match="version"):
        attention_forward_cuda(qkv, 2, version="flash")
    with pytest.raises(ValueError, match="multiple of 32"):
        attention_forward_cuda(qkv, 2, version="cublas", block_size=48)
    with pytest.raises(ValueError, match="block_size"):
        attention_forward_cuda(qkv, 2, version="naive", block_size=2048)
    with pytest.raises(TypeError):
        attention_forward_cuda(to_host(qkv).tolist(), 2)
    dout = xp.zeros((1, 4, 6), dtype=np.float32)
    att = xp.zeros((1, 2, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="att"):
        attention_backward_cuda(dout, qkv, xp.zeros((1, 2, 4, 5), dtype=np.float32), 2)
    with pytest.raises(ValueError, match="dout"):
        attention_backward_cuda(xp.zeros((1, 4, 7), dtype=np.float32), qkv, att, 2)
    with pytest.raises(TypeError, match="float32"):
        attention_backward_cuda(dout, qkv, att.astype(np.float64), 2)
    with pytest.raises(ValueError, match="multiple of 32"):
        attention_backward_cuda(dout, qkv, att, 2, block_size=100)


@pytest.mark.skipif(not device.on_gpu(), reason="a NumPy array is a valid input on the CPU backend")
def test_launchers_reject_host_arrays_on_gpu():
    with pytest.raises(TypeError, match="NumPy"):
        attention_forward_cuda(np.zeros((1, 4, 18), dtype=np.float32), 2)


# ---------------------------------------------------------------------------------------------------------
# Exercise 5.2: the check passes on the reference and fails, naming the cause, on each plausible mistake


def _stub(*args):
    raise NotImplementedError("Exercise 5.2: write attention_backward")


def test_check_backward_passes_on_reference(capsys):
    checks.check_attention_backward(attention_backward)
    assert "Exercise 5.2: correct" in capsys.readouterr().out


def test_check_backward_variant_none_is_reference():
    gen = np.random.default_rng(0)
    qkv = gen.standard_normal((2, 6, 18))
    _, att = attention_forward(qkv, 3)
    dout = gen.standard_normal((2, 6, 6))
    np.testing.assert_allclose(checks._backward_variant(dout, qkv, att, 3), attention_backward(dout, qkv, att, 3),
                               atol=1e-13)


def test_check_backward_fails_on_stub():
    with pytest.raises(AssertionError, match="Exercise 5.2 is not done yet"):
        checks.check_attention_backward(_stub)


@pytest.mark.parametrize("mistake,message", [
    ("no_sum_term", "sum\\(att \\* datt\\)"),
    ("no_att_factor", "leaks into the masked future"),
    ("no_scale", "1/sqrt\\(hs\\) scale is missing"),
    ("swapped_qk", "dq and dk are swapped"),
    ("heads_interleaved", "wrong head slicing"),
    ("qkv_per_head", "wrong q/k/v slicing"),
])
def test_check_backward_names_each_mistake(mistake, message):
    def student(dout, qkv, att, NH):
        return checks._backward_variant(dout, qkv, att, NH, mistake)
    with pytest.raises(AssertionError, match=message) as e:
        checks.check_attention_backward(student)
    assert "Exercise 5.2" in str(e.value)


def test_check_backward_fails_on_sign_error_none_and_shape():
    with pytest.raises(AssertionError, match="sign error"):
        checks.check_attention_backward(lambda *a: -attention_backward(*a))
    with pytest.raises(AssertionError, match="return"):
        checks.check_attention_backward(lambda *a: None)
    with pytest.raises(AssertionError, match="shape"):
        checks.check_attention_backward(lambda *a: attention_backward(*a)[:, :, :-1])


def test_check_backward_catches_a_leak_that_keeps_other_values_plausible():
    """dk at position t also fed by dout at t - 1 (a leak of the gradient one step into the future)."""
    def student(dout, qkv, att, NH):
        d = attention_backward(dout, qkv, att, NH)
        C = dout.shape[2]
        d[:, 1:, C:2 * C] += 1e-3 * dout[:, :-1, :]
        return d
    with pytest.raises(AssertionError, match="leaked into the future"):
        checks.check_attention_backward(student)


# ---------------------------------------------------------------------------------------------------------
# Exercise 5.3: the softmax kernel check, on the real kernel and on wrong bodies of it


def _softmax_source():
    """The text of softmax_forward_kernel from attention.cu, with #include "common.cuh"."""
    src = kernel_source("attention.cu")
    start = src.index('extern "C" __global__ void softmax_forward_kernel')
    end = src.index("\n}\n", start) + 3
    return '#include "common.cuh"\n' + src[start:end]


BODY_START = "    // the maximum over the visible keys"
BODY_END = "        y[i] *= norm;\n    }\n"


def _variant(change):
    src = _softmax_source()
    new = change(src)
    assert new != src, "the variant did not change the source"
    return new


def test_check_softmax_kernel_accepts_source_text(capsys):
    checks.check_softmax_forward_kernel(_softmax_source())
    assert "Exercise 5.3: correct" in capsys.readouterr().out


def test_check_softmax_kernel_stub_without_todo_marker_reports_unwritten_half():
    src = _stubbed(_softmax_source()).replace("TODO (Exercise 5.3)", "nothing here")
    with pytest.raises(AssertionError, match="no element of the causal half"):
        checks.check_softmax_forward_kernel(RawKernel(src, "softmax_forward_kernel"))


def _stubbed(src):
    a, b = src.index(BODY_START), src.index(BODY_END) + len(BODY_END)
    return src[:a] + "    // TODO (Exercise 5.3): max, exp-sum, normalise\n" + src[b:]


WRONG_KERNELS = {
    "stub": (_stubbed, "not done yet"),
    "bound_excludes_diagonal": (lambda s: s.replace("i <= own_pos", "i < own_pos"), "off-by-one"),
    "bound_one_too_far": (lambda s: s.replace("i <= own_pos", "i <= own_pos + 1 && i < T"), "off by one"),
    "whole_row": (lambda s: s.replace("i <= own_pos", "i < T"), "whole row"),
    "no_scale": (lambda s: s.replace("inv_temperature * (x[i] - maxval)", "(x[i] - maxval)"),
                 "inv_temperature is missing"),
    "no_max_reduce": (lambda s: s.replace("maxval = warpReduceMax(maxval);", ""), "own maximum"),
    "no_sum_reduce": (lambda s: s.replace("sumval = warpReduceSum(sumval);", ""), "own partial sum"),
    "no_max_shift": (lambda s: s.replace("(x[i] - maxval)", "x[i]"), "overflow"),
    "sign": (lambda s: s.replace("expf(inv_temperature *", "expf(-inv_temperature *"), "Exercise 5.3"),
}


def test_check_softmax_kernel_passes_on_the_course_kernel(capsys):
    checks.check_softmax_forward_kernel(load_kernel("attention.cu", "softmax_forward_kernel"))
    assert "Exercise 5.3: correct" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(WRONG_KERNELS))
def test_check_softmax_kernel_names_each_mistake(name):
    change, message = WRONG_KERNELS[name]
    with pytest.raises(AssertionError, match=message) as e:
        checks.check_softmax_forward_kernel(_variant(change))
    assert "Exercise 5.3" in str(e.value)


def test_check_softmax_kernel_fails_on_value_correct_loops_whose_accesses_do_not_coalesce():
    """Each lane walks its own block of ceil((own_pos + 1) / 32) neighbouring keys: the right softmax, but the warp's
    32 loads of a step are a block apart."""
    loop = "for (int i = lane; i <= own_pos; i += warpSize)"
    blocked = "for (int i = lane * ((own_pos + 32) / 32); i <= own_pos && i < (lane + 1) * ((own_pos + 32) / 32); i++)"
    src = _softmax_source()
    assert src.count(loop) == 3
    with pytest.raises(AssertionError, match=r"(?s)Exercise 5.3: the values are right, but the warps' accesses to inp "
                                             r"are not coalesced.*lane l takes key l \+ 32 k"):
        checks.check_softmax_forward_kernel(src.replace(loop, blocked))


def test_check_softmax_kernel_fails_on_python_stub():
    def stub(*args):
        raise NotImplementedError("Exercise 5.3")
    with pytest.raises(AssertionError, match="not done yet"):
        checks.check_softmax_forward_kernel(stub)


def test_notebook_kernel_is_the_package_kernel():
    """The softmax kernel the student completes in the notebook is the one in attention.cu."""
    nb = json.loads((ROOT / "solutions" / "05_attention.ipynb").read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    cell = next(c for c in cells if c.startswith("# Exercise 5.3"))
    code = re.search(r'r"""(.*?)"""', cell, re.S).group(1)
    code = re.sub(r"[ \t]*// (BEGIN|END) SOLUTION\n", "", code)
    assert code.strip() == _softmax_source().strip()
