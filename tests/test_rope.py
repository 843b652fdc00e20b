"""Lesson 15, rotary position embeddings: the NumPy reference against Meta's complex form and finite
differences."""
from __future__ import annotations

import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.checks import poisoned
from llmc_lessons.cuda import load_kernel
from llmc_lessons.device import to_device, to_host
from llmc_lessons.gradcheck import gradcheck
from llmc_lessons.layers.rope import (precompute_freqs_cis, rope_backward, rope_backward_cuda, rope_forward,
                                      rope_forward_cuda)

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
