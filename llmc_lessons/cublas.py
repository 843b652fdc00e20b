"""Row-major matrix products through cuBLAS's gemmEx, without copies, honouring the course's TF32 switch.

CuPy's `matmul` copies a transposed operand before calling cuBLAS and its batched path ignores the TF32
setting, which cost the training step a fifth of its time. The functions here call cuBLAS directly, as
llm.c does: cuBLAS is column-major, and a row-major (M, N) matrix is the column-major (N, M) matrix, so
C = op(A) @ op(B) is computed as C^T = op(B)^T @ op(A)^T with no data moved. On a CPU they are NumPy (but
gemm_bias, the bias epilogue, which runs on a GPU only).
Operands are float32, or bf16 (lesson 14: uint16 arrays holding the bits) with float32 accumulation.
"""
from __future__ import annotations

import ctypes

import numpy as np

from llmc_lessons import device
from llmc_lessons.cuda import launch_listeners
from llmc_lessons.precision import from_bf16, tf32_enabled, to_bf16

CUDA_R_32F = 0
CUDA_R_16BF = 14
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
CUBLAS_GEMM_DEFAULT = -1
_ONE, _ZERO = np.ones(1, np.float32), np.zeros(1, np.float32)


def _operands(a, b, trans_a: bool, trans_b: bool, batched: bool):
    nd = 3 if batched else 2
    device.require_array("a", a, shape=(None,) * nd, dtype=(np.float32, np.uint16))
    device.require_array("b", b, shape=(None,) * nd, dtype=(np.float32, np.uint16))
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype (float32, or uint16 holding bf16), got {a.dtype} and {b.dtype}")
    M, K = a.shape[-1:-3:-1] if trans_a else a.shape[-2:]
    Kb, N = b.shape[-1:-3:-1] if trans_b else b.shape[-2:]
    if K != Kb:
        raise ValueError(f"inner dimensions differ: op(a) is ({M}, {K}) but op(b) is ({Kb}, {N})")
    if batched and a.shape[0] != b.shape[0]:
        raise ValueError(f"batch sizes differ: {a.shape[0]} and {b.shape[0]}")
    return M, N, K


def _compute_type(dtype) -> int:
    """bf16 inputs: float32 accumulation on the tensor cores. float32 inputs: float32, or TF32 when it is on."""
    if dtype == np.uint16:
        return CUBLAS_COMPUTE_32F
    return CUBLAS_COMPUTE_32F_FAST_TF32 if tf32_enabled() else CUBLAS_COMPUTE_32F


def _cuda_type(dtype) -> int:
    return CUDA_R_16BF if dtype == np.uint16 else CUDA_R_32F


def _host_product(a, b, trans_a, trans_b, out, accumulate):
    """The CPU path: NumPy in float32, bf16 operands widened exactly, a bf16 result rounded to nearest-even
    once at the end, as cuBLAS does with its float32 accumulator."""
    if a.dtype == np.uint16:
        a, b = from_bf16(a), from_bf16(b)
    prod = (a.swapaxes(-1, -2) if trans_a else a) @ (b.swapaxes(-1, -2) if trans_b else b)
    if out.dtype == np.uint16:
        out[...] = to_bf16((from_bf16(out) + prod) if accumulate else prod)
    elif accumulate:
        out += prod
    else:
        out[...] = prod
    return out


def gemm(a, b, trans_a: bool = False, trans_b: bool = False, out=None, accumulate: bool = False,
         out_dtype=None):
    """out (M, N) = op(a) @ op(b), or out += op(a) @ op(b) with accumulate; op(x) = x.T when trans_x.

    a: (M, K), or (K, M) with trans_a; b: (K, N), or (N, K) with trans_b; C-contiguous, both float32 or both
    uint16 holding bf16 bits (lesson 14). out: float32 or bf16 (uint16); a new one of out_dtype (default: the
    inputs' dtype) when None. bf16 products accumulate in float32 and round once, into out's type.
    """
    M, N, K = _operands(a, b, trans_a, trans_b, batched=False)
    out = _output(out, (M, N), accumulate, a.dtype if out_dtype is None else out_dtype, a.dtype)
    _announce("cublas gemm")
    if not device.on_gpu():
        return _host_product(a, b, trans_a, trans_b, out, accumulate)
    if K == 0:  # cuBLAS refuses K = 0; the product of empty sums is 0
        return _zero_k(out, accumulate)
    if M and N:
        lib, handle = _library(a.dtype)
        t_in, t_out = _cuda_type(a.dtype), _cuda_type(out.dtype)
        _check("cublasGemmEx", lib.cublasGemmEx(
            handle, CUBLAS_OP_T if trans_b else CUBLAS_OP_N, CUBLAS_OP_T if trans_a else CUBLAS_OP_N,
            N, M, K, _ONE.ctypes.data, b.data.ptr, t_in, K if trans_b else N,
            a.data.ptr, t_in, M if trans_a else K, (_ONE if accumulate else _ZERO).ctypes.data,
            out.data.ptr, t_out, N, _compute_type(a.dtype), CUBLAS_GEMM_DEFAULT))
    return out


def gemm_batched(a, b, trans_a: bool = False, trans_b: bool = False, out=None, out_dtype=None):
    """out[i] = op(a[i]) @ op(b[i]) for each i of the leading axis: (L, M, K) @ (L, K, N) -> (L, M, N).
    Types as gemm's."""
    M, N, K = _operands(a, b, trans_a, trans_b, batched=True)
    L = a.shape[0]
    out = _output(out, (L, M, N), False, a.dtype if out_dtype is None else out_dtype, a.dtype)
    _announce("cublas gemm_batched")
    if not device.on_gpu():
        return _host_product(a, b, trans_a, trans_b, out, False)
    if K == 0:  # cuBLAS refuses K = 0; the product of empty sums is 0
        return _zero_k(out, False)
    if L and M and N:
        lib, handle = _library(a.dtype)
        t_in, t_out = _cuda_type(a.dtype), _cuda_type(out.dtype)
        _check("cublasGemmStridedBatchedEx", lib.cublasGemmStridedBatchedEx(
            handle, CUBLAS_OP_T if trans_b else CUBLAS_OP_N, CUBLAS_OP_T if trans_a else CUBLAS_OP_N, N, M, K,
            _ONE.ctypes.data, b.data.ptr, t_in, K if trans_b else N, K * N,
            a.data.ptr, t_in, M if trans_a else K, M * K,
            _ZERO.ctypes.data, out.data.ptr, t_out, N, M * N, L, _compute_type(a.dtype), CUBLAS_GEMM_DEFAULT))
    return out


# cuBLASLt (the library under cuBLAS's products, with epilogues): the values of its enums that the course uses
CUBLASLT_EPILOGUE_BIAS = 4
CUBLASLT_MATMUL_DESC_TRANSA, CUBLASLT_MATMUL_DESC_TRANSB, CUBLASLT_MATMUL_DESC_EPILOGUE = 3, 4, 7
CUBLASLT_MATMUL_DESC_BIAS_POINTER, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE = 8, 26
CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1
CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_BYTES = (5, 6, 7, 8)   # of A, B, C, D: the search assumes 256 unless told


def gemm_bias(x, weight, bias, out=None):
    """GPU only (layers/matmul.py's linear_bf16 is the call that also runs on a CPU): one cuBLASLt product of bf16
    operands with the bias in its epilogue, out (M, N) bf16 = x (M, K) @ weight^T + bias, weight (N, K) and bias
    (N,) bf16, the bias added to the float32 sums before their one rounding (epilogue BIAS, as llm.c's
    matmul_cublaslt)."""
    if not device.on_gpu():
        raise RuntimeError("gemm_bias runs on a GPU only; layers.matmul.linear_bf16 gives the same numbers on a CPU")
    M, N, K = _operands(x, weight, False, True, batched=False)
    if x.dtype != np.uint16:
        raise TypeError("gemm_bias takes bf16 (uint16) operands")
    device.require_array("bias", bias, shape=(N,), dtype=np.uint16)
    out = (device.xp.empty((M, N), np.uint16) if out is None     # bf16 only: cuBLASLt writes the dtype it is told
           else device.require_array("out", out, shape=(M, N), dtype=np.uint16))
    if N % 8:
        raise ValueError(f"the epilogue's rows (N = {N}) must be a multiple of 8")
    if not (M and N and K):
        raise ValueError(f"gemm_bias needs M, N, K > 0, got {M}, {N}, {K}")
    for name, a in (("x", x), ("weight", weight), ("bias", bias), ("out", out)):
        if device.address(a) % 16:
            raise ValueError(f"{name} must start on a 16-byte boundary for cuBLASLt's epilogue")
    _announce("cublasLt gemm + bias")
    align = tuple(_alignment(a.data.ptr) for a in (weight, x, out, out))    # A, B, C, D
    lib, handle, (layouts, pref) = _lt_library(), _lt["handle"], _lt_layouts(M, N, K, align)
    desc = ctypes.c_void_p()
    _check("cublasLtMatmulDescCreate", lib.cublasLtMatmulDescCreate(ctypes.byref(desc), CUBLAS_COMPUTE_32F,
                                                                       CUDA_R_32F))
    try:
        def attr(name, value, ctype):
            v = ctype(value)
            _check("cublasLtMatmulDescSetAttribute",
                   lib.cublasLtMatmulDescSetAttribute(desc, name, ctypes.byref(v), ctypes.sizeof(v)))
        # column-major: out^T (N, M) = weight (stored as (K, N)) transposed @ x^T (K, M)
        attr(CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T, ctypes.c_int32)
        attr(CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N, ctypes.c_int32)
        attr(CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_BIAS, ctypes.c_uint32)
        attr(CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias.data.ptr, ctypes.c_void_p)
        attr(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, CUDA_R_16BF, ctypes.c_int32)
        a_layout, b_layout, d_layout = layouts
        found, count = _HeuristicResult(), ctypes.c_int(0)
        _check("cublasLtMatmulAlgoGetHeuristic", lib.cublasLtMatmulAlgoGetHeuristic(
            handle, desc, a_layout, b_layout, d_layout, d_layout, pref, 1, ctypes.byref(found), ctypes.byref(count)))
        if count.value == 0:
            raise RuntimeError(f"cuBLASLt has no algorithm for this product with its bias (M={M}, N={N}, K={K})")
        ws = _lib["workspace"]
        _check("cublasLtMatmul", lib.cublasLtMatmul(
            handle, desc, _ONE.ctypes.data, weight.data.ptr, a_layout, x.data.ptr, b_layout, _ZERO.ctypes.data,
            out.data.ptr, d_layout, out.data.ptr, d_layout, ctypes.byref(found.algo), ws.data.ptr,
            min(WORKSPACE_BYTES[np.dtype(np.uint16)], ws.nbytes),
            device.xp.cuda.get_current_stream().ptr))
    finally:
        lib.cublasLtMatmulDescDestroy(desc)
    return out


class _Algo(ctypes.Structure):              # cublasLtMatmulAlgo_t: opaque, 8 uint64
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _HeuristicResult(ctypes.Structure):   # cublasLtMatmulHeuristicResult_t
    _fields_ = [("algo", _Algo), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


_lt = {}   # cuBLASLt: the library, the course's handle, the matrix layouts and search preference of each shape


def _lt_library():
    """cuBLASLt through ctypes (loaded with cuBLAS), and the course's handle for it."""
    if not _lt:
        _library()                                    # cuBLAS first: it loads cuBLASLt and sets up the workspace
        path = next((line.split()[-1] for line in open("/proc/self/maps") if "/libcublasLt.so" in line), None)
        if path is None:
            raise RuntimeError("cuBLASLt is not loaded in this process: the bias epilogue needs it")
        lib = ctypes.CDLL(path)
        ptr, i32, u64, i64, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
        lib.cublasLtCreate.argtypes = [ptr]
        lib.cublasLtMatmulDescCreate.argtypes = [ptr, i32, i32]
        lib.cublasLtMatmulDescSetAttribute.argtypes = [ptr, i32, ptr, size]
        lib.cublasLtMatmulDescDestroy.argtypes = [ptr]
        lib.cublasLtMatrixLayoutCreate.argtypes = [ptr, i32, u64, u64, i64]
        lib.cublasLtMatmulPreferenceCreate.argtypes = [ptr]
        lib.cublasLtMatmulPreferenceSetAttribute.argtypes = [ptr, i32, ptr, size]
        lib.cublasLtMatmulAlgoGetHeuristic.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, ptr, ptr]
        lib.cublasLtMatmul.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, size, ptr]
        handle = ptr()
        _check("cublasLtCreate", lib.cublasLtCreate(ctypes.byref(handle)))
        _lt.update(lib=lib, handle=handle.value, shapes={})
    return _lt["lib"]


def _alignment(ptr: int) -> int:
    """The largest power of two up to 256 that divides a device address."""
    return min(256, ptr & -ptr)


def _lt_layouts(M: int, N: int, K: int, align: tuple) -> tuple:
    """((A, B, D) matrix layouts, search preference) of a bf16 product out (M, N) = x (M, K) @ weight (N, K)^T in
    cuBLASLt's column-major terms, the preference telling the search how A, B, C and D are aligned (a weight is a
    view into the flat parameters), made once per shape and alignment and kept (the process's few)."""
    key = (M, N, K, align)
    if key not in _lt["shapes"]:
        lib = _lt["lib"]

        def layout(rows, cols):
            h = ctypes.c_void_p()
            _check("cublasLtMatrixLayoutCreate", lib.cublasLtMatrixLayoutCreate(ctypes.byref(h), CUDA_R_16BF, rows,
                                                                                 cols, rows))
            return h
        pref, ws = ctypes.c_void_p(), ctypes.c_uint64(WORKSPACE_BYTES[np.dtype(np.uint16)])
        _check("cublasLtMatmulPreferenceCreate", lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)))
        _check("cublasLtMatmulPreferenceSetAttribute", lib.cublasLtMatmulPreferenceSetAttribute(
            pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws), ctypes.sizeof(ws)))
        for attribute, value in zip(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_BYTES, align):
            v = ctypes.c_uint32(value)
            _check("cublasLtMatmulPreferenceSetAttribute", lib.cublasLtMatmulPreferenceSetAttribute(
                pref, attribute, ctypes.byref(v), ctypes.sizeof(v)))
        # weight (N, K) row-major is (K, N) column-major; x (M, K) is (K, M); out (M, N) is (N, M)
        _lt["shapes"][key] = ((layout(K, N), layout(K, M), layout(N, M)), pref)
    return _lt["shapes"][key]


_lib = {}   # the cuBLAS library CuPy loaded, the course's handle, its workspace, and the stream it is bound to

WORKSPACE_BYTES = {np.dtype(np.uint16): 0, np.dtype(np.float32): 32 * 2**20}
"""The course's cuBLAS workspace for products of bf16 (uint16) and of float32 operands. cuBLAS picks its algorithm
partly by the workspace it has. With NVIDIA's 32 MiB for Hopper, cuBLAS 13's bf16 products on an H100 ran as
kernels that need part of it cleared first, a memset before each (103 a d12 step); with none, as kernels that need
none, and the bf16 step ran 0.3-1.5% faster (d12 and d48). The float32 (TF32) products need theirs: without it the
fp32 step took 112.9 ms instead of 85.3 (results/bench/workspace-h100-2026-12-07.log). The one buffer is set on the
handle, with the size of the product's type, on every stream: a handle without a workspace of its own draws on
cuBLAS's internal pool, outside CuPy's memory pool, which may offer another workspace while a stream records a CUDA
graph; so a product recorded into a graph has the workspace of the same product launched alone (tests/test_cublas.py
checks that both give the same bits)."""


def _library(dtype=np.float32):
    """(cuBLAS through ctypes, the course's handle bound to the current stream, with its workspace for products of
    `dtype` operands: WORKSPACE_BYTES).

    The products call cuBLAS's C functions directly: CuPy's wrappers bind the handle to the current stream at
    every call, and CuPy refuses that while a stream records a CUDA graph (lesson 12), which would keep every
    product out of a graph. The handle is the course's own, so the stream it is bound to is always known."""
    if not _lib:
        import ctypes.util
        from cupy_backends.cuda.libs import cublas   # noqa: F401  (loads libcublas into the process)
        path = next((line.split()[-1] for line in open("/proc/self/maps")
                     if "/libcublas.so" in line), None) or ctypes.util.find_library("cublas")
        lib = ctypes.CDLL(path)
        ptr, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
        lib.cublasGemmEx.argtypes = [ptr, i32, i32, i32, i32, i32, ptr, ptr, i32, i32, ptr, i32, i32, ptr, ptr,
                                     i32, i32, i32, i32]
        lib.cublasGemmStridedBatchedEx.argtypes = [ptr, i32, i32, i32, i32, i32, ptr, ptr, i32, i32, i64, ptr, i32,
                                                   i32, i64, ptr, ptr, i32, i32, i64, i32, i32, i32]
        lib.cublasSetStream_v2.argtypes = [ptr, ptr]
        lib.cublasSetWorkspace_v2.argtypes = [ptr, ptr, ctypes.c_size_t]
        handle = ptr()
        _check("cublasCreate_v2", lib.cublasCreate_v2(ctypes.byref(handle)))
        _lib.update(lib=lib, handle=handle.value, stream=None, workspace_bytes=None,
                    workspace=device.xp.empty(max(WORKSPACE_BYTES.values()), dtype=np.uint8))
    lib, handle, ws = _lib["lib"], _lib["handle"], _lib["workspace"]
    stream, nbytes = device.xp.cuda.get_current_stream().ptr, min(WORKSPACE_BYTES[np.dtype(dtype)], ws.nbytes)
    if _lib["stream"] != stream:
        _check("cublasSetStream_v2", lib.cublasSetStream_v2(handle, stream))
        _lib.update(stream=stream, workspace_bytes=None)
    if _lib["workspace_bytes"] != nbytes:
        # Setting the stream resets the workspace to cuBLAS's own pool: give it ours again, the same buffer on
        # every stream (the course's streams never run at the same time: a recording only records).
        _check("cublasSetWorkspace_v2", lib.cublasSetWorkspace_v2(handle, ws.data.ptr, nbytes))
        _lib["workspace_bytes"] = nbytes
    return lib, handle


def _check(name: str, status: int) -> None:
    if status:
        raise RuntimeError(f"{name} failed with cuBLAS status {status} (see cublasStatus_t in the cuBLAS docs)")


def _zero_k(out, accumulate: bool):
    if not accumulate:
        out.fill(0)
    return out


def _announce(name: str) -> None:
    for listener in launch_listeners:
        listener(name)


def _output(out, shape, accumulate: bool, dtype, in_dtype):
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs an `out` to add into")
        if np.dtype(dtype) not in (np.float32, np.uint16):
            raise TypeError(f"out_dtype must be float32 or uint16 (bf16 bits), got {dtype}")
        out = device.xp.empty(shape, dtype=dtype)
    device.require_array("out", out, shape=shape, dtype=(np.float32, np.uint16))
    if out.dtype == np.uint16 and in_dtype != np.uint16:
        raise TypeError("a bf16 (uint16) output needs bf16 inputs: cuBLAS has no float32 x float32 -> bf16 product")
    return out
