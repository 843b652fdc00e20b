"""Probe: version 4's forward with its copies changed (tools/fa_copies_probe.cu), against the package's kernel: bits, time."""
import sys
import numpy as np, cupy as cp
from llmc_lessons.cuda import SM90A, load_kernel
from llmc_lessons.cuda.source import KERNELS_DIR
opts = ("-DHS=64", "-DGROUP=1", "-DFA_WGMMA=1", SM90A)
pkg = load_kernel("flash_attention.cu", "flash_attention_forward_bf16_kernel", opts)
variants = [("package", pkg)] + [(f"probe mode {m}", load_kernel("tools/fa_copies_probe.cu", "fwd_probe_kernel",
                                   opts + (f"-DPROBE_MODE={m}",), include_dirs=(KERNELS_DIR,))) for m in (0, 1, 2)]
def run(k, qkv, B, T, NH, o=None, l=None):
    if o is None:
        o = cp.full((B, T, NH * 64), 0x7fc0, np.uint16); l = cp.full((B, NH, T), np.nan, np.float32)
    k((-(-T // 64), NH, B), (128,), (o, l, qkv, np.int32(B), np.int32(T), np.int32(NH), np.int32(NH)))
    return o, l
rng = np.random.default_rng(0)
for B, T, NH in [(1, 200, 2), (2, 777, 3), (3, 1000, 2), (16, 1024, 12), (8, 2048, 12)]:
    x = rng.standard_normal((B, T, 3 * NH * 64), dtype=np.float32) * 2
    qkv = cp.asarray((x.view(np.uint32) >> 16).astype(np.uint16))
    ro, rl = run(pkg, qkv, B, T, NH)
    flops = 4 * B * NH * 64 * T * (T + 1) / 2
    for name, k in variants:
        o, l = run(k, qkv, B, T, NH)
        same = bool(cp.all(o == ro)) and bool(cp.all((l == rl)))
        ms = ""
        if B >= 8:
            for _ in range(5): run(k, qkv, B, T, NH, o, l)
            ts = []
            for rep in range(5):
                s, e = cp.cuda.Event(), cp.cuda.Event()
                s.record()
                for _ in range(20): run(k, qkv, B, T, NH, o, l)
                e.record(); e.synchronize()
                ts.append(cp.cuda.get_elapsed_time(s, e) / 20)
            t = float(np.median(ts))
            ms = f"{t * 1e3:8.1f} us {flops / t / 1e9:6.1f} TFLOP/s"
        print(f"B={B:2d} T={T:4d} NH={NH:2d} {name:14s} bits-equal {same!s:5s} {ms}", flush=True)
