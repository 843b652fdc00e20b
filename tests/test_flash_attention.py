"""Flash attention: the NumPy reference and the kernels against lesson 05's attention; the exercise checks."""
import platform
import sys

import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.checks import poisoned
from llmc_lessons.checks.flash_attention import check_flash_forward_kernel, check_online_softmax_update
from llmc_lessons.cuda import kernel_source
from llmc_lessons.device import to_device, to_host
from llmc_lessons.layers.attention import attention_backward, attention_forward, repkv_backward, repkv_forward
from llmc_lessons.precision import from_bf16, to_bf16
from llmc_lessons.layers.flash_attention import (flash_attention_backward, flash_attention_backward_bf16_cuda,
                                                 flash_attention_backward_cuda, flash_attention_forward,
                                                 flash_attention_forward_bf16_cuda, flash_attention_forward_cuda,
                                                 flash_version, online_softmax_update, tile_grid, WGMMA_HEAD_SIZES)

SRC = kernel_source("flash_attention.cu")
RESCALE = """            float m_new = fmaxf(m, tile_max);
            float correction = expf(m - m_new);       // exp(-inf) = 0 on the first tile
            l *= correction;
            for (int d = 0; d < hs; d++) o[d] *= correction;
            m = m_new;"""
SHAPES = [(2, 13, 3, 8), (1, 37, 2, 5), (1, 1, 1, 4), (2, 70, 3, 16), (1, 33, 1, 64)]


def qkv_of(B, T, NH, hs, seed=0, dtype=np.float64):
    return (np.random.default_rng(seed).standard_normal((B, T, 3 * NH * hs)) * 2).astype(dtype)


@pytest.mark.parametrize("B,T,NH,hs", SHAPES)
@pytest.mark.parametrize("Bc", [1, 4, 16])
def test_reference_equals_lesson_05_in_float64(B, T, NH, hs, Bc):
    qkv = qkv_of(B, T, NH, hs)
    out, att = attention_forward(qkv, NH)
    fout, L = flash_attention_forward(qkv, NH, Bc=Bc)
    np.testing.assert_allclose(fout, out, rtol=1e-12, atol=1e-12)
    rows = att.sum(-1)  # each causal row sums to 1; L is its log-normaliser, so exp(S - L) gives att back
    np.testing.assert_allclose(rows, 1.0)
    dout = np.random.default_rng(1).standard_normal(out.shape)
    np.testing.assert_allclose(flash_attention_backward(dout, qkv, fout, L, NH),
                               attention_backward(dout, qkv, att, NH), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("B,T,NH,hs", SHAPES)
@pytest.mark.parametrize("block_size", [8, 32])
def test_kernels_match_lesson_05(B, T, NH, hs, block_size):
    qkv = qkv_of(B, T, NH, hs, seed=T)
    out, att = attention_forward(qkv, NH)
    _, L = flash_attention_forward(qkv, NH)
    got_out, got_L = flash_attention_forward_cuda(to_device(qkv.astype(np.float32)), NH, block_size=block_size)
    np.testing.assert_allclose(to_host(got_out), out, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(to_host(got_L), L, rtol=1e-5, atol=2e-5)
    dout = np.random.default_rng(2).standard_normal(out.shape)
    dqkv = flash_attention_backward_cuda(*(to_device(a.astype(np.float32)) for a in (dout, qkv, out, L)), NH,
                                         block_size=block_size)
    np.testing.assert_allclose(to_host(dqkv), attention_backward(dout, qkv, att, NH), rtol=1e-4, atol=5e-5)


def test_every_output_is_written():
    B, T, NH, hs = 2, 19, 3, 4
    C = NH * hs
    qkv = to_device(qkv_of(B, T, NH, hs, dtype=np.float32))
    out, L = poisoned((B, T, C)), poisoned((B, NH, T))
    from llmc_lessons.cuda import load_kernel
    load_kernel("flash_attention.cu", "flash_attention_forward_kernel")(
        (3, B * NH), (8,), (out, L, qkv, np.int32(B), np.int32(T), np.int32(NH), np.int32(hs), np.float32(0.5)),
        shared_mem=2 * 8 * hs * 4)
    assert not np.isnan(to_host(out)).any() and not np.isnan(to_host(L)).any()
    dqkv = flash_attention_backward_cuda(to_device(np.ones((B, T, C), np.float32)), qkv, out, L, NH, block_size=8)
    assert not np.isnan(to_host(dqkv)).any()


def test_bad_input():
    qkv = to_device(np.zeros((1, 4, 3 * 130), np.float32))
    with pytest.raises(ValueError, match="hs = 130 exceeds 64"):
        flash_attention_forward_cuda(qkv, 1)
    with pytest.raises(ValueError, match="do not split into NH"):
        flash_attention_forward_cuda(to_device(np.zeros((1, 4, 3 * 10), np.float32)), 3)
    with pytest.raises(ValueError, match="block_size"):
        flash_attention_forward_cuda(to_device(np.zeros((1, 4, 12), np.float32)), 1, block_size=0)
    with pytest.raises(TypeError, match="float32"):
        flash_attention_forward_cuda(to_device(np.zeros((1, 4, 12))), 1)


# ---------------------------------------------------------------------------------------------------------
# Exercise checks

def test_online_update_check(capsys):
    check_online_softmax_update(online_softmax_update)
    assert "Exercise 13.1: correct" in capsys.readouterr().out

    def stub(*a):
        raise NotImplementedError("Exercise 13.1: write it")
    with pytest.raises(AssertionError, match="Exercise 13.1 is not done yet"):
        check_online_softmax_update(stub)


def no_rescale_l(m, l, o, s, v):
    m_new = np.maximum(m, s.max(-1))
    c, p = np.exp(m - m_new), np.exp(s - m_new[:, None])
    return m_new, l + p.sum(-1), o * c[:, None] + p @ v


def no_rescale_o(m, l, o, s, v):
    m_new = np.maximum(m, s.max(-1))
    c, p = np.exp(m - m_new), np.exp(s - m_new[:, None])
    return m_new, l * c + p.sum(-1), o + p @ v


def tile_max_only(m, l, o, s, v):
    m_new = s.max(-1)
    c, p = np.exp(m - m_new), np.exp(s - m_new[:, None])
    return m_new, l * c + p.sum(-1), o * c[:, None] + p @ v


def wrong_direction(m, l, o, s, v):
    m_new = np.maximum(m, s.max(-1))
    c, p = np.exp(m_new - m), np.exp(s - m_new[:, None])
    c = np.where(np.isfinite(c), c, 0.0)
    return m_new, l * c + p.sum(-1), o * c[:, None] + p @ v


@pytest.mark.parametrize("wrong, field", [(no_rescale_l, "o / l"), (no_rescale_o, "o / l"),
                                          (tile_max_only, "m \\(running max\\)"), (wrong_direction, "o / l")])
def test_online_update_wrong_answers(wrong, field):
    with pytest.raises(AssertionError, match=field):
        check_online_softmax_update(wrong)


def test_kernel_check(capsys):
    assert RESCALE in SRC
    check_flash_forward_kernel(SRC)
    assert "Exercise 13.2: correct" in capsys.readouterr().out


@pytest.mark.parametrize("body, message", [
    ("            // TODO (Exercise 13.2): rescale", "Exercise 13.2 is not done yet"),
    ("            // the rescaling is missing", r"\(out\)"),
    (RESCALE.replace("            l *= correction;\n", ""), r"\(out\)"),
    (RESCALE.replace("            for (int d = 0; d < hs; d++) o[d] *= correction;\n", ""), r"\(out\)"),
    (RESCALE.replace("            m = m_new;", ""), r"\(out\)"),
    (RESCALE.replace("expf(m - m_new)", "expf(m_new - m)"), r"\(out\)"),
])
def test_kernel_check_catches_wrong_rescaling(body, message):
    with pytest.raises(AssertionError, match=message):
        check_flash_forward_kernel(SRC.replace(RESCALE, body))


def test_the_notebook_kernel_is_the_package_kernel():
    from conftest import notebook_cuda_source
    body = notebook_cuda_source("13_flash_attention.ipynb", "flash_src")
    start = 'extern "C" __global__ void flash_attention_forward_kernel'
    end = 'extern "C" __global__ void flash_attention_backward_kv_kernel'
    assert body[body.index(start):].strip() == SRC[SRC.index(start):SRC.index(end)].strip()


# ---------------------------------------------------------------------------------------------------------
# Version 2: bf16 on the tensor cores


@pytest.mark.parametrize("options", [(), ("-DLLMC_MMA_SHUFFLE",)])   # on a GPU: the PTX instruction, and
def test_mma_fragment_layout(options):                                   # the shuffles the emulator runs
    from llmc_lessons.cuda import load_kernel
    gen = np.random.default_rng(3)
    A, B = to_bf16(gen.standard_normal((16, 16))), to_bf16(gen.standard_normal((16, 8)))
    C = gen.standard_normal((16, 8)).astype(np.float32)
    D, regs = poisoned((16, 8)), poisoned((32, 4))
    load_kernel("flash_attention.cu", "mma_bf16_16816_kernel", ("-DHS=64", *options))(
        (1,), (32,), (D, regs, *(to_device(x) for x in (A, B, C))))
    want = from_bf16(A).astype(np.float64) @ from_bf16(B).astype(np.float64) + C
    np.testing.assert_allclose(to_host(D), want, rtol=1e-5, atol=1e-5)
    lane = np.arange(32)[:, None]
    rows, cols = lane // 4 + 8 * (np.arange(4) >= 2), 2 * (lane % 4) + np.arange(4) % 2
    np.testing.assert_array_equal(to_host(regs), to_host(D)[rows, cols])


BF16_SHAPES = [(1, 1, 1, 16), (2, 70, 2, 16), (1, 131, 1, 32), (1, 65, 3, 48), (2, 77, 2, 64)]


def bf16_case(B, T, NH, hs, seed):
    """qkv (B, T, 3C) and dout (B, T, C) as bf16 bits, and qkv's values in float64."""
    gen = np.random.default_rng(seed)
    qkv = to_bf16(gen.standard_normal((B, T, 3 * NH * hs)).astype(np.float32))
    dout = to_bf16(gen.standard_normal((B, T, NH * hs)).astype(np.float32))
    return qkv, dout, from_bf16(qkv).astype(np.float64)


def rel(got, want, floor=0.0):
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), floor)


def check_dqkv(got, want, NH, NKV, hs, tol):
    """dq, dk and dv of a (B, T, (NH + 2 NKV) hs) gradient, each within `tol` relative error of the float64 one. The
    floor: dq and dk are 0 at T = 1 (one key: the softmax is constant)."""
    C, KV, floor = NH * hs, NKV * hs, np.linalg.norm(want) / 10
    for name, cols in (("dq", slice(0, C)), ("dk", slice(C, C + KV)), ("dv", slice(C + KV, None))):
        e = rel(got[..., cols], want[..., cols], floor)
        assert e < tol, f"{name}: relative error {e:.1e}"


def versions(hs_values):
    """(version, hs) pairs: version 2 (mma.sync) at every head size, version 4 (wgmma) at its own, where this
    device runs it (an sm_90 GPU, or the emulator)."""
    runs4 = not device.on_gpu() or device.compute_capability() == 90
    return [(2, hs) for hs in hs_values] + [(4, hs) for hs in hs_values if runs4 and hs in WGMMA_HEAD_SIZES]


@pytest.mark.parametrize("version,B,T,NH,hs", [(v, *shape) for shape in BF16_SHAPES
                                               for v, _ in versions([shape[3]])])
def test_bf16_tensor_core_kernels_match_lesson_05(version, B, T, NH, hs, poisoned_allocations):
    qkv, dout, x = bf16_case(B, T, NH, hs, seed=T + hs)
    ref_out, att = attention_forward(x, NH)
    _, ref_L = flash_attention_forward(x, NH)
    out, lse = flash_attention_forward_bf16_cuda(to_device(qkv), NH, version=version)
    got = from_bf16(to_host(out)).astype(np.float64)
    assert not np.isnan(got).any() and not np.isnan(to_host(lse)).any(), "some outputs were never written"
    assert rel(got, ref_out) < 4e-3, rel(got, ref_out)          # about one bf16 rounding (2^-9 relative)
    np.testing.assert_allclose(to_host(lse), ref_L, atol=2e-5, rtol=1e-5)
    # the backward from the kernel's own out and lse, against the float64 backward of the same inputs
    start = to_bf16(np.random.default_rng(hs).standard_normal(3 * NH * hs))     # the gradient is bf16
    dbias = to_device(start.copy())
    dqkv = flash_attention_backward_bf16_cuda(to_device(dout), to_device(qkv), out, lse, NH, dbias=dbias,
                                              version=version)
    got_d = from_bf16(to_host(dqkv)).astype(np.float64)
    # the qkv bias's gradient, summed in the kernels: the column sums of dqkv as stored, added to what it held
    # and rounded to bf16 once (within one bf16 rounding of the exact sum)
    want_b = from_bf16(start) + got_d.sum(axis=(0, 1))
    np.testing.assert_allclose(from_bf16(to_host(dbias)), want_b, rtol=2 ** -8, atol=1e-6,
                               err_msg="dbias: the column sums of dqkv")
    want_d = attention_backward(from_bf16(dout).astype(np.float64), x, att, NH)
    assert not np.isnan(got_d).any(), "some gradients were never written"
    check_dqkv(got_d, want_d, NH, NH, hs, 1e-2)


@pytest.mark.skipif(not device.on_gpu(), reason="on a CPU both versions are the shuffle version")
def test_bf16_kernels_same_with_shuffle_mma_on_the_gpu():
    from llmc_lessons.cuda import load_kernel
    B, T, NH, hs = 2, 100, 2, 64
    qkv = to_device(bf16_case(B, T, NH, hs, seed=7)[0])
    out, lse = flash_attention_forward_bf16_cuda(qkv, NH)
    out2, lse2 = device.xp.full((B, T, NH * hs), 0x7FC0, np.uint16), poisoned((B, NH, T))
    load_kernel("flash_attention.cu", "flash_attention_forward_bf16_kernel", (f"-DHS={hs}", "-DLLMC_MMA_SHUFFLE"))(
        tile_grid(T, NH, B), (128,), (out2, lse2, qkv, np.int32(B), np.int32(T), np.int32(NH), np.int32(NH)))
    assert rel(from_bf16(to_host(out2)).astype(np.float64), from_bf16(to_host(out)).astype(np.float64)) < 2e-3
    np.testing.assert_allclose(to_host(lse2), to_host(lse), atol=1e-5)


def test_bf16_flash_attention_refuses_bad_input():
    qkv, dout, _ = bf16_case(1, 8, 2, 16, seed=0)
    q, d = to_device(qkv), to_device(dout)
    with pytest.raises(TypeError, match="uint16"):
        flash_attention_forward_bf16_cuda(to_device(from_bf16(qkv)), 2)
    with pytest.raises(ValueError, match="head size hs = 8"):
        flash_attention_forward_bf16_cuda(q, 4)
    with pytest.raises(ValueError, match="do not split into NH = 5"):
        flash_attention_forward_bf16_cuda(q, 5)
    with pytest.raises(ValueError, match="NH .* must be a positive int"):
        flash_attention_forward_bf16_cuda(q, 2.0)
    with pytest.raises(ValueError, match="16-byte aligned"):
        flash_attention_forward_bf16_cuda(to_device(np.zeros(8 * 96 + 1, np.uint16))[1:].reshape(1, 8, 96), 2)
    out, lse = flash_attention_forward_bf16_cuda(q, 2)
    with pytest.raises(ValueError, match="lse must have shape"):
        flash_attention_backward_bf16_cuda(d, q, out, lse[:, :1].copy(), 2)
    with pytest.raises(ValueError, match="dout must have shape"):
        flash_attention_backward_bf16_cuda(d[:, :4].copy(), q, out, lse, 2)
    with pytest.raises(ValueError, match="dbias must have shape"):
        flash_attention_backward_bf16_cuda(d, q, out, lse, 2, dbias=device.xp.zeros(32, np.uint16))
    with pytest.raises(TypeError, match="dbias must hold bf16 bits"):
        flash_attention_backward_bf16_cuda(d, q, out, lse, 2, dbias=device.xp.zeros(3 * 32, np.float32))


# ---------------------------------------------------------------------------------------------------------
# Version 2 with grouped-query attention: NKV key/value heads, read where they lie (lesson 16)

GQA_HEADS = [(4, 2), (6, 1), (3, 3)]


def gqa_case(B, T, NH, NKV, hs, seed):
    """qkv (B, T, (NH + 2 NKV) hs) and dout (B, T, NH hs) as bf16 bits."""
    gen = np.random.default_rng(seed)
    qkv = to_bf16(gen.standard_normal((B, T, (NH + 2 * NKV) * hs)).astype(np.float32))
    return qkv, to_bf16(gen.standard_normal((B, T, NH * hs)).astype(np.float32))


def gqa_kernels(qkv, dout, NH, NKV, version=None):
    """The bf16 forward and backward on host bf16 bits -> out, lse, dqkv on the host."""
    out, lse = flash_attention_forward_bf16_cuda(to_device(qkv), NH, NKV, version=version)
    dqkv = flash_attention_backward_bf16_cuda(to_device(dout), to_device(qkv), out, lse, NH, NKV=NKV, version=version)
    return to_host(out), to_host(lse), to_host(dqkv)


def check_gqa_against_float64(B, T, NH, NKV, hs, seed, version=None):
    qkv, dout = gqa_case(B, T, NH, NKV, hs, seed)
    out, lse, dqkv = gqa_kernels(qkv, dout, NH, NKV, version)
    assert not np.isnan(from_bf16(out)).any() and not np.isnan(lse).any(), "some outputs were never written"
    assert not np.isnan(from_bf16(dqkv)).any(), "some gradients were never written"
    x = from_bf16(qkv).astype(np.float64)
    ref_out, att = attention_forward(x, NH, NKV)
    assert rel(from_bf16(out).astype(np.float64), ref_out) < 4e-3          # about one bf16 rounding
    _, ref_L = flash_attention_forward(repkv_forward(x, NH, NKV), NH)
    np.testing.assert_allclose(lse, ref_L, atol=2e-5, rtol=1e-5)
    want = attention_backward(from_bf16(dout).astype(np.float64), x, att, NH, NKV)
    got = from_bf16(dqkv).astype(np.float64)
    check_dqkv(got, want, NH, NKV, hs, 1e-2)


@pytest.mark.parametrize("version,hs", versions([16, 64]))
@pytest.mark.parametrize("NH,NKV", GQA_HEADS)
@pytest.mark.parametrize("T", [1, 37, 130])
def test_bf16_gqa_matches_the_float64_reference(T, NH, NKV, version, hs, poisoned_allocations):
    check_gqa_against_float64(2 if T < 100 else 1, T, NH, NKV, hs, seed=T + NH + hs, version=version)


@pytest.mark.parametrize("B,T,NH,NKV,hs", [(2, 70, 2, 2, 64), (1, 130, 6, 2, 64), (2, 1, 3, 3, 64)])
def test_bf16_version_4_equals_version_2(B, T, NH, NKV, hs):
    """The wgmma kernels (version 4) are the mma.sync kernels (version 2) with the tiles in wgmma's layout and each
    batch of products one warpgroup instruction: the same numbers, up to the order in which each product's 16
    terms are added (the last bits of float32), so bf16 outputs that round differently are one bf16 step apart."""
    if device.on_gpu() and device.compute_capability() != 90:
        pytest.skip("version 4 (wgmma) runs on sm_90 only")
    qkv, dout = gqa_case(B, T, NH, NKV, hs, seed=T + hs)
    two, four = gqa_kernels(qkv, dout, NH, NKV, version=2), gqa_kernels(qkv, dout, NH, NKV, version=4)
    for name, a, b in zip(("out", "lse", "dqkv"), two, four):
        a, b = (from_bf16(x) if x.dtype == np.uint16 else x for x in (a, b))
        np.testing.assert_allclose(b, a, rtol=2 ** -7, atol=1e-5 * np.abs(a).max(), err_msg=name)


def test_bf16_version_4_refuses_what_it_cannot_run():
    qkv, dout = (to_device(a) for a in gqa_case(1, 8, 4, 2, 16, seed=0))
    with pytest.raises(ValueError, match="version 4 takes a head size in"):
        flash_attention_forward_bf16_cuda(qkv, 4, 2, version=4)               # hs = 16
    with pytest.raises(ValueError, match="version is 2 .mma.sync., 4 .wgmma. or None"):
        flash_attention_forward_bf16_cuda(qkv, 4, 2, version=3)
    out, lse = flash_attention_forward_bf16_cuda(qkv, 4, 2)
    with pytest.raises(ValueError, match="version 4 takes a head size in"):
        flash_attention_backward_bf16_cuda(dout, qkv, out, lse, 4, NKV=2, version=4)
    assert flash_version(64) == (4 if device.compute_capability() == 90 else 2) and flash_version(16) == 2


@pytest.mark.parametrize("T,NH,NKV,hs", [(37, 4, 2, 16), (130, 6, 1, 64), (1, 6, 1, 16), (70, 3, 3, 64)])
def test_bf16_gqa_is_repkv_then_multi_head(T, NH, NKV, hs):
    """Reading key/value head h // (NH / NKV) in place computes what multi-head attention on repkv's copies does.
    The forward and dq read the same numbers in the same order: bit for bit. dk and dv: the multi-head kernel
    rounds each of the group's NH / NKV copies to bf16 and repkv_backward adds them; the GQA kernel adds them in
    float32 registers and rounds once. Each rounding is within 2^-8 of its value (bf16 keeps 8 significant bits),
    so they agree within 2^-8 (sum of |copies| + |result|), plus float32's order of the additions."""
    B = 2
    qkv, dout = gqa_case(B, T, NH, NKV, hs, seed=T * NH)
    out, lse, dqkv = gqa_kernels(qkv, dout, NH, NKV)
    rep = repkv_forward(qkv, NH, NKV)                     # copies of bf16 bits: exact
    out_r, lse_r = flash_attention_forward_bf16_cuda(to_device(rep), NH)
    d_r = to_host(flash_attention_backward_bf16_cuda(to_device(dout), to_device(rep), out_r, lse_r, NH))
    np.testing.assert_array_equal(out, to_host(out_r))
    np.testing.assert_array_equal(lse, to_host(lse_r))
    C = NH * hs
    np.testing.assert_array_equal(dqkv[..., :C], d_r[..., :C], err_msg="dq")
    copies = from_bf16(d_r).astype(np.float64)
    want, size = repkv_backward(copies, NH, NKV)[..., C:], repkv_backward(np.abs(copies), NH, NKV)[..., C:]
    got = from_bf16(dqkv).astype(np.float64)[..., C:]
    bound = 2.0 ** -8 * (size + np.abs(got)) + 2.0 ** -20 * size.max()
    worst = (np.abs(got - want) / bound).max()
    assert worst <= 1, f"dk, dv: worst |error| / bound {worst:.2f}"


def test_bf16_gqa_backward_is_deterministic():
    """dk and dv sum a group's query heads inside one block, in a fixed order: no atomics, the same bits every run."""
    qkv, dout = gqa_case(2, 130, 6, 2, 16, seed=4)
    first, second = gqa_kernels(qkv, dout, 6, 2), gqa_kernels(qkv, dout, 6, 2)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.skipif(device.on_gpu() or not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                    reason="the emulator's checked mode watches shared memory on Linux x86-64")
@pytest.mark.parametrize("version,hs", [(2, 16), (4, 64)])
def test_bf16_gqa_kernels_have_no_races(monkeypatch, version, hs):   # about 10 s each on one core
    """Checked mode: no data race or out-of-bounds access, the dk/dv kernel's prefetch of the next query head's
    first tile (T = 65: two tiles per head) included, in both tile layouts."""
    monkeypatch.setenv("LLMC_CHECK", "1")
    qkv, dout = gqa_case(1, 65, 2, 1, hs, seed=2)
    assert not np.isnan(from_bf16(gqa_kernels(qkv, dout, 2, 1, version)[2])).any()


def test_bf16_gqa_refuses_bad_input():
    qkv, dout = (to_device(a) for a in gqa_case(1, 8, 4, 2, 16, seed=0))      # (1, 8, 128), (1, 8, 64)
    with pytest.raises(ValueError, match="NKV = 3 key/value heads must divide NH = 4"):
        flash_attention_forward_bf16_cuda(qkv, 4, 3)
    with pytest.raises(ValueError, match=r"\(B, T, \(NH \+ 2 NKV\) hs\) with NH = 4, NKV = 1"):
        flash_attention_forward_bf16_cuda(qkv, 4, 1)                          # 128 columns are not 6 heads
    with pytest.raises(ValueError, match="NKV .* must be a positive int"):
        flash_attention_forward_bf16_cuda(qkv, 4, 2.0)
    with pytest.raises(ValueError, match="head size hs = 8"):
        flash_attention_forward_bf16_cuda(qkv, 8, 4)
    with pytest.raises(ValueError, match=r"NH \* \(NH / NKV\) = 65536 exceeds 2\^15"):   # kv_head's limit
        flash_attention_forward_bf16_cuda(to_device(np.zeros((1, 1, 258 * 16), np.uint16)), 256, 1)
    out, lse = flash_attention_forward_bf16_cuda(qkv, 4, 2)
    with pytest.raises(ValueError, match="must divide NH"):
        flash_attention_backward_bf16_cuda(dout, qkv, out, lse, 4, NKV=3)
    with pytest.raises(ValueError, match="dout must have shape"):
        flash_attention_backward_bf16_cuda(qkv[..., :32].copy(), qkv, out, lse, 4, NKV=2)
    with pytest.raises(ValueError, match="dbias is summed for NKV = NH only"):
        flash_attention_backward_bf16_cuda(dout, qkv, out, lse, 4, dbias=device.xp.zeros(128, np.uint16), NKV=2)


@pytest.mark.gpu
@pytest.mark.skipif(not device.on_gpu(), reason="a large shape: minutes on the emulator")
@pytest.mark.parametrize("NH,NKV", [(12, 4), (12, 1)])
def test_bf16_gqa_large_on_the_gpu(NH, NKV):
    check_gqa_against_float64(2, 1000, NH, NKV, 64, seed=NKV)


def _registers_and_spills(kernel) -> tuple:
    """(registers a thread, bytes of local memory a thread: spills) of a compiled GPU kernel, as the driver reports
    them: a cupy.RawKernel (version 2) or the cupy Function that NVRTC's sm_90a build gives (version 4)."""
    import cupy
    from llmc_lessons.cuda import _loaded_function
    func, driver = _loaded_function(kernel._compiled()), cupy.cuda.driver
    return tuple(driver.funcGetAttribute(getattr(driver, f"CU_FUNC_ATTRIBUTE_{name}", number), func.ptr)
                 for name, number in (("NUM_REGS", 4), ("LOCAL_SIZE_BYTES", 3)))


@pytest.mark.gpu
@pytest.mark.skipif(not device.on_gpu(), reason="registers are counted by the GPU's compiler")
@pytest.mark.parametrize("version", [2, 4])
def test_bf16_kernels_registers_do_not_grow_with_the_group(version):
    """kv_head divides by GROUP with a multiply and a shift, which the block-wide (uniform) registers can do: the
    kernels of llama-124m (GROUP = 3) need no more registers a thread than GPT-2's (GROUP = 1). A division put the
    head's addresses in per-thread registers: 166-168 instead of 128 for the dq kernel (ptxas -v, sm_90). The
    kernels' launch bounds cap the registers (128 a thread for the forward and dq kernels, 4 blocks of 128 threads;
    168 for the dk/dv kernel, 3 blocks), so beyond the cap the growth shows as spills to local memory: both are
    compared, in both versions (version 4, wgmma, on an sm_90 GPU only). And none spills but version 2's dk/dv
    kernel (a few bytes at 168 registers, as compiled since c73b153): version 4's forward keeps two tiles' scores
    and probabilities in registers, under the same cap of 128."""
    from llmc_lessons.layers.flash_attention import _flash_kernel
    if version == 4 and device.compute_capability() != 90:
        pytest.skip("version 4 (wgmma) compiles for sm_90a: an H100 or H200")
    for name in ("flash_attention_forward_bf16_kernel", "flash_attention_backward_dq_bf16_kernel",
                 "flash_attention_backward_dkdv_bf16_kernel"):
        (gpt2, gpt2_local), (llama, llama_local) = (_registers_and_spills(_flash_kernel(name, 64, group, version=version))
                                                    for group in (1, 3))
        where = f"{name}, version {version}"
        if version == 4 or "dkdv" not in name:
            assert gpt2_local == 0, f"{where}: {gpt2_local} bytes of local memory (spills) a thread"
        assert llama <= gpt2 + 4, f"{where}: {llama} registers a thread at GROUP = 3, {gpt2} at GROUP = 1"
        assert llama_local <= gpt2_local, (f"{where}: {llama_local} bytes of local memory (spills) a thread at "
                                           f"GROUP = 3, {gpt2_local} at GROUP = 1")


def test_d_fragment_check(capsys):
    from llmc_lessons.checks.flash_attention import check_d_fragment
    check_d_fragment(lambda lane, i: (lane // 4 + 8 * (i // 2), 2 * (lane % 4) + i % 2))
    assert "correct" in capsys.readouterr().out


def _stub(lane, i):
    raise NotImplementedError("Exercise 13.3: where the accumulators live")


@pytest.mark.parametrize("wrong,message", [
    (_stub, "not done yet"),
    (lambda lane, i: (lane % 4 + 8 * (i // 2), 2 * (lane // 4) + i % 2), "the row: lane 1 is in group g"),  # g, t swapped
    (lambda lane, i: (lane // 4, 2 * (lane % 4) + i % 2), "registers 2, 3 row g \\+ 8"),                  # no + 8
    (lambda lane, i: (lane // 4 + 8 * (i // 2), 2 * (lane % 4) + i), "register i holds column 2t \\+ i % 2"),
    (lambda lane, i: (lane // 4 + 8 * (i % 2), 2 * (lane % 4) + i // 2), "you said D\\[8\\]\\[0\\]"),        # axes swapped
    (lambda lane, i: [lane // 4 + 8 * (i // 2), 2 * (lane % 4) + i % 2], "return a tuple"),
])
def test_d_fragment_check_catches_wrong_answers(wrong, message):
    from llmc_lessons.checks.flash_attention import check_d_fragment
    with pytest.raises(AssertionError, match=message):
        check_d_fragment(wrong)


@pytest.mark.parametrize("version,hs", [(2, 32), (2, 64), (4, 64)])
def test_flash_products_alone(version, hs):
    """Each product of the flash kernels on one pair of tiles, against NumPy: q k^T over 64 and over 32 key rows
    (from row 32), and p v with p the first product rounded to bf16. Where a version's kernels go wrong, this says
    which product and which width."""
    if version == 4 and device.on_gpu() and device.compute_capability() != 90:
        pytest.skip("version 4 (wgmma) runs on sm_90 only")
    from llmc_lessons.layers.flash_attention import _flash_kernel
    gen = np.random.default_rng(hs + version)
    Q, K = (to_bf16((gen.standard_normal((64, hs)) / 4).astype(np.float32)) for _ in range(2))
    S, S32, O = poisoned((64, 64)), poisoned((64, 32)), poisoned((64, hs))
    _flash_kernel("flash_products_kernel", hs, 1, version=version)((1,), (128,), (S, S32, O, to_device(Q), to_device(K)))
    q, k = from_bf16(Q).astype(np.float64), from_bf16(K).astype(np.float64)
    want = q @ k.T
    np.testing.assert_allclose(to_host(S), want, atol=1e-4, err_msg="q k^T, 64 key rows (mma_rows<8>)")
    np.testing.assert_allclose(to_host(S32), want[:, 32:], atol=1e-4, err_msg="q k^T, rows 32-63 (mma_rows<4>)")
    p = from_bf16(to_bf16(to_host(S))).astype(np.float64)
    np.testing.assert_allclose(to_host(O), p @ k, atol=1e-3, err_msg="p v (mma_cols<4>)")
