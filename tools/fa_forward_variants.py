"""Forward-kernel probe: the pipelined forward (new) against the one-step-at-a-time forward (old), version 2 and 4
builds, and version 4 with the mask on the diagonal tile only; correctness against version 2's old kernel, time."""
import sys
import numpy as np, cupy as cp
from llmc_lessons.cuda import SM90A, load_kernel

def build(name, version, extra=()):
    opts = ("-DHS=64", "-DGROUP=1") + (("-DFA_WGMMA=1", SM90A) if version == 4 else ()) + tuple(extra)
    return load_kernel("flash_attention.cu", name, opts)

def run(k, qkv, B, T, NH):
    out = cp.full((B, T, NH * 64), 0x7fc0, np.uint16)   # NaN bits
    lse = cp.full((B, NH, T), np.nan, np.float32)
    k((-(-T // 64), NH, B), (128,), (out, lse, qkv, np.int32(B), np.int32(T), np.int32(NH), np.int32(NH)))
    return out, lse

def f32(u16):
    return (u16.astype(cp.uint32) << 16).view(cp.float32)

variants = [("v2 old", "flash_attention_forward_bf16_old_kernel", 2, ()),
            ("v2 new", "flash_attention_forward_bf16_kernel", 2, ()),
            ("v4 old", "flash_attention_forward_bf16_old_kernel", 4, ()),
            ("v4 new", "flash_attention_forward_bf16_kernel", 4, ()),
            ("v4 new, mask on the diagonal only", "flash_attention_forward_bf16_kernel", 4, ("-DMASK_ALL=false",)),
            ("v4 old, mask on the diagonal only", "flash_attention_forward_bf16_old_kernel", 4, ("-DMASK_ALL=false",)),
            ("v4 old, diagonal only, s outside", "flash_attention_forward_bf16_old_kernel", 4, ("-DMASK_ALL=false", "-DFA_S_OUTSIDE=1"))]
kernels = [(n, build(k, v, e)) for n, k, v, e in variants]
rng = np.random.default_rng(0)
for B, T, NH in [(1, 200, 2), (2, 777, 3), (16, 1024, 12), (8, 2048, 12), ]:
    x = rng.standard_normal((B, T, 3 * NH * 64), dtype=np.float32) * 2
    qkv = cp.asarray((x.view(np.uint32) >> 16).astype(np.uint16))
    ref_o, ref_l = run(kernels[0][1], qkv, B, T, NH)
    flops = 4 * B * NH * 64 * T * (T + 1) / 2
    for name, k in kernels:
        o, l = run(k, qkv, B, T, NH)
        err = float(cp.max(cp.abs(f32(o) - f32(ref_o))))
        lerr = float(cp.max(cp.abs(l - ref_l)))
        same = bool(cp.all(o == ref_o))
        nan = bool(cp.any(cp.isnan(f32(o)))) or bool(cp.any(cp.isnan(l)))
        ms = ""
        if B >= 8:
            s, e = cp.cuda.Event(), cp.cuda.Event()
            for _ in range(3): run(k, qkv, B, T, NH)
            s.record()
            for _ in range(20): k((-(-T // 64), NH, B), (128,), (o, l, qkv, np.int32(B), np.int32(T), np.int32(NH), np.int32(NH)))
            e.record(); e.synchronize()
            t = cp.cuda.get_elapsed_time(s, e) / 20
            ms = f"{t * 1e3:8.1f} us {flops / t / 1e9:6.1f} TFLOP/s"
        print(f"B={B:2d} T={T:4d} NH={NH:2d} {name:36s} max|o-v2old| {err:.2e} lse {lerr:.2e} bits-equal {same!s:5s} nan {nan!s:5s} {ms}", flush=True)
