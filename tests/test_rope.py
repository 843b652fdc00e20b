"""Lesson 15, rotary position embeddings: the NumPy reference against Meta's complex form and finite
differences."""
from __future__ import annotations

import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.checks import poisoned
from llmc_lessons.checks import rope as checks
from llmc_lessons.cuda import kernel_source, load_kernel
from llmc_lessons.device import to_device, to_host
from llmc_lessons.gradcheck import gradcheck
from llmc_lessons.layers.rope import (precompute_freqs_cis, rope_backward, rope_backward_bf16_cuda, rope_backward_cuda,
                                      rope_forward, rope_forward_bf16, rope_forward_bf16_cuda, rope_forward_cuda,
                                      rope_qkv_backward_bf16_cuda, rope_qkv_backward_cuda, rope_qkv_forward_bf16_cuda,
                                      rope_qkv_forward_cuda)
from llmc_lessons.precision import from_bf16, to_bf16

# ---------------------------------------------------------------------------------------------------------
# NumPy reference


def test_table_is_cos_and_sin_of_the_angles():
    f = precompute_freqs_cis(8, 5, theta=10000.0, dtype=np.float64)
    assert f.shape == (5, 4, 2)
    t, i = 3, 2
    angle = t * 10000.0 ** (-2 * i / 8)
    np.testing.assert_allclose(f[t, i], [np.cos(angle), np.sin(angle)], rtol=1e-15)
    np.testing.assert_array_equal(f[0], np.stack([np.ones(4), np.zeros(4)], axis=-1))   # position 0: no turn
    assert precompute_freqs_cis(8, 5).dtype == np.float32


def test_forward_is_complex_multiplication_of_neighbouring_pairs():
    gen = np.random.default_rng(0)
    x = gen.standard_normal((2, 6, 3, 10))
    f = precompute_freqs_cis(10, 6, dtype=np.float64)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * np.arctan2(f[..., 1], f[..., 0]))[None, :, None, :]
    out = rope_forward(x, f)
    np.testing.assert_allclose(out[..., 0::2], z.real, atol=1e-13)
    np.testing.assert_allclose(out[..., 1::2], z.imag, atol=1e-13)


def test_scores_depend_on_relative_position_only():
    gen = np.random.default_rng(1)
    q, k = gen.standard_normal(16), gen.standard_normal(16)
    f = precompute_freqs_cis(16, 40, dtype=np.float64)
    x = np.zeros((1, 40, 2, 16))
    x[0, :, 0], x[0, :, 1] = q, k                            # the same q and k at every position
    r = rope_forward(x, f)[0]
    score = lambda t, s: r[t, 0] @ r[s, 1]                   # noqa: E731
    assert score(7, 3) == pytest.approx(score(30, 26), rel=1e-12)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)


def test_backward_is_inverse_rotation_and_gradcheck_float64():
    gen = np.random.default_rng(2)
    x = gen.standard_normal((2, 5, 3, 8))
    f = precompute_freqs_cis(8, 5, dtype=np.float64)
    np.testing.assert_allclose(rope_backward(rope_forward(x, f), f), x, atol=1e-13)
    gradcheck(lambda inp: rope_forward(inp, f), lambda dy, inp: {"inp": rope_backward(dy, f)},
              {"inp": x}, title="rope").assert_ok()


def test_reference_rejects_bad_shapes_and_arguments():
    f = precompute_freqs_cis(8, 5)
    with pytest.raises(ValueError, match=r"\(B, T, NH, hs\)"):
        rope_forward(np.ones((5, 2, 8)), f)
    with pytest.raises(ValueError, match="freqs_cis must have shape"):
        rope_forward(np.ones((1, 4, 2, 8)), f)
    with pytest.raises(ValueError, match="even"):
        precompute_freqs_cis(7, 5)
    with pytest.raises(ValueError, match="T"):
        precompute_freqs_cis(8, -1)


# ---------------------------------------------------------------------------------------------------------
# Kernels, launched directly: outputs poisoned with NaN, each the front of a longer array whose NaN tail must
# stay NaN


@pytest.mark.parametrize("kernel,reference", [("rope_forward_kernel", rope_forward),
                                              ("rope_backward_kernel", rope_backward)])
@pytest.mark.parametrize("block_size,shape", [(32, (2, 7, 3, 10)), (96, (3, 5, 2, 18)), (256, (1, 33, 5, 6))])
def test_kernels_match_reference(kernel, reference, block_size, shape):
    gen = np.random.default_rng(block_size)
    x = gen.standard_normal(shape).astype(np.float32)
    B, T, NH, hs = shape
    f = precompute_freqs_cis(hs, T + 5)[5:]                   # positions 5 .. 5 + T - 1, as in generation
    n = x.size
    buf = poisoned((n + block_size,))
    x_pad = to_device(np.concatenate([x.reshape(-1), np.ones(block_size, np.float32)]))
    load_kernel("rope.cu", kernel)((-(-(n // 2) // block_size),), (block_size,),
                                   (buf[:n], x_pad[:n], to_device(np.ascontiguousarray(f)), np.int32(B), np.int32(T),
                                    np.int32(NH), np.int32(hs)))
    want = reference(x.astype(np.float64), f.astype(np.float64))
    np.testing.assert_allclose(to_host(buf[:n]).reshape(shape), want, atol=1e-6, rtol=1e-5)
    assert np.isnan(to_host(buf[n:])).all()


@pytest.mark.parametrize("block_size", [32, 100, 1024])
def test_launchers_match_reference_and_work_in_place(block_size):
    gen = np.random.default_rng(block_size)
    x = gen.standard_normal((2, 9, 3, 14)).astype(np.float32)
    f = precompute_freqs_cis(14, 9)
    got = rope_forward_cuda(to_device(x), to_device(f), block_size=block_size)
    np.testing.assert_allclose(to_host(got), rope_forward(x, f), atol=1e-6)
    back = rope_backward_cuda(got, to_device(f), out=got, block_size=block_size)   # in place
    assert back is got
    np.testing.assert_allclose(to_host(back), x, atol=1e-5)


def test_launchers_reject_bad_input():
    x, f = to_device(np.ones((2, 4, 3, 8), np.float32)), to_device(precompute_freqs_cis(8, 4))
    with pytest.raises(TypeError, match="dtype float32"):
        rope_forward_cuda(to_device(np.ones((2, 4, 3, 8))), f)
    with pytest.raises(ValueError, match="shape"):
        rope_forward_cuda(to_device(np.ones((4, 3, 8), np.float32)), f)
    with pytest.raises(ValueError, match="even"):
        rope_forward_cuda(to_device(np.ones((2, 4, 3, 7), np.float32)), f)
    with pytest.raises(ValueError, match="freqs_cis"):
        rope_backward_cuda(x, to_device(precompute_freqs_cis(8, 5)))
    with pytest.raises(ValueError, match="out"):
        rope_forward_cuda(x, f, out=to_device(np.ones((2, 4, 3, 6), np.float32)))
    with pytest.raises(ValueError, match="C-contiguous"):
        rope_forward_cuda(to_device(np.ones((2, 4, 3, 16), np.float32))[..., ::2], f)
    with pytest.raises(ValueError, match="block_size"):
        rope_forward_cuda(x, f, block_size=0)


@pytest.mark.skipif(not device.on_gpu(), reason="only a GPU backend refuses NumPy arrays")
def test_launchers_reject_numpy_on_gpu():
    with pytest.raises(TypeError, match="CuPy"):
        rope_forward_cuda(np.ones((1, 2, 1, 8), np.float32), precompute_freqs_cis(8, 2))


# ---------------------------------------------------------------------------------------------------------
# Exercise 15.3: the NumPy backward


def _backward(kind=None):
    def rope_backward(dout, freqs_cis):
        cos, sin = freqs_cis[None, :, None, :, 0], freqs_cis[None, :, None, :, 1]
        if kind == "sign":
            sin = -sin
        elif kind == "swap":
            cos, sin = sin, cos
        elif kind == "position":         # angles computed afresh, positions counted from 1
            T, half = freqs_cis.shape[:2]
            hs = 2 * half
            angle = np.arange(1, T + 1)[:, None] * 100.0 ** (-np.arange(0, hs, 2) / hs)
            cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
        if kind == "rotate_half":
            half = dout.shape[-1] // 2
            d0, d1 = dout[..., :half], dout[..., half:]
        else:
            d0, d1 = dout[..., 0::2], dout[..., 1::2]
        dinp = np.empty_like(dout)
        a, b = d0 * cos + d1 * sin, -d0 * sin + d1 * cos
        if kind == "rotate_half":
            return np.concatenate([a, b], axis=-1)
        dinp[..., 0::2], dinp[..., 1::2] = a, b
        return dinp
    return rope_backward


def test_check_backward_passes_on_solution(capsys):
    checks.check_rope_backward(_backward())
    checks.check_rope_backward(rope_backward)
    checks.check_rope_backward(lambda dout, f: rope_forward(dout, f * [1.0, -1.0]))   # the forward by -angle
    assert capsys.readouterr().out.count("Exercise 15.3: correct") == 3


def test_check_backward_fails_on_stub_and_float32():
    def stub(dout, freqs_cis):
        raise NotImplementedError("Exercise 15.3: write rope_backward")
    with pytest.raises(AssertionError, match="Exercise 15.3 is not done yet"):
        checks.check_rope_backward(stub)
    with pytest.raises(AssertionError, match="returned float32"):
        checks.check_rope_backward(lambda dout, f: _backward()(dout, f).astype(np.float32))


@pytest.mark.parametrize("kind,cause", [
    ("sign", "that is the forward rotation"), ("rotate_half", "rotate_half"),
    ("position", "the angle of the next position"), ("swap", "cos and sin were swapped"),
])
def test_check_backward_names_mistakes(kind, cause):
    with pytest.raises(AssertionError, match="likely cause: .*" + cause):
        checks.check_rope_backward(_backward(kind))


# ---------------------------------------------------------------------------------------------------------
# Exercise 15.4: the backward kernel's body

HEAD = """extern "C" __global__ void rope_backward_kernel(float* dinp, const float* dout, const float* freqs_cis,
                                                int B, int T, int NH, int hs) {
    int half = hs / 2;
    int p = blockIdx.x * blockDim.x + threadIdx.x;
"""
GOOD = HEAD + """    if (p >= B * T * NH * half) { return; }
    int i = p % half;
    int t = (p / (NH * half)) % T;
    float cos_a = freqs_cis[(t * half + i) * 2];
    float sin_a = freqs_cis[(t * half + i) * 2 + 1];
    float d0 = dout[2 * p];
    float d1 = dout[2 * p + 1];
    dinp[2 * p] = d0 * cos_a + d1 * sin_a;
    dinp[2 * p + 1] = -d0 * sin_a + d1 * cos_a;
}
"""


def test_check_kernel_passes_on_solution_and_package_source(capsys):
    checks.check_rope_backward_kernel(GOOD)
    checks.check_rope_backward_kernel(kernel_source("rope.cu"))
    assert capsys.readouterr().out.count("Exercise 15.4: correct") == 2


def test_check_kernel_fails_on_stub():
    stub = HEAD + "    // TODO (Exercise 15.4): the inverse rotation of the pair this thread owns\n}\n"
    with pytest.raises(AssertionError, match="(?s)Exercise 15.4 .*never written"):
        checks.check_rope_backward_kernel(stub)


@pytest.mark.parametrize("old,new,cause", [
    ("dinp[2 * p] = d0 * cos_a + d1 * sin_a;\n    dinp[2 * p + 1] = -d0 * sin_a + d1 * cos_a;",
     "dinp[2 * p] = d0 * cos_a - d1 * sin_a;\n    dinp[2 * p + 1] = d0 * sin_a + d1 * cos_a;",
     "that is the forward rotation"),
    ("int t = (p / (NH * half)) % T;", "int t = (p / (NH * half)) % T + 1;", "the angle of the next position"),
    ("int t = (p / (NH * half)) % T;", "int t = (p / half) % T;", "forgets the NH heads|sit the NH heads"),
    ("if (p >= B * T * NH * half) { return; }", "", "wrote past the end"),
])
def test_check_kernel_names_mistakes(old, new, cause):
    assert old in GOOD
    with pytest.raises(AssertionError, match=cause):
        checks.check_rope_backward_kernel(GOOD.replace(old, new))


def test_check_kernel_names_wrong_pairing():
    src = GOOD.replace("float d0 = dout[2 * p];\n    float d1 = dout[2 * p + 1];",
                       "int base = p - i;  // the head's first pair\n"
                       "    float d0 = dout[2 * base + i];\n    float d1 = dout[2 * base + i + half];")
    src = src.replace("dinp[2 * p] =", "dinp[2 * base + i] =")
    src = src.replace("dinp[2 * p + 1] =", "dinp[2 * base + i + half] =")
    with pytest.raises(AssertionError, match="rotate_half"):
        checks.check_rope_backward_kernel(src)


# ---------------------------------------------------------------------------------------------------------
# bf16 kernel: outputs allocated full of NaN (poisoned_allocations), against the float64 reference of the same
# bf16 inputs, rounded once


@pytest.mark.parametrize("block_size,shape", [(32, (2, 7, 3, 10)), (96, (3, 5, 2, 64)), (256, (1, 33, 5, 6))])
def test_bf16_kernel_matches_reference(block_size, shape, poisoned_allocations):
    gen = np.random.default_rng(block_size)
    x = to_bf16(gen.standard_normal(shape).astype(np.float32))
    f = precompute_freqs_cis(shape[-1], shape[1])
    got = to_host(rope_forward_bf16_cuda(to_device(x), to_device(f), block_size=block_size))
    want = rope_forward_bf16(x, f)
    np.testing.assert_allclose(from_bf16(got), from_bf16(want), rtol=2 ** -7, atol=1e-6)
    assert np.mean(got == want) > 0.98
    back = to_host(rope_backward_bf16_cuda(to_device(x), to_device(f), block_size=block_size))
    want = to_bf16(rope_backward(from_bf16(x).astype(np.float64), f.astype(np.float64)).astype(np.float32))
    np.testing.assert_allclose(from_bf16(back), from_bf16(want), rtol=2 ** -7, atol=1e-6)


def test_bf16_launchers_work_in_place_and_reject_bad_input():
    x = to_device(to_bf16(np.random.default_rng(0).standard_normal((1, 4, 2, 8)).astype(np.float32)))
    f = to_device(precompute_freqs_cis(8, 4))
    assert rope_forward_bf16_cuda(x, f, out=x) is x
    with pytest.raises(TypeError, match="dtype uint16"):
        rope_forward_bf16_cuda(to_device(np.ones((1, 4, 2, 8), np.float32)), f)
    with pytest.raises(TypeError, match="dtype uint16"):
        rope_backward_bf16_cuda(x, f, out=to_device(np.ones((1, 4, 2, 8), np.float32)))


# ---------------------------------------------------------------------------------------------------------
# In place on qkv (B, T, (NH + 2 NKV) hs): q's and k's heads rotated, v's untouched


def _qkv_reference(qkv, f, NH, NKV, rotate):
    B, T, W = qkv.shape
    hs = W // (NH + 2 * NKV)
    heads = qkv.reshape(B, T, NH + 2 * NKV, hs).copy()
    heads[:, :, :NH + NKV] = rotate(heads[:, :, :NH + NKV], f)
    return heads.reshape(B, T, W)


@pytest.mark.parametrize("NH,NKV,hs,block_size", [(4, 4, 8, 32), (6, 2, 10, 96), (3, 1, 6, 256)])
def test_qkv_kernels_rotate_q_and_k_in_place(NH, NKV, hs, block_size):
    gen = np.random.default_rng(NH * 10 + NKV)
    B, T = 2, 7
    qkv = gen.standard_normal((B, T, (NH + 2 * NKV) * hs)).astype(np.float32)
    f = precompute_freqs_cis(hs, T)
    d = to_device(qkv.copy())
    assert rope_qkv_forward_cuda(d, to_device(f), NH, NKV, block_size=block_size) is d
    np.testing.assert_allclose(to_host(d), _qkv_reference(qkv, f, NH, NKV, rope_forward), atol=1e-6)
    rope_qkv_backward_cuda(d, to_device(f), NH, NKV, block_size=block_size)
    np.testing.assert_allclose(to_host(d), qkv, atol=1e-5)          # the inverse: back where it started
    bits = to_bf16(qkv)
    db = to_device(bits.copy())
    rope_qkv_forward_bf16_cuda(db, to_device(f), NH, NKV, block_size=block_size)
    want = to_bf16(_qkv_reference(from_bf16(bits).astype(np.float64), f.astype(np.float64), NH, NKV,
                                  rope_forward).astype(np.float32))
    np.testing.assert_allclose(from_bf16(to_host(db)), from_bf16(want), rtol=2 ** -7, atol=1e-6)
    np.testing.assert_array_equal(to_host(db)[..., (NH + NKV) * hs:], bits[..., (NH + NKV) * hs:])   # v untouched
    rope_qkv_backward_bf16_cuda(db, to_device(f), NH, NKV, block_size=block_size)
    np.testing.assert_allclose(from_bf16(to_host(db)), from_bf16(bits), rtol=2 ** -6, atol=1e-2)


def test_qkv_launchers_reject_bad_input():
    qkv, f = to_device(np.ones((2, 4, 6 * 8), np.float32)), to_device(precompute_freqs_cis(8, 4))
    with pytest.raises(ValueError, match=r"\(NH \+ 2 NKV\) \* hs"):
        rope_qkv_forward_cuda(qkv, f, 3, 2)
    with pytest.raises(ValueError, match="freqs_cis"):
        rope_qkv_forward_cuda(qkv, to_device(precompute_freqs_cis(8, 5)), 4, 1)
    with pytest.raises(TypeError, match="NKV must be an int"):
        rope_qkv_backward_cuda(qkv, f, 4, 1.0)
    with pytest.raises(TypeError, match="dtype uint16"):
        rope_qkv_forward_bf16_cuda(qkv, f, 4, 1)
