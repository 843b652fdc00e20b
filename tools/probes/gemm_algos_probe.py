"""How much faster than cuBLAS's default choice (gemm: cublasGemmEx) the best of cuBLASLt's top algorithms runs, for
every product shape of the bf16 step at d12 and d48."""
import ctypes, json, sys, numpy as np, cupy as cp
from llmc_lessons import timing, cublas
from llmc_lessons.cublas import gemm, _check, _HeuristicResult
from llmc_lessons.layers.bf16 import float_to_bf16_cuda
def out(**kw): print(json.dumps(kw), flush=True)
gen = cp.random.default_rng(0)
def bf(shape): return float_to_bf16_cuda(gen.standard_normal(shape, dtype=np.float32) * 0.1)
cublas._library(np.uint16)
lib = cublas._lt_library(); handle = cublas._lt["handle"]
ws_buf = cp.empty(64 * 2**20, np.uint8)

def lt_algos(a, b, trans_a, trans_b, outm, beta, ws_bytes, count=16):
    """row-major out (M, N) = op(a) @ op(b) as cuBLASLt column-major out^T = op(b)^T @ op(a)^T."""
    M, N = outm.shape
    K = a.shape[0] if trans_a else a.shape[1]
    t_out = 14 if outm.dtype == np.uint16 else 0
    def layout(t, r, c):
        h = ctypes.c_void_p(); _check("l", lib.cublasLtMatrixLayoutCreate(ctypes.byref(h), t, r, c, r)); return h
    # A_cm = b: row-major (K, N) [or (N, K) if trans_b] = col-major (N, K) [or (K, N)]
    la = layout(14, K, N) if trans_b else layout(14, N, K)
    lb = layout(14, M, K) if trans_a else layout(14, K, M)
    ld = layout(t_out, N, M)
    desc = ctypes.c_void_p(); _check("d", lib.cublasLtMatmulDescCreate(ctypes.byref(desc), 68, 0))
    for name, val in ((3, 1 if trans_b else 0), (4, 1 if trans_a else 0)):
        v = ctypes.c_int32(val); _check("a", lib.cublasLtMatmulDescSetAttribute(desc, name, ctypes.byref(v), 4))
    pref = ctypes.c_void_p(); _check("p", lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)))
    w = ctypes.c_uint64(ws_bytes); _check("pa", lib.cublasLtMatmulPreferenceSetAttribute(pref, 1, ctypes.byref(w), 8))
    res = (_HeuristicResult * count)(); n = ctypes.c_int(0)
    _check("h", lib.cublasLtMatmulAlgoGetHeuristic(handle, desc, la, lb, ld, ld, pref, count, res, ctypes.byref(n)))
    one, bt = np.ones(1, np.float32), np.array([beta], np.float32)
    runs = []
    for i in range(n.value):
        def run(i=i):
            _check("m", lib.cublasLtMatmul(handle, desc, one.ctypes.data, b.data.ptr, la, a.data.ptr, lb, bt.ctypes.data,
                                           outm.data.ptr, ld, outm.data.ptr, ld, ctypes.byref(res[i].algo), ws_buf.data.ptr,
                                           ws_bytes, cp.cuda.get_current_stream().ptr))
        runs.append((run, res[i].workspaceSize))
    return runs

total = {}
for size, BT, C, reps in (("d12", 16384, 768, 12), ("d48", 8192, 1600, 48)):
    Vp = 50304
    shapes = {"qkv": 3 * C, "attproj": C, "fc": 4 * C, "fcproj_in4C": C, "classifier": Vp}
    for name, N in shapes.items():
        K = 4 * C if name == "fcproj_in4C" else C
        x, w = bf((BT, K)), bf((N, K))
        dout = bf((BT, N))
        cases = [("forward", x, w, False, True, cp.empty((BT, N), np.uint16), 0.0),
                 ("dinp", dout, w, False, False, cp.empty((BT, K), np.uint16), 0.0),
                 ("dW", dout, x, True, False, cp.zeros((N, K), np.float32), 1.0)]
        for what, a, b, ta, tb, o, beta in cases:
            t_def = timing.time_ms(lambda: gemm(a, b, trans_a=ta, trans_b=tb, out=o, accumulate=beta == 1.0), warmup=3, repeat=15)
            best = {}
            for ws in (0, 32 * 2**20):
                times = []
                for run, wsz in lt_algos(a, b, ta, tb, o, beta, ws):
                    try:
                        times.append(timing.time_ms(run, warmup=2, repeat=10))
                    except Exception as e:
                        times.append(None)
                ok = [t for t in times if t is not None]
                best[ws] = (min(ok) if ok else None, times[0] if times else None, len(times))
            t_over = timing.time_ms(lambda: gemm(a, b, trans_a=ta, trans_b=tb, out=o), warmup=3, repeat=15) if beta else None
            mult = (1 if name == "classifier" else reps)
            out(size=size, product=name, what=what, default_ms=round(t_def, 4), lt_ws0_best=best[0][0], lt_ws0_first=best[0][1],
                n_ws0=best[0][2], lt_ws32_best=best[32 * 2**20][0], lt_ws32_first=best[32 * 2**20][1], per_step_calls=mult, default_overwrite_ms=t_over)
            d = total.setdefault(size, [0.0, 0.0])
            d[0] += t_def * mult; d[1] += min(x for x in (t_def, best[0][0]) if x is not None) * mult
        del x, w, dout
        cp.get_default_memory_pool().free_all_blocks()
out(total_ms_default_vs_best_ws0=total)
