"""LayerNorm: normalise each (b, t) row of C channels to mean 0 and variance 1, then scale and shift.

    mean = (1/C) sum_c x_c            rstd = 1 / sqrt((1/C) sum_c (x_c - mean)^2 + eps)
    norm_c = (x_c - mean) * rstd      out_c = norm_c * weight_c + bias_c

Shapes: inp and out (B, T, C), weight and bias (C,), mean and rstd (B, T).

Read top-down: the NumPy forward and backward references, then the launchers of the kernels in
`kernels/layernorm.cu` (forward kernel1: a thread per row; kernel2: a warp per row; backward: a warp per row
for dinp plus a deterministic column-reduction kernel for dweight and dbias); then LayerNorm fused with the
residual add before it (lesson 12), and the bf16 versions (lesson 14 and the bf16 training step), each
section in the same order in `kernels/layernorm.cu`.
"""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.cuda import DEFAULT_SHARED_LIMIT, load_kernel
from llmc_lessons.layers.bf16 import (kernel_with_shared, launch_1d, require_aligned16, require_bf16_array,
                                      require_float_vector, require_multiple_of_8)
from llmc_lessons.layers.residual import residual_forward
from llmc_lessons.precision import from_bf16, to_bf16

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


def row_kernel2_version(version, C: int, block_size: int, arrays, rows: bool = True):
    """The version a float32 normalisation backward runs (this one, RMSNorm's), whose kernel 2 keeps a row per warp
    in registers as float4s: None -> 2 where that fits (and there are rows), else 1; 2 where it does not fit -> a
    ValueError that says why; any other value is returned for the caller to check."""
    fits = (C % 4 == 0 and C <= 1024 and 4 * (block_size // 32) * C <= DEFAULT_SHARED_LIMIT
            and all(device.address(a) % 16 == 0 for a in arrays))
    if version is None:
        return 2 if fits and rows else 1
    if version == 2 and not fits:
        raise ValueError(f"version 2 keeps a row in registers as float4s: it needs C % 4 == 0, C <= 1024, "
                         f"16-byte aligned arrays and 4 * (block_size / 32) * C <= {DEFAULT_SHARED_LIMIT} bytes of "
                         f"shared memory (C = {C}, block_size = {block_size}); use version=1")
    return version


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
    version = row_kernel2_version(version, C, block_size, (dout, inp, weight), rows=N * C > 0)
    if version == 2:
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

# ---------------------------------------------------------------------------------------------------------
# Fused with the residual add before it (lesson 12): residual = inp1 + inp2 and out = layernorm(residual) in
# one kernel; the reference is the composition of the two course layers it replaces.


def fused_residual_layernorm_forward(inp1, inp2, weight, bias, eps: float = 1e-5):
    """(B, T, C) x 2, (C,), (C,) -> residual (B, T, C), out (B, T, C), mean (B, T), rstd (B, T)."""
    residual = residual_forward(inp1, inp2)
    out, mean, rstd = layernorm_forward(residual, weight, bias, eps)
    return residual, out, mean, rstd


def fused_residual_layernorm_forward_cuda(inp1, inp2, weight, bias, block_size: int = 256, eps: float = 1e-5,
                                          kernel=None):
    """The same through fused_residual_layernorm_forward_kernel (one warp per row); fresh output arrays.

    kernel: a RawKernel with the same parameters to launch instead (the lesson's exercise check uses it).
    """
    device.require_array("inp1", inp1, shape=(None, None, None))
    B, T, C = inp1.shape
    device.require_array("inp2", inp2, shape=(B, T, C))
    device.require_array("weight", weight, shape=(C,))
    device.require_array("bias", bias, shape=(C,))
    block_size = device.require_block_size(block_size, warps=True)     # a warp per row
    xp = device.xp
    residual, out = xp.empty((B, T, C), np.float32), xp.empty((B, T, C), np.float32)
    mean, rstd = xp.empty((B, T), np.float32), xp.empty((B, T), np.float32)
    N = B * T
    if N:
        rows_per_block = block_size // 32
        (kernel or load_kernel("layernorm.cu", "fused_residual_layernorm_forward_kernel"))(
            (-(-N // rows_per_block),), (block_size,),
            (residual, out, mean, rstd, inp1, inp2, weight, bias, np.int32(N), np.int32(C), np.float32(eps)))
    return residual, out, mean, rstd


# ---------------------------------------------------------------------------------------------------------
# bf16 (lesson 14): launchers of the bf16 kernels in kernels/layernorm.cu (bf16 arrays are uint16 arrays of
# the bits; layers/bf16.py has the checks they share)


def layernorm_forward_bf16(inp_bits, weight, bias):
    """Reference of layernorm_forward_bf16_kernel: (out bits, mean, rstd) with float32 statistics."""
    out, mean, rstd = layernorm_forward(from_bf16(inp_bits).astype(np.float64), weight.astype(np.float64),
                                        bias.astype(np.float64))
    return to_bf16(out.astype(np.float32)), mean.astype(np.float32), rstd.astype(np.float32)


def layernorm_forward_bf16_cuda(inp, weight, bias, block_size: int = 256, version: int = 1):
    """(B, T, C) bf16 bits, (C,), (C,) float32 -> out (B, T, C) bf16 bits, mean, rstd (B, T) float32.

    version 1: layernorm_forward_bf16_kernel, two-byte loads (any C). version 2: layernorm_forward_bf16_kernel2,
    the row in registers through 16-byte loads (the training step's; C a multiple of 8, at most ROW_MAX_C)."""
    device.require_array("inp", inp, shape=(None, None, None), dtype=np.uint16)
    B, T, C = inp.shape
    if version == 2:
        require_aligned16("inp", inp)
        require_multiple_of_8("C", C)
        chunks = row_chunks(C)
        require_float_vector("weight", weight, C)
        require_float_vector("bias", bias, C)
    elif version == 1:
        device.require_array("weight", weight, shape=(C,))
        device.require_array("bias", bias, shape=(C,))
    else:
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    block_size = device.require_block_size(block_size, warps=True)
    xp = device.xp
    out, mean, rstd = xp.empty((B, T, C), np.uint16), xp.empty((B, T), np.float32), xp.empty((B, T), np.float32)
    if B * T:
        load_kernel("layernorm.cu", "layernorm_forward_bf16_kernel2" + _WIDE[chunks] if version == 2 else
                    "layernorm_forward_bf16_kernel")(
            (-(-(B * T) // (block_size // 32)),), (block_size,),
            (out, mean, rstd, inp, weight, bias, np.int32(B * T), np.int32(C)))
    return out, mean, rstd


ROW_MAX_C = 2048
"""The bf16 layernorm kernels keep a row in registers: C <= 2048 (every GPT-2 size; 1.5B has C = 1600)."""


_WIDE = {4: "", 8: "_c2048"}   # the suffix of each instance's kernel name


def row_chunks(C: int) -> int:
    """The CHUNKS instance of the bf16 layernorm kernels for rows of C channels: a warp keeps a row in registers,
    CHUNKS 8-value chunks per lane; 4 for C <= 1024 (the fast path), 8 (the kernels named ..._c2048) up to
    ROW_MAX_C."""
    if C > ROW_MAX_C:
        raise ValueError(f"the bf16 layernorm and RMSNorm kernels keep a row in registers: C must be <= "
                         f"{ROW_MAX_C}, got {C}")
    return 4 if C <= 1024 else 8


def residual_layernorm_forward_bf16_cuda(inp1, inp2, bias2, weight, bias, block_size: int = 256):
    """residual = inp1 + (inp2 + bias2), out = layernorm(residual) with weight, bias.
    inp1, inp2 (B, T, C) bf16; bias2, weight, bias (C,) float32 -> residual, out (B, T, C) bf16, mean, rstd
    (B, T) float32."""
    require_bf16_array("inp1", inp1, (None, None, None))
    B, T, C = inp1.shape
    require_multiple_of_8("C", C)
    chunks = row_chunks(C)
    require_bf16_array("inp2", inp2, (B, T, C))
    for name, a in (("bias2", bias2), ("weight", weight), ("bias", bias)):
        require_float_vector(name, a, C)
    block_size = device.require_block_size(block_size, warps=True)
    xp = device.xp
    residual, out = xp.empty((B, T, C), np.uint16), xp.empty((B, T, C), np.uint16)
    mean, rstd = xp.empty((B, T), np.float32), xp.empty((B, T), np.float32)
    launch_1d("layernorm.cu", "residual_layernorm_forward_bf16_kernel" + _WIDE[chunks], B * T * 32, block_size,
              (residual, out, mean, rstd, inp1, inp2, bias2, weight, bias, np.int32(B * T), np.int32(C)))
    return residual, out, mean, rstd


def column_sum_add_cuda(out1, out2, out3, partial, columns_per_block: int = 8, rows_per_block: int = 32):
    """out1, out2, out3 (C,) += the column sums of partial[:, :C], [:, C:2C], [:, 2C:] for partial (R, 3C)
    float32, in a fixed order (one launch, blocks of (columns_per_block, rows_per_block) threads): the end of the
    reductions that leave a row of partial sums per block. With out3 None, partial is (R, 2C); with out2 and out3
    None, (R, C) and out1 alone gets its column sums. The outputs are float32 gradients (column_sum_add_kernel),
    or all bf16 (uint16), the bf16 step's gradients, each rounded once after its sum is added
    (column_sum_add_bf16_kernel)."""
    device.require_array("partial", partial, shape=(None, None))
    if out1 is None:
        raise ValueError("column_sum_add_cuda: out1 is needed (out2 and out3 may be None)")
    if out2 is None and out3 is not None:
        raise ValueError("column_sum_add_cuda: out3 given without out2")
    outs = [a for a in (out1, out2, out3) if a is not None]
    R, KC = partial.shape
    K = len(outs)
    if KC % K:
        raise ValueError(f"partial must have {K}C columns for {K} output vectors, got {KC}")
    dtype = np.uint16 if getattr(out1, "dtype", None) == np.uint16 else np.float32
    for i, a in enumerate(outs):
        device.require_array(f"out{i + 1}", a, shape=(KC // K,), dtype=dtype)
    X, Y = columns_per_block, rows_per_block
    if KC:
        outs += [out1] * (3 - K)                    # unused by the kernel: columns stop at K C
        name = "column_sum_add_bf16_kernel" if dtype == np.uint16 else "column_sum_add_kernel"
        load_kernel("layernorm.cu", name)((-(-KC // X),), (X, Y),
                                                         (*outs, partial, np.int32(R), np.int32(KC // K), np.int32(K)),
                                                         shared_mem=4 * X * Y)


LAYERNORM_BACKWARD_BLOCKS = 256
"""The bf16 layernorm backward's default grid: 2 blocks of 8 warps per multiprocessor of an H100 or H200 fit
at once (128 registers a thread), and 256 blocks give each warp of GPT-2's 16,384 rows exactly 8 (no
ragged last round); more blocks also mean more partial rows for the column sums to add
(tools/tune_bf16_kernels.py times the choices)."""


def layernorm_backward_bf16_cuda(dinp, dout, inp, weight, mean, rstd, dweight, dbias, dresidual_bias=None,
                                 block_size: int | None = None, max_blocks: int = LAYERNORM_BACKWARD_BLOCKS):
    """The layernorm backward on bf16 dout, inp (B, T, C): dinp (B, T, C) float32 += the input gradient,
    dweight, dbias (C,) bf16 (the bf16 step's weight gradients) += theirs. Returns dinp's new value in bf16 (for
    the next matmul backward). dresidual_bias (C,) bf16, if given, += the column sums of that bf16 value: the
    bias gradient of the projection whose output was added into this residual stream, in the same pass.

    max_blocks caps the grid: each warp loops over rows, each block leaves one row of partial sums of the
    three (its warps' sums: 3C floats a warp, 3 * block_size * C / 8 bytes of shared memory), which a
    second kernel adds in order. block_size None: 256 for C <= 1024, else 128 (a row of 8 chunks a lane, one row
    at a time; 4 warps of C = 1600 take 75 KiB of shared memory, so two blocks fit on a multiprocessor)."""
    require_bf16_array("inp", inp, (None, None, None))
    B, T, C = inp.shape
    require_multiple_of_8("C", C)
    chunks = row_chunks(C)
    require_bf16_array("dout", dout, (B, T, C))
    require_aligned16("dinp", device.require_array("dinp", dinp, shape=(B, T, C)))
    require_float_vector("weight", weight, C)
    xp = device.xp
    if dresidual_bias is None:
        dresidual_bias = xp.zeros(C, np.uint16)      # computed and dropped
    for name, a in (("dweight", dweight), ("dbias", dbias), ("dresidual_bias", dresidual_bias)):
        require_bf16_array(name, a, (C,), aligned=False)
    for name, a in (("mean", mean), ("rstd", rstd)):
        device.require_array(name, a, shape=(B, T))
    if block_size is None:
        block_size = 256 if chunks == 4 else 128
    block_size = device.require_block_size(block_size, warps=True)
    N, wpb = B * T, block_size // 32
    shared = 4 * wpb * 3 * C
    kernel = kernel_with_shared("layernorm.cu", "layernorm_backward_bf16_kernel" + _WIDE[chunks], shared,
                                f"block_size {block_size} (use fewer warps per block) for C = {C}")
    blocks = max(1, min(device.require_int("max_blocks", max_blocks), -(-N // wpb)))
    dinp_bf16 = xp.empty((B, T, C), np.uint16)
    partial = xp.empty((blocks, 3 * C), np.float32)
    if N:
        kernel(
            (blocks,), (block_size,), (dinp, dinp_bf16, partial, dout, inp, weight, mean, rstd, np.int32(N),
                                       np.int32(C)), shared_mem=shared)
        column_sum_add_cuda(dweight, dbias, dresidual_bias, partial)
    return dinp_bf16
