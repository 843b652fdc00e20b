"""Lesson 03, LayerNorm: references, gradient check, every kernel, bad input, and the exercise checks."""
from __future__ import annotations

from pathlib import Path

import nbformat
import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.checks import layernorm as checks
from llmc_lessons.checks import poisoned
from llmc_lessons.cuda import load_kernel
from llmc_lessons.device import to_device, to_host
from llmc_lessons.exercises import to_student
from llmc_lessons.gradcheck import gradcheck
from llmc_lessons.layers.layernorm import (layernorm_backward, layernorm_backward_cuda, layernorm_forward,
                                           layernorm_forward_cuda)

NOTEBOOK = Path(__file__).resolve().parents[1] / "solutions" / "03_layernorm.ipynb"
U = 2.0 ** -24  # float32 unit roundoff


def _inputs(seed, B, T, C, dtype=np.float32):
    gen = np.random.default_rng(seed)
    inp = (gen.standard_normal((B, T, C)) * 2 + 1).astype(dtype)
    weight = (gen.standard_normal(C) + 1).astype(dtype)
    bias = gen.standard_normal(C).astype(dtype)
    dout = gen.standard_normal((B, T, C)).astype(dtype)
    return inp, weight, bias, dout


def _f64(*arrays):
    return tuple(np.asarray(a, dtype=np.float64) for a in arrays)


# ---------------------------------------------------------------------------------------------------------
# NumPy reference


def test_forward_normalises_rows_and_matches_loops():
    inp, weight, bias, _ = _inputs(0, 2, 3, 10, np.float64)
    out, mean, rstd = layernorm_forward(inp, np.ones(10), np.zeros(10))
    np.testing.assert_allclose(out.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(out.var(-1), 1, rtol=1e-4)          # 1 up to eps / var
    out, mean, rstd = layernorm_forward(inp, weight, bias)
    for b in range(2):
        for t in range(3):
            x = inp[b, t]
            m = sum(x) / 10
            s = 1 / np.sqrt(sum((xi - m) ** 2 for xi in x) / 10 + 1e-5)
            np.testing.assert_allclose([mean[b, t], rstd[b, t]], [m, s], rtol=1e-12)
            np.testing.assert_allclose(out[b, t], (x - m) * s * weight + bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_preserves_dtype(dtype):
    inp, weight, bias, dout = _inputs(1, 2, 3, 8, dtype)
    out, mean, rstd = layernorm_forward(inp, weight, bias)
    grads = layernorm_backward(dout, inp, weight, mean, rstd)
    assert all(a.dtype == dtype for a in (out, mean, rstd, *grads))
    assert out.shape == (2, 3, 8) and mean.shape == rstd.shape == (2, 3)
    assert [g.shape for g in grads] == [(2, 3, 8), (8,), (8,)]


def test_backward_gradcheck_float64():
    inp, weight, bias, _ = _inputs(2, 2, 3, 13, np.float64)

    def backward(dy, inp, weight, bias):
        _, mean, rstd = layernorm_forward(inp, weight, bias)
        return dict(zip(("inp", "weight", "bias"), layernorm_backward(dy, inp, weight, mean, rstd)))

    gradcheck(lambda inp, weight, bias: layernorm_forward(inp, weight, bias)[0], backward,
              dict(inp=inp, weight=weight, bias=bias), title="layernorm").assert_ok()


def test_reference_rejects_bad_shapes():
    inp = np.ones((2, 3, 4))
    with pytest.raises(ValueError, match="weight must have shape"):
        layernorm_forward(inp, np.ones(5), np.ones(4))
    with pytest.raises(ValueError, match="bias must have shape"):
        layernorm_forward(inp, np.ones(4), np.ones(3))
    with pytest.raises(ValueError, match=r"inp must have shape \(B, T, C\)"):
        layernorm_forward(np.ones((3, 4)), np.ones(4), np.ones(4))
    with pytest.raises(ValueError, match="mean must have shape"):
        layernorm_backward(inp, inp, np.ones(4), np.ones((2, 4)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="dout must have shape"):
        layernorm_backward(np.ones((2, 3, 5)), inp, np.ones(4), np.ones((2, 3)), np.ones((2, 3)))


# ---------------------------------------------------------------------------------------------------------
# Kernels, launched directly


def _nan_tail(n, pad):
    """A poisoned buffer of n + pad floats and its first n: a write past the end shows up in the tail."""
    buf = poisoned((n + pad,))
    return buf, buf[:n]


@pytest.mark.parametrize("version,block_size,C", [(1, 32, 77), (1, 50, 5), (2, 32, 77), (2, 96, 5), (2, 256, 130),
                                                  (3, 32, 77), (3, 96, 5), (3, 256, 1024)])
def test_forward_kernels(version, block_size, C):
    B, T = 3, 5                                               # 15 rows: no block size here divides it
    inp, weight, bias, _ = _inputs(version * 100 + block_size, B, T, C)
    N = B * T
    out_buf, out = _nan_tail(N * C, 64)
    mean_buf, mean = _nan_tail(N, 64)
    rstd_buf, rstd = _nan_tail(N, 64)
    rows_per_block = block_size if version == 1 else block_size // 32
    load_kernel("layernorm.cu", f"layernorm_forward_kernel{version}")(
        (-(-N // rows_per_block),), (block_size,),
        (out, mean, rstd, to_device(inp), to_device(weight), to_device(bias), np.int32(N), np.int32(C),
         np.float32(1e-5)))
    want = layernorm_forward(*_f64(inp, weight, bias))
    for got, ref in zip((out, mean, rstd), want):
        np.testing.assert_allclose(to_host(got).reshape(ref.shape), ref, rtol=1e-5, atol=2e-6)
    for buf, n in ((out_buf, N * C), (mean_buf, N), (rstd_buf, N)):
        assert np.isnan(to_host(buf[n:])).all()


@pytest.mark.parametrize("block_size,C", [(32, 77), (96, 5), (256, 130)])
def test_backward_kernel_dinp_accumulates(block_size, C):
    B, T = 3, 5
    inp, weight, bias, dout = _inputs(7 + block_size, B, T, C)
    _, mean, rstd = layernorm_forward(inp, weight, bias)
    N = B * T
    init = np.random.default_rng(block_size).standard_normal((B, T, C)).astype(np.float32)
    dinp = to_device(init.copy())                                  # the kernel adds (+=): start from noise
    load_kernel("layernorm.cu", "layernorm_backward_kernel")(
        (-(-N // (block_size // 32)),), (block_size,),
        (dinp, to_device(dout), to_device(inp), to_device(weight), to_device(mean), to_device(rstd),
         np.int32(N), np.int32(C)))
    want = init + layernorm_backward(*_f64(dout, inp, weight, mean, rstd))[0]
    np.testing.assert_allclose(to_host(dinp), want, rtol=1e-5, atol=1e-5)


def _param_bound(dout, inp, mean, rstd):
    """|float32 sum - exact| <= N u sum|terms| per channel (plus a little for norm's own rounding)."""
    d, x = _f64(dout, inp)
    norm = (x - mean[..., None]) * rstd[..., None]
    N = d.shape[0] * d.shape[1]
    return ((N + 8) * U * np.abs(d * norm).sum((0, 1)) + 1e-7, (N + 8) * U * np.abs(d).sum((0, 1)) + 1e-7)


@pytest.mark.parametrize("block_size,B,T,C", [(32, 3, 5, 77), (96, 4, 9, 33), (1024, 2, 40, 31)])
def test_param_backward_kernel_accumulates_within_rounding_bound(block_size, B, T, C):
    inp, weight, bias, dout = _inputs(11 + block_size, B, T, C)
    _, mean, rstd = layernorm_forward(inp, weight, bias)
    gen = np.random.default_rng(block_size)
    init_w, init_b = gen.standard_normal(C).astype(np.float32), gen.standard_normal(C).astype(np.float32)
    dweight, dbias = to_device(init_w.copy()), to_device(init_b.copy())
    load_kernel("layernorm.cu", "layernorm_param_backward_kernel")(
        (-(-C // 32),), (block_size,),
        (dweight, dbias, to_device(dout), to_device(inp), to_device(mean), to_device(rstd), np.int32(B * T),
         np.int32(C)))
    _, want_w, want_b = layernorm_backward(*_f64(dout, inp, weight, mean, rstd))
    bound_w, bound_b = _param_bound(dout, inp, mean, rstd)
    # the initial values add one more rounding each
    assert np.all(np.abs(to_host(dweight) - (init_w + want_w)) <= bound_w + U * np.abs(init_w + want_w) * 2)
    assert np.all(np.abs(to_host(dbias) - (init_b + want_b)) <= bound_b + U * np.abs(init_b + want_b) * 2)


@pytest.mark.parametrize("version,block_size", [(1, 32), (1, 100), (2, 64), (2, 512), (3, 64), (3, 512)])
def test_forward_launcher(version, block_size):
    inp, weight, bias, _ = _inputs(20 + block_size, 2, 7, 45)
    got = layernorm_forward_cuda(to_device(inp), to_device(weight), to_device(bias), block_size=block_size,
                                 version=version)
    want = layernorm_forward(*_f64(inp, weight, bias))
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and g.shape == w.shape
        np.testing.assert_allclose(to_host(g), w, rtol=1e-5, atol=2e-6)


# (3, 4) rows: one row chunk; (5, 23) with param_block_size 64: 115 // 16 = 7 chunks and the reduce kernel
@pytest.mark.parametrize("block_size,param_block_size,B,T", [(32, 32, 3, 4), (128, 1024, 3, 4), (64, 64, 5, 23)])
def test_backward_launcher(block_size, param_block_size, B, T):
    inp, weight, bias, dout = _inputs(30 + block_size, B, T, 50)
    _, mean, rstd = layernorm_forward(inp, weight, bias)
    dinp, dweight, dbias = layernorm_backward_cuda(*(to_device(a) for a in (dout, inp, weight, mean, rstd)),
                                                   block_size=block_size, param_block_size=param_block_size)
    want = layernorm_backward(*_f64(dout, inp, weight, mean, rstd))
    np.testing.assert_allclose(to_host(dinp), want[0], rtol=1e-5, atol=1e-5)
    bound_w, bound_b = _param_bound(dout, inp, mean, rstd)
    assert np.all(np.abs(to_host(dweight) - want[1]) <= bound_w)
    assert np.all(np.abs(to_host(dbias) - want[2]) <= bound_b)
    # deterministic: a second run gives the same bits
    again = layernorm_backward_cuda(*(to_device(a) for a in (dout, inp, weight, mean, rstd)),
                                    block_size=block_size, param_block_size=param_block_size)
    assert all(np.array_equal(to_host(a), to_host(b)) for a, b in zip((dinp, dweight, dbias), again))


@pytest.mark.parametrize("block_size,max_blocks,B,T,C", [(32, 264, 5, 23, 44), (256, 1, 3, 7, 1024), (96, 3, 2, 9, 768)])
def test_backward_kernel2_launcher(block_size, max_blocks, B, T, C, poisoned_allocations):
    inp, weight, bias, dout = _inputs(C + block_size, B, T, C)
    _, mean, rstd = layernorm_forward(inp, weight, bias)
    args = [to_device(a) for a in (dout, inp, weight, mean, rstd)]
    dinp, dweight, dbias = layernorm_backward_cuda(*args, block_size=block_size, version=2, max_blocks=max_blocks)
    want = layernorm_backward(*_f64(dout, inp, weight, mean, rstd))
    np.testing.assert_allclose(to_host(dinp), want[0], rtol=1e-5, atol=1e-5)
    bound_w, bound_b = _param_bound(dout, inp, mean, rstd)
    assert np.all(np.abs(to_host(dweight) - want[1]) <= bound_w)
    assert np.all(np.abs(to_host(dbias) - want[2]) <= bound_b)
    again = layernorm_backward_cuda(*args, block_size=block_size, version=2, max_blocks=max_blocks)
    assert all(np.array_equal(to_host(a), to_host(b)) for a, b in zip((dinp, dweight, dbias), again))
    default = layernorm_backward_cuda(*args, block_size=block_size, max_blocks=max_blocks)   # version 2 where it fits
    assert all(np.array_equal(to_host(a), to_host(b)) for a, b in zip((dinp, dweight, dbias), default))


def test_launchers_reject_bad_input():
    x = to_device(np.ones((2, 3, 4), np.float32))
    w = to_device(np.ones(4, np.float32))
    m = to_device(np.ones((2, 3), np.float32))
    with pytest.raises(TypeError, match="dtype float32"):
        layernorm_forward_cuda(to_device(np.ones((2, 3, 4))), w, w)
    with pytest.raises(ValueError, match=r"weight must have shape \(4\)"):
        layernorm_forward_cuda(x, to_device(np.ones(5, np.float32)), w)
    with pytest.raises(ValueError, match="C-contiguous"):
        layernorm_forward_cuda(to_device(np.ones((2, 3, 8), np.float32))[..., ::2], w, w)
    with pytest.raises(ValueError, match="multiple of 32"):
        layernorm_forward_cuda(x, w, w, block_size=100, version=2)
    with pytest.raises(ValueError, match="in 1..1024"):
        layernorm_forward_cuda(x, w, w, block_size=2048, version=1)
    with pytest.raises(TypeError, match="block_size must be an int"):
        layernorm_forward_cuda(x, w, w, block_size=64.0)
    with pytest.raises(ValueError, match="version"):
        layernorm_forward_cuda(x, w, w, version=4)
    big = to_device(np.ones(1025, np.float32))
    with pytest.raises(ValueError, match="C must be <= 1024"):
        layernorm_forward_cuda(to_device(np.ones((1, 2, 1025), np.float32)), big, big, version=3)
    with pytest.raises(ValueError, match="eps"):
        layernorm_forward_cuda(x, w, w, eps=-1.0)
    with pytest.raises(TypeError):
        layernorm_forward_cuda([[[1.0]]], w, w)
    with pytest.raises(ValueError, match="dout must have shape"):
        layernorm_backward_cuda(to_device(np.ones((2, 3, 5), np.float32)), x, w, m, m)
    with pytest.raises(ValueError, match="rstd must have shape"):
        layernorm_backward_cuda(x, x, w, m, to_device(np.ones((3, 2), np.float32)))
    with pytest.raises(ValueError, match="param_block_size"):
        layernorm_backward_cuda(x, x, w, m, m, param_block_size=48)
    with pytest.raises(ValueError, match="use version=1"):
        x6, w6 = to_device(np.ones((2, 3, 6), np.float32)), to_device(np.ones(6, np.float32))
        layernorm_backward_cuda(x6, x6, w6, m, m, version=2)   # C = 6: not a multiple of 4
    with pytest.raises(ValueError, match="version must be"):
        layernorm_backward_cuda(x, x, w, m, m, version=3)


@pytest.mark.skipif(not device.on_gpu(), reason="only a GPU backend refuses NumPy arrays")
def test_launchers_reject_numpy_on_gpu():
    with pytest.raises(TypeError, match="CuPy"):
        layernorm_forward_cuda(np.ones((1, 2, 4), np.float32), np.ones(4, np.float32), np.ones(4, np.float32))


# ---------------------------------------------------------------------------------------------------------
# Exercise 3.2: the NumPy backward


def _stub(dout, inp, weight, mean, rstd):
    raise NotImplementedError("Exercise 3.2: layernorm_backward in NumPy")


def _wrong(kind):
    def fn(dout, inp, weight, mean, rstd):
        r = rstd[..., None]
        norm = (inp - mean[..., None]) * r
        dnorm = dout if kind == "dout_for_dnorm" else dout * weight
        m1 = dnorm.mean(-1, keepdims=True)
        m2 = (dnorm * norm).mean(-1, keepdims=True)
        dinp = {"no_mean_term": r * (dnorm - norm * m2), "no_norm_term": r * (dnorm - m1),
                "sign_norm_term": r * (dnorm - m1 + norm * m2), "sign_all": -r * (dnorm - m1 - norm * m2),
                "no_rstd": dnorm - m1 - norm * m2}.get(kind, r * (dnorm - m1 - norm * m2))
        dweight = {"dweight_inp": (dout * inp).sum((0, 1)), "dweight_wrong_axis": (dout * norm).sum(-1)}.get(
            kind, (dout * norm).sum((0, 1)))
        dbias = dout.mean((0, 1)) if kind == "dbias_mean" else dout.sum((0, 1))
        return dinp, dweight, dbias
    return fn


def test_check_layernorm_backward_passes_on_solution(capsys):
    checks.check_layernorm_backward(layernorm_backward)
    assert "Exercise 3.2: correct" in capsys.readouterr().out


def test_check_layernorm_backward_fails_on_stub():
    with pytest.raises(AssertionError, match="Exercise 3.2 is not done yet"):
        checks.check_layernorm_backward(_stub)


@pytest.mark.parametrize("kind,cause", [
    ("no_mean_term", r"- mean\(dnorm\) is missing"), ("no_norm_term", r"norm \* mean\(dnorm \* norm\) is missing"),
    ("dout_for_dnorm", "dout was used where dnorm"), ("sign_norm_term", "must be subtracted"),
    ("sign_all", "sign error"), ("no_rstd", "rstd is missing"), ("dweight_inp", "used inp where norm"),
    ("dweight_wrong_axis", r"dweight\): expected shape \(11,\)"), ("dbias_mean", "averaged"),
])
def test_check_layernorm_backward_catches_mistakes(kind, cause):
    with pytest.raises(AssertionError, match=f"(?s)Exercise 3.2.*{cause}"):
        checks.check_layernorm_backward(_wrong(kind))


# ---------------------------------------------------------------------------------------------------------
# Exercise 3.3: kernel2's reductions, as in the solution notebook and as the student sees them


def _exercise_source(student: bool) -> str:
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    if student:
        nb = to_student(nb, NOTEBOOK.name)
    cell = next(c for c in nb.cells if c.cell_type == "code" and "# Exercise 3.3:" in c.source)
    namespace = {}
    exec(cell.source, namespace)
    return namespace["layernorm_kernel2_src"]


SUM_LOOP = "for (int c = lane; c < C; c += 32) { sum += x[c]; }"
SUM_REDUCE = "sum = warpReduceSum(sum);"
SQ_REDUCE = "sumsq = warpReduceSum(sumsq);"
SQ_TERM = "float d = x[c] - m;"


def test_check_kernel2_passes_on_notebook_solution(capsys):
    checks.check_layernorm_forward_kernel2(_exercise_source(student=False))
    assert "Exercise 3.3: correct" in capsys.readouterr().out


def test_check_kernel2_fails_on_student_stub():
    src = _exercise_source(student=True)
    assert src.count("TODO (Exercise 3.3)") == 2 and SUM_REDUCE not in src
    with pytest.raises(AssertionError, match="Exercise 3.3 is not done yet"):
        checks.check_layernorm_forward_kernel2(src)
    with pytest.raises(AssertionError, match="(?s)Exercise 3.3.*mean.*every element is zero"):
        checks.check_layernorm_forward_kernel2(src.replace("TODO (Exercise 3.3)", "nothing here"))


@pytest.mark.parametrize("old,new,cause", [
    (SUM_REDUCE, "", r"mean.*never combined: call warpReduceSum\(sum\)"),
    (SQ_REDUCE, "", r"rstd.*warpReduceSum\(sumsq\)"),
    (SQ_REDUCE, "sumsq = warpReduceSum(sumsq) * C / (C - 1);", "divides by C - 1"),
    (SQ_TERM, "float d = x[c];", "squares were taken of x"),
    (SUM_LOOP, "for (int c = lane + 1; c < C; c += 32) { sum += x[c]; }", "elements are wrong"),
    (SUM_LOOP, "for (int c = lane; c < C; c += 16) { sum += x[c]; }", "elements are wrong"),
])
def test_check_kernel2_catches_mistakes(old, new, cause):
    src = _exercise_source(student=False)
    assert old in src
    with pytest.raises(AssertionError, match=f"(?s)Exercise 3.3.*{cause}"):
        checks.check_layernorm_forward_kernel2(src.replace(old, new))


def test_check_kernel2_fails_on_value_correct_loops_whose_loads_do_not_coalesce():
    """Each lane sums its own block of ceil(C/32) neighbouring channels: the right sum, but the warp's 32 loads of a
    step are ceil(C/32) floats apart."""
    src = _exercise_source(student=False)
    assert SUM_LOOP in src
    blocked = ("int per = (C + 31) / 32; "
               "for (int c = lane * per; c < C && c < (lane + 1) * per; c++) { sum += x[c]; }")
    with pytest.raises(AssertionError, match=r"(?s)Exercise 3.3: the values are right, but the warps' accesses to inp "
                                             r"are not coalesced.*lane l reads channel l \+ 32 i"):
        checks.check_layernorm_forward_kernel2(src.replace(SUM_LOOP, blocked))
