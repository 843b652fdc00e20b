"""Row-major matrix products through cuBLAS's gemmEx, without copies, honouring the course's TF32 switch.

CuPy's `matmul` copies a transposed operand before calling cuBLAS and its batched path ignores the TF32
setting, which cost the training step a fifth of its time. These two functions call cuBLAS directly, as
llm.c does: cuBLAS is column-major, and a row-major (M, N) matrix is the column-major (N, M) matrix, so
C = op(A) @ op(B) is computed as C^T = op(B)^T @ op(A)^T with no data moved. On a CPU they are NumPy.
"""
from __future__ import annotations

import numpy as np

from llmc_lessons import device

CUDA_R_32F = 0
CUDA_R_16BF = 14
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
CUBLAS_GEMM_DEFAULT = -1
_ONE, _ZERO = np.ones(1, np.float32), np.zeros(1, np.float32)


def _operands(a, b, trans_a: bool, trans_b: bool, batched: bool):
    nd = 3 if batched else 2
    device.require_array("a", a, shape=(None,) * nd)
    device.require_array("b", b, shape=(None,) * nd)
    M, K = a.shape[-1:-3:-1] if trans_a else a.shape[-2:]
    Kb, N = b.shape[-1:-3:-1] if trans_b else b.shape[-2:]
    if K != Kb:
        raise ValueError(f"inner dimensions differ: op(a) is ({M}, {K}) but op(b) is ({Kb}, {N})")
    if batched and a.shape[0] != b.shape[0]:
        raise ValueError(f"batch sizes differ: {a.shape[0]} and {b.shape[0]}")
    return M, N, K


def _compute_type() -> int:
    from llmc_lessons.layers.matmul import tf32_enabled
    return CUBLAS_COMPUTE_32F_FAST_TF32 if tf32_enabled() else CUBLAS_COMPUTE_32F


def gemm(a, b, trans_a: bool = False, trans_b: bool = False, out=None, accumulate: bool = False):
    """out (M, N) = op(a) @ op(b), or out += op(a) @ op(b) with accumulate; op(x) = x.T when trans_x.

    a: (M, K), or (K, M) with trans_a; b: (K, N), or (N, K) with trans_b; float32, C-contiguous.
    """
    M, N, K = _operands(a, b, trans_a, trans_b, batched=False)
    out = _output(out, (M, N), accumulate)
    _announce("cublas gemm")
    if not device.on_gpu() or K == 0:  # (cuBLAS refuses K = 0; the product of empty sums is 0)
        prod = (a.T if trans_a else a) @ (b.T if trans_b else b)
        if accumulate:
            out += prod
        else:
            out[...] = prod
        return out
    if M and N:
        from cupy_backends.cuda.libs import cublas
        handle = device.xp.cuda.device.get_cublas_handle()
        cublas.gemmEx(handle, CUBLAS_OP_T if trans_b else CUBLAS_OP_N, CUBLAS_OP_T if trans_a else CUBLAS_OP_N,
                      N, M, K, _ONE.ctypes.data, b.data.ptr, CUDA_R_32F, K if trans_b else N,
                      a.data.ptr, CUDA_R_32F, M if trans_a else K, (_ONE if accumulate else _ZERO).ctypes.data,
                      out.data.ptr, CUDA_R_32F, N, _compute_type(), CUBLAS_GEMM_DEFAULT)
    return out


def gemm_batched(a, b, trans_a: bool = False, trans_b: bool = False, out=None):
    """out[i] = op(a[i]) @ op(b[i]) for each i of the leading axis: (L, M, K) @ (L, K, N) -> (L, M, N)."""
    M, N, K = _operands(a, b, trans_a, trans_b, batched=True)
    L = a.shape[0]
    out = _output(out, (L, M, N), False)
    _announce("cublas gemm_batched")
    if not device.on_gpu() or K == 0:
        out[...] = (a.transpose(0, 2, 1) if trans_a else a) @ (b.transpose(0, 2, 1) if trans_b else b)
        return out
    if L and M and N:
        from cupy_backends.cuda.libs import cublas
        handle = device.xp.cuda.device.get_cublas_handle()
        cublas.gemmStridedBatchedEx(
            handle, CUBLAS_OP_T if trans_b else CUBLAS_OP_N, CUBLAS_OP_T if trans_a else CUBLAS_OP_N, N, M, K,
            _ONE.ctypes.data, b.data.ptr, CUDA_R_32F, K if trans_b else N, K * N,
            a.data.ptr, CUDA_R_32F, M if trans_a else K, M * K,
            _ZERO.ctypes.data, out.data.ptr, CUDA_R_32F, N, M * N, L, _compute_type(), CUBLAS_GEMM_DEFAULT)
    return out


def gemm_bf16(a, b, trans_b: bool, M: int, N: int, K: int):
    """GPU only: (M, K) bf16 @ (K, N) or (N, K)^T bf16 -> (M, N) float32, fp32 accumulation on tensor cores."""
    out = device.xp.empty((M, N), dtype=np.float32)
    _announce("cublas gemm bf16")
    if M and N and K:
        from cupy_backends.cuda.libs import cublas
        handle = device.xp.cuda.device.get_cublas_handle()
        cublas.gemmEx(handle, CUBLAS_OP_T if trans_b else CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, _ONE.ctypes.data,
                      b.data.ptr, CUDA_R_16BF, K if trans_b else N, a.data.ptr, CUDA_R_16BF, K,
                      _ZERO.ctypes.data, out.data.ptr, CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
    elif M and N:
        out.fill(0)
    return out


def _announce(name: str) -> None:
    from llmc_lessons.cuda import launch_listeners
    for listener in launch_listeners:
        listener(name)


def _output(out, shape, accumulate: bool):
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs an `out` to add into")
        return device.xp.empty(shape, dtype=np.float32)
    return device.require_array("out", out, shape=shape)
