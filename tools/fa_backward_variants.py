"""Backward-kernel probe: version 4's dq and dkdv kernels with the causal mask on every tile (MASK_ALL, today),
on the diagonal tile only, and on the diagonal only with the scores' registers declared outside the loops
(FA_S_OUTSIDE); against version 2's bits, and timed. Then the forward's old kernel with FA_S_OUTSIDE."""
import numpy as np, cupy as cp
from llmc_lessons.cuda import SM90A, load_kernel

def build(name, version, extra=()):
    opts = ("-DHS=64", "-DGROUP=1") + (("-DFA_WGMMA=1", SM90A) if version == 4 else ()) + tuple(extra)
    return load_kernel("flash_attention.cu", name, opts)

def f32(u16):
    return (u16.astype(cp.uint32) << 16).view(cp.float32)

fwd = build("flash_attention_forward_bf16_kernel", 2)
variants = [("v2", 2, ()), ("v4 mask on every tile", 4, ()), ("v4 mask on the diagonal", 4, ("-DMASK_ALL=false",)),
            ("v4 diagonal, s outside", 4, ("-DMASK_ALL=false", "-DFA_S_OUTSIDE=1"))]
kernels = [(n, build("flash_attention_backward_dq_bf16_kernel", v, e), build("flash_attention_backward_dkdv_bf16_kernel", v, e))
           for n, v, e in variants]
rng = np.random.default_rng(1)
for B, T, NH in [(1, 200, 2), (2, 777, 3), (16, 1024, 12), (8, 2048, 12)]:
    tiles, W, C = -(-T // 64), 3 * NH * 64, NH * 64
    bits = lambda a: cp.asarray((a.view(np.uint32) >> 16).astype(np.uint16))
    qkv = bits(rng.standard_normal((B, T, W), dtype=np.float32) * 2)
    dout = bits(rng.standard_normal((B, T, C), dtype=np.float32))
    out, lse = cp.empty((B, T, C), np.uint16), cp.empty((B, NH, T), np.float32)
    fwd((tiles, NH, B), (128,), (out, lse, qkv, np.int32(B), np.int32(T), np.int32(NH), np.int32(NH)))
    sizes = (np.int32(B), np.int32(T), np.int32(NH), np.int32(NH))
    def run(dq, dkdv, dqkv, partial, D):
        dq((tiles, NH, B), (128,), (dqkv, partial, D, dout, qkv, out, lse, *sizes))
        dkdv((tiles, NH, B), (128,), (dqkv, partial, dout, qkv, lse, D, *sizes))
    ref = None
    flops = 5 * 2 * B * NH * 64 * T * (T + 1) / 2
    for name, dq, dkdv in kernels:
        dqkv = cp.full((B, T, W), 0x7fc0, np.uint16)
        partial = cp.full((B * tiles, W), np.nan, np.float32)
        D = cp.full((B, NH, T), np.nan, np.float32)
        run(dq, dkdv, dqkv, partial, D)
        if ref is None:
            ref = (dqkv.copy(), partial.copy())
        err = float(cp.max(cp.abs(f32(dqkv) - f32(ref[0]))))
        same = bool(cp.all(dqkv == ref[0]))
        nan = bool(cp.any(cp.isnan(f32(dqkv))))
        ms = ""
        if B >= 8:
            s, e = cp.cuda.Event(), cp.cuda.Event()
            for _ in range(3): run(dq, dkdv, dqkv, partial, D)
            s.record()
            for _ in range(20): run(dq, dkdv, dqkv, partial, D)
            e.record(); e.synchronize()
            t = cp.cuda.get_elapsed_time(s, e) / 20
            ms = f"{t * 1e3:8.1f} us {flops / t / 1e9:6.1f} TFLOP/s"
        print(f"backward B={B:2d} T={T:4d} NH={NH:2d} {name:28s} max|dqkv-v2| {err:.2e} bits-equal {same!s:5s} nan {nan!s:5s} {ms}", flush=True)
