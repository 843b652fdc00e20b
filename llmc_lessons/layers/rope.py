"""Rotary position embeddings (RoPE), LLaMA's positions (lesson 15): q and k are rotated, wpe is gone.

Each head's hs channels are hs/2 pairs. Pair i of the vector at position t is turned by the angle

    angle(t, i) = t * theta^(-2i / hs),   theta = 10000

    out[2i]     = x[2i] cos(angle) - x[2i+1] sin(angle)
    out[2i + 1] = x[2i] sin(angle) + x[2i+1] cos(angle)

The pairs are neighbouring channels (2i, 2i+1), as in Meta's LLaMA (which multiplies by complex numbers
made of the pairs) and llm.c; Hugging Face's checkpoints pair channel i with i + hs/2 instead (rotate_half),
with their q and k weights permuted to match. The two are the same model up to that permutation, but
weights and kernels of one do not work with the other.

The dot product of a rotated q at position t and a rotated k at position s depends on t - s only: attention
sees relative positions. A rotation keeps lengths, and its inverse is its transpose, the rotation by
-angle: so the backward is the same formula with sin negated.

Shapes: inp, out (B, T, NH, hs) (q or k split into heads, llm.c's layout); freqs_cis (T, hs/2, 2), for each
position and pair [cos(angle), sin(angle)], made once by precompute_freqs_cis (llm.c's name). A model
generating from position `start` passes freqs_cis[start:start + T].

Read top-down: the NumPy table, forward and backward, then the launchers of `kernels/rope.cu`: float32 on
(B, T, NH, hs) arrays, float32 in place on q and k inside the qkv matmul's output (B, T, (NH + 2 NKV) hs), then
bf16.
"""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.layers.bf16 import launch_1d
from llmc_lessons.precision import from_bf16, to_bf16

ROPE_THETA = 10000.0

# ---------------------------------------------------------------------------------------------------------
# NumPy reference


def precompute_freqs_cis(hs: int, T: int, theta: float = ROPE_THETA, dtype=np.float32) -> np.ndarray:
    """(T, hs/2, 2): [cos, sin] of angle(t, i) = t * theta^(-2i/hs), computed in float64, returned in `dtype`."""
    if isinstance(hs, bool) or not isinstance(hs, (int, np.integer)) or hs < 2 or hs % 2:
        raise ValueError(f"hs (channels per head) must be a positive even int, got {hs!r}")
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 0:
        raise ValueError(f"T (positions) must be an int >= 0, got {T!r}")
    inv_freq = float(theta) ** (-np.arange(0, hs, 2, dtype=np.float64) / hs)   # (hs/2,): theta^(-2i/hs)
    angle = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]      # (T, hs/2)
    return np.stack([np.cos(angle), np.sin(angle)], axis=-1).astype(dtype)


def _check_shapes(where: str, x, freqs_cis):
    x, freqs_cis = np.asarray(x), np.asarray(freqs_cis)
    if x.ndim != 4 or x.shape[-1] % 2:
        raise ValueError(f"{where}: the input must have shape (B, T, NH, hs) with hs even, got {x.shape}")
    B, T, NH, hs = x.shape
    if freqs_cis.shape != (T, hs // 2, 2):
        raise ValueError(f"{where}: freqs_cis must have shape (T, hs/2, 2) = {(T, hs // 2, 2)}, got "
                         f"{freqs_cis.shape}; slice the table to the positions of this input")
    return x, freqs_cis


def _rotate(x, freqs_cis, sign):
    """x (B, T, NH, hs) with each pair (x[2i], x[2i+1]) turned by sign * angle(t, i)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]                        # (B, T, NH, hs/2): the pairs' two halves
    cos = freqs_cis[None, :, None, :, 0]                       # (1, T, 1, hs/2): broadcast over B and NH
    sin = sign * freqs_cis[None, :, None, :, 1]
    out = np.empty(np.broadcast_shapes(x.shape, cos.shape[:-1] + (x.shape[-1],)),
                   np.result_type(x, freqs_cis))
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def rope_forward(inp, freqs_cis):
    """inp (B, T, NH, hs), freqs_cis (T, hs/2, 2) -> out (B, T, NH, hs): each pair rotated by angle(t, i)."""
    inp, freqs_cis = _check_shapes("rope_forward", inp, freqs_cis)
    return _rotate(inp, freqs_cis, 1)


def rope_backward(dout, freqs_cis):
    """dout (B, T, NH, hs), freqs_cis (T, hs/2, 2) -> dinp (B, T, NH, hs): the inverse rotation, by -angle(t, i).

    out = R x for an orthogonal R, so dinp = R^T dout = R^-1 dout; no cache beyond the table is needed."""
    dout, freqs_cis = _check_shapes("rope_backward", dout, freqs_cis)
    return _rotate(dout, freqs_cis, -1)


# ---------------------------------------------------------------------------------------------------------
# Kernel launchers (kernels/rope.cu): backend arrays in (CuPy on a GPU, NumPy + the emulator on a CPU)


def _launch(kernel: str, x, freqs_cis, out, block_size, direction=None):
    dtype = np.float32 if direction is None else np.uint16
    device.require_array("the input", x, shape=(None, None, None, None), dtype=dtype)
    B, T, NH, hs = x.shape
    if hs % 2:
        raise ValueError(f"hs (the last axis) must be even: RoPE turns pairs of channels, got {x.shape}")
    device.require_array("freqs_cis", freqs_cis, shape=(T, hs // 2, 2))
    out = device.xp.empty_like(x) if out is None else device.require_array("out", out, shape=x.shape, dtype=dtype)
    block_size = device.require_block_size(block_size)
    pairs = x.size // 2
    args = (out, x, freqs_cis, np.int32(B), np.int32(T), np.int32(NH), np.int32(hs))
    if direction is not None:
        args += (np.float32(direction),)
    launch_1d("rope.cu", kernel, pairs, block_size, args)
    return out


def rope_forward_cuda(inp, freqs_cis, out=None, block_size: int = 256):
    """inp (B, T, NH, hs), freqs_cis (T, hs/2, 2) float32 -> out (B, T, NH, hs) through rope_forward_kernel (a
    thread per pair); into `out` if given, which may be inp itself (in place)."""
    return _launch("rope_forward_kernel", inp, freqs_cis, out, block_size)


def rope_backward_cuda(dout, freqs_cis, out=None, block_size: int = 256):
    """dout (B, T, NH, hs), freqs_cis (T, hs/2, 2) float32 -> dinp (B, T, NH, hs) through rope_backward_kernel;
    into `out` if given, which may be dout itself (in place)."""
    return _launch("rope_backward_kernel", dout, freqs_cis, out, block_size)


def _rope_qkv_cuda(kernel, qkv, freqs_cis, NH, NKV, block_size, dtype, direction):
    """Launch `kernel` (rope_qkv_kernel or its bf16 twin) in place on qkv (B, T, (NH + 2 NKV) hs)."""
    NH, NKV = device.require_int("NH", NH), device.require_int("NKV", NKV)
    device.require_array("qkv", qkv, shape=(None, None, None), dtype=dtype)
    B, T, W = qkv.shape
    heads = NH + 2 * NKV
    if W % heads or (W // heads) % 2:
        raise ValueError(f"qkv's last axis ({W}) must be (NH + 2 NKV) * hs = {heads} * hs with hs even")
    hs = W // heads
    device.require_array("freqs_cis", freqs_cis, shape=(T, hs // 2, 2))
    block_size = device.require_block_size(block_size)
    pairs = B * T * (NH + NKV) * (hs // 2)
    launch_1d("rope.cu", kernel, pairs, block_size, (qkv, freqs_cis, np.int32(B), np.int32(T), np.int32(NH + NKV),
                                                     np.int32(heads), np.int32(hs), np.float32(direction)))
    return qkv


def rope_qkv_forward_cuda(qkv, freqs_cis, NH: int, NKV: int, block_size: int = 256):
    """qkv (B, T, (NH + 2 NKV) hs) float32, freqs_cis (T, hs/2, 2): q's NH and k's NKV heads rotated in place
    (v unchanged) through rope_qkv_kernel; returns qkv."""
    return _rope_qkv_cuda("rope_qkv_kernel", qkv, freqs_cis, NH, NKV, block_size, np.float32, 1.0)


def rope_qkv_backward_cuda(dqkv, freqs_cis, NH: int, NKV: int, block_size: int = 256):
    """dqkv (B, T, (NH + 2 NKV) hs) float32: dq and dk turned back by the inverse rotation in place (dv
    unchanged); returns dqkv."""
    return _rope_qkv_cuda("rope_qkv_kernel", dqkv, freqs_cis, NH, NKV, block_size, np.float32, -1.0)


# ---------------------------------------------------------------------------------------------------------
# bf16: launchers of rope_bf16_kernel and rope_qkv_bf16_kernel (bf16 arrays are uint16 arrays of the bits; the
# table stays float32)


def rope_forward_bf16(inp_bits, freqs_cis):
    """Reference of rope_bf16_kernel forward: bf16 bits in, rotated in float64, rounded once to bf16."""
    return to_bf16(rope_forward(from_bf16(inp_bits).astype(np.float64), np.asarray(freqs_cis, np.float64))
                   .astype(np.float32))


def rope_forward_bf16_cuda(inp, freqs_cis, out=None, block_size: int = 256):
    """inp (B, T, NH, hs) bf16 bits, freqs_cis (T, hs/2, 2) float32 -> out bf16 bits (into `out`, maybe inp)."""
    return _launch("rope_bf16_kernel", inp, freqs_cis, out, block_size, direction=1.0)


def rope_backward_bf16_cuda(dout, freqs_cis, out=None, block_size: int = 256):
    """dout (B, T, NH, hs) bf16 bits, freqs_cis (T, hs/2, 2) float32 -> dinp bf16 bits: the inverse rotation."""
    return _launch("rope_bf16_kernel", dout, freqs_cis, out, block_size, direction=-1.0)


def rope_qkv_forward_bf16_cuda(qkv, freqs_cis, NH: int, NKV: int, block_size: int = 256):
    """rope_qkv_forward_cuda on bf16 bits: q's and k's heads of qkv rotated in place; returns qkv."""
    return _rope_qkv_cuda("rope_qkv_bf16_kernel", qkv, freqs_cis, NH, NKV, block_size, np.uint16, 1.0)


def rope_qkv_backward_bf16_cuda(dqkv, freqs_cis, NH: int, NKV: int, block_size: int = 256):
    """rope_qkv_backward_cuda on bf16 bits: dq and dk turned back in place; returns dqkv."""
    return _rope_qkv_cuda("rope_qkv_bf16_kernel", dqkv, freqs_cis, NH, NKV, block_size, np.uint16, -1.0)
