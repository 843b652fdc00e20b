"""The probe of 2026-12-07 (H100): AdamW (bf16) four elements a thread against one, and the one-row bf16 LayerNorm
backward with the old residual gradient prefetched against without. Ran from .probe_tmp/ as probe2.py, with
.probe_tmp/adamw_old.cu and layernorm_old.cu = `git show ae05ee6:llmc_lessons/kernels/<name>` and adamw4.cu (here)."""
import json, sys, numpy as np, cupy as cp
from llmc_lessons import device, timing
from llmc_lessons.cuda.source import KERNELS_DIR
from llmc_lessons.layers.adamw import adamw_update_bf16_cuda
from llmc_lessons.layers.layernorm import layernorm_backward_bf16_cuda
from llmc_lessons.layers.bf16 import float_to_bf16_cuda
def out(**kw): print(json.dumps(kw), flush=True)
gen = cp.random.default_rng(0)
src = open(".probe_tmp/adamw4.cu").read()
mod = cp.RawModule(code=src, options=("-I" + str(KERNELS_DIR), "--std=c++17"))
k4 = mod.get_function("adamw_bf16_kernel4")
for N in (124_475_904, 774_000_000 // 4 * 4):
    g = gen.standard_normal(N, dtype=np.float32); m = gen.standard_normal(N, dtype=np.float32) * 0.01
    v = cp.abs(gen.standard_normal(N, dtype=np.float32)) * 0.01; p = gen.standard_normal(N, dtype=np.float32)
    pb = cp.empty(N, np.uint16)
    m2, v2, p2, pb2 = m.copy(), v.copy(), p.copy(), pb.copy()
    adamw_update_bf16_cuda(p, pb, g, m, v, 3, 6e-4, weight_decay=0.1, stochastic=True, seed=7)
    args = lambda P, PB, M, V: (P, PB, g, M, V, np.int32(N), np.float32(6e-4), np.float32(0.9), np.float32(0.95),
                                np.float32(1 - 0.9**3), np.float32(1 - 0.95**3), np.float32(1e-8), np.float32(0.1),
                                np.float32(1.0), np.int32(1), np.uint32(7))
    for bs in (256, 512):
        k4((-(-N // (4 * bs)),), (bs,), args(p2, pb2, m2, v2))
        same = bool((p == p2).all() and (pb == pb2).all() and (m == m2).all() and (v == v2).all())
        m2[...] = m; v2[...] = v; p2[...] = p; pb2[...] = pb
        t4 = timing.time_ms(lambda: k4((-(-N // (4 * bs)),), (bs,), args(p2, pb2, m2, v2)), warmup=2, repeat=10)
        out(what="adamw4", N=N, block=bs, ms=t4, gbps=30 * N / t4 / 1e6, same_as_current_after_one_step=same)
    t1 = timing.time_ms(lambda: adamw_update_bf16_cuda(p, pb, g, m, v, 3, 6e-4, weight_decay=0.1, stochastic=True, seed=7), warmup=2, repeat=10)
    out(what="adamw package (four a thread)", N=N, ms=t1, gbps=30 * N / t1 / 1e6)
    kold = cp.RawModule(code=open(".probe_tmp/adamw_old.cu").read(), options=("-I" + str(KERNELS_DIR), "--std=c++17")).get_function("adamw_bf16_kernel")
    t0 = timing.time_ms(lambda: kold((-(-N // 512),), (512,), args(p2, pb2, m2, v2)), warmup=2, repeat=10)
    out(what="adamw old (one a thread)", N=N, ms=t0, gbps=30 * N / t0 / 1e6)
    del g, m, v, p, pb, m2, v2, p2, pb2
    cp.get_default_memory_pool().free_all_blocks()
# LN backward at d24-d48 shapes: the kernel alone, old (git HEAD) against new
opts = ("-I" + str(KERNELS_DIR), "--std=c++17", "-arch=sm_90")
old_mod = cp.RawModule(code=open(".probe_tmp/layernorm_old.cu").read(), options=opts)
new_src = open(__import__("os").path.join(str(KERNELS_DIR), "layernorm.cu")).read()
new_mod = cp.RawModule(code=new_src, options=opts)
lb3_mod = cp.RawModule(code=new_src.replace('extern "C" __global__ void layernorm_backward_bf16_kernel_c2048(',
                                            'extern "C" __global__ void __launch_bounds__(128, 3) layernorm_backward_bf16_kernel_c2048('), options=opts)
for name, N, C in (("d24", 16384, 1024), ("d36", 16384, 1280), ("d48", 8192, 1600)):
    kname = "layernorm_backward_bf16_kernel" + ("_c2048" if C > 1024 else "")
    bs = 256 if C <= 1024 else 128
    shared = 4 * (bs // 32) * 3 * C
    blocks = min(256, -(-N // (bs // 32)))
    dres = gen.standard_normal((N, C), dtype=np.float32)
    dout = float_to_bf16_cuda(gen.standard_normal((N, C), dtype=np.float32))
    inp = float_to_bf16_cuda(gen.standard_normal((N, C), dtype=np.float32))
    w = gen.standard_normal(C, dtype=np.float32); mean = gen.standard_normal(N, dtype=np.float32) * 0.1
    rstd = cp.ones(N, np.float32)
    res = {}
    for tag, mod in (("old", old_mod), ("new", new_mod), ("new, launch bounds 3 blocks", lb3_mod)):
        k = mod.get_function(kname)
        k.max_dynamic_shared_size_bytes = shared
        d = dres.copy(); d16 = cp.empty((N, C), np.uint16); part = cp.empty((blocks, 3 * C), np.float32)
        k((blocks,), (bs,), (d, d16, part, dout, inp, w, mean, rstd, np.int32(N), np.int32(C)), shared_mem=shared)
        res[tag] = (d.copy(), d16.copy(), part.copy())
        t = timing.time_ms(lambda: k((blocks,), (bs,), (d, d16, part, dout, inp, w, mean, rstd, np.int32(N), np.int32(C)),
                                     shared_mem=shared), flush_l2=True, hide_host=True)
        out(what="ln backward kernel", size=name, variant=tag, us=t * 1e3, gbps=14 * N * C / t / 1e6, regs=k.num_regs, local_bytes=k.local_size_bytes)
    out(what="ln backward same bits", size=name, same=all(bool((a == b).all()) for a, b in zip(res["old"], res["new"])))
