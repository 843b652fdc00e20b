"""Numeric precision: bfloat16 conversions and rounding (lesson 14), and cuBLAS's TF32 switch (lesson 4).

NumPy has no bf16 type, so bf16 arrays are uint16 arrays holding the bits (the top half of a float32),
exactly as the kernels see them. The TF32 switch is process-wide: it decides how every float32 product
through cuBLAS (llmc_lessons.cublas) is computed, for the layers, the model and the trainer alike.

This module sits low in the package (above `device` only): cuBLAS, the layers and the trainer all read
their conversions and the setting here, and none of them needs another for it.
"""
from __future__ import annotations

import contextlib

import numpy as np

from llmc_lessons import device

# ---------------------------------------------------------------------------------------------------------
# bfloat16: conversions and rounding


def _float32(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    return a if a.flags.c_contiguous else a.copy()


def to_bf16(x) -> np.ndarray:
    """float32 values -> uint16 bf16 bits, rounding to nearest with ties to even; NaN -> 0x7FFF."""
    u = _float32(x).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where((u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000), np.uint16(0x7FFF), rounded)


def from_bf16(h, out=None):
    """uint16 bf16 bits -> float32 values (exact). A backend (GPU) array stays on its device. out: a float32 array
    of h's size (and kind) to write them into, in place (no temporary arrays); it is returned."""
    xp = device.xp if isinstance(h, device.xp.ndarray) else np
    if out is None:
        return (xp.asarray(h, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    if getattr(out, "dtype", None) != np.float32 or out.shape != np.shape(h):
        raise ValueError(f"from_bf16: out must be a float32 array of shape {np.shape(h)}, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
    bits = out.view(np.uint32)
    bits[...] = h
    bits <<= 16
    return out


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


# ---------------------------------------------------------------------------------------------------------
# TF32: cuBLAS's tensor-core mode for float32 matmuls
#
# On Ampere and later GPUs (compute capability >= 8.0) cuBLAS can compute a float32 product on tensor cores
# in TF32: each input is rounded to a 10-bit mantissa (about 3 decimal digits), products are added in
# float32. Roughly 7-8x the FP32 throughput on an H100, at a relative error near 1e-3 instead of 1e-6.
#
# How CuPy chooses (cupy/_core/_routines_linalg.pyx): `get_compute_type(dtype)` keeps one cached compute
# type per dtype in a module-level list. The first float32 matmul resolves it from the environment variable
# CUPY_TF32 (>0 means COMPUTE_TYPE_TF32, else COMPUTE_TYPE_DEFAULT) and caches it, so changing os.environ
# afterwards does nothing. `set_compute_type(dtype, compute_type)` overwrites the cached entry and is read on
# every call of the 2-D product path (`dot` -> `tensordot_core` -> cublasGemmEx with
# CUBLAS_COMPUTE_32F_FAST_TF32 or CUBLAS_COMPUTE_32F), so it switches at run time. Two caveats: the batched
# path of `cupy.matmul` (arrays of 3 or more dimensions) passes CUDA_R_32F as its compute type and does not
# read this setting, so the launchers of layers/matmul.py always multiply
# 2-D views; and NVIDIA_TF32_OVERRIDE=0 in the
# environment disables TF32 inside cuBLAS whatever CuPy asks.


def round_tf32(x) -> np.ndarray:
    """float32 -> the nearest TF32 value (10 mantissa bits, ties away from zero), as float32: what cvt.rna.tf32.f32
    gives the TF32 flash attention kernels (mma.cuh's tf32_bits). Infinity and NaN pass unchanged."""
    u = _float32(x).view(np.uint32)
    finite = (u & np.uint32(0x7F800000)) != np.uint32(0x7F800000)
    with np.errstate(over="ignore"):
        rounded = np.where(finite, (u + np.uint32(0x1000)) & np.uint32(0xFFFFE000), u)
    return rounded.astype(np.uint32).view(np.float32)


def _cupy_linalg():
    """CuPy's module that holds the matmul compute type (its path has moved between CuPy versions)."""
    try:
        from cupy._core import _routines_linalg as linalg
    except ImportError:  # pragma: no cover - a later source layout
        from cupy._core._gpu import _routines_linalg as linalg
    return linalg


def tf32_enabled() -> bool:
    """True when float32 matmuls through CuPy (version="cublas") use TF32 tensor cores; always False on a CPU."""
    if not device.on_gpu():
        return False
    linalg = _cupy_linalg()
    return int(linalg.get_compute_type(np.float32)) == int(linalg.COMPUTE_TYPE_TF32)


def set_tf32(enabled: bool) -> bool:
    """Switch TF32 for float32 cuBLAS matmuls on or off now; return the previous setting. A no-op on a CPU.

    On a GPU older than compute capability 8.0 CuPy warns and stays in FP32.
    """
    if not isinstance(enabled, (bool, np.bool_)):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    previous = tf32_enabled()
    if device.on_gpu():
        linalg = _cupy_linalg()
        linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT)
    return previous


@contextlib.contextmanager
def tf32(enabled: bool = True):
    """`with tf32(True): ...` runs the block with TF32 matmuls (or without, for False), then restores the setting."""
    previous = set_tf32(enabled)
    try:
        yield
    finally:
        set_tf32(previous)
