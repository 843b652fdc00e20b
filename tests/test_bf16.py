"""bfloat16: conversions bit for bit, the emulator's __nv_bfloat16, the bf16 kernels, and lesson 14's checks."""
import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.checks.bf16 import EDGES, NANS, check_stochastic_round, check_to_bf16
from llmc_lessons.cuda import RawKernel
from llmc_lessons.device import to_device, to_host
from llmc_lessons.layers.adamw import _vector_head, adamw_update, adamw_update_bf16_cuda
from llmc_lessons.layers.gelu import gelu_forward_bf16, gelu_forward_bf16_cuda
from llmc_lessons.layers.layernorm import layernorm_forward_bf16, layernorm_forward_bf16_cuda
from llmc_lessons.layers.matmul import matmul_bf16
from llmc_lessons.precision import from_bf16, stochastic_to_bf16, to_bf16

gen = np.random.default_rng(0)
VALUES = np.concatenate([EDGES, NANS, (gen.standard_normal(20000) * 10.0 ** gen.integers(-30, 30, 20000)).astype(np.float32)])


def nearest_even_reference(x):
    """Round to nearest bf16 by comparing the two neighbours in float64 (independent of the bit trick)."""
    out = np.empty(x.size, np.uint16)
    with np.errstate(invalid="ignore"):  # signalling NaN payloads
        x64 = x.astype(np.float64)
    for i, v in enumerate(x64):
        if np.isnan(v):
            out[i] = 0x7FFF
            continue
        lo = (np.array(x[i], np.float32).view(np.uint32) >> 16).astype(np.uint16)  # toward zero
        hi = lo + np.uint16(1)
        with np.errstate(invalid="ignore"):
            a, b = from_bf16(lo).astype(np.float64), from_bf16(hi).astype(np.float64)
        if lo & 0x7FFF == 0x7F7F:  # above the largest finite bf16 the next step would be 2^128: past it is inf
            b = np.copysign(2.0 ** 128, v)
        if np.isinf(v):
            out[i] = lo
        elif abs(v - a) < abs(b - a) / 2 or (abs(v - a) == abs(b - a) / 2 and lo % 2 == 0):
            out[i] = lo
        else:
            out[i] = hi
    return out


def test_to_bf16_is_round_to_nearest_even():
    np.testing.assert_array_equal(to_bf16(VALUES[:3000]), nearest_even_reference(VALUES[:3000]))
    assert to_bf16(np.float32(1 + 2**-8)) == 0x3F80 and to_bf16(np.float32(1 + 3 * 2**-8)) == 0x3F82  # ties
    assert to_bf16(np.float32(3.4e38)) == 0x7F80 and np.all(to_bf16(NANS) == 0x7FFF)
    np.testing.assert_array_equal(to_bf16(from_bf16(np.arange(0, 0x7F80, 7, dtype=np.uint16))),
                                  np.arange(0, 0x7F80, 7, dtype=np.uint16))   # bf16 values are fixed points


def test_from_bf16_into_out():
    bits = to_bf16(VALUES[:1000])
    out = np.full(1000, np.nan, np.float32)
    assert from_bf16(bits, out=out) is out
    np.testing.assert_array_equal(out, from_bf16(bits))
    for wrong in (np.zeros(1000, np.float64), np.zeros(999, np.float32), np.zeros((10, 100), np.float32)):
        with pytest.raises(ValueError, match="out must be a float32 array of shape"):
            from_bf16(bits, out=wrong)


def test_stochastic_rounding_is_unbiased_and_brackets():
    x = np.full(40000, 1.0 + 3 * 2**-9, np.float32)   # 3/4 of the way from 1.0 to the next bf16
    bits = stochastic_to_bf16(x, seed=3)
    assert set(np.unique(bits)) == {0x3F80, 0x3F81}
    assert abs(from_bf16(bits).mean() - x[0]) < 2e-4


@pytest.mark.skipif(device.on_gpu(), reason="the software __nv_bfloat16 is the emulator's")
def test_emulator_nv_bfloat16_matches_numpy():
    src = r'''
    #include <cuda_bf16.h>
    extern "C" __global__ void conv(__nv_bfloat16* out, unsigned short* rz, float* back, const float* x, int n) {
        int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i < n) {
            out[i] = __float2bfloat16(x[i]);
            rz[i] = __float2bfloat16_rz(x[i]).__x;
            back[i] = __bfloat162float(__hadd(out[i], __float2bfloat16(1.0f)));
        }
    }'''
    n = VALUES.size
    out, rz, back = np.zeros(n, np.uint16), np.zeros(n, np.uint16), np.zeros(n, np.float32)
    RawKernel(src, "conv")((-(-n // 256),), (256,), (out, rz, back, VALUES, np.int32(n)))
    np.testing.assert_array_equal(out, to_bf16(VALUES))
    finite = ~np.isnan(VALUES)
    np.testing.assert_array_equal(rz[finite], (VALUES[finite].view(np.uint32) >> 16).astype(np.uint16))
    np.testing.assert_array_equal(back, from_bf16(to_bf16(from_bf16(out) + np.float32(1.0))))


@pytest.mark.parametrize("n,block,version", [(1, 32, 1), (1000, 96, 1), (5003, 256, 1), (8, 32, 2), (4000, 96, 2)])
def test_gelu_bf16_kernel(n, block, version):
    h = to_bf16((gen.standard_normal(n) * 3).astype(np.float32))
    out = to_host(gelu_forward_bf16_cuda(to_device(h), block_size=block, version=version))
    ref = gelu_forward_bf16(h)
    # the kernel's float32 result may lie on the other side of a rounding boundary than the float64 one: then
    # the two differ by one bf16 step; that happens rarely (a float32 GELU as 0.5 x (1 + tanh u) loses digits
    # to cancellation for x < 0 and lands on the other side 2% of the time, the kernel's form well under 1%)
    np.testing.assert_allclose(from_bf16(out), from_bf16(ref), rtol=2**-7, atol=1e-5)
    assert n < 100 or np.mean(out == ref) > 0.99


@pytest.mark.parametrize("B,T,C,block,version", [(2, 7, 45, 32, 1), (1, 5, 768, 128, 1), (3, 3, 31, 64, 1),
                                                   (2, 7, 40, 32, 2), (1, 5, 768, 128, 2), (3, 3, 1024, 96, 2),
                                                   (1, 9, 264, 256, 2), (2, 3, 1032, 64, 2), (1, 3, 1600, 96, 2),
                                                   (2, 2, 2048, 32, 2)])
def test_layernorm_bf16_kernel(B, T, C, block, version, poisoned_allocations):
    x = to_bf16(gen.standard_normal((B, T, C)).astype(np.float32) * 2 + 1)
    w, b = gen.standard_normal(C).astype(np.float32), gen.standard_normal(C).astype(np.float32)
    out, mean, rstd = layernorm_forward_bf16_cuda(*(to_device(a) for a in (x, w, b)), block_size=block,
                                                  version=version)
    ro, rm, rr = layernorm_forward_bf16(x, w, b)
    np.testing.assert_allclose(to_host(mean), rm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_host(rstd), rr, rtol=1e-5)
    np.testing.assert_allclose(from_bf16(to_host(out)), from_bf16(ro), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("stochastic", [False, True])
def test_adamw_bf16_kernel_updates_master_and_copy(stochastic):
    n = 777
    master, g = gen.standard_normal(n).astype(np.float32), to_bf16(gen.standard_normal(n).astype(np.float32))
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    want_p, want_m, want_v = adamw_update(master, from_bf16(g), m, v, 1, 1e-3, weight_decay=0.1)
    dm, dp = to_device(master.copy()), to_device(np.full(n, 0x7FC0, np.uint16))   # the copy poisoned with NaN
    dmm, dvv = to_device(m.copy()), to_device(v.copy())
    adamw_update_bf16_cuda(dm, dp, to_device(g), dmm, dvv, 1, 1e-3, weight_decay=0.1, stochastic=stochastic, seed=5,
                           block_size=128)
    np.testing.assert_allclose(to_host(dm), want_p, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(to_host(dmm), want_m, rtol=1e-6, atol=1e-8)
    copy = to_host(dp)
    expected = stochastic_to_bf16(to_host(dm), seed=5) if stochastic else to_bf16(to_host(dm))
    np.testing.assert_array_equal(copy, expected)


@pytest.mark.parametrize("n, offset", [(1, 0), (3, 1), (4, 0), (13, 2), (38, 0), (777, 3)])
def test_adamw_bf16_kernel_four_at_a_time_gives_the_same_bits(n, offset):
    """The kernel's four-element path (arrays that line up; the elements before the first 16-byte boundary and after
    the last whole four on their own) gives the bits of its one-element path (grads one element further along their
    buffer, so the arrays do not line up), close to the NumPy reference; views start `offset` elements into their
    buffers, and nothing before or after them is touched."""
    master, g = gen.standard_normal(n).astype(np.float32), to_bf16(gen.standard_normal(n).astype(np.float32))
    m, v = 0.1 * gen.standard_normal(n).astype(np.float32), np.abs(gen.standard_normal(n)).astype(np.float32)

    def run(grads_offset, vector: bool):
        def view(a, k):                     # a inside a buffer, k poisoned elements before it and 5 after
            pad = np.full(k + 5, np.nan if a.dtype == np.float32 else 0x7FC0, a.dtype)
            buf = to_device(np.concatenate([pad[:k], a, pad[k:]]))
            return buf, buf[k:k + n]
        (bm, dm), (bp, dp) = view(master, offset), view(np.full(n, 0x7FC0, np.uint16), offset)
        (bmm, dmm), (bvv, dvv), (_, dg) = view(m, offset), view(v, offset), view(g, grads_offset)
        assert (_vector_head(dm, dp, dg, dmm, dvv, n) >= 0) == vector     # the path this run is meant to take
        adamw_update_bf16_cuda(dm, dp, dg, dmm, dvv, 3, 1e-3, weight_decay=0.1, stochastic=True, seed=11,
                               block_size=32, grad_scale=0.5)
        for buf in (bm, bmm, bvv):
            assert np.isnan(np.delete(to_host(buf), np.s_[offset:offset + n])).all()
        assert (np.delete(to_host(bp), np.s_[offset:offset + n]) == 0x7FC0).all()
        return [to_host(a) for a in (dm, dmm, dvv, dp)]

    four, one = run(offset, vector=True), run(offset + 1, vector=False)
    for a, b in zip(four, one):
        np.testing.assert_array_equal(a, b)
    want_p, want_m, want_v = adamw_update(master, 0.5 * from_bf16(g), m, v, 3, 1e-3, weight_decay=0.1)
    for got, want in zip(four, (want_p, want_m, want_v)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(four[3], stochastic_to_bf16(four[0], seed=11))


def test_matmul_bf16_accumulates_in_float32():
    a, b = to_bf16(gen.standard_normal((37, 45)).astype(np.float32)), to_bf16(gen.standard_normal((29, 45)).astype(np.float32))
    got = to_host(matmul_bf16(to_device(a), to_device(b), trans_b=True))
    want = from_bf16(a).astype(np.float64) @ from_bf16(b).astype(np.float64).T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="inner dimensions"):
        matmul_bf16(to_device(a), to_device(b))


def test_launchers_refuse_float_arrays_for_bf16():
    with pytest.raises(TypeError, match="uint16"):
        gelu_forward_bf16_cuda(to_device(np.zeros(4, np.float32)))
    with pytest.raises(ValueError, match="multiple of 8"):
        gelu_forward_bf16_cuda(to_device(np.zeros(12, np.uint16)), version=2)


# ---------------------------------------------------------------------------------------------------------
# Exercise checks

def test_to_bf16_check(capsys):
    check_to_bf16(to_bf16)
    assert "Exercise 14.1: correct" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, cause", [
    (lambda x: (x.view(np.uint32) >> 16).astype(np.uint16), "toward zero"),
    (lambda x: ((x.view(np.uint32) + np.uint32(0x8000)) >> 16).astype(np.uint16), "half up"),
    (lambda x: ((x.view(np.uint32) + np.uint32(0x7FFF) + ((x.view(np.uint32) >> 16) & np.uint32(1))) >> 16).astype(np.uint16),
     "NaN"),
    (lambda x: to_bf16(x).astype(np.int32), "uint16"),
    (lambda x: to_bf16(x)[1:], "shape"),
])
def test_to_bf16_check_wrong_answers(wrong, cause):
    with pytest.raises(AssertionError, match=cause):
        check_to_bf16(wrong)


def test_stochastic_round_check(capsys):
    check_stochastic_round(lambda x, r: ((x.view(np.uint32) + r) >> 16).astype(np.uint16))
    assert "Exercise 14.2: correct" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, cause", [
    (lambda x, r: to_bf16(x), "round-to-nearest"),
    (lambda x, r: ((x.view(np.uint32) >> 16) + (r >> 16)).astype(np.uint16), "after the shift"),
    (lambda x, r: (x.view(np.uint32) >> 16).astype(np.uint16), "truncated"),
    (lambda x, r: ((x.view(np.uint32) + (r << 16)) >> 16).astype(np.uint16), "expected"),
])
def test_stochastic_round_check_wrong_answers(wrong, cause):
    with pytest.raises(AssertionError, match=cause):
        check_stochastic_round(wrong)


def test_stochastic_round_check_calls_the_answer_twice_and_checks_both():
    """The check's second call (20000 copies of 1 + 2^-9) goes through run_exercise too: an error there is an
    exercise failure, not a traceback, and an answer that only fits the first call's size fails."""
    def fixed_size(x, r):   # a buffer sized for the first test's 2000 values
        out = np.zeros(2000, np.uint16)
        out[:] = ((x.view(np.uint32) + r) >> 16).astype(np.uint16)
        return out
    with pytest.raises(AssertionError, match="your code raised ValueError"):
        check_stochastic_round(fixed_size)

    def first_2000_only(x, r):
        bits = ((x.view(np.uint32) + r) >> 16).astype(np.uint16)
        bits[2000:] = (x.view(np.uint32)[2000:] >> 16).astype(np.uint16)
        return bits
    with pytest.raises(AssertionError, match="copies of 1 \\+ 2\\^-9"):
        check_stochastic_round(first_2000_only)


def test_stubs():
    def stub(*a):
        raise NotImplementedError("Exercise 14.x: write it")
    for check in (check_to_bf16, check_stochastic_round):
        with pytest.raises(AssertionError, match="not done yet"):
            check(stub)


def test_a_float_array_where_bf16_bits_go_is_told_how_to_convert():
    """.astype(np.uint16) would keep the integer parts of the numbers, not their bf16 bits: the message names the
    conversions instead."""
    from llmc_lessons.layers.bf16 import require_bf16_array
    x = device.xp.ones((2, 8), np.float32)
    with pytest.raises(TypeError, match=r"bf16 bits.*float_to_bf16_cuda") as info:
        require_bf16_array("x", x, (2, 8))
    assert "astype" not in str(info.value)
