"""The bf16 training step (GPT2(precision="bf16")): every kernel of its sections of kernels/<layer>.cu against a
float64 reference on awkward sizes, at two or more launch configurations, with every fresh output poisoned;
bf16 products through cuBLAS; then the whole model against the fp32 kernel path."""
import math

import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.cublas import gemm, gemm_batched
from llmc_lessons.device import to_device, to_host
from llmc_lessons.layers.attention import (attention_backward, attention_backward_bf16_cuda, attention_forward,
                                           attention_forward_bf16_cuda, merge_heads_bf16_cuda,
                                           softmax_backward_bf16_cuda, softmax_forward_bf16_cuda, split_heads_bf16_cuda)
from llmc_lessons.layers.bf16 import zero_counters, float_to_bf16_cuda
from llmc_lessons.layers.crossentropy import fused_classifier_bf16_cuda
from llmc_lessons.layers.encoder import encoder_forward_bf16_cuda
from llmc_lessons.layers.gelu import (gelu_backward, gelu_bias_backward_bf16_cuda, gelu_bias_forward_bf16_cuda,
                                      gelu_forward)
from llmc_lessons.layers.layernorm import (column_sum_add_cuda, layernorm_backward, layernorm_backward_bf16_cuda,
                                           layernorm_forward, residual_layernorm_forward_bf16_cuda)
from llmc_lessons.layers.matmul import linear_bf16
from llmc_lessons.model import GPT2, GPT2Config
from llmc_lessons.precision import from_bf16, stochastic_to_bf16, to_bf16
from llmc_lessons.sampling import generate

BF16_STEP = 2.0 ** -7   # relative spacing of bf16 numbers: one rounding is at most half of it


@pytest.fixture(autouse=True)
def poison(poisoned_allocations):
    """Every launcher output here starts as NaN (conftest.poisoned_allocations)."""


def bits(gen, *shape, scale=1.0):
    """Random bf16 bits (host)."""
    return to_bf16((gen.standard_normal(shape) * scale).astype(np.float32))


def wide(a):
    """Device or host bf16 bits -> float64 values (host)."""
    return from_bf16(to_host(a)).astype(np.float64)


def rand32(gen, *shape, scale=1.0):
    return (gen.standard_normal(shape) * scale).astype(np.float32)


def close_bf16(got_bits, want, what):
    """bf16 results against a float64 reference: within one rounding (plus a little for float32 math)."""
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(wide(got_bits), want, rtol=BF16_STEP, atol=1e-6 * max(1.0, np.abs(want).max()),
                               err_msg=what)


# ---------------------------------------------------------------------------------------------------------
# Kernels one by one


@pytest.mark.parametrize("n,block", [(1, 32), (1001, 256), (77, 64)])
def test_float_to_bf16_kernel_matches_numpy_bit_for_bit(n, block):
    x = rand32(np.random.default_rng(n), n, scale=100.0)
    np.testing.assert_array_equal(to_host(float_to_bf16_cuda(to_device(x), block_size=block)), to_bf16(x))
    np.testing.assert_array_equal(to_host(float_to_bf16_cuda(to_device(x), stochastic=True, seed=9, block_size=block)),
                                  stochastic_to_bf16(x, seed=9))


@pytest.mark.parametrize("B,T,C,block", [(3, 5, 24, 32), (2, 9, 40, 96)])
def test_encoder_forward_bf16(B, T, C, block):
    gen = np.random.default_rng(B * T)
    Vp, maxT = 40, 11
    wte, wpe = bits(gen, Vp, C), bits(gen, maxT, C)
    ids = gen.integers(0, Vp, (B, T)).astype(np.int32)
    out = encoder_forward_bf16_cuda(to_device(ids), to_device(wte), to_device(wpe), block_size=block)
    want = to_bf16(from_bf16(wte)[ids] + from_bf16(wpe)[:T])   # one float32 add, one rounding: exact
    np.testing.assert_array_equal(to_host(out), want)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 40\)"):
        encoder_forward_bf16_cuda(to_device(np.full((B, T), 40, np.int32)), to_device(wte), to_device(wpe))


@pytest.mark.parametrize("B,T,C,block", [(3, 7, 40, 32), (2, 3, 264, 96), (1, 5, 768, 256), (2, 3, 1280, 64),
                                         (1, 3, 1600, 128), (3, 1, 1288, 32), (1, 2, 2040, 96)])
def test_residual_layernorm_forward_bf16(B, T, C, block):
    gen = np.random.default_rng(C)
    a, b = bits(gen, B, T, C), bits(gen, B, T, C, scale=2.0)
    bias2, w, bb = rand32(gen, C), 1 + rand32(gen, C, scale=0.1), rand32(gen, C)
    res, out, mean, rstd = residual_layernorm_forward_bf16_cuda(*(to_device(x) for x in (a, b, bias2, w, bb)),
                                                                  block_size=block)
    want_res = to_bf16(from_bf16(a) + (from_bf16(b) + bias2))
    np.testing.assert_array_equal(to_host(res), want_res)
    ref, rm, rr = layernorm_forward(from_bf16(want_res).astype(np.float64), w.astype(np.float64), bb.astype(np.float64))
    np.testing.assert_allclose(to_host(mean), rm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_host(rstd), rr, rtol=1e-5)
    close_bf16(out, ref, "layernorm output")


def test_split_and_merge_heads_bf16():
    gen = np.random.default_rng(1)
    B, T, NH, hs = 2, 5, 3, 16
    C = NH * hs
    qkv, bias = bits(gen, B, T, 3 * C), rand32(gen, 3 * C)
    for block in (32, 100):
        h = split_heads_bf16_cuda(to_device(qkv), 3, NH, to_device(bias), block_size=block)
        want = to_bf16(from_bf16(qkv) + bias).reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)
        np.testing.assert_array_equal(to_host(h), want)
        np.testing.assert_array_equal(to_host(merge_heads_bf16_cuda(to_device(np.ascontiguousarray(want)),
                                                                      block_size=block)),
                                      to_bf16(from_bf16(qkv) + bias))
        one = split_heads_bf16_cuda(to_device(qkv[:, :, :C].copy()), 1, NH, block_size=block)  # no bias
        np.testing.assert_array_equal(to_host(one)[0], qkv[:, :, :C].reshape(B, T, NH, hs).transpose(0, 2, 1, 3))


def causal_softmax(scores):
    T = scores.shape[-1]
    s = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("N,T,block,in_place", [(3, 24, 32, False), (2, 40, 64, True), (1, 264, 96, False)])
def test_softmax_forward_bf16(N, T, block, in_place):
    gen = np.random.default_rng(T)
    pre = bits(gen, N, T, T, scale=4.0)
    scale = 1 / math.sqrt(16)
    d_pre = to_device(pre.copy())   # (on a CPU to_device returns the same array: in place would overwrite pre)
    att = softmax_forward_bf16_cuda(d_pre, scale, out=d_pre if in_place else None, block_size=block)
    got = wide(att)
    close_bf16(att, causal_softmax(from_bf16(pre).astype(np.float64) * scale), "att")
    assert not np.triu(got, 1).any(), "the future (j > t) must be exactly 0"


@pytest.mark.parametrize("N,T,block,in_place", [(3, 24, 32, True), (2, 48, 64, False)])
def test_softmax_backward_bf16(N, T, block, in_place):
    gen = np.random.default_rng(T + 1)
    att = to_bf16(causal_softmax(rand32(gen, N, T, T, scale=3.0)).astype(np.float32))
    datt = bits(gen, N, T, T)
    a, d = from_bf16(att).astype(np.float64), from_bf16(datt).astype(np.float64) * np.tril(np.ones((T, T)))
    want = 0.25 * a * (d - (a * d).sum(-1, keepdims=True))
    d_datt = to_device(datt.copy())
    got = softmax_backward_bf16_cuda(d_datt, to_device(att), 0.25, out=d_datt if in_place else None,
                                       block_size=block)
    np.testing.assert_allclose(wide(got), want, rtol=BF16_STEP, atol=1e-6)
    assert not np.triu(wide(got), 1).any()


@pytest.mark.parametrize("shape,block,launch,in_place", [((2, 3, 40), 32, (8, 32, None), True),
                                                         ((1, 7, 264), 128, (3, 5, 2), False),
                                                         ((5, 33, 784), 64, (8, 4, None), True),
                                                         ((3, 37, 40), 32, (8, 8, 32), False),
                                                         ((3, 37, 272), 64, (32, 3, 5), True),
                                                         ((3, 37, 264), 64, (8, 32, 1), False),
                                                         ((3, 37, 2312), 256, (8, 32, None), True)])
def test_gelu_bias_forward_and_backward_bf16(shape, block, launch, in_place):
    gen = np.random.default_rng(shape[-1])
    x, dout, bias = bits(gen, *shape, scale=2.0), bits(gen, *shape), rand32(gen, shape[-1])
    pre = from_bf16(x).astype(np.float64) + bias
    close_bf16(gelu_bias_forward_bf16_cuda(to_device(x), to_device(bias), block_size=block), gelu_forward(pre),
               "gelu(x + bias)")
    d_dout, start = to_device(dout.copy()), to_bf16(rand32(gen, shape[-1]))      # the gradient is bf16
    dbias = to_device(start.copy())
    X, Y, R = launch
    got = gelu_bias_backward_bf16_cuda(d_dout, to_device(x), to_device(bias), dbias, out=d_dout if in_place else None,
                                         block_columns=X, block_rows=Y, grid_rows=R)
    assert (got is d_dout) == in_place
    close_bf16(got, gelu_backward(from_bf16(dout).astype(np.float64), pre), "dinp")
    # the fc bias's gradient: the column sums of dinp as stored, added to what dbias held, rounded once
    want = from_bf16(start) + wide(got).sum(axis=(0, 1))
    np.testing.assert_allclose(from_bf16(to_host(dbias)), want, rtol=2 ** -8, atol=1e-6, err_msg="dbias")
    assert not to_host(zero_counters(1)).any()


@pytest.mark.parametrize("B,T,C,OC", [(2, 7, 40, 24), (1, 13, 72, 264), (3, 5, 264, 40), (4, 33, 64, 2304)])
def test_linear_bf16_adds_the_bias_before_its_one_rounding(B, T, C, OC):
    gen = np.random.default_rng(B * C + OC)
    x, w, b = bits(gen, B, T, C), bits(gen, OC, C, scale=0.2), bits(gen, OC)
    pre = from_bf16(x).astype(np.float64) @ from_bf16(w).astype(np.float64).T + from_bf16(b)
    out = to_device(np.full((B * T, OC), 0x7FC0, np.uint16))          # NaN bits: every one must be written
    got = linear_bf16(to_device(x), to_device(w), to_device(b))
    assert got.dtype == np.uint16 and got.shape == (B, T, OC)
    close_bf16(got, pre, "x @ w^T + b")
    # as in the model: the weight and the bias views into one flat buffer, 16 bytes past a 256-byte boundary
    flat = to_device(np.zeros(8 + OC * C + OC, np.uint16))
    flat[8:8 + OC * C] = to_device(w.ravel())
    flat[8 + OC * C:] = to_device(b)
    w_view, b_view = flat[8:8 + OC * C].reshape(OC, C), flat[8 + OC * C:]
    close_bf16(linear_bf16(to_device(x), w_view, b_view), pre, "x @ w^T + b, the weight a view at 16 bytes")
    if device.on_gpu():                                                 # the epilogue's product itself, into out
        from llmc_lessons.cublas import gemm_bias
        assert gemm_bias(to_device(x).reshape(B * T, C), to_device(w), to_device(b), out=out) is out
        close_bf16(out.reshape(B, T, OC), pre, "gemm_bias")
        with pytest.raises(ValueError, match="16-byte boundary"):   # cuBLASLt's epilogue needs 16-byte starts
            gemm_bias(to_device(x).reshape(B * T, C), flat[1:1 + OC * C].reshape(OC, C), to_device(b))
        with pytest.raises(TypeError, match="bf16"):
            gemm_bias(to_device(from_bf16(x)).reshape(B * T, C), to_device(from_bf16(w)), to_device(b))
        with pytest.raises(TypeError, match="dtype"):                   # cuBLASLt would write bf16 into it
            gemm_bias(to_device(x).reshape(B * T, C), to_device(w), to_device(b),
                      out=to_device(np.zeros((B * T, OC), np.float32)))


def test_linear_bf16_refuses_bad_input():
    x, w, b = (to_device(np.zeros(s, np.uint16)) for s in ((2, 3, 16), (8, 16), (8,)))
    with pytest.raises(ValueError, match="shape"):
        linear_bf16(x, to_device(np.zeros((8, 24), np.uint16)), b)
    with pytest.raises(TypeError, match="dtype"):
        linear_bf16(x, w, to_device(np.zeros(8, np.float32)))           # the bias in bf16, as the weights
    with pytest.raises(ValueError, match="multiple of 8"):
        linear_bf16(x, to_device(np.zeros((12, 16), np.uint16)), to_device(np.zeros(12, np.uint16)))
    with pytest.raises(ValueError, match="shape"):
        linear_bf16(x, w, to_device(np.zeros(16, np.uint16)))
    with pytest.raises(TypeError, match="to_bf16") as e:               # floats: how to make bf16 bits of them
        linear_bf16(x, to_device(np.zeros((8, 16), np.float32)), b)
    assert ".astype" not in str(e.value)                               # which would keep the integer parts
    with pytest.raises(ValueError, match="non-empty"):                  # as cuBLASLt would refuse it on a GPU
        linear_bf16(to_device(np.zeros((2, 0, 16), np.uint16)), w, b)
    flat = to_device(np.zeros(1 + 8 * 16, np.uint16))
    with pytest.raises(ValueError, match="16-byte aligned"):            # a view 2 bytes into a buffer
        linear_bf16(x, flat[1:].reshape(8, 16), b)


def test_gemm_bias_runs_on_a_gpu_only():
    if device.on_gpu():
        pytest.skip("the GPU path is tested with linear_bf16")
    from llmc_lessons.cublas import gemm_bias
    x, w, b = (np.zeros(s, np.uint16) for s in ((4, 16), (8, 16), (8,)))
    with pytest.raises(RuntimeError, match="linear_bf16"):
        gemm_bias(x, w, b)


@pytest.mark.parametrize("B,T,C,block,max_blocks", [(2, 7, 40, 64, 264), (3, 11, 264, 96, 2), (1, 5, 1024, 256, 1),
                                                   (2, 5, 1280, None, 264), (3, 3, 1600, 64, 2), (1, 7, 1032, 96, 3),
                                                   (2, 2, 2040, 32, 264)])
def test_layernorm_backward_bf16(B, T, C, block, max_blocks):
    gen = np.random.default_rng(C + B)
    x, dout = bits(gen, B, T, C, scale=2.0), bits(gen, B, T, C)
    w, b = 1 + rand32(gen, C, scale=0.1), rand32(gen, C)
    _, mean, rstd = layernorm_forward(from_bf16(x).astype(np.float64), w.astype(np.float64), b.astype(np.float64))
    dinp0 = rand32(gen, B, T, C)
    dw0, db0, dr0 = (to_bf16(rand32(gen, C)) for _ in range(3))          # the weight gradients are bf16
    dinp, dw, db, dr = to_device(dinp0.copy()), to_device(dw0.copy()), to_device(db0.copy()), to_device(dr0.copy())
    d16 = layernorm_backward_bf16_cuda(dinp, to_device(dout), to_device(x), to_device(w),
                                         to_device(mean.astype(np.float32)), to_device(rstd.astype(np.float32)),
                                         dw, db, dr, block_size=block, max_blocks=max_blocks)
    rdx, rdw, rdb = layernorm_backward(from_bf16(dout).astype(np.float64), from_bf16(x).astype(np.float64),
                                       w.astype(np.float64), mean, rstd)
    np.testing.assert_allclose(to_host(dinp), dinp0 + rdx, rtol=1e-4, atol=1e-4)   # accumulated in float32
    np.testing.assert_array_equal(to_host(d16), to_bf16(to_host(dinp)))             # and its bf16 copy
    # each weight gradient: its sum added to what it held, rounded to bf16 once
    np.testing.assert_allclose(from_bf16(to_host(dw)), from_bf16(dw0) + rdw, rtol=2 ** -8, atol=1e-4)
    np.testing.assert_allclose(from_bf16(to_host(db)), from_bf16(db0) + rdb, rtol=2 ** -8, atol=1e-4)
    # the bias gradient of the projection before: the column sums of the bf16 copy, added to what it held
    np.testing.assert_allclose(from_bf16(to_host(dr)), from_bf16(dr0) + wide(d16).sum(axis=(0, 1)), rtol=2 ** -8,
                               atol=1e-4)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("K,R,C,X,Y", [(1, 37, 24, 8, 32), (2, 5, 776, 16, 4), (3, 300, 40, 8, 32), (1, 1, 1600, 32, 8)])
def test_column_sum_add(K, R, C, X, Y, bf16):
    """Into float32 gradients, or into the bf16 step's bf16 ones (each sum added, then rounded once)."""
    gen = np.random.default_rng(K * R + C)
    partial, starts = rand32(gen, R, K * C), [rand32(gen, C) for _ in range(K)]
    if bf16:
        starts = [to_bf16(a) for a in starts]
    outs = [to_device(a.copy()) for a in starts]
    column_sum_add_cuda(*outs, *[None] * (3 - K), to_device(partial), columns_per_block=X, rows_per_block=Y)
    sums = partial.astype(np.float64).sum(0)
    values = from_bf16 if bf16 else np.asarray
    for k in range(K):    # added into what each held
        np.testing.assert_allclose(values(to_host(outs[k])), values(starts[k]) + sums[k * C:(k + 1) * C],
                                   rtol=2 ** -8 if bf16 else 1e-5, atol=1e-5)
    if bf16:    # one rounding: exactly the nearest bf16 of what the float32 kernel adds up, in the same order
        wide_outs = [to_device(from_bf16(a)) for a in starts]
        column_sum_add_cuda(*wide_outs, *[None] * (3 - K), to_device(partial), columns_per_block=X, rows_per_block=Y)
        for k in range(K):
            np.testing.assert_array_equal(to_host(outs[k]), to_bf16(to_host(wide_outs[k])))
    with pytest.raises(ValueError, match="out3 given without out2"):
        column_sum_add_cuda(outs[0], None, outs[0], to_device(partial))
    with pytest.raises(ValueError, match="out1 is needed"):
        column_sum_add_cuda(None, None, None, to_device(partial))
    with pytest.raises(ValueError, match="partial must have 3C columns"):
        column_sum_add_cuda(*outs[:1] * 3, to_device(np.zeros((2, 3 * C + 1), np.float32)))


@pytest.mark.parametrize("V,Vp,block", [(37, 40, 32), (1000, 1008, 512), (1001, 1008, 96), (48, 48, 64)])
def test_fused_classifier_bf16(V, Vp, block):
    gen = np.random.default_rng(V)
    B, T = 2, 3
    logits = bits(gen, B, T, Vp, scale=3.0)
    logits[..., V:] = 0x7FC0          # NaN in the padded columns: they must not reach the max, the sum or the loss
    targets = gen.integers(0, V, (B, T)).astype(np.int32)
    d_logits = to_device(logits.copy())
    losses = fused_classifier_bf16_cuda(d_logits, to_device(targets), V, 1 / (B * T), block_size=block)
    z = from_bf16(logits).astype(np.float64)[..., :V]
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    np.testing.assert_allclose(to_host(losses), -np.take_along_axis(logp, targets[..., None], -1)[..., 0], rtol=1e-5)
    want = np.exp(logp)
    np.put_along_axis(want, targets[..., None], np.take_along_axis(want, targets[..., None], -1) - 1, -1)
    got = wide(d_logits)
    np.testing.assert_allclose(got[..., :V], want / (B * T), rtol=BF16_STEP, atol=1e-7)
    assert not got[..., V:].any(), "the padded columns get no gradient"


@pytest.mark.parametrize("bad", [-1, 37, 39, 2**31 - 1])
def test_fused_classifier_bf16_range_checks_the_targets(bad):
    gen = np.random.default_rng(1)
    logits = bits(gen, 2, 3, 40)
    targets = gen.integers(0, 37, (2, 3)).astype(np.int32)
    targets[1, 1] = bad
    d_logits = to_device(logits.copy())
    with pytest.raises(ValueError, match="every target must be a token id in 0..36"):
        fused_classifier_bf16_cuda(d_logits, to_device(targets), 37, 1 / 6, check_targets=True)
    if not device.on_gpu():   # the default checks on the CPU backend
        with pytest.raises(ValueError, match="every target must be a token id in 0..36"):
            fused_classifier_bf16_cuda(d_logits, to_device(targets), 37, 1 / 6)
    np.testing.assert_array_equal(to_host(d_logits), logits)   # refused before the launch: the logits are intact


def test_attention_forward_and_backward_bf16_match_lesson_05():
    gen = np.random.default_rng(5)
    B, T, NH, hs = 2, 16, 2, 8
    C = NH * hs
    qkv, qkvb, dout = bits(gen, B, T, 3 * C), rand32(gen, 3 * C, scale=0.1), bits(gen, B, T, C)
    atty, qkvh, att = attention_forward_bf16_cuda(to_device(qkv), to_device(qkvb), NH)
    q64 = from_bf16(to_bf16(from_bf16(qkv) + qkvb)).astype(np.float64)      # the bias is added, then rounded
    ref_out, ref_att = attention_forward(q64, NH)
    np.testing.assert_allclose(wide(att), ref_att, atol=4e-3)
    np.testing.assert_allclose(wide(atty), ref_out, atol=3e-2 * np.abs(ref_out).max())
    dqkv = attention_backward_bf16_cuda(to_device(dout), qkvh, att)
    ref_d = attention_backward(from_bf16(dout).astype(np.float64), q64, ref_att, NH)
    np.testing.assert_allclose(wide(dqkv), ref_d, atol=3e-2 * np.abs(ref_d).max())


def test_gemm_bf16_outputs_and_float32_accumulation():
    gen = np.random.default_rng(2)
    a, b = bits(gen, 37, 24), bits(gen, 29, 24)
    exact = from_bf16(a).astype(np.float64) @ from_bf16(b).astype(np.float64).T
    close_bf16(gemm(to_device(a), to_device(b), trans_b=True), exact, "bf16 out")
    acc = rand32(gen, 24, 24)
    out = to_device(acc.copy())
    gemm(to_device(a), to_device(a), trans_a=True, out=out, accumulate=True)   # bf16 in, float32 +=
    np.testing.assert_allclose(to_host(out), acc + from_bf16(a).astype(np.float64).T @ from_bf16(a), rtol=1e-5,
                               atol=1e-4)
    x, y = bits(gen, 3, 8, 16), bits(gen, 3, 16, 8)
    close_bf16(gemm_batched(to_device(x), to_device(y)), from_bf16(x).astype(np.float64) @ from_bf16(y), "batched")
    with pytest.raises(TypeError, match="same dtype"):
        gemm(to_device(a), to_device(from_bf16(b)), trans_b=True)
    with pytest.raises(TypeError, match="needs bf16 inputs"):
        gemm(to_device(from_bf16(a)), to_device(from_bf16(b)), trans_b=True, out_dtype=np.uint16)


def test_bad_input_is_refused():
    f32 = to_device(np.zeros((2, 8, 16), np.float32))
    with pytest.raises(TypeError, match="uint16"):
        gelu_bias_forward_bf16_cuda(f32, to_device(np.zeros(16, np.float32)))
    with pytest.raises(ValueError, match="multiple of 8"):
        gelu_bias_forward_bf16_cuda(to_device(np.zeros((2, 3, 12), np.uint16)), to_device(np.zeros(12, np.float32)))
    with pytest.raises(ValueError, match="aligned"):
        gelu_bias_forward_bf16_cuda(to_device(np.zeros(8 * 9 + 1, np.uint16))[1:].reshape(1, 9, 8),
                                      to_device(np.zeros(8, np.float32)))
    with pytest.raises(ValueError, match="C must be <= 2048"):
        z = to_device(np.zeros((1, 1, 2056), np.uint16))
        f = to_device(np.zeros(2056, np.float32))
        layernorm_backward_bf16_cuda(to_device(np.zeros((1, 1, 2056), np.float32)), z, z, f,
                                       to_device(np.zeros((1, 1), np.float32)), to_device(np.zeros((1, 1), np.float32)),
                                       f, f)
    z, f, g = (to_device(np.zeros(s, t)) for s, t in (((1, 1, 1024), np.uint16), (1024, np.float32),
                                                      (1024, np.uint16)))
    stats = to_device(np.zeros((1, 1), np.float32))
    with pytest.raises(ValueError, match="shared memory"):
        layernorm_backward_bf16_cuda(to_device(np.zeros((1, 1, 1024), np.float32)), z, z, f, stats, stats, g, g,
                                     block_size=1024)
    with pytest.raises(TypeError, match="dweight must hold bf16 bits"):    # the step's weight gradients are bf16
        layernorm_backward_bf16_cuda(to_device(np.zeros((1, 1, 1024), np.float32)), z, z, f, stats, stats, f, g)
    with pytest.raises(ValueError, match="shape"):
        residual_layernorm_forward_bf16_cuda(*(to_device(np.zeros((1, 2, 8), np.uint16)),) * 2,
                                               *(to_device(np.zeros(16, np.float32)),) * 3)


# ---------------------------------------------------------------------------------------------------------
# The whole model

SMALL = GPT2Config(max_seq_len=32, vocab_size=100, padded_vocab_size=128, num_layers=2, num_heads=2, channels=32)


def batch(T=16, seed=0):
    gen = np.random.default_rng(seed)
    return gen.integers(0, 100, (2, T)).astype(np.int32), gen.integers(0, 100, (2, T)).astype(np.int32)


def test_bf16_model_matches_the_fp32_kernel_path():
    x, y = batch()
    m32, m16 = GPT2(SMALL, seed=1, backend="kernels"), GPT2(SMALL, seed=1, precision="bf16")
    l32, l16 = m32.forward(x, y), m16.forward(x, y)
    assert abs(l16 - l32) < 1e-2 * l32
    np.testing.assert_allclose(to_host(m16.logits), to_host(m32.logits), atol=2e-2)
    for m in (m32, m16):
        m.zero_grad()
        m.backward()
    for name in m32.grads:
        a, b = to_host(m32.gradient(name)), to_host(m16.gradient(name))
        err = np.linalg.norm(a - b) / np.linalg.norm(a)
        assert err < 3e-2, f"{name}: the bf16 gradient is {err:.1e} away (relative) from the fp32 one"


@pytest.mark.parametrize("C,NH", [(1600, 25)])
def test_bf16_model_runs_gpt2_xl_widths(C, NH):
    # GPT-2 1.5B's width and heads (hs = 64): the wide layernorm kernels and 25 heads of flash attention, one layer
    c = GPT2Config(max_seq_len=8, vocab_size=100, padded_vocab_size=128, num_layers=1, num_heads=NH, channels=C)
    x, y = batch(T=8)
    m32, m16 = GPT2(c, seed=1, backend="kernels"), GPT2(c, seed=1, precision="bf16")
    l32, l16 = m32.forward(x, y), m16.forward(x, y)
    assert abs(l16 - l32) < 1e-2 * l32
    for m in (m32, m16):
        m.zero_grad()
        m.backward()
    for name in m32.grads:
        a, b = to_host(m32.gradient(name)), to_host(m16.gradient(name))
        err = np.linalg.norm(a - b) / np.linalg.norm(a)
        assert err < 3e-2, f"{name}: the bf16 gradient is {err:.1e} away (relative) from the fp32 one"


def test_bf16_model_is_deterministic_and_learns():
    x, y = batch()
    runs = []
    for _ in range(2):
        m = GPT2(SMALL, seed=3, precision="bf16")
        losses = []
        for t in range(1, 6):
            losses.append(m.forward(x, y))
            m.zero_grad()
            m.backward()
            m.update(3e-3, weight_decay=0.1, grad_scale=0.5)
        runs.append((losses, to_host(m.params_memory), to_host(m.params_bf16_memory)))
    (l1, p1, c1), (l2, p2, c2) = runs
    assert l1 == l2 and np.array_equal(p1, p2) and np.array_equal(c1, c2)
    assert l1[-1] < l1[0] - 0.5, l1
    # the bf16 copy is the stochastic rounding of the master weights, and sync_params rebuilds it exactly
    m.sync_params()
    np.testing.assert_array_equal(to_host(m.params_bf16_memory), c2)
    assert np.abs(from_bf16(c2) - p2).max() <= np.abs(p2).max() * BF16_STEP


def test_bf16_model_generates_and_refuses_what_it_cannot_do():
    m = GPT2(SMALL, seed=1, precision="bf16")
    tokens = generate(m, [1, 2, 3], 4, temperature=0)        # forwards on T = 3..6: padded to 8 internally
    assert len(tokens) == 7 and all(0 <= t < 100 for t in tokens)
    m.forward(np.array([[5, 6, 7]], np.int32))
    assert m.logits.shape == (1, 3, 128) and m.logits.dtype == np.float32
    with pytest.raises(ValueError, match="multiple of 8"):
        m.forward(*batch(T=12))
    with pytest.raises(ValueError, match="backend='kernels'"):
        GPT2(SMALL, backend="numpy", precision="bf16")
    with pytest.raises(ValueError, match="multiples of 8"):
        GPT2(GPT2Config(max_seq_len=8, vocab_size=10, padded_vocab_size=12, num_layers=1, num_heads=1, channels=8),
             precision="bf16")
    with pytest.raises(ValueError, match="C \\(2112\\) must be at most 2048"):   # the normalisations' rows
        GPT2(GPT2Config(max_seq_len=8, vocab_size=10, padded_vocab_size=16, num_layers=1, num_heads=33, channels=2112),
             precision="bf16")
    with pytest.raises(ValueError, match="bf16 kernels only"):
        m.use_kernels = False
    m.forward(*batch())
    m.backward()
    with pytest.raises(RuntimeError, match="one backward"):
        m.backward()
