"""Flash attention version 3 (TF32 on the tensor cores, for the fp32 model): the m16n8k8 fragment layouts, the
kernels against the float64 reference at awkward sizes with grouped key/value heads, determinism, bad input."""
import platform
import sys

import numpy as np
import pytest

from llmc_lessons import device, parts, paths
from llmc_lessons.checks import poisoned
from llmc_lessons.cuda import kernel_source, load_kernel
from llmc_lessons.device import to_device, to_host
from llmc_lessons.layers.attention import attention_backward, attention_forward, repkv_backward, repkv_forward
from llmc_lessons.layers.block import (block_backward, block_backward_cuda, block_forward, block_forward_cuda,
                                       init_block_params)
from llmc_lessons.layers.flash_attention import (flash_attention_backward_tf32_cuda, flash_attention_forward,
                                                 flash_attention_forward_tf32_cuda, tile_grid)
from llmc_lessons.llama import Llama, LlamaConfig
from llmc_lessons.model import GPT2
from llmc_lessons.parameters import GPT2Config
from llmc_lessons.precision import round_tf32
from test_flash_attention import check_dqkv, rel


def test_round_tf32_keeps_10_mantissa_bits_ties_away_from_zero():
    one = np.float32(1.0)
    ulp = np.float32(2.0 ** -10)              # TF32's last mantissa bit at 1.0
    x = np.array([1 + ulp / 2, -(1 + ulp / 2), 1 + ulp / 2 - 2 ** -20, 1 + 3 * ulp / 2, np.inf, np.nan], np.float32)
    got = round_tf32(x)
    np.testing.assert_array_equal(got[:4], [one + ulp, -(one + ulp), one, one + 2 * ulp])
    assert got[4] == np.inf and np.isnan(got[5])
    assert not (round_tf32(np.random.default_rng(0).standard_normal(100)).view(np.uint32) & 0x1FFF).any()


@pytest.mark.parametrize("options", [(), ("-DLLMC_MMA_SHUFFLE",)])   # on a GPU: the PTX instructions, and
def test_mma_tf32_fragment_layout(options):                              # the shuffles the emulator runs
    gen = np.random.default_rng(3)
    A, B, C = (gen.standard_normal(s).astype(np.float32) for s in ((16, 8), (8, 8), (16, 8)))
    D, regs = poisoned((16, 8)), poisoned((32, 4))
    load_kernel("flash_attention_tf32.cu", "mma_tf32_1688_kernel", ("-DHS=8", *options))(
        (1,), (32,), (D, regs, *(to_device(x) for x in (A, B, C))))
    want = round_tf32(A).astype(np.float64) @ round_tf32(B).astype(np.float64) + C
    # the inputs rounded to TF32, the products exact, the sums in float32: far closer than TF32's 2^-11 steps
    np.testing.assert_allclose(to_host(D), want, rtol=1e-5, atol=1e-5)
    assert np.abs(A.astype(np.float64) @ B + C - want).max() > 1e-4   # so rounding the inputs is seen
    lane = np.arange(32)[:, None]
    rows, cols = lane // 4 + 8 * (np.arange(4) >= 2), 2 * (lane % 4) + np.arange(4) % 2
    np.testing.assert_array_equal(to_host(regs), to_host(D)[rows, cols])


def case(B, T, NH, NKV, hs, seed):
    """qkv (B, T, (NH + 2 NKV) hs) and dout (B, T, NH hs), float32."""
    gen = np.random.default_rng(seed)
    qkv = (gen.standard_normal((B, T, (NH + 2 * NKV) * hs)) * 1.5).astype(np.float32)
    return qkv, gen.standard_normal((B, T, NH * hs)).astype(np.float32)


# T in {1, 37, 130}: one key, a partial tile, several tiles with a partial last one; (NH, NKV): multi-head,
# groups of 2, one key/value head for all (multi-query); hs in {8, 24, 64}
SHAPES = [(1, 1, 3, 3, 8), (2, 37, 4, 2, 24), (1, 130, 6, 1, 64), (1, 130, 3, 3, 24), (2, 37, 6, 1, 8),
          (1, 70, 4, 2, 64)]


@pytest.mark.parametrize("B,T,NH,NKV,hs", SHAPES)
def test_tf32_kernels_match_the_float64_reference(B, T, NH, NKV, hs, poisoned_allocations):
    qkv, dout = case(B, T, NH, NKV, hs, seed=T + hs + NKV)
    x = qkv.astype(np.float64)
    ref_out, att = attention_forward(x, NH, NKV)
    _, ref_L = flash_attention_forward(repkv_forward(x, NH, NKV), NH)
    out, lse = flash_attention_forward_tf32_cuda(to_device(qkv), NH, NKV)
    got = to_host(out).astype(np.float64)
    assert not np.isnan(got).any() and not np.isnan(to_host(lse)).any(), "some outputs were never written"
    # TF32 keeps 11 significant bits: a relative error of a few 2^-12 in each product, averaged over the sums
    assert rel(got, ref_out) < 2e-3, rel(got, ref_out)
    np.testing.assert_allclose(to_host(lse), ref_L, atol=2e-2, rtol=2e-3)
    dqkv = to_host(flash_attention_backward_tf32_cuda(to_device(dout), to_device(qkv), out, lse, NH, NKV))
    assert dqkv.shape == qkv.shape and not np.isnan(dqkv).any(), "some gradients were never written"
    check_dqkv(dqkv, attention_backward(dout.astype(np.float64), x, att, NH, NKV), NH, NKV, hs, 5e-3)


def test_tf32_kernels_are_deterministic():
    qkv, dout = case(2, 100, 4, 2, 16, seed=5)
    q, d = to_device(qkv), to_device(dout)
    runs = []
    for _ in range(2):
        out, lse = flash_attention_forward_tf32_cuda(q, 4, 2)
        runs.append([to_host(a) for a in (out, lse, flash_attention_backward_tf32_cuda(d, q, out, lse, 4, 2))])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_grouped_heads_equal_copied_heads():
    """Reading a group's key/value head in place gives what copying it to every query head (repkv) gives: the
    forward bit for bit (the same products), the backward's dk and dv as the sum over the group's copies."""
    B, T, NH, NKV, hs = 1, 45, 6, 2, 16
    qkv, dout = case(B, T, NH, NKV, hs, seed=9)
    rep = repkv_forward(qkv, NH, NKV).astype(np.float32)
    out_g, lse_g = flash_attention_forward_tf32_cuda(to_device(qkv), NH, NKV)
    out_r, lse_r = flash_attention_forward_tf32_cuda(to_device(rep), NH)
    np.testing.assert_array_equal(to_host(out_g), to_host(out_r))
    np.testing.assert_array_equal(to_host(lse_g), to_host(lse_r))
    d_g = flash_attention_backward_tf32_cuda(to_device(dout), to_device(qkv), out_g, lse_g, NH, NKV)
    d_r = flash_attention_backward_tf32_cuda(to_device(dout), to_device(rep), out_r, lse_r, NH)
    np.testing.assert_allclose(to_host(d_g), repkv_backward(to_host(d_r), NH, NKV), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(device.on_gpu() or not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                    reason="the emulator's checked mode watches shared memory on Linux x86-64")
def test_tf32_kernels_have_no_races(monkeypatch):   # about 17 s on one core, 3 s once compiled
    """Checked mode: no data race or out-of-bounds access between the cp.async buffers and the fragment loads,
    the dk/dv kernel's prefetch of the next query head's first tile (T = 40: two tiles per head) included."""
    monkeypatch.setenv("LLMC_CHECK", "1")
    qkv, dout = case(1, 40, 2, 1, 8, seed=2)
    out, lse = flash_attention_forward_tf32_cuda(to_device(qkv), 2, 1)
    dqkv = flash_attention_backward_tf32_cuda(to_device(dout), to_device(qkv), out, lse, 2, 1)
    assert not np.isnan(to_host(dqkv)).any()


def test_tf32_flash_attention_refuses_bad_input():
    qkv, dout = case(1, 8, 2, 2, 16, seed=0)
    q, d = to_device(qkv), to_device(dout)
    with pytest.raises(TypeError, match="float32"):
        flash_attention_forward_tf32_cuda(to_device(qkv.astype(np.float64)), 2)
    with pytest.raises(TypeError, match="qkv must be a (CuPy|NumPy) array"):     # on the GPU: host memory
        flash_attention_forward_tf32_cuda(qkv if device.on_gpu() else qkv.tolist(), 2)
    with pytest.raises(ValueError, match="head size hs = 4"):
        flash_attention_forward_tf32_cuda(q, 8)
    with pytest.raises(ValueError, match="head size hs = 96"):
        flash_attention_forward_tf32_cuda(to_device(np.zeros((1, 4, 3 * 96), np.float32)), 1)
    with pytest.raises(ValueError, match="do not split into NH = 5"):
        flash_attention_forward_tf32_cuda(q, 5)
    with pytest.raises(ValueError, match="NKV = 3 key/value heads must divide NH = 4"):
        flash_attention_forward_tf32_cuda(to_device(np.zeros((1, 4, 10 * 8), np.float32)), 4, 3)
    with pytest.raises(ValueError, match="NH .* must be a positive int"):
        flash_attention_forward_tf32_cuda(q, 2.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        flash_attention_forward_tf32_cuda(to_device(np.zeros((1, 96, 8), np.float32)).transpose(0, 2, 1), 2)
    with pytest.raises(ValueError, match="16-byte aligned"):
        flash_attention_forward_tf32_cuda(to_device(np.zeros(8 * 96 + 1, np.float32))[1:].reshape(1, 8, 96), 2)
    out, lse = flash_attention_forward_tf32_cuda(q, 2)
    with pytest.raises(ValueError, match="lse must have shape"):
        flash_attention_backward_tf32_cuda(d, q, out, lse[:, :1].copy(), 2)
    with pytest.raises(ValueError, match="dout must have shape"):
        flash_attention_backward_tf32_cuda(d[:, :4].copy(), q, out, lse, 2)
    with pytest.raises(TypeError, match="float32"):
        flash_attention_backward_tf32_cuda(d, q, out.astype(np.float64), lse, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("NH,NKV", [(12, 12), (12, 4)])
def test_tf32_kernels_at_gpt2_size_on_the_gpu(NH, NKV, poisoned_allocations):
    """GPT-2 small's attention (T = 1024, hs = 64), and the LLaMA-style model's grouped heads."""
    if not device.on_gpu():
        pytest.skip("needs a GPU")
    B, T, hs = 2, 1024, 64
    qkv, dout = case(B, T, NH, NKV, hs, seed=11)
    x = qkv.astype(np.float64)
    ref_out, att = attention_forward(x, NH, NKV)
    out, lse = flash_attention_forward_tf32_cuda(to_device(qkv), NH, NKV)
    assert rel(to_host(out).astype(np.float64), ref_out) < 2e-3
    want = attention_backward(dout.astype(np.float64), x, att, NH, NKV)
    got = to_host(flash_attention_backward_tf32_cuda(to_device(dout), to_device(qkv), out, lse, NH, NKV))
    assert rel(got, want) < 5e-3


@pytest.mark.gpu
def test_tf32_kernels_same_with_shuffle_mma_on_the_gpu():
    if not device.on_gpu():
        pytest.skip("on a CPU both versions are the shuffle version")
    B, T, NH, hs = 2, 200, 2, 64
    qkv = to_device(case(B, T, NH, NH, hs, seed=7)[0])
    out, lse = flash_attention_forward_tf32_cuda(qkv, NH)
    out2, lse2 = poisoned((B, T, NH * hs)), poisoned((B, NH, T))
    load_kernel("flash_attention_tf32.cu", "flash_attention_forward_tf32_kernel", (f"-DHS={hs}", "-DLLMC_MMA_SHUFFLE"))(
        tile_grid(T, NH, B), (128,), (out2, lse2, qkv, np.int32(B), np.int32(T), np.int32(NH), np.int32(NH)))
    # The scores agree to float32 rounding (the tensor cores add in another order), and lse with them; a
    # probability that lies that close to a TF32 rounding boundary can round to the neighbouring TF32 value
    # (2^-11 apart) in one version and not the other, so a few outputs differ by up to p * |v| * 2^-11
    # (H100: 100 of 51,200 beyond 1e-4 relative, the largest 1.3e-4 absolute).
    np.testing.assert_allclose(to_host(lse2), to_host(lse), atol=1e-5)
    np.testing.assert_allclose(to_host(out2), to_host(out), rtol=1e-4, atol=1e-3)
    assert np.mean(~np.isclose(to_host(out2), to_host(out), rtol=1e-4, atol=1e-5)) < 0.01


# ---------------------------------------------------------------------------------------------------------
# The fp32 model: its kernel path takes version 3 when TF32 matmuls are on (always off on a CPU: the tests
# switch it on for the path's decision)

TINY = GPT2Config(max_seq_len=48, vocab_size=37, padded_vocab_size=40, num_layers=2, num_heads=2, channels=48)  # hs 24
SOFTMAX = "attention.cu:softmax_forward_kernel"


def step(config, backend="kernels", tf32=False, recompute=0, model_parts=None, seed=0, model_class=GPT2,
         matmul_version="cublas"):
    """One forward and backward on a fixed batch -> (mean loss, gradients on the host, the first block's cache)."""
    gen = np.random.default_rng(1)
    idx, targets = (gen.integers(0, config.vocab_size, (2, 45)) for _ in range(2))
    model = model_class(config, seed=seed, backend=backend, parts=model_parts)
    model.recompute, model.matmul_version = recompute, matmul_version
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(paths, "tf32_enabled", lambda: tf32)
        model.forward(idx, targets)
        cache = dict(model._cache["block_caches"][0]) if backend == "kernels" else None
        model.zero_grad()
        model.backward()
    return model.mean_loss, device.to_host(model.grads_memory).copy(), cache


def test_the_block_with_flash_attention_against_the_float64_block():
    B, T, C, NH = 2, 33, 48, 2
    gen = np.random.default_rng(6)
    p = init_block_params(C, gen, dtype=np.float64, std=0.2)
    x, dout = gen.standard_normal((B, T, C)), gen.standard_normal((B, T, C))
    out, cache = block_forward(x, p, NH)
    dx, grads = block_backward(dout, cache, p, NH)
    d_p = {k: to_device(v.astype(np.float32)) for k, v in p.items()}
    d_out, d_cache = block_forward_cuda(to_device(x.astype(np.float32)), d_p, NH, flash=True)
    assert "lse" in d_cache and "att" not in d_cache
    assert rel(to_host(d_out), out) < 1e-3
    d_dx, d_grads = block_backward_cuda(to_device(dout.astype(np.float32)), d_cache, d_p, NH)
    assert rel(to_host(d_dx), dx) < 2e-3
    for name in grads:
        assert rel(to_host(d_grads[name]), grads[name]) < 3e-3, name


def test_the_fp32_kernel_path_takes_tf32_flash_attention_when_tf32_is_on():
    loss, grads, cache = step(TINY, tf32=True)
    assert "lse" in cache and "att" not in cache, "with TF32 on, the cache holds L, not the T x T matrix"
    ref_loss, ref_grads, _ = step(TINY, backend="numpy")
    l05_loss, l05_grads, l05_cache = step(TINY, tf32=False)
    assert "att" in l05_cache and "lse" not in l05_cache, "with TF32 off, lesson 05's exact attention"
    for other_loss, other_grads in ((ref_loss, ref_grads), (l05_loss, l05_grads)):
        assert abs(loss - other_loss) < 1e-4 * abs(other_loss)
        assert rel(grads, other_grads) < 2e-3, rel(grads, other_grads)


@pytest.mark.parametrize("level", [1, 2])
def test_recomputation_with_tf32_flash_attention(level):
    loss, grads, _ = step(TINY, tf32=True)
    loss_r, grads_r, cache = step(TINY, tf32=True, recompute=level)
    assert "lse" in cache and loss_r == loss
    np.testing.assert_array_equal(grads_r, grads)


def test_a_head_size_the_kernels_do_not_take_keeps_lesson_05():
    odd = GPT2Config(max_seq_len=48, vocab_size=37, padded_vocab_size=40, num_layers=1, num_heads=2, channels=20)
    assert "att" in step(odd, tf32=True)[2]


@pytest.mark.parametrize("model_class,config", [(GPT2, TINY), (Llama, LlamaConfig.from_name("llama-tiny"))])
def test_the_course_matmul_kernels_keep_lesson_05s_exact_attention(model_class, config):
    """The course's matmul kernels are exact float32 whatever cuBLAS's TF32 switch says: attention stays exact too."""
    assert "att" in step(config, tf32=True, model_class=model_class, matmul_version=2)[2]


def test_the_students_softmax_kernel_keeps_lesson_05s_attention(monkeypatch):
    """Exercise 5.3's kernel runs inside lesson 05's attention: with it as a part, TF32 on does not replace it."""
    from llmc_lessons import cuda
    launched, compile_theirs = set(), cuda._replacement_kernel
    monkeypatch.setattr(cuda, "_replacement_kernel",
                        lambda code, name, options: launched.add(name) or compile_theirs(code, name, options))
    theirs = {SOFTMAX: parts.Part(parts.BY_KEY[SOFTMAX], kernel_source("attention.cu"))}
    _, _, cache = step(TINY, tf32=True, model_parts=theirs)
    assert "att" in cache and launched == {"softmax_forward_kernel"}


def test_the_llama_kernel_path_reads_the_grouped_heads_in_place_when_tf32_is_on():
    config = LlamaConfig.from_name("llama-tiny")           # NH = 4, NKV = 2, hs = 16
    loss, grads, cache = step(config, tf32=True, model_class=Llama)
    assert "lse" in cache and "att" not in cache
    ref_loss, ref_grads, _ = step(config, backend="numpy", model_class=Llama)
    l05_loss, l05_grads, l05_cache = step(config, tf32=False, model_class=Llama)
    assert "att" in l05_cache
    for other_loss, other_grads in ((ref_loss, ref_grads), (l05_loss, l05_grads)):
        assert abs(loss - other_loss) < 1e-4 * abs(other_loss)
        assert rel(grads, other_grads) < 2e-3, rel(grads, other_grads)


def test_the_reference_beside_the_students_softmax_kernel_runs_lesson_05s_attention_too(monkeypatch):
    from llmc_lessons.your_model import train_side_by_side
    monkeypatch.setattr(paths, "tf32_enabled", lambda: True)
    theirs = {SOFTMAX: parts.Part(parts.BY_KEY[SOFTMAX], kernel_source("attention.cu"))}
    gen = np.random.default_rng(2)
    batches = [tuple(gen.integers(0, TINY.vocab_size, (2, 40)) for _ in range(2))]
    assert all(r["same"] and r["yours"] == r["reference"] for r in train_side_by_side(TINY, batches, theirs,
                                                                                         backend="kernels"))


@pytest.mark.parametrize("hs", [24, 64])
def test_shared_memory_loads_are_free_of_bank_conflicts(hs):
    """The tiles' rows hs + 4 floats apart: every fragment load of every kernel is one wavefront per request (the
    emulator's access trace); the cp.async copies into the tiles too, where a 16-byte phase stays in one row."""
    from llmc_lessons.cuda.trace import recording
    B, T, NH, NKV = 1, 70, 2, 1
    qkv, dout = case(B, T, NH, NKV, hs, seed=hs)
    with recording() as traces:
        out, lse = flash_attention_forward_tf32_cuda(to_device(qkv), NH, NKV)
        flash_attention_backward_tf32_cuda(to_device(dout), to_device(qkv), out, lse, NH, NKV)
    assert len(traces) == 3
    for t in traces:
        rows = [r for r in t.summary() if r["memory"] == "shared"]
        assert any(r["op"] == "load" for r in rows)
        for r in rows:
            if r["op"] == "load" or hs % 32 == 0:
                assert r["ways"] == 1, f"{t.kernel}, {r['line']}: {r['op']}s {r['ways']}-way conflicted"
