"""LayerNorm: normalise each (b, t) row of C channels to mean 0 and variance 1, then scale and shift.

    mean = (1/C) sum_c x_c            rstd = 1 / sqrt((1/C) sum_c (x_c - mean)^2 + eps)
    norm_c = (x_c - mean) * rstd      out_c = norm_c * weight_c + bias_c

Shapes: inp and out (B, T, C), weight and bias (C,), mean and rstd (B, T).

Read top-down: the NumPy forward and backward references, then the launchers of the kernels in
`kernels/layernorm.cu` (forward kernel1: a thread per row; kernel2: a warp per row; backward: a warp per row
for dinp plus a deterministic column-reduction kernel for dweight and dbias).
"""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.cuda import DEFAULT_SHARED_LIMIT, load_kernel

# ---------------------------------------------------------------------------------------------------------
# NumPy reference


def _check_shapes(where: str, inp, weight, **row_arrays) -> None:
    if inp.ndim != 3:
        raise ValueError(f"{where}: inp must have shape (B, T, C), got {inp.shape}")
    B, T, C = inp.shape
    if weight.shape != (C,):
        raise ValueError(f"{where}: weight must have shape (C,) = ({C},), got {weight.shape}")
    for name, a in row_arrays.items():
        want = (C,) if name in ("bias",) else (B, T, C) if name == "dout" else (B, T)
        if a.shape != want:
            raise ValueError(f"{where}: {name} must have shape {want}, got {a.shape}")


def layernorm_forward(inp, weight, bias, eps: float = 1e-5):
    """(B, T, C), (C,), (C,) -> out (B, T, C), mean (B, T), rstd (B, T); mean and rstd are kept for the backward."""
    inp, weight, bias = np.asarray(inp), np.asarray(weight), np.asarray(bias)
    _check_shapes("layernorm_forward", inp, weight, bias=bias)
    mean = inp.mean(axis=-1)                                  # (B, T)
    xshift = inp - mean[..., None]                            # (B, T, C): x - mean
    var = (xshift * xshift).mean(axis=-1)                     # (B, T): the biased variance (divide by C)
    rstd = 1.0 / np.sqrt(var + np.asarray(eps, dtype=inp.dtype))  # (B, T): reciprocal standard deviation
    norm = xshift * rstd[..., None]                           # (B, T, C): mean 0, variance ~1 per row
    out = norm * weight + bias                                # (B, T, C)
    return out, mean, rstd


def layernorm_backward(dout, inp, weight, mean, rstd):
    """(B, T, C), (B, T, C), (C,), (B, T), (B, T) -> dinp (B, T, C), dweight (C,), dbias (C,).

    dinp = rstd * (dnorm - mean_c(dnorm) - norm * mean_c(dnorm * norm)) with dnorm = dout * weight.
    """
    dout, inp, weight = np.asarray(dout), np.asarray(inp), np.asarray(weight)
    mean, rstd = np.asarray(mean), np.asarray(rstd)
    _check_shapes("layernorm_backward", inp, weight, dout=dout, mean=mean, rstd=rstd)
    norm = (inp - mean[..., None]) * rstd[..., None]          # (B, T, C), recomputed from the cache
    dnorm = dout * weight                                     # (B, T, C)
    dnorm_mean = dnorm.mean(axis=-1, keepdims=True)           # (B, T, 1)
    dnorm_norm_mean = (dnorm * norm).mean(axis=-1, keepdims=True)
    dinp = rstd[..., None] * (dnorm - dnorm_mean - norm * dnorm_norm_mean)
    dweight = (dout * norm).sum(axis=(0, 1))                  # (C,): weight was used at every (b, t)
    dbias = dout.sum(axis=(0, 1))                             # (C,)
    return dinp, dweight, dbias


# ---------------------------------------------------------------------------------------------------------
# Kernel launchers (backend arrays: CuPy on a GPU, NumPy + the emulator on a CPU)


def layernorm_forward_cuda(inp, weight, bias, block_size: int = 256, version: int | None = None, eps: float = 1e-5):
    """(B, T, C), (C,), (C,) -> out (B, T, C), mean (B, T), rstd (B, T) through layernorm_forward_kernel<version>.

    version 1: one thread per row. version 2: one warp per row (block_size must be a multiple of 32).
    version 3: version 2 with the row in registers, read once (C <= 1024). Default: 3 when C <= 1024, else 2.
    """
    device.require_array("inp", inp, shape=(None, None, None))
    B, T, C = inp.shape
    if version is None:
        version = 3 if C <= 1024 else 2
    if version not in (1, 2, 3):
        raise ValueError(f"version must be 1, 2 or 3, got {version!r}")
    block_size = device.require_block_size(block_size, warps=(version != 1))
    if version == 3 and C > 1024:
        raise ValueError(f"version 3 keeps a row in registers, 32 floats per lane: C must be <= 1024, got {C}")
    device.require_array("weight", weight, shape=(C,))
    device.require_array("bias", bias, shape=(C,))
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    xp = device.xp
    out = xp.empty((B, T, C), dtype=np.float32)
    mean = xp.empty((B, T), dtype=np.float32)
    rstd = xp.empty((B, T), dtype=np.float32)
    N = B * T
    if N == 0:
        return out, mean, rstd
    rows_per_block = block_size if version == 1 else block_size // 32
    kernel = load_kernel("layernorm.cu", f"layernorm_forward_kernel{version}")
    kernel((-(-N // rows_per_block),), (block_size,),
           (out, mean, rstd, inp, weight, bias, np.int32(N), np.int32(C), np.float32(eps)))
    return out, mean, rstd


def layernorm_backward_cuda(dout, inp, weight, mean, rstd, block_size: int = 256, param_block_size: int = 512,
                            version: int | None = None, max_blocks: int = 264):
    """(B, T, C), (B, T, C), (C,), (B, T), (B, T) -> dinp (B, T, C), dweight (C,), dbias (C,), fresh arrays.

    version 1: dinp through layernorm_backward_kernel, a warp per row. dweight, dbias through
    layernorm_param_backward_kernel, a block per 32 channels and chunk of rows with param_block_size / 32 row
    groups, then layernorm_param_reduce_kernel over the chunks.
    version 2: all three in one pass, layernorm_backward_kernel2 (a warp per row held in registers; at most
    max_blocks blocks, each leaving a row of partial sums), then layernorm_param_reduce_kernel. Needs
    C % 4 == 0, C <= 1024 and 16-byte aligned arrays.
    None: version 2 where it fits, else 1. Every sum is in a fixed order (deterministic).
    """
    block_size = device.require_block_size(block_size, warps=True)
    param_block_size = device.require_block_size(param_block_size, warps=True, name="param_block_size")
    device.require_array("inp", inp, shape=(None, None, None))
    B, T, C = inp.shape
    device.require_array("dout", dout, shape=(B, T, C))
    device.require_array("weight", weight, shape=(C,))
    device.require_array("mean", mean, shape=(B, T))
    device.require_array("rstd", rstd, shape=(B, T))
    xp = device.xp
    N = B * T
    warps = block_size // 32
    fits = (C % 4 == 0 and C <= 1024 and 4 * warps * C <= DEFAULT_SHARED_LIMIT
            and all(device.address(a) % 16 == 0 for a in (dout, inp, weight)))
    if version is None:
        version = 2 if fits and N and C else 1
    if version == 2:
        if not fits:
            raise ValueError(f"version 2 keeps a row in registers as float4s: it needs C % 4 == 0, C <= 1024, "
                             f"16-byte aligned arrays and 4 * (block_size / 32) * C <= {DEFAULT_SHARED_LIMIT} bytes of shared memory "
                             f"(C = {C}, block_size = {block_size}); use version=1")
        if isinstance(max_blocks, bool) or not isinstance(max_blocks, (int, np.integer)) or max_blocks < 1:
            raise ValueError(f"max_blocks must be a positive int, got {max_blocks!r}")
        blocks = max(1, min(int(max_blocks), -(-N // warps)))
        dinp = xp.empty((B, T, C), dtype=np.float32)
        dweight, dbias = xp.zeros((C,), dtype=np.float32), xp.zeros((C,), dtype=np.float32)
        part_w, part_b = xp.empty((blocks, C), np.float32), xp.empty((blocks, C), np.float32)
        load_kernel("layernorm.cu", "layernorm_backward_kernel2")(
            (blocks,), (block_size,), (dinp, part_w, part_b, dout, inp, weight, mean, rstd, np.int32(N), np.int32(C)),
            shared_mem=4 * warps * C)
        load_kernel("layernorm.cu", "layernorm_param_reduce_kernel")(
            (-(-C // 256),), (256,), (dweight, dbias, part_w, part_b, np.int32(blocks), np.int32(C)))
        return dinp, dweight, dbias
    if version != 1:
        raise ValueError(f"version must be 1, 2 or None, got {version!r}")
    dinp = xp.zeros((B, T, C), dtype=np.float32)     # the kernels accumulate (+=), so start from zero
    dweight = xp.zeros((C,), dtype=np.float32)
    dbias = xp.zeros((C,), dtype=np.float32)
    if N == 0 or C == 0:
        return dinp, dweight, dbias
    rows_per_block = block_size // 32
    load_kernel("layernorm.cu", "layernorm_backward_kernel")(
        (-(-N // rows_per_block),), (block_size,), (dinp, dout, inp, weight, mean, rstd, np.int32(N), np.int32(C)))
    # Row chunks: ceil(C/32) blocks alone (24 for GPT-2) leave most of a GPU idle, so the rows are also split
    # into R chunks, each summed into its own row of partial sums, then added in order (deterministic).
    G = param_block_size // 32
    R = max(1, min(64, N // (8 * G)))
    part_w, part_b = (dweight, dbias) if R == 1 else (xp.zeros((R, C), np.float32), xp.zeros((R, C), np.float32))
    load_kernel("layernorm.cu", "layernorm_param_backward_kernel")(
        (-(-C // 32), R), (param_block_size,), (part_w, part_b, dout, inp, mean, rstd, np.int32(N), np.int32(C)))
    if R > 1:
        load_kernel("layernorm.cu", "layernorm_param_reduce_kernel")(
            (-(-C // 256),), (256,), (dweight, dbias, part_w, part_b, np.int32(R), np.int32(C)))
    return dinp, dweight, dbias
