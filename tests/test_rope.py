"""Lesson 15, rotary position embeddings: the NumPy reference against Meta's complex form and finite
differences."""
from __future__ import annotations

import numpy as np
import pytest

from llmc_lessons.gradcheck import gradcheck
from llmc_lessons.layers.rope import precompute_freqs_cis, rope_backward, rope_forward

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
