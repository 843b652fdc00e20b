"""SwiGLU, the gated MLP nonlinearity of LLaMA (lesson 15).

GPT-2's MLP is fcproj(gelu(fc(x))). LLaMA's has two input matmuls, a gate and an "up" projection, both
(C -> H), and multiplies them after passing the gate through SiLU:

    out = up * silu(gate),   silu(g) = g * sigmoid(g),   sigmoid(g) = 1 / (1 + exp(-g))

As in llm.c, the two projections are one matmul with a (2H, C) weight whose output inp (B, T, 2H) holds
up = inp[..., :H] then gate = inp[..., H:]; out is (B, T, H). The third matmul projects H back to C.

Backward, with s = sigmoid(gate):

    dup   = dout * silu(gate)
    dgate = dout * up * silu'(gate),   silu'(g) = s + g s (1 - s) = s (1 + g (1 - s))

Read top-down: the NumPy forward and backward references, then the launchers of `kernels/swiglu.cu`, float32
then bf16.
"""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.layers.bf16 import launch_1d
from llmc_lessons.precision import from_bf16, to_bf16

# ---------------------------------------------------------------------------------------------------------
# NumPy reference


def _split(where: str, inp):
    inp = np.asarray(inp)
    if not np.issubdtype(inp.dtype, np.floating):
        raise TypeError(f"{where}: inp must be a float32 or float64 array, got dtype {inp.dtype}")
    if inp.ndim < 1 or inp.shape[-1] % 2:
        raise ValueError(f"{where}: inp must have shape (..., 2H), up then gate; got {inp.shape}")
    H = inp.shape[-1] // 2
    return inp[..., :H], inp[..., H:]


def sigmoid(x):
    """1 / (1 + exp(-x)), elementwise, without overflow for large |x|, in the dtype of x."""
    x = np.asarray(x)
    e = np.exp(-np.abs(x))                                     # in (0, 1]: never overflows
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


def swiglu_forward(inp):
    """(B, T, 2H) holding up then gate -> out (B, T, H) = up * silu(gate), in the dtype of inp."""
    up, gate = _split("swiglu_forward", inp)
    return up * (gate * sigmoid(gate))


def swiglu_backward(dout, inp):
    """dout (B, T, H), inp (B, T, 2H) -> dinp (B, T, 2H): [dup, dgate] = [dout silu(gate), dout up silu'(gate)]."""
    up, gate = _split("swiglu_backward", inp)
    dout = np.asarray(dout)
    if dout.shape != up.shape:
        raise ValueError(f"swiglu_backward: dout must have shape {up.shape} (inp's with half the last axis), "
                         f"got {dout.shape}")
    s = sigmoid(gate)
    silu = gate * s
    dsilu = s * (1 + gate * (1 - s))                          # d/dg [g s(g)] = s + g s (1 - s)
    return np.concatenate([dout * silu, dout * up * dsilu], axis=-1)


# ---------------------------------------------------------------------------------------------------------
# Kernel launchers (kernels/swiglu.cu): backend arrays in (CuPy on a GPU, NumPy + the emulator on a CPU),
# fresh backend arrays out


def _require_inp(inp, dtype=np.float32):
    device.require_array("inp", inp, shape=(None, None, None), dtype=dtype)
    if inp.shape[-1] % 2:
        raise ValueError(f"inp must have shape (B, T, 2H), up then gate: its last axis must be even, got {inp.shape}")
    B, T, H2 = inp.shape
    return B, T, H2 // 2


def swiglu_forward_cuda(inp, block_size: int = 256):
    """(B, T, 2H) float32, up then gate -> out (B, T, H) through swiglu_forward_kernel (a thread per output)."""
    B, T, H = _require_inp(inp)
    block_size = device.require_block_size(block_size)
    out = device.xp.empty((B, T, H), np.float32)
    launch_1d("swiglu.cu", "swiglu_forward_kernel", out.size, block_size,
              (out, inp, np.int32(B * T), np.int32(H)))
    return out


def swiglu_backward_cuda(dout, inp, block_size: int = 256):
    """dout (B, T, H), inp (B, T, 2H) float32 -> dinp (B, T, 2H) = [dup, dgate] through swiglu_backward_kernel."""
    B, T, H = _require_inp(inp)
    device.require_array("dout", dout, shape=(B, T, H))
    block_size = device.require_block_size(block_size)
    dinp = device.xp.empty((B, T, 2 * H), np.float32)
    launch_1d("swiglu.cu", "swiglu_backward_kernel", dout.size, block_size,
              (dinp, dout, inp, np.int32(B * T), np.int32(H)))
    return dinp


# ---------------------------------------------------------------------------------------------------------
# bf16: launchers of the bf16 kernels in kernels/swiglu.cu (bf16 arrays are uint16 arrays of the bits)


def swiglu_forward_bf16(inp_bits):
    """Reference of swiglu_forward_bf16_kernel: bf16 bits in, computed in float64, rounded once to bf16."""
    return to_bf16(swiglu_forward(from_bf16(inp_bits).astype(np.float64)).astype(np.float32))


def swiglu_backward_bf16(dout_bits, inp_bits):
    """Reference of swiglu_backward_bf16_kernel: bf16 bits in, computed in float64, rounded once to bf16."""
    return to_bf16(swiglu_backward(from_bf16(dout_bits).astype(np.float64), from_bf16(inp_bits).astype(np.float64))
                   .astype(np.float32))


def swiglu_forward_bf16_cuda(inp, block_size: int = 256):
    """(B, T, 2H) bf16 bits, up then gate -> out (B, T, H) bf16 bits through swiglu_forward_bf16_kernel."""
    B, T, H = _require_inp(inp, np.uint16)
    block_size = device.require_block_size(block_size)
    out = device.xp.empty((B, T, H), np.uint16)
    launch_1d("swiglu.cu", "swiglu_forward_bf16_kernel", out.size, block_size,
              (out, inp, np.int32(B * T), np.int32(H)))
    return out


def swiglu_backward_bf16_cuda(dout, inp, block_size: int = 256):
    """dout (B, T, H), inp (B, T, 2H) bf16 bits -> dinp (B, T, 2H) bf16 bits through swiglu_backward_bf16_kernel."""
    B, T, H = _require_inp(inp, np.uint16)
    device.require_array("dout", dout, shape=(B, T, H), dtype=np.uint16)
    block_size = device.require_block_size(block_size)
    dinp = device.xp.empty((B, T, 2 * H), np.uint16)
    launch_1d("swiglu.cu", "swiglu_backward_bf16_kernel", dout.size, block_size,
              (dinp, dout, inp, np.int32(B * T), np.int32(H)))
    return dinp
