"""Lesson 16, grouped-query attention: the references against loops, GPT-2's attention unchanged at NKV = NH,
the gradient check, and the repkv kernels against the references."""
from __future__ import annotations

import math

import numpy as np
import pytest

from llmc_lessons.device import to_device, to_host
from llmc_lessons.gradcheck import gradcheck
from llmc_lessons.layers.attention import (attention_backward, attention_backward_cuda, attention_forward,
                                           attention_forward_cuda, repkv_backward, repkv_backward_cuda,
                                           repkv_forward, repkv_forward_cuda)


def _loops_gqa(qkv, NH, NKV):
    """Grouped-query attention with plain Python loops, written independently of the vectorised reference."""
    B, T, W = qkv.shape
    hs = W // (NH + 2 * NKV)
    C = NH * hs
    out = np.zeros((B, T, C))
    att = np.zeros((B, NH, T, T))
    for b in range(B):
        for h in range(NH):
            g = h // (NH // NKV)                            # the key/value head of query head h
            k0, v0 = C + g * hs, C + NKV * hs + g * hs
            for t in range(T):
                q = qkv[b, t, h * hs:(h + 1) * hs]
                s = np.array([q @ qkv[b, t2, k0:k0 + hs] / math.sqrt(hs) for t2 in range(t + 1)])
                p = np.exp(s - s.max())
                p /= p.sum()
                att[b, h, t, :t + 1] = p
                for t2 in range(t + 1):
                    out[b, t, h * hs:(h + 1) * hs] += p[t2] * qkv[b, t2, v0:v0 + hs]
    return out, att


@pytest.mark.parametrize("NH,NKV", [(4, 2), (6, 3), (4, 1), (3, 3)])
def test_forward_matches_loops(NH, NKV):
    hs = 3
    qkv = np.random.default_rng(0).standard_normal((2, 6, (NH + 2 * NKV) * hs))
    out, att = attention_forward(qkv, NH, NKV)
    ref_out, ref_att = _loops_gqa(qkv, NH, NKV)
    np.testing.assert_allclose(out, ref_out, atol=1e-12)
    np.testing.assert_allclose(att, ref_att, atol=1e-12)


def test_nkv_equal_to_nh_is_gpt2_attention_bit_for_bit():
    qkv = np.random.default_rng(1).standard_normal((2, 5, 3 * 12)).astype(np.float32)
    out, att = attention_forward(qkv, 4)
    out4, att4 = attention_forward(qkv, 4, 4)
    assert np.array_equal(out, out4) and np.array_equal(att, att4)
    dout = np.random.default_rng(2).standard_normal(out.shape).astype(np.float32)
    assert np.array_equal(attention_backward(dout, qkv, att, 4), attention_backward(dout, qkv, att, 4, 4))


def test_repkv_layout():
    # B = T = 1, hs = 1, NH = 4, NKV = 2: q heads 0..3, k heads 10, 11, v heads 20, 21
    qkv = np.array([[[0, 1, 2, 3, 10, 11, 20, 21]]], dtype=np.float64)
    assert repkv_forward(qkv, 4, 2).tolist() == [[[0, 1, 2, 3, 10, 10, 11, 11, 20, 20, 21, 21]]]
    d = np.arange(12, dtype=np.float64).reshape(1, 1, 12)
    assert repkv_backward(d, 4, 2).tolist() == [[[0, 1, 2, 3, 4 + 5, 6 + 7, 8 + 9, 10 + 11]]]


@pytest.mark.parametrize("B,T,NH,NKV,hs", [(2, 5, 4, 2, 3), (1, 6, 6, 2, 2), (1, 4, 3, 1, 2)])
def test_backward_gradcheck(B, T, NH, NKV, hs):
    qkv = np.random.default_rng(3).standard_normal((B, T, (NH + 2 * NKV) * hs))

    def forward(qkv):
        return attention_forward(qkv, NH, NKV)[0]

    def backward(dout, qkv):
        return {"qkv": attention_backward(dout, qkv, attention_forward(qkv, NH, NKV)[1], NH, NKV)}

    gradcheck(forward, backward, {"qkv": qkv}, title="grouped-query attention").assert_ok()


def test_references_reject_bad_head_counts():
    with pytest.raises(ValueError, match="must divide NH"):
        attention_forward(np.zeros((1, 4, 20)), 4, 3)
    with pytest.raises(ValueError, match=r"\(NH \+ 2 NKV\) hs"):
        attention_forward(np.zeros((1, 4, 17)), 4, 2)
    with pytest.raises(ValueError, match="NKV"):
        attention_forward(np.zeros((1, 4, 16)), 4, 0)
    with pytest.raises(ValueError, match="NKV"):
        repkv_backward(np.zeros((1, 4, 12)), 4, 3)


# ---------------------------------------------------------------------------------------------------------
# Kernels: NaN-poisoned outputs, awkward sizes, several block sizes


def _rand(gen, *shape):
    return to_device(gen.standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("block_size", [32, 100, 256])
@pytest.mark.parametrize("B,T,NH,NKV,hs", [(2, 7, 6, 2, 5), (1, 13, 4, 1, 3), (3, 3, 2, 2, 7)])
def test_repkv_kernels(block_size, B, T, NH, NKV, hs):
    gen = np.random.default_rng(B * T + NH)
    qkv = _rand(gen, B, T, (NH + 2 * NKV) * hs)
    out = repkv_forward_cuda(qkv, NH, NKV, block_size=block_size)
    np.testing.assert_array_equal(to_host(out), repkv_forward(to_host(qkv), NH, NKV))
    d = _rand(gen, B, T, 3 * NH * hs)
    dinp = repkv_backward_cuda(d, NH, NKV, block_size=block_size)
    np.testing.assert_allclose(to_host(dinp), repkv_backward(to_host(d), NH, NKV), rtol=1e-6, atol=1e-6)


def test_repkv_kernels_write_every_output(poisoned_allocations):
    """The launchers' outputs start full of NaN: an unwritten element would show."""
    gen = np.random.default_rng(5)
    qkv = _rand(gen, 2, 5, (4 + 2 * 2) * 3)
    assert np.isfinite(to_host(repkv_forward_cuda(qkv, 4, 2, block_size=64))).all()
    assert np.isfinite(to_host(repkv_backward_cuda(_rand(gen, 2, 5, 36), 4, 2, block_size=64))).all()


@pytest.mark.parametrize("version", ["naive", "cublas"])
def test_gqa_launchers_match_the_reference(version):
    B, T, NH, NKV, hs = 2, 11, 6, 3, 4
    gen = np.random.default_rng(6)
    qkv = _rand(gen, B, T, (NH + 2 * NKV) * hs)
    out, att = attention_forward_cuda(qkv, NH, version=version, block_size=64, NKV=NKV)
    ref_out, ref_att = attention_forward(to_host(qkv).astype(np.float64), NH, NKV)
    np.testing.assert_allclose(to_host(out), ref_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_host(att), ref_att, rtol=1e-4, atol=1e-5)
    dout = _rand(gen, B, T, NH * hs)
    dqkv = attention_backward_cuda(dout, qkv, att, NH, block_size=64, NKV=NKV)
    ref = attention_backward(to_host(dout).astype(np.float64), to_host(qkv).astype(np.float64), ref_att, NH, NKV)
    np.testing.assert_allclose(to_host(dqkv), ref, rtol=1e-4, atol=1e-5)


def test_launchers_reject_bad_head_counts():
    qkv = to_device(np.zeros((1, 4, 20), np.float32))
    with pytest.raises(ValueError, match="must divide NH"):
        repkv_forward_cuda(qkv, 4, 3)
    with pytest.raises(ValueError, match="must divide NH"):
        repkv_backward_cuda(to_device(np.zeros((1, 4, 12), np.float32)), 4, 3)


# ---------------------------------------------------------------------------------------------------------
# Exercises 16.1 and 16.2: the checks pass the reference and fail the stub and plausible wrong answers, as a
# student would write them, naming the mistake


from llmc_lessons.checks import ExerciseFailed  # noqa: E402
from llmc_lessons.checks.llama import check_repkv_backward, check_repkv_forward  # noqa: E402


def _split_kv(qkv, NH, NKV):
    hs = qkv.shape[-1] // (NH + 2 * NKV)
    C, K = NH * hs, NKV * hs
    return qkv[..., :C], qkv[..., C:C + K], qkv[..., C + K:], hs


def forward_tiled(qkv, NH, NKV):                 # query head h reads kv head h % NKV
    q, k, v, hs = _split_kv(qkv, NH, NKV)
    return np.concatenate([q] + [np.concatenate([x] * (NH // NKV), axis=-1) for x in (k, v)], axis=-1)


def forward_channels(qkv, NH, NKV):              # np.repeat over the channels, not the heads
    q, k, v, hs = _split_kv(qkv, NH, NKV)
    return np.concatenate([q, np.repeat(k, NH // NKV, axis=-1), np.repeat(v, NH // NKV, axis=-1)], axis=-1)


def forward_right(qkv, NH, NKV):
    q, k, v, hs = _split_kv(qkv, NH, NKV)
    B, T, _ = qkv.shape
    rep = [np.repeat(x.reshape(B, T, NKV, hs), NH // NKV, axis=2).reshape(B, T, -1) for x in (k, v)]
    return np.concatenate([q] + rep, axis=-1)


def forward_no_repeat(qkv, NH, NKV):             # forgets to expand: still (NH + 2 NKV) hs wide
    return qkv.copy()


def _dsplit(d, NH):
    C = d.shape[-1] // 3
    return d[..., :C], d[..., C:2 * C], d[..., 2 * C:], C // NH


def backward_right(d, NH, NKV):
    dq, dk, dv, hs = _dsplit(d, NH)
    B, T, _ = d.shape
    return np.concatenate([dq] + [x.reshape(B, T, NKV, NH // NKV, hs).sum(3).reshape(B, T, -1) for x in (dk, dv)],
                          axis=-1)


def backward_first_copy(d, NH, NKV):             # no sum: keeps every group's first copy
    dq, dk, dv, hs = _dsplit(d, NH)
    B, T, _ = d.shape
    return np.concatenate([dq] + [x.reshape(B, T, NKV, NH // NKV, hs)[:, :, :, 0].reshape(B, T, -1)
                                  for x in (dk, dv)], axis=-1)


def backward_mean(d, NH, NKV):
    dq, dk, dv, hs = _dsplit(d, NH)
    B, T, _ = d.shape
    return np.concatenate([dq] + [x.reshape(B, T, NKV, NH // NKV, hs).mean(3).reshape(B, T, -1)
                                  for x in (dk, dv)], axis=-1)


def backward_tiled(d, NH, NKV):                  # sums heads h with the same h % NKV
    dq, dk, dv, hs = _dsplit(d, NH)
    B, T, _ = d.shape
    return np.concatenate([dq] + [x.reshape(B, T, NH // NKV, NKV * hs).sum(2) for x in (dk, dv)], axis=-1)


def backward_no_sum(d, NH, NKV):                 # returns the expanded gradient unchanged
    return d.copy()


def _stub(*args):
    raise NotImplementedError("Exercise 16.k: write it")


def test_checks_pass_right_answers(capsys):
    check_repkv_forward(forward_right)
    check_repkv_backward(backward_right)
    out = capsys.readouterr().out
    assert "Exercise 16.1: correct" in out and "Exercise 16.2: correct" in out


@pytest.mark.parametrize("check,exercise", [(check_repkv_forward, "16.1"), (check_repkv_backward, "16.2")])
def test_checks_fail_on_the_stub(check, exercise):
    with pytest.raises(ExerciseFailed, match=f"Exercise {exercise} is not done yet"):
        check(_stub)


@pytest.mark.parametrize("answer,message", [
    (forward_tiled, "likely cause: wrong head grouping"),
    (forward_channels, "likely cause: each channel was repeated instead of each head"),
    (forward_no_repeat, r"must have shape \(B, T, 3 NH hs\)"),
])
def test_16_1_names_the_mistake(answer, message):
    with pytest.raises(ExerciseFailed, match=f"(?s)Exercise 16.1.*{message}") as e:
        check_repkv_forward(answer)
    assert "Traceback" not in str(e.value)


@pytest.mark.parametrize("answer,message", [
    (backward_first_copy, "from one copy only"),
    (backward_mean, "averaged"),
    (backward_tiled, "summed over the wrong copies"),
    (backward_no_sum, r"must have shape \(B, T, \(NH \+ 2 NKV\) hs\)"),
])
def test_16_2_names_the_mistake(answer, message):
    with pytest.raises(ExerciseFailed, match=f"(?s)Exercise 16.2.*{message}"):
        check_repkv_backward(answer)


# ---------------------------------------------------------------------------------------------------------
# Exercise 16.3: the sum in repkv_backward_kernel


from llmc_lessons.checks.llama import check_repkv_backward_kernel  # noqa: E402
from llmc_lessons.cuda import kernel_source  # noqa: E402

GOOD = "#include \"common.cuh\"\n" + kernel_source("attention.cu")[
    kernel_source("attention.cu").index('extern "C" __global__ void repkv_backward_kernel('):]
GOOD = GOOD[:GOOD.index("\n}\n") + 3]
SUM = "        sum += row[(part * NH + g * group + j) * hs + i];"


def test_16_3_passes_the_package_kernel(capsys):
    check_repkv_backward_kernel(GOOD)
    assert "Exercise 16.3: correct" in capsys.readouterr().out


def test_16_3_fails_on_the_stub():
    start, end = GOOD.index("    float sum = 0.0f;"), GOOD.index("    dinp[idx] = sum;\n") + len("    dinp[idx] = sum;\n")
    stub = GOOD[:start] + "    // TODO (Exercise 16.3): write the sum\n" + GOOD[end:]
    with pytest.raises(ExerciseFailed, match="(?s)Exercise 16.3.*NaN.*TODO"):
        check_repkv_backward_kernel(stub)


@pytest.mark.parametrize("new,message", [
    ("        sum = row[(part * NH + g * group) * hs + i];", "from one copy only"),
    ("        sum += row[(part * NH + j * NKV + g) * hs + i] ;", "summed over the wrong copies"),
    ("        sum += row[(part * NH + g * group + j) * hs + i] / group;", "averaged"),
])
def test_16_3_names_the_mistake(new, message):
    assert SUM in GOOD
    with pytest.raises(ExerciseFailed, match=f"(?s)Exercise 16.3.*likely cause: .*{message}"):
        check_repkv_backward_kernel(GOOD.replace(SUM, new))


def test_the_notebook_kernel_is_the_package_kernel():
    from conftest import notebook_cuda_source
    body = notebook_cuda_source("16_llama.ipynb", "repkv_src")
    assert body.strip() == GOOD.strip()
