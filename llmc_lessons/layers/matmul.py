"""The linear layer (llm.c's matmul): out = inp @ weight^T + bias, applied to every (b, t) position.

    out[b, t, o] = bias[o] + sum_c inp[b, t, c] * weight[o, c]

Shapes (llm.c's layout): inp (B, T, C), weight (OC, C), bias (OC,) or None, out (B, T, OC). The backward:

    dinp (B, T, C) = dout @ weight        dweight (OC, C) = dout^T @ inp        dbias (OC,) = sum_{b,t} dout

with dout and inp viewed as (B*T, OC) and (B*T, C) matrices.

Read top-down: the NumPy forward and backward references, then the launchers of the kernels in
`kernels/matmul.cu` (cuBLAS's TF32 switch, `tf32`, lives in llmc_lessons/precision.py). Those kernels compute
one general product out (M, N) = A (M, K) @ B (K, N) [+ bias] with A and B read through strides, so the forward and both backward
products run through the same kernel (`gemm_cuda`): kernel1 naive, kernel2 shared-memory tiles, kernel3
register-blocked; "cublas" is the backend's own matmul (cuBLAS through CuPy on a GPU, NumPy on a CPU).
"""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.cublas import gemm, gemm_bias
from llmc_lessons.cuda import load_kernel
from llmc_lessons.layers.bf16 import require_bf16_array, require_multiple_of_8
from llmc_lessons.precision import from_bf16, to_bf16

# ---------------------------------------------------------------------------------------------------------
# NumPy reference


def _check_shapes(where: str, inp, weight, **others) -> None:
    if inp.ndim != 3:
        raise ValueError(f"{where}: inp must have shape (B, T, C), got {inp.shape}")
    B, T, C = inp.shape
    if weight.ndim != 2 or weight.shape[1] != C:
        raise ValueError(f"{where}: weight must have shape (OC, C) with C = {C} (inp's last axis), got {weight.shape}")
    OC = weight.shape[0]
    want = {"bias": (OC,), "dout": (B, T, OC)}
    for name, a in others.items():
        if a is not None and a.shape != want[name]:
            raise ValueError(f"{where}: {name} must have shape {want[name]}, got {a.shape}")


def matmul_forward(inp, weight, bias=None):
    """(B, T, C), (OC, C), (OC,) or None -> out (B, T, OC) = inp @ weight^T + bias."""
    inp, weight = np.asarray(inp), np.asarray(weight)
    bias = None if bias is None else np.asarray(bias)
    _check_shapes("matmul_forward", inp, weight, bias=bias)
    out = inp @ weight.T                    # (B, T, C) @ (C, OC) -> (B, T, OC): a dot product per (b, t, o)
    if bias is not None:
        out = out + bias                    # (OC,) broadcast over every (b, t)
    return out


def matmul_backward(dout, inp, weight):
    """(B, T, OC), (B, T, C), (OC, C) -> dinp (B, T, C), dweight (OC, C), dbias (OC,)."""
    dout, inp, weight = np.asarray(dout), np.asarray(inp), np.asarray(weight)
    _check_shapes("matmul_backward", inp, weight, dout=dout)
    B, T, C = inp.shape
    OC = weight.shape[0]
    dout2 = dout.reshape(B * T, OC)          # the (B*T, OC) matrix view: every (b, t) is one row
    inp2 = inp.reshape(B * T, C)
    dinp = (dout2 @ weight).reshape(B, T, C)  # (BT, OC) @ (OC, C): each input feeds every output o
    dweight = dout2.T @ inp2                 # (OC, BT) @ (BT, C): weight[o, c] is used at every (b, t)
    dbias = dout2.sum(axis=0)                # (OC,): bias[o] is added at every (b, t)
    return dinp, dweight, dbias


# ---------------------------------------------------------------------------------------------------------
# Kernel launchers (backend arrays: CuPy on a GPU, NumPy + the emulator on a CPU)

VERSIONS = (1, 2, 3, "cublas")
TILES = (8, 16, 32)              # kernel1's block edge and kernel2's tile edge: TILE x TILE threads
K3_BM = K3_BN = 128              # kernel3's output tile per block (matmul.cu: K3_BM, K3_BN), 16 x 16 threads
_INT_MAX = 2**31 - 1


def _check_version(version):
    if isinstance(version, bool) or version not in VERSIONS:
        raise ValueError(f"version must be one of 1, 2, 3 or 'cublas', got {version!r}")
    return version


def _check_tile(tile):
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or int(tile) not in TILES:
        raise ValueError(f"tile must be one of {TILES} (a block of tile x tile threads), got {tile!r}")
    return int(tile)


def _dummy_bias():
    # A kernel's `const float* bias` must be an array even when use_bias = 0 (it is then never read).
    return device.xp.zeros((1,), dtype=np.float32)


def gemm_cuda(a, b, bias=None, trans_a: bool = False, trans_b: bool = False, version=2, tile: int = 16,
              kernel=None, out=None):
    """out (M, N) = op(a) @ op(b) [+ bias (N,)], op(x) = x.T when trans_x: the product behind every launcher.

    a is (M, K), or (K, M) with trans_a; b is (K, N), or (N, K) with trans_b; both C-contiguous float32.
    version 1, 2, 3: matmul_kernel<version> reads the transposed operand through swapped strides (no copy);
    "cublas": the backend's matmul on 2-D views. tile: the block edge of versions 1 and 2.
    kernel: a RawKernel with matmul_kernel<version>'s parameters to launch instead (the exercise checks use it).
    out: an (M, N) float32 array to write into instead of a fresh one (checks pass one filled with NaN).
    """
    version = _check_version(version)
    tile = _check_tile(tile)
    for name, flag in (("trans_a", trans_a), ("trans_b", trans_b)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    device.require_array("a", a, shape=(None, None))
    device.require_array("b", b, shape=(None, None))
    M, K = a.shape[::-1] if trans_a else a.shape
    Kb, N = b.shape[::-1] if trans_b else b.shape
    if Kb != K:
        ta, tb = (".T" if trans_a else ""), (".T" if trans_b else "")
        raise ValueError(f"inner dimensions differ: a{ta} is ({M}, {K}) but b{tb} is ({Kb}, {N})")
    if bias is not None:
        device.require_array("bias", bias, shape=(N,))
    for name, size in (("a", M * K), ("b", K * N), ("out", M * N)):
        if size > _INT_MAX:
            raise ValueError(f"{name} has {size} elements; the kernels index with 32-bit ints (at most {_INT_MAX})")
    xp = device.xp
    if out is not None:
        device.require_array("out", out, shape=(M, N))
    if version == "cublas":
        # cuBLAS reads the transposed operand in place and honours the TF32 switch (cublas.py); NumPy on a CPU
        out = gemm(a, b, trans_a, trans_b, out=out)
        if bias is not None and M * N:
            load_kernel("matmul.cu", "add_bias_kernel")((-(-(M * N) // 256),), (256,), (out, bias, np.int32(M),
                                                                                       np.int32(N)))
        return out
    if out is None:
        out = xp.empty((M, N), dtype=np.float32)
    if M == 0 or N == 0:
        return out
    # Element strides: a stored (M, K) row-major has A(m, k) at m * K + k; stored (K, M) (trans_a) at k * M + m.
    sam, sak = (1, M) if trans_a else (K, 1)
    sbk, sbn = (1, K) if trans_b else (N, 1)
    if kernel is None:
        kernel = load_kernel("matmul.cu", f"matmul_kernel{version}")
    if version == 3:
        grid, block, shared = (-(-N // K3_BN), -(-M // K3_BM)), (16, 16), 0
    else:
        grid, block = (-(-N // tile), -(-M // tile)), (tile, tile)
        shared = 0 if version == 1 else 4 * (tile * tile + tile * (tile + 1))
    use_bias = bias is not None
    kernel(grid, block, (out, a, b, bias if use_bias else _dummy_bias(), np.int32(M), np.int32(N), np.int32(K),
                         np.int32(sam), np.int32(sak), np.int32(sbk), np.int32(sbn), np.int32(use_bias)),
           shared_mem=shared)
    return out


def matmul_forward_cuda(inp, weight, bias=None, version="cublas", tile: int = 16):
    """(B, T, C), (OC, C), (OC,) or None -> out (B, T, OC) = inp @ weight^T + bias, a fresh array.

    version 1 (naive), 2 (shared-memory tiles), 3 (register-blocked) run matmul_kernel<version>; "cublas" runs
    the backend's matmul (cuBLAS through CuPy, honouring precision.tf32(); NumPy on a CPU). tile: versions 1 and 2.
    """
    device.require_array("inp", inp, shape=(None, None, None))
    B, T, C = inp.shape
    device.require_array("weight", weight, shape=(None, C))
    OC = weight.shape[0]
    if bias is not None:
        device.require_array("bias", bias, shape=(OC,))
    out = gemm_cuda(inp.reshape(B * T, C), weight, bias, trans_b=True, version=version, tile=tile)
    return out.reshape(B, T, OC)


def matmul_backward_bias_cuda(dout, block_rows: int = 32, out=None):
    """dout (B, T, OC) -> dbias (OC,), its sum over B and T, through matmul_backward_bias_kernel.

    block_rows: R in the kernel's (32, R) blocks, a power of two in 1..32. out: an (OC,) float32 array to write
    into instead of a fresh one.
    """
    if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) or \
            int(block_rows) not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"block_rows must be a power of two in 1..32, got {block_rows!r}")
    R = int(block_rows)
    device.require_array("dout", dout, shape=(None, None, None))
    B, T, OC = dout.shape
    if dout.size > _INT_MAX:
        raise ValueError(f"dout has {dout.size} elements; the kernel indexes with 32-bit ints")
    if out is None:
        dbias = device.xp.empty((OC,), dtype=np.float32)
    else:
        dbias = device.require_array("out", out, shape=(OC,))
    if OC == 0:
        return dbias
    load_kernel("matmul.cu", "matmul_backward_bias_kernel")(
        (-(-OC // 32),), (32, R), (dbias, dout, np.int32(B * T), np.int32(OC)), shared_mem=4 * 32 * R)
    return dbias


def matmul_backward_cuda(dout, inp, weight, version="cublas", tile: int = 16, block_rows: int = 32,
                         has_bias: bool = True):
    """(B, T, OC), (B, T, C), (OC, C) -> dinp (B, T, C), dweight (OC, C), dbias (OC,), fresh arrays.

    has_bias=False (a layer without bias, such as GPT-2's lm_head) skips the column sum and returns dbias None.

    dinp = dout @ weight and dweight = dout^T @ inp through gemm_cuda with the same `version` and `tile` as
    the forward (the kernels read the transposes through strides); dbias through matmul_backward_bias_kernel.
    """
    device.require_array("inp", inp, shape=(None, None, None))
    B, T, C = inp.shape
    device.require_array("weight", weight, shape=(None, C))
    OC = weight.shape[0]
    device.require_array("dout", dout, shape=(B, T, OC))
    _check_version(version)
    dout2, inp2 = dout.reshape(B * T, OC), inp.reshape(B * T, C)
    dinp = gemm_cuda(dout2, weight, version=version, tile=tile).reshape(B, T, C)      # (BT, OC) @ (OC, C)
    dweight = gemm_cuda(dout2, inp2, trans_a=True, version=version, tile=tile)       # (OC, BT) @ (BT, C)
    dbias = matmul_backward_bias_cuda(dout, block_rows=block_rows) if has_bias else None
    return dinp, dweight, dbias

# ---------------------------------------------------------------------------------------------------------
# bf16 (lesson 14): launchers of the bf16 kernels in kernels/matmul.cu (bf16 arrays are uint16 arrays of
# the bits; layers/bf16.py has the checks they share)


def matmul_bf16(a, b, trans_b: bool = False):
    """(M, K) bf16 bits @ (K, N) bf16 bits (or (N, K) with trans_b) -> (M, N) float32, accumulated in float32.

    On a GPU: cuBLASLt with bf16 inputs on the tensor cores (cublas.gemm). On a CPU: the same numbers in NumPy.
    """
    device.require_array("a", a, shape=(None, None), dtype=np.uint16)
    device.require_array("b", b, shape=(None, None), dtype=np.uint16)
    return gemm(a, b, trans_b=trans_b, out_dtype=np.float32)


def linear_bf16(inp, weight, bias):
    """inp (B, T, C) bf16 @ weight (OC, C)^T bf16 + bias (OC,) bf16 -> (B, T, OC) bf16, the bias added to the
    float32 sums before their one rounding: on a GPU one cuBLASLt product with the bias in its epilogue, in place of
    a product and a pass over the result that adds the bias. On a CPU: the same numbers in NumPy."""
    require_bf16_array("inp", inp, (None, None, None))
    B, T, C = inp.shape
    require_bf16_array("weight", weight, (None, C))
    OC = require_multiple_of_8("OC", weight.shape[0])
    require_bf16_array("bias", bias, (OC,))
    if not (B * T and C and OC):
        raise ValueError(f"linear_bf16 needs a non-empty input and weight, got inp {inp.shape}, weight {weight.shape}")
    x = inp.reshape(B * T, C)
    if device.on_gpu():
        return gemm_bias(x, weight, bias).reshape(B, T, OC)
    return to_bf16(gemm(x, weight, trans_b=True, out_dtype=np.float32) + from_bf16(bias)).reshape(B, T, OC)
