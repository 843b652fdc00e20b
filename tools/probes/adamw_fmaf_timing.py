"""AdamW (bf16): the package's kernel (four a thread, fmaf; db3237c) against ae05ee6's (one a thread), GPU work alone
(time_ms's hide_host), on an H100 2026-12-07 13:24. Ran as a heredoc from the repository root, with
.probe_tmp/adamw_old.cu = `git show ae05ee6:llmc_lessons/kernels/adamw.cu`."""
import json, numpy as np, cupy as cp
from llmc_lessons import timing
from llmc_lessons.cuda.source import KERNELS_DIR
from llmc_lessons.layers.adamw import adamw_update_bf16_cuda
gen = cp.random.default_rng(0)
kold = cp.RawModule(code=open(".probe_tmp/adamw_old.cu").read(), options=("-I" + str(KERNELS_DIR), "--std=c++17")).get_function("adamw_bf16_kernel")
for N in (124_475_904, 774_000_000):
    g = gen.standard_normal(N, dtype=np.float32); m = gen.standard_normal(N, dtype=np.float32) * 0.01
    v = cp.abs(gen.standard_normal(N, dtype=np.float32)) * 0.01; p = gen.standard_normal(N, dtype=np.float32); pb = cp.empty(N, np.uint16)
    t1 = timing.time_ms(lambda: adamw_update_bf16_cuda(p, pb, g, m, v, 3, 6e-4, weight_decay=0.1, stochastic=True, seed=7), warmup=2, repeat=10, hide_host=True)
    args = (p, pb, g, m, v, np.int32(N), np.float32(6e-4), np.float32(0.9), np.float32(0.95), np.float32(1 - 0.9**3), np.float32(1 - 0.95**3), np.float32(1e-8), np.float32(0.1), np.float32(1.0), np.int32(1), np.uint32(7))
    t0 = timing.time_ms(lambda: kold((-(-N // 512),), (512,), args), warmup=2, repeat=10, hide_host=True)
    print(json.dumps(dict(N=N, new_fmaf_ms=t1, old_ms=t0, new_gbps=30 * N / t1 / 1e6, old_gbps=30 * N / t0 / 1e6)), flush=True)
    del g, m, v, p, pb; cp.get_default_memory_pool().free_all_blocks()
