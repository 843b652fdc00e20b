"""GELU, the nonlinearity of GPT-2's MLP, in the tanh approximation GPT-2 uses (lesson 06).

    gelu(x) = 0.5 x (1 + tanh(u)),   u = sqrt(2/pi) (x + 0.044715 x^3)
    gelu'(x) = 0.5 (1 + tanh(u)) + 0.5 x sech^2(u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)

Read top-down: the NumPy forward and backward (any shape, float32 or float64), the exact erf-GELU for
comparison, then the kernel launchers for kernels/gelu.cu.
"""
from __future__ import annotations

import math

import numpy as np

from llmc_lessons import device
from llmc_lessons.cuda import load_kernel
from llmc_lessons.layers.bf16 import (column_groups, launch_1d, require_bf16_array, require_float_vector,
                                      require_multiple_of_8, zero_counters)
from llmc_lessons.precision import from_bf16, to_bf16

GELU_SCALING_FACTOR = math.sqrt(2.0 / math.pi)  # sqrt(2/pi) = 0.7978845608...
GELU_CUBE_COEF = 0.044715


def _float_array(name: str, a) -> np.ndarray:
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {a.dtype}")
    return a


def gelu_forward(inp):
    """(any shape) -> same shape: the tanh-approximate GELU, elementwise, in the dtype of `inp`."""
    x = _float_array("inp", inp)
    k, c = x.dtype.type(GELU_SCALING_FACTOR), x.dtype.type(GELU_CUBE_COEF)
    u = k * (x + c * x * x * x)                     # the tanh argument
    return x.dtype.type(0.5) * x * (1 + np.tanh(u))


def gelu_backward(dout, inp):
    """dout, inp (same shape) -> dinp = gelu'(inp) * dout, in the dtype of `inp`."""
    x = _float_array("inp", inp)
    dout = _float_array("dout", dout)
    if dout.shape != x.shape:
        raise ValueError(f"dout has shape {dout.shape} but inp has shape {x.shape}; they must match")
    k, c = x.dtype.type(GELU_SCALING_FACTOR), x.dtype.type(GELU_CUBE_COEF)
    u = k * (x + c * x * x * x)
    th = np.tanh(u)
    sech2 = 1 - th * th                             # sech^2(u) = 1 - tanh^2(u)
    du_dx = k * (1 + 3 * c * x * x)
    local_grad = x.dtype.type(0.5) * (1 + th) + x.dtype.type(0.5) * x * sech2 * du_dx
    return (local_grad * dout).astype(x.dtype, copy=False)


def gelu_erf_forward(inp):
    """(any shape) -> same shape: the exact GELU x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), in float64.

    Not used by GPT-2: shown in lesson 06 to compare with the tanh approximation.
    """
    x = np.asarray(inp, dtype=np.float64)
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_erf_backward(dout, inp):
    """dout, inp -> dinp for the exact GELU: d/dx [x Phi(x)] = Phi(x) + x phi(x), in float64."""
    x = np.asarray(inp, dtype=np.float64)
    erf = np.vectorize(math.erf, otypes=[np.float64])
    cdf = 0.5 * (1.0 + erf(x / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return (cdf + x * pdf) * np.asarray(dout, dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------
# Kernel launchers (kernels/gelu.cu): backend arrays in, fresh backend arrays out.


def _grid(n: int, block_size: int) -> int:
    """CEIL_DIV(n, block_size): enough blocks to give every element a thread."""
    return (n + block_size - 1) // block_size


def gelu_forward_cuda(inp, block_size: int = 128, version: int = 1):
    """(any shape) float32 -> same shape: gelu through gelu_forward_kernel1 (version=1, one thread per
    element) or gelu_forward_kernel2 (version=2, one thread per float4; needs inp.size % 4 == 0)."""
    device.require_array("inp", inp)
    block_size = device.require_block_size(block_size, warps=True)
    N = int(inp.size)
    out = device.xp.empty_like(inp)
    if N == 0:
        return out
    if version == 1:
        load_kernel("gelu.cu", "gelu_forward_kernel1")((_grid(N, block_size),), (block_size,),
                                                        (out, inp, np.int32(N)))
    elif version == 2:
        if N % 4:
            raise ValueError(f"version=2 reads float4 (4 floats at once), so inp.size must be a multiple of 4, "
                             f"got {N}; use version=1")
        load_kernel("gelu.cu", "gelu_forward_kernel2")((_grid(N // 4, block_size),), (block_size,),
                                                        (out, inp, np.int32(N // 4)))
    else:
        raise ValueError(f"version must be 1 (one thread per element) or 2 (float4), got {version!r}")
    return out


def gelu_backward_cuda(dout, inp, block_size: int = 128):
    """dout, inp (same shape, float32) -> dinp = gelu'(inp) * dout through gelu_backward_kernel."""
    device.require_array("inp", inp)
    device.require_array("dout", dout, shape=tuple(inp.shape))
    block_size = device.require_block_size(block_size, warps=True)
    N = int(inp.size)
    dinp = device.xp.empty_like(inp)
    if N:
        load_kernel("gelu.cu", "gelu_backward_kernel")((_grid(N, block_size),), (block_size,),
                                                        (dinp, inp, dout, np.int32(N)))
    return dinp

# ---------------------------------------------------------------------------------------------------------
# bf16 (lesson 14): launchers of the bf16 kernels in kernels/gelu.cu (bf16 arrays are uint16 arrays of
# the bits; layers/bf16.py has the checks they share)


def gelu_forward_bf16(inp_bits) -> np.ndarray:
    """Reference of gelu_forward_bf16_kernel: bf16 in, the GELU in float64, rounded once to bf16.

    Computed as x / (1 + exp(-2u)), the same function as 0.5 x (1 + tanh u): the tanh form cancels for
    x < -7 even in float64 (1 + tanh u is then below float64's 1e-16 spacing near 1)."""
    x = from_bf16(inp_bits).astype(np.float64)
    u = np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)
    with np.errstate(over="ignore"):
        return to_bf16((x / (1.0 + np.exp(-2.0 * u))).astype(np.float32))


def gelu_forward_bf16_cuda(inp, block_size: int = 256, version: int = 1):
    """uint16 bf16 bits (any shape) -> gelu of them, bf16 bits, through gelu_forward_bf16_kernel (version 1,
    a thread per value) or gelu_forward_bf16_kernel2 (version 2, 8 values per thread in 128-bit accesses;
    needs inp.size % 8 == 0)."""
    device.require_array("inp", inp, dtype=np.uint16)
    block_size = device.require_block_size(block_size)
    out = device.xp.empty_like(inp)
    if version == 1:
        if inp.size:
            load_kernel("gelu.cu", "gelu_forward_bf16_kernel")(
                (-(-inp.size // block_size),), (block_size,), (out, inp, np.int32(inp.size)))
    elif version == 2:
        if inp.size % 8:
            raise ValueError(f"version=2 moves 8 bf16 values (16 bytes) at a time: inp.size must be a multiple of 8, "
                             f"got {inp.size}; use version=1")
        n8 = inp.size // 8
        if n8:  # the kernel sees the bits as int4: 4 int32 = 8 bf16
            load_kernel("gelu.cu", "gelu_forward_bf16_kernel2")(
                (-(-n8 // block_size),), (block_size,), (out.reshape(-1).view(np.int32), inp.reshape(-1).view(np.int32),
                                                         np.int32(n8)))
    else:
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    return out


def gelu_bias_forward_bf16_cuda(inp, bias, block_size: int = 256):
    """(B, T, OC) bf16 product, (OC,) float32 bias -> gelu(inp + bias) (B, T, OC) bf16."""
    require_bf16_array("inp", inp, (None, None, None))
    OC = require_multiple_of_8("OC", inp.shape[-1])
    require_float_vector("bias", bias, OC)
    out = device.xp.empty_like(inp)
    launch_1d("gelu.cu", "gelu_bias_forward_bf16_kernel", inp.size // 8, device.require_block_size(block_size),
              (out, inp, bias, np.int32(inp.size // OC), np.int32(OC)))
    return out


def gelu_bias_backward_bf16_cuda(dout, inp, bias, dbias, out=None, block_columns: int = 16, block_rows: int = 16,
                                 grid_rows: int | None = None):
    """dout, inp (B, T, OC) bf16, bias (OC,) -> dinp = dout * gelu'(inp + bias) bf16 (out may be dout), and
    dbias (OC,) bf16 (the bf16 step's weight gradient) += the column sums of dinp: the fc bias's gradient, in
    the same pass.

    Blocks of (block_columns, block_rows) threads, each thread 8 columns, so a block covers 8 * block_columns
    columns; grid_rows: how many blocks split the rows of one column group (R partial sums, the last block of
    the group adds them), by default enough for each thread to sum 16 rows."""
    require_bf16_array("inp", inp, (None, None, None))
    OC = require_multiple_of_8("OC", inp.shape[-1])
    require_bf16_array("dout", dout, inp.shape)
    require_float_vector("bias", bias, OC)
    require_bf16_array("dbias", dbias, (OC,), aligned=False)
    out = device.xp.empty_like(inp) if out is None else require_bf16_array("out", out, inp.shape)
    N, groups, R, X, Y = column_groups(inp.size // OC, OC, block_columns, block_rows, grid_rows)
    partial = device.xp.empty((R, OC), np.float32)
    load_kernel("gelu.cu", "gelu_bias_backward_bf16_kernel")(
        (groups, R), (X, Y), (out, dbias, partial, zero_counters(groups), dout, inp, bias, np.int32(N), np.int32(OC)),
        shared_mem=4 * 8 * X * Y)
    return out
