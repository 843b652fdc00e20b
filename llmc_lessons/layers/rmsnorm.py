"""RMSNorm, LLaMA's normalisation (lesson 15): LayerNorm without the mean and without the bias.

    rstd = 1 / sqrt((1/C) sum_c x_c^2 + eps)        norm_c = x_c * rstd        out_c = norm_c * weight_c

Shapes: inp and out (B, T, C), weight (C,), rstd (B, T). eps = 1e-5, as in LLaMA.

Backward, with dnorm = dout * weight:

    dinp = rstd * (dnorm - norm * mean_c(dnorm * norm))        dweight = sum over (b, t) of dout * norm

LayerNorm's dinp has one more term, - mean_c(dnorm): it comes from the mean, which RMSNorm does not subtract.

Read top-down: the NumPy forward and backward references, then the launchers of the kernels in
`kernels/rmsnorm.cu`, float32 then bf16.
"""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.cuda import load_kernel
from llmc_lessons.layers.bf16 import (kernel_with_shared, launch_1d, require_aligned16, require_bf16_array,
                                      require_float_vector, require_multiple_of_8)
from llmc_lessons.layers.layernorm import (LAYERNORM_BACKWARD_BLOCKS, _check_shapes, column_sum_add_cuda, row_chunks,
                                          row_kernel2_version)
from llmc_lessons.precision import from_bf16, to_bf16

# ---------------------------------------------------------------------------------------------------------
# NumPy reference


def rmsnorm_forward(inp, weight, eps: float = 1e-5):
    """(B, T, C), (C,) -> out (B, T, C), rstd (B, T); rstd is kept for the backward."""
    inp, weight = np.asarray(inp), np.asarray(weight)
    _check_shapes("rmsnorm_forward", inp, weight)
    ms = (inp * inp).mean(axis=-1)                             # (B, T): the mean square, no mean subtracted
    rstd = 1.0 / np.sqrt(ms + np.asarray(eps, dtype=inp.dtype))  # (B, T): 1 / root mean square
    norm = inp * rstd[..., None]                               # (B, T, C): root mean square ~1 per row
    out = norm * weight                                        # (B, T, C): no bias
    return out, rstd


def rmsnorm_backward(dout, inp, weight, rstd):
    """(B, T, C), (B, T, C), (C,), (B, T) -> dinp (B, T, C), dweight (C,).

    dinp = rstd * (dnorm - norm * mean_c(dnorm * norm)) with dnorm = dout * weight.
    """
    dout, inp, weight, rstd = np.asarray(dout), np.asarray(inp), np.asarray(weight), np.asarray(rstd)
    _check_shapes("rmsnorm_backward", inp, weight, dout=dout, rstd=rstd)
    norm = inp * rstd[..., None]                               # (B, T, C), recomputed from the cache
    dnorm = dout * weight                                      # (B, T, C)
    dnorm_norm_mean = (dnorm * norm).mean(axis=-1, keepdims=True)  # (B, T, 1)
    dinp = rstd[..., None] * (dnorm - norm * dnorm_norm_mean)
    dweight = (dout * norm).sum(axis=(0, 1))                   # (C,): weight was used at every (b, t)
    return dinp, dweight


# ---------------------------------------------------------------------------------------------------------
# Kernel launchers (kernels/rmsnorm.cu): backend arrays in (CuPy on a GPU, NumPy + the emulator on a CPU),
# fresh backend arrays out


def _require_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    return float(eps)


def rmsnorm_forward_cuda(inp, weight, block_size: int = 256, eps: float = 1e-5):
    """(B, T, C), (C,) float32 -> out (B, T, C), rstd (B, T) through rmsnorm_forward_kernel (a warp per row)."""
    device.require_array("inp", inp, shape=(None, None, None))
    B, T, C = inp.shape
    device.require_array("weight", weight, shape=(C,))
    block_size = device.require_block_size(block_size, warps=True)
    eps = _require_eps(eps)
    xp = device.xp
    out, rstd = xp.empty((B, T, C), np.float32), xp.empty((B, T), np.float32)
    N = B * T
    if N:
        load_kernel("rmsnorm.cu", "rmsnorm_forward_kernel")(
            (-(-N // (block_size // 32)),), (block_size,), (out, rstd, inp, weight, np.int32(N), np.int32(C),
                                                            np.float32(eps)))
    return out, rstd


def rmsnorm_backward_cuda(dout, inp, weight, rstd, block_size: int = 256, param_block_size: int = 256,
                          version: int | None = None, max_blocks: int = LAYERNORM_BACKWARD_BLOCKS):
    """(B, T, C), (B, T, C), (C,), (B, T) float32 -> dinp (B, T, C), dweight (C,), fresh arrays.

    version 1: dinp through rmsnorm_backward_kernel (a warp per row, blocks of block_size threads); dweight
    through rmsnorm_param_backward_kernel (a thread per channel and chunk of rows, blocks of param_block_size
    threads) and rmsnorm_param_reduce_kernel (the chunks' sums added in order).
    version 2: both in one pass, rmsnorm_backward_kernel2 (a warp per row held in registers; at most max_blocks
    blocks, each leaving a row of partial sums), then column_sum_add_cuda. Needs C % 4 == 0, C <= 1024 and
    16-byte aligned arrays.
    None: version 2 where it fits, else 1. Every sum is in a fixed order (deterministic)."""
    device.require_array("inp", inp, shape=(None, None, None))
    B, T, C = inp.shape
    device.require_array("dout", dout, shape=(B, T, C))
    device.require_array("weight", weight, shape=(C,))
    device.require_array("rstd", rstd, shape=(B, T))
    block_size = device.require_block_size(block_size, warps=True)
    param_block_size = device.require_block_size(param_block_size, name="param_block_size")
    xp = device.xp
    N, warps = B * T, block_size // 32
    version = row_kernel2_version(version, C, block_size, (dout, inp, weight))
    if version not in (1, 2):
        raise ValueError(f"version must be 1, 2 or None, got {version!r}")
    blocks = max(1, min(device.require_int("max_blocks", max_blocks), -(-N // warps)))
    dinp = xp.empty((B, T, C), np.float32)
    dweight = xp.zeros((C,), np.float32)             # no rows: no gradient
    if N and C and version == 2:
        partial = xp.empty((blocks, C), np.float32)
        load_kernel("rmsnorm.cu", "rmsnorm_backward_kernel2")(
            (blocks,), (block_size,), (dinp, partial, dout, inp, weight, rstd, np.int32(N), np.int32(C)),
            shared_mem=4 * warps * C)
        column_sum_add_cuda(dweight, None, None, partial)
    elif N and C:
        load_kernel("rmsnorm.cu", "rmsnorm_backward_kernel")(
            (-(-N // warps),), (block_size,), (dinp, dout, inp, weight, rstd, np.int32(N), np.int32(C)))
        R = max(1, min(64, N // 64))                 # each thread sums N / R >= 64 rows
        partial = xp.empty((R, C), np.float32)
        grid_x = -(-C // param_block_size)
        load_kernel("rmsnorm.cu", "rmsnorm_param_backward_kernel")(
            (grid_x, R), (param_block_size,), (partial, dout, inp, rstd, np.int32(N), np.int32(C)))
        load_kernel("rmsnorm.cu", "rmsnorm_param_reduce_kernel")(
            (grid_x,), (param_block_size,), (dweight, partial, np.int32(R), np.int32(C)))
    return dinp, dweight


# ---------------------------------------------------------------------------------------------------------
# bf16: launchers of the bf16 kernels in kernels/rmsnorm.cu (bf16 arrays are uint16 arrays of the bits;
# rstd, weight and the input gradient that accumulates stay float32; the weight's gradient is bf16)


def rmsnorm_forward_bf16(inp_bits, weight):
    """Reference of rmsnorm_forward_bf16_kernel: (out bits, rstd float32), computed in float64, rounded once."""
    out, rstd = rmsnorm_forward(from_bf16(inp_bits).astype(np.float64), np.asarray(weight, np.float64))
    return to_bf16(out.astype(np.float32)), rstd.astype(np.float32)


def rmsnorm_forward_bf16_cuda(inp, weight, block_size: int = 256, eps: float = 1e-5):
    """(B, T, C) bf16 bits, (C,) float32 -> out (B, T, C) bf16 bits, rstd (B, T) float32, a warp per row."""
    device.require_array("inp", inp, shape=(None, None, None), dtype=np.uint16)
    B, T, C = inp.shape
    device.require_array("weight", weight, shape=(C,))
    block_size = device.require_block_size(block_size, warps=True)
    eps = _require_eps(eps)
    xp = device.xp
    out, rstd = xp.empty((B, T, C), np.uint16), xp.empty((B, T), np.float32)
    if B * T:
        load_kernel("rmsnorm.cu", "rmsnorm_forward_bf16_kernel")(
            (-(-(B * T) // (block_size // 32)),), (block_size,),
            (out, rstd, inp, weight, np.int32(B * T), np.int32(C), np.float32(eps)))
    return out, rstd


def residual_rmsnorm_forward_bf16(inp1_bits, inp2_bits, weight):
    """Reference of residual_rmsnorm_forward_bf16_kernel: (residual bits, out bits, rstd float32), the residual
    added in float32 and rounded once, its RMSNorm computed in float64 and rounded once."""
    residual = to_bf16(from_bf16(inp1_bits) + from_bf16(inp2_bits))
    return (residual, *rmsnorm_forward_bf16(residual, weight))


def residual_rmsnorm_forward_bf16_cuda(inp1, inp2, weight, block_size: int = 256, eps: float = 1e-5):
    """residual = inp1 + inp2, out = rmsnorm(residual) with weight, in one pass (residual_rmsnorm_forward_bf16_kernel,
    a warp per row). inp1, inp2 (B, T, C) bf16 (C a multiple of 8, at most 2048); weight (C,) float32 ->
    residual, out (B, T, C) bf16, rstd (B, T) float32."""
    require_bf16_array("inp1", inp1, (None, None, None))
    B, T, C = inp1.shape
    require_multiple_of_8("C", C)
    chunks = row_chunks(C)
    require_bf16_array("inp2", inp2, (B, T, C))
    require_float_vector("weight", weight, C)
    block_size = device.require_block_size(block_size, warps=True)
    eps = _require_eps(eps)
    xp = device.xp
    residual, out, rstd = xp.empty((B, T, C), np.uint16), xp.empty((B, T, C), np.uint16), xp.empty((B, T), np.float32)
    launch_1d("rmsnorm.cu", "residual_rmsnorm_forward_bf16_kernel" + ("" if chunks == 4 else "_c2048"), B * T * 32,
              block_size, (residual, out, rstd, inp1, inp2, weight, np.int32(B * T), np.int32(C), np.float32(eps)))
    return residual, out, rstd


def rmsnorm_backward_bf16_cuda(dinp, dout, inp, weight, rstd, dweight, block_size: int | None = None,
                               max_blocks: int = LAYERNORM_BACKWARD_BLOCKS):
    """The RMSNorm backward on bf16 dout, inp (B, T, C): dinp (B, T, C) float32 += the input gradient and
    dweight (C,) bf16 (the bf16 step's weight gradient) += the weight gradient. Returns dinp's new value in bf16
    (for the matmul backward).

    One pass, rmsnorm_backward_bf16_kernel (C a multiple of 8, at most 2048; 16-byte aligned arrays): a warp per
    row, at most max_blocks blocks, each leaving a row of dweight's partial sums (its warps' sums: C floats a
    warp, block_size * C / 8 bytes of shared memory), which column_sum_add_cuda adds in order. block_size None:
    256 for C <= 1024, else 128, as layernorm_backward_bf16_cuda."""
    require_bf16_array("inp", inp, (None, None, None))
    B, T, C = inp.shape
    require_multiple_of_8("C", C)
    chunks = row_chunks(C)
    require_bf16_array("dout", dout, (B, T, C))
    require_aligned16("dinp", device.require_array("dinp", dinp, shape=(B, T, C)))
    require_float_vector("weight", weight, C)
    device.require_array("rstd", rstd, shape=(B, T))
    require_bf16_array("dweight", dweight, (C,), aligned=False)
    if block_size is None:
        block_size = 256 if chunks == 4 else 128
    block_size = device.require_block_size(block_size, warps=True)
    N, wpb = B * T, block_size // 32
    shared = 4 * wpb * C
    kernel = kernel_with_shared("rmsnorm.cu", "rmsnorm_backward_bf16_kernel" + ("" if chunks == 4 else "_c2048"),
                                shared, f"block_size {block_size} (use fewer warps per block) for C = {C}")
    blocks = max(1, min(device.require_int("max_blocks", max_blocks), -(-N // wpb)))
    xp = device.xp
    dinp_bf16 = xp.empty((B, T, C), np.uint16)
    if N:
        partial = xp.empty((blocks, C), np.float32)
        kernel((blocks,), (block_size,),
               (dinp, dinp_bf16, partial, dout, inp, weight, rstd, np.int32(N), np.int32(C)), shared_mem=shared)
        column_sum_add_cuda(dweight, None, None, partial)
    return dinp_bf16
