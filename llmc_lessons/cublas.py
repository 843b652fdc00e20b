"""Row-major matrix products through cuBLAS, without copies, honouring the course's TF32 switch.

CuPy's `matmul` copies a transposed operand before calling cuBLAS and its batched path ignores the TF32
setting, which cost the training step a fifth of its time. The functions here call cuBLAS directly, as
llm.c does: cuBLAS is column-major, and a row-major (M, N) matrix is the column-major (N, M) matrix, so
C = op(A) @ op(B) is computed as C^T = op(B)^T @ op(A)^T with no data moved. On a CPU they are NumPy (but
gemm_bias, the bias epilogue, which runs on a GPU only).
Operands are float32, or bf16 (lesson 14: uint16 arrays holding the bits) with float32 accumulation. gemm of
float32 operands goes through cuBLAS's gemmEx; gemm of bf16 operands and gemm_bias through cuBLASLt, with the
algorithm measured fastest for their shape (AlgorithmChoices); gemm_batched through cublasGemmStridedBatchedEx.
"""
from __future__ import annotations

import ctypes
import json
import os
import warnings

import numpy as np

from llmc_lessons import device, timing
from llmc_lessons.cuda import launch_listeners
from llmc_lessons.files import atomic_write, cache_dir, locked
from llmc_lessons.precision import from_bf16, tf32_enabled, to_bf16

CUDA_R_32F = 0
CUDA_R_16BF = 14
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_STATUS_NOT_SUPPORTED = 15
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
    if M and N and not (a.dtype == np.uint16 and _lt_matmul(a, b, trans_a, trans_b, out, accumulate)):
        lib, handle = _library(a.dtype)     # float32 operands, or a bf16 shape cuBLASLt has no algorithm for
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
    if not _lt_matmul(x, weight, False, True, out, False, bias):
        raise RuntimeError(f"cuBLASLt has no algorithm for this product with its bias (M={M}, N={N}, K={K})")
    return out


class _Algo(ctypes.Structure):              # cublasLtMatmulAlgo_t: opaque, 8 uint64, may be saved and restored
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _HeuristicResult(ctypes.Structure):   # cublasLtMatmulHeuristicResult_t
    _fields_ = [("algo", _Algo), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


CANDIDATES = 8
"""How many of cuBLASLt's heuristic's algorithms (best guess first) AlgorithmChoices measures for a product."""
MARGIN = 0.03
"""AlgorithmChoices keeps the heuristic's first algorithm unless another is faster by more than this fraction (a
difference within timing noise does not change the product's bits)."""
ROUNDS = 3
"""AlgorithmChoices times the candidates ROUNDS times over, taking turns (each round starting one candidate later),
and compares their medians: one slow or fast moment of the GPU (its clock moves as it heats) does not decide."""
MEASURED_FLOPS = 2 ** 30
"""Products of fewer FLOPs (2MNK) are not measured: their time is mostly the launch, and generation's short
sequences would otherwise measure a new shape at every length. They run the heuristic's first algorithm."""
ALGORITHM_MODES = ("measure", "heuristic")
FORMAT = 1   # of the file of choices, part of its name: a file of another format is another file


class AlgorithmChoices:
    """Which of cuBLASLt's candidate algorithms each bf16 product shape runs, and where that choice is kept.

    cuBLASLt's heuristic ranks the algorithms that can compute a product, but its first guess is not always the
    fastest (results/profile/gemmalgos-h100-2026-12-07.log). Each algorithm adds in its own order, so each gives
    slightly different bits, and a product must run the same algorithm every time it is called: launched alone or
    recorded into a CUDA graph, in this run or the next.

    mode "measure" (the default; $LLMC_GEMM_ALGORITHMS): at a shape's first call, time each candidate on that
    call's own operands (ROUNDS rounds, taking turns) and keep the fastest (the heuristic's first unless another
    is MARGIN faster). The choice goes to `path` (one JSON file per GPU model and cuBLASLt version, written
    atomically, under a lock shared with other processes); a later process reads it there and measures nothing,
    and where two processes measure the same shape at once, the first to write wins and the other takes its
    choice. Where a shape cannot be measured (while a CUDA graph is being recorded; a small product: can_measure
    False) the file's choice is used if it has one, else the heuristic's first, for this process only; so for a
    shape with one candidate. A file that cannot be written leaves the choices to this process (one warning).
    mode "heuristic": the heuristic's first algorithm always, nothing measured, read or written.
    """

    def __init__(self, path, mode: str = "measure"):
        if mode not in ALGORITHM_MODES:
            raise ValueError(f"the cuBLASLt algorithm mode must be one of {ALGORITHM_MODES}, got {mode!r} "
                             "(set by $LLMC_GEMM_ALGORITHMS)")
        self.path, self.mode, self.writable = path, mode, True
        self.chosen = {}                                   # key -> algorithm bytes, for the life of the process
        self.counts = dict(measured=0, read=0, heuristic=0)

    def choose(self, key: str, candidates: list, measure, can_measure: bool, usable=lambda algo: True) -> bytes:
        """The algorithm (bytes) for the product `key`, of `candidates` (bytes, the heuristic's order; at least
        one). measure(i) -> ms times candidate i on the call's operands (inf where it failed); usable(algo) says
        whether an algorithm read from the file still fits this product (cublasLtMatmulAlgoCheck)."""
        if key in self.chosen:
            return self.chosen[key]
        if self.mode == "heuristic" or len(candidates) == 1:
            return self._keep(key, candidates[0], "heuristic")
        saved = self._saved(key, usable)
        if saved is not None:
            return self._keep(key, saved, "read")
        if not can_measure:
            return self._keep(key, candidates[0], "heuristic")
        n = len(candidates)
        rounds = [{i % n: measure(i % n) for i in range(r, r + n)} for r in range(ROUNDS)]
        times = [float(np.median([r[i] for r in rounds])) for i in range(n)]
        best = min(range(n), key=times.__getitem__)
        if times[best] > times[0] * (1 - MARGIN):
            best = 0
        if times[best] == float("inf"):        # every candidate failed: the call will say why; nothing to keep
            return self._keep(key, candidates[0], "heuristic")
        algo = candidates[best]
        try:
            with locked(self.path):
                entries = self._read(set_aside=True)
                theirs = entries.get(key)
                if theirs is not None and usable(bytes.fromhex(theirs["algo"])):
                    algo = bytes.fromhex(theirs["algo"])    # another process measured it first: the same bits
                elif self.writable:
                    entries[key] = dict(algo=algo.hex(), ms=round(times[best], 5), first_ms=round(times[0], 5),
                                        candidate=best, candidates=n)
                    atomic_write(self.path, json.dumps(dict(format=FORMAT, choices=entries), indent=1).encode())
        except OSError as e:
            self._unwritable(e)
        return self._keep(key, algo, "measured")

    def _keep(self, key: str, algo: bytes, how: str) -> bytes:
        self.counts[how] += 1
        self.chosen[key] = algo
        return algo

    def _unwritable(self, e: OSError) -> None:
        if self.writable:
            warnings.warn(f"the cuBLASLt algorithm choices cannot be kept in {self.path} ({type(e).__name__}: {e}); "
                          "this process keeps them for itself, and the next measures them again",
                          RuntimeWarning, stacklevel=4)
        self.writable = False

    def _saved(self, key: str, usable):
        entry = self._read(set_aside=False).get(key)
        if entry is None:
            return None
        algo = bytes.fromhex(entry["algo"])
        return algo if usable(algo) else None

    def _read(self, set_aside: bool) -> dict:
        """The file's choices ({} where there is none, or it cannot be read). set_aside (under the lock): a file
        that is not a file of choices is reported and renamed with .unreadable, not written over."""
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read())
            entries = data["choices"]
            if data.get("format") != FORMAT or not all(
                    isinstance(e, dict) and isinstance(e.get("algo"), str)
                    and len(bytes.fromhex(e["algo"])) == ctypes.sizeof(_Algo) for e in entries.values()):
                raise ValueError(f"not a format-{FORMAT} file of algorithm choices")
            return entries
        except FileNotFoundError:
            return {}
        except OSError as e:
            self._unwritable(e)
            return {}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            if set_aside:
                aside = f"{self.path}.unreadable"
                os.replace(self.path, aside)
                warnings.warn(f"{self.path} could not be read ({type(e).__name__}: {e}); it is now {aside}, and the "
                              "products' algorithms are measured again", RuntimeWarning, stacklevel=4)
            return {}

    def report(self) -> dict:
        """What this process did: the mode, the file, how many shapes were measured, read from it, or given the
        heuristic's first algorithm."""
        return dict(mode=self.mode, path=str(self.path), **self.counts)


_lt = {}   # cuBLASLt: the library, the course's handle, its products by shape, the algorithm choices


def _lt_library():
    """cuBLASLt through ctypes (loaded with cuBLAS), and the course's handle for it."""
    if not _lt:
        _library()                                    # cuBLAS first: it loads cuBLASLt and sets up the workspace
        path = next((line.split()[-1] for line in open("/proc/self/maps") if "/libcublasLt.so" in line), None)
        if path is None:
            raise RuntimeError("cuBLASLt is not loaded in this process: the course's bf16 products need it")
        lib = ctypes.CDLL(path)
        ptr, i32, u64, i64, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
        lib.cublasLtCreate.argtypes = [ptr]
        lib.cublasLtGetVersion.restype = size
        lib.cublasLtMatmulDescCreate.argtypes = [ptr, i32, i32]
        lib.cublasLtMatmulDescSetAttribute.argtypes = [ptr, i32, ptr, size]
        lib.cublasLtMatrixLayoutCreate.argtypes = [ptr, i32, u64, u64, i64]
        lib.cublasLtMatmulPreferenceCreate.argtypes = [ptr]
        lib.cublasLtMatmulPreferenceSetAttribute.argtypes = [ptr, i32, ptr, size]
        lib.cublasLtMatmulAlgoGetHeuristic.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, ptr, ptr]
        lib.cublasLtMatmulAlgoCheck.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
        lib.cublasLtMatmul.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, size, ptr]
        handle = ptr()
        _check("cublasLtCreate", lib.cublasLtCreate(ctypes.byref(handle)))
        name = device.xp.cuda.runtime.getDeviceProperties(device.xp.cuda.Device().id)["name"]
        name = "-".join("".join(c if c.isalnum() else " " for c in name.decode().lower()).split())
        mode = os.environ.get("LLMC_GEMM_ALGORITHMS", "measure")
        version = lib.cublasLtGetVersion()
        choices = AlgorithmChoices(cache_dir() / f"cublaslt-{name}-{version}-format{FORMAT}.json", mode)
        _lt.update(lib=lib, handle=handle.value, products={}, choices=choices)
    return _lt["lib"]


def algorithm_report() -> dict:
    """How this process chose its cuBLASLt algorithms (AlgorithmChoices.report; {} before any bf16 product)."""
    return _lt["choices"].report() if _lt else {}


def _alignment(ptr: int) -> int:
    """The largest power of two up to 256 that divides a device address."""
    return min(256, ptr & -ptr)


class _LtProduct:
    """One product shape in cuBLASLt's column-major terms, made at its first call and kept (the process's few):
    row-major out (M, N) = op(a) @ op(b) is column-major out^T (N, M) = op(b)^T @ op(a)^T, so cuBLASLt's A is b and
    its B is a, each described as stored. The search preference tells the heuristic the workspace (none for bf16:
    WORKSPACE_BYTES) and how the operands are aligned (a weight is a view into the flat parameters)."""

    def __init__(self, lib, M, N, K, trans_a, trans_b, out_type, bias, align):
        self.lib, self.algo = lib, None
        self.desc, self.pref = ctypes.c_void_p(), ctypes.c_void_p()
        _check("cublasLtMatmulDescCreate", lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), CUBLAS_COMPUTE_32F,
                                                                           CUDA_R_32F))
        self.attr(CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T if trans_b else CUBLAS_OP_N, ctypes.c_int32)
        self.attr(CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_T if trans_a else CUBLAS_OP_N, ctypes.c_int32)
        if bias:
            self.attr(CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_BIAS, ctypes.c_uint32)
            self.attr(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, CUDA_R_16BF, ctypes.c_int32)
        self.a = self.layout(CUDA_R_16BF, *((K, N) if trans_b else (N, K)))
        self.b = self.layout(CUDA_R_16BF, *((M, K) if trans_a else (K, M)))
        self.d = self.layout(out_type, N, M)
        ws = ctypes.c_uint64(WORKSPACE_BYTES[np.dtype(np.uint16)])
        _check("cublasLtMatmulPreferenceCreate", lib.cublasLtMatmulPreferenceCreate(ctypes.byref(self.pref)))
        _check("cublasLtMatmulPreferenceSetAttribute", lib.cublasLtMatmulPreferenceSetAttribute(
            self.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws), ctypes.sizeof(ws)))
        for attribute, value in zip(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_BYTES, align):
            v = ctypes.c_uint32(value)
            _check("cublasLtMatmulPreferenceSetAttribute", lib.cublasLtMatmulPreferenceSetAttribute(
                self.pref, attribute, ctypes.byref(v), ctypes.sizeof(v)))
        found, count = (_HeuristicResult * CANDIDATES)(), ctypes.c_int(0)
        status = lib.cublasLtMatmulAlgoGetHeuristic(_lt["handle"], self.desc, self.a, self.b, self.d, self.d,
                                                    self.pref, CANDIDATES, found, ctypes.byref(count))
        if status != CUBLAS_STATUS_NOT_SUPPORTED:      # what it answers where no algorithm fits: no candidates
            _check("cublasLtMatmulAlgoGetHeuristic", status)
        found = [] if status else found[:count.value]
        self.candidates = [bytes(r.algo) for r in found if r.state == 0]

    def attr(self, name, value, ctype):
        v = ctype(value)
        _check("cublasLtMatmulDescSetAttribute",
               self.lib.cublasLtMatmulDescSetAttribute(self.desc, name, ctypes.byref(v), ctypes.sizeof(v)))

    def layout(self, dtype, rows, cols):
        h = ctypes.c_void_p()
        _check("cublasLtMatrixLayoutCreate", self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(h), dtype, rows, cols,
                                                                                  rows))
        return h

    def usable(self, algo: bytes) -> bool:
        """Whether cuBLASLt accepts `algo` for this product without a workspace (cublasLtMatmulAlgoCheck; with a
        bias epilogue, after run() or set_bias() has set the bias pointer)."""
        result = _HeuristicResult()
        status = self.lib.cublasLtMatmulAlgoCheck(_lt["handle"], self.desc, self.a, self.b, self.d, self.d,
                                                  ctypes.byref(_Algo.from_buffer_copy(algo)), ctypes.byref(result))
        return status == 0 and result.workspaceSize <= WORKSPACE_BYTES[np.dtype(np.uint16)]

    def set_bias(self, bias) -> None:
        if bias is not None:      # the descriptor is shared by the shape's calls: each sets its own (one thread)
            self.attr(CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias.data.ptr, ctypes.c_void_p)

    def run(self, algo, a, b, out, beta, bias):
        self.set_bias(bias)
        _check("cublasLtMatmul", self.lib.cublasLtMatmul(
            _lt["handle"], self.desc, _ONE.ctypes.data, b.data.ptr, self.a, a.data.ptr, self.b, beta.ctypes.data,
            out.data.ptr, self.d, out.data.ptr, self.d, ctypes.byref(algo), _lib["workspace"].data.ptr,
            WORKSPACE_BYTES[np.dtype(np.uint16)], device.xp.cuda.get_current_stream().ptr))


def _lt_matmul(a, b, trans_a: bool, trans_b: bool, out, accumulate: bool, bias=None) -> bool:
    """out (M, N) = op(a) @ op(b) (+ bias, into the float32 sums) (+ out with accumulate) through cuBLASLt, a and b
    bf16 (uint16), out bf16 or float32, with the algorithm AlgorithmChoices gives this shape. False where cuBLASLt
    has no algorithm for it (nothing is launched)."""
    lib = _lt_library()
    M, N = out.shape
    K = a.shape[0] if trans_a else a.shape[1]
    align = tuple(_alignment(x.data.ptr) for x in (b, a, out, out))      # cuBLASLt's A, B, C, D
    key = (M, N, K, trans_a, trans_b, out.dtype.char, accumulate, bias is not None, align)
    beta = _ONE if accumulate else _ZERO
    product = _lt["products"].get(key)
    if product is None:
        product = _LtProduct(lib, M, N, K, trans_a, trans_b, _cuda_type(out.dtype), bias is not None, align)
        if product.candidates:
            product.set_bias(bias)
            product.algo = _Algo.from_buffer_copy(_choose(product, key, a, b, out, beta, bias))
        _lt["products"][key] = product          # kept once chosen: a failed choice is tried again at the next call
    if product.algo is None:
        return False
    try:
        product.run(product.algo, a, b, out, beta, bias)
    except RuntimeError as e:
        raise RuntimeError(f"{e}; its algorithm came from {_lt['choices'].path} or cuBLASLt's heuristic: delete that "
                           "file, or set LLMC_GEMM_ALGORITHMS=heuristic, to choose again") from None
    return True


def _choose(product, key, a, b, out, beta, bias) -> bytes:
    """AlgorithmChoices.choose for this call's product, timed on its operands where it may be. The timing writes
    out; a product that adds into out gets it back as it was, also if the choice fails."""
    kept = []

    def measure(i):
        if beta is _ONE and not kept:
            kept.append(out.get())
        return _measure(product, i, a, b, out, beta, bias)
    M, N, K = key[:3]
    can_measure = 2 * M * N * K >= MEASURED_FLOPS and not device.xp.cuda.get_current_stream().is_capturing()
    try:
        return _lt["choices"].choose(_choice_key(key), product.candidates, measure, can_measure, product.usable)
    finally:
        if kept:
            out.set(kept[0])


def _choice_key(key) -> str:
    M, N, K, trans_a, trans_b, out_char, accumulate, bias, align = key
    return (f"bf16 {'T' if trans_a else 'N'}{'T' if trans_b else 'N'} M={M} N={N} K={K} "
            f"out={'bf16' if out_char == np.dtype(np.uint16).char else 'float32'}"
            f"{' +=' if accumulate else ''}{' +bias' if bias else ''} align={','.join(map(str, align))}")


def _measure(product, i, a, b, out, beta, bias) -> float:
    """GPU milliseconds of candidate i on the call's own operands (timing.burst_ms; AlgorithmChoices takes turns
    and medians), inf where it fails. It writes the call's out."""
    algo = _Algo.from_buffer_copy(product.candidates[i])
    try:
        return timing.burst_ms(lambda: product.run(algo, a, b, out, beta, bias))
    except RuntimeError:
        return float("inf")


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
