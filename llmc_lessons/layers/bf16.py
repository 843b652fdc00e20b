"""bfloat16 (lesson 14): conversions, references and the launchers of kernels/bf16.cu.

NumPy has no bf16 type, so bf16 arrays are uint16 arrays holding the bits (the top half of a float32),
exactly as the kernels see them.
"""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.layers.gelu import gelu_forward
from llmc_lessons.layers.layernorm import layernorm_forward


def _float32(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    return a if a.flags.c_contiguous else a.copy()


def to_bf16(x) -> np.ndarray:
    """float32 values -> uint16 bf16 bits, rounding to nearest with ties to even; NaN -> 0x7FFF."""
    u = _float32(x).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where((u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000), np.uint16(0x7FFF), rounded)


def from_bf16(h) -> np.ndarray:
    """uint16 bf16 bits -> float32 values (exact)."""
    return (np.asarray(h, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_bf16(x) -> np.ndarray:
    """float32 -> the nearest bf16 value, as float32."""
    return from_bf16(to_bf16(x))


def hash32(seed: int, i) -> np.ndarray:
    """The kernels' 32-bit hash of (seed, index): the random bits of stochastic rounding."""
    with np.errstate(over="ignore"):
        h = np.uint32(seed) ^ (np.asarray(i, dtype=np.uint32) * np.uint32(0x9E3779B9))
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
    return h


def stochastic_to_bf16(x, seed: int) -> np.ndarray:
    """float32 -> bf16 bits, rounded up with probability (dropped bits) / 2^16 so the expected value is x."""
    u = _float32(x).view(np.uint32)
    noise = hash32(seed, np.arange(u.size, dtype=np.uint32)).reshape(u.shape) & np.uint32(0xFFFF)
    with np.errstate(over="ignore"):
        return ((u + noise) >> np.uint32(16)).astype(np.uint16)


def gelu_forward_bf16(inp_bits) -> np.ndarray:
    """Reference of gelu_forward_bf16_kernel: bf16 in, float32 math, bf16 out."""
    return to_bf16(gelu_forward(from_bf16(inp_bits)))


def layernorm_forward_bf16(inp_bits, weight, bias):
    """Reference of layernorm_forward_bf16_kernel: (out bits, mean, rstd) with float32 statistics."""
    out, mean, rstd = layernorm_forward(from_bf16(inp_bits).astype(np.float64), weight.astype(np.float64),
                                        bias.astype(np.float64))
    return to_bf16(out.astype(np.float32)), mean.astype(np.float32), rstd.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Launchers

def _block(block_size):
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or not 1 <= block_size <= 1024:
        raise ValueError(f"block_size must be an int in 1..1024, got {block_size!r}")
    return int(block_size)


def gelu_forward_bf16_cuda(inp, block_size: int = 256, version: int = 1):
    """uint16 bf16 bits (any shape) -> gelu of them, bf16 bits, through gelu_forward_bf16_kernel (version 1,
    a thread per value) or gelu_forward_bf16_kernel2 (version 2, 8 values per thread in 128-bit accesses;
    needs inp.size % 8 == 0)."""
    from llmc_lessons.cuda import load_kernel
    device.require_array("inp", inp, dtype=np.uint16)
    block_size = _block(block_size)
    out = device.xp.empty_like(inp)
    if version == 1:
        if inp.size:
            load_kernel("bf16.cu", "gelu_forward_bf16_kernel")(
                (-(-inp.size // block_size),), (block_size,), (out, inp, np.int32(inp.size)))
    elif version == 2:
        if inp.size % 8:
            raise ValueError(f"version=2 moves 8 bf16 values (16 bytes) at a time: inp.size must be a multiple of 8, "
                             f"got {inp.size}; use version=1")
        n8 = inp.size // 8
        if n8:  # the kernel sees the bits as int4: 4 int32 = 8 bf16
            load_kernel("bf16.cu", "gelu_forward_bf16_kernel2")(
                (-(-n8 // block_size),), (block_size,), (out.reshape(-1).view(np.int32), inp.reshape(-1).view(np.int32),
                                                         np.int32(n8)))
    else:
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    return out


def layernorm_forward_bf16_cuda(inp, weight, bias, block_size: int = 256):
    """(B, T, C) bf16 bits, (C,), (C,) float32 -> out (B, T, C) bf16 bits, mean, rstd (B, T) float32."""
    from llmc_lessons.cuda import load_kernel
    device.require_array("inp", inp, shape=(None, None, None), dtype=np.uint16)
    B, T, C = inp.shape
    device.require_array("weight", weight, shape=(C,))
    device.require_array("bias", bias, shape=(C,))
    block_size = _block(block_size)
    if block_size % 32:
        raise ValueError(f"block_size must be a multiple of 32 (a warp per row), got {block_size}")
    xp = device.xp
    out, mean, rstd = xp.empty((B, T, C), np.uint16), xp.empty((B, T), np.float32), xp.empty((B, T), np.float32)
    if B * T:
        load_kernel("bf16.cu", "layernorm_forward_bf16_kernel")(
            (-(-(B * T) // (block_size // 32)),), (block_size,),
            (out, mean, rstd, inp, weight, bias, np.int32(B * T), np.int32(C)))
    return out, mean, rstd


def adamw_update_bf16_cuda(master, params, grads, m, v, t: int, lr: float, beta1: float = 0.9,
                           beta2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.0,
                           stochastic: bool = False, seed: int = 0, block_size: int = 512):
    """AdamW on float32 `master` weights and moments in place, then `params` (uint16) = their bf16 copy."""
    from llmc_lessons.cuda import load_kernel
    device.require_array("master", master)
    n = master.size
    device.require_array("params", params, shape=master.shape, dtype=np.uint16)
    for name, a in (("grads", grads), ("m", m), ("v", v)):
        device.require_array(name, a, shape=master.shape)
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1:
        raise ValueError(f"t counts steps from 1, got {t!r}")
    block_size = _block(block_size)
    if n:
        load_kernel("bf16.cu", "adamw_bf16_kernel")(
            (-(-n // block_size),), (block_size,),
            (master, params, grads, m, v, np.int32(n), np.float32(lr), np.float32(beta1), np.float32(beta2),
             np.float32(1 - beta1 ** t), np.float32(1 - beta2 ** t), np.float32(eps), np.float32(weight_decay),
             np.int32(bool(stochastic)), np.uint32(seed)))


def matmul_bf16(a, b, trans_b: bool = False):
    """(M, K) bf16 bits @ (K, N) bf16 bits (or (N, K) with trans_b) -> (M, N) float32, accumulated in float32.

    On a GPU: cuBLAS's gemmEx with bf16 inputs on the tensor cores. On a CPU: the same numbers in NumPy.
    """
    from llmc_lessons import cublas
    device.require_array("a", a, shape=(None, None), dtype=np.uint16)
    device.require_array("b", b, shape=(None, None), dtype=np.uint16)
    M, K = a.shape
    N = b.shape[0] if trans_b else b.shape[1]
    if (b.shape[1] if trans_b else b.shape[0]) != K:
        raise ValueError(f"inner dimensions differ: a is {a.shape}, b is {b.shape} (trans_b={trans_b})")
    if not device.on_gpu():
        bf = from_bf16(b)
        return from_bf16(a) @ (bf.T if trans_b else bf)
    return cublas.gemm_bf16(a, b, trans_b, M, N, K)

