"""Probe: the backward with ds^T stored (dq in one product) against version 2, on a GPU; then the d12 bf16 step."""
import sys, time
import numpy as np
sys.path.insert(0, "tests")
from llmc_lessons import device
import llmc_lessons.layers.flash_attention as fa
from llmc_lessons.device import to_device, to_host
from llmc_lessons.precision import from_bf16, to_bf16
xp = device.xp
rng = np.random.default_rng(0)

def case(B, T, NH, hs):
    qkv = to_device(to_bf16(rng.standard_normal((B, T, 3 * NH * hs)).astype(np.float32)))
    dout = to_device(to_bf16(rng.standard_normal((B, T, NH * hs)).astype(np.float32)))
    return qkv, dout

print("correctness on the GPU (ds stored vs version 2): dk, dv bits equal; dq relative difference")
for B, T, NH, hs in [(2, 130, 3, 64), (1, 77, 2, 32), (2, 1, 2, 16), (3, 1000, 4, 48), (2, 2048, 2, 64)]:
    qkv, dout = case(B, T, NH, hs)
    out, lse = fa.flash_attention_forward_bf16_cuda(qkv, NH)
    a = to_host(fa.flash_attention_backward_bf16_cuda(dout, qkv, out, lse, NH, store_ds=False))
    b = to_host(fa.flash_attention_backward_bf16_cuda(dout, qkv, out, lse, NH, store_ds=True))
    C = NH * hs
    fa_, fb_ = from_bf16(a).astype(float), from_bf16(b).astype(float)
    print(f"  B={B} T={T} NH={NH} hs={hs}: dk dv equal {np.array_equal(a[..., C:], b[..., C:])}, dk/dv max rel "
          f"{np.abs(fa_[..., C:] - fb_[..., C:]).max() / np.abs(fa_[..., C:]).max():.2e}, dq max rel "
          f"{np.abs(fa_[..., :C] - fb_[..., :C]).max() / max(np.abs(fa_[..., :C]).max(), 1e-30):.2e}, nan {np.isnan(fb_).any()}")

def timed(fn, reps=30):
    for _ in range(3): fn()
    s, e = device.xp.cuda.Event(), device.xp.cuda.Event()
    s.record()
    for _ in range(reps): fn()
    e.record(); e.synchronize()
    return device.xp.cuda.get_elapsed_time(s, e) / reps

print("timing, B=16 NH=12 hs=64 (ms per call; TFLOP/s counting the causal half of 5 products in the backward)")
for T in (1024, 2048):
    B, NH, hs = 16, 12, 64
    qkv, dout = case(B, T, NH, hs)
    out, lse = fa.flash_attention_forward_bf16_cuda(qkv, NH)
    fwd = timed(lambda: fa.flash_attention_forward_bf16_cuda(qkv, NH))
    flops_b = 5 * 2 * B * NH * T * T * hs / 2
    res = {}
    for rep in range(2):
        for sd in (False, True):
            res.setdefault(sd, []).append(timed(lambda: fa.flash_attention_backward_bf16_cuda(dout, qkv, out, lse, NH, store_ds=sd)))
    for sd, ms in res.items():
        m = min(ms)
        print(f"  T={T} store_ds={sd}: backward {m:.3f} ms ({flops_b / m / 1e9:.1f} TFLOP/s), forward {fwd:.3f} ms; runs {['%.3f' % x for x in ms]}")
    print(f"  T={T}: backward ratio {min(res[False]) / min(res[True]):.3f}x")

from llmc_lessons.bench import bench_course
from llmc_lessons.model import GPT2Config
config = GPT2Config.from_name("d12")
rows = []
for rep in range(2):
    for sd in (False, True):
        fa.STORE_DS = sd
        r = bench_course(config, 16, 1024, 10, 3, precision="bf16")
        print(f"  step store_ds={sd}: {r['ms']:.2f} ms, {r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_bytes'] / 2**30:.2f} GiB", flush=True)
