"""Run at commit b966613 (its bf16.cu). LayerNorm backward variants on the GPU at GPT-2 124M's shapes (B=16, T=1024, C=768): the kernel of
llmc_lessons/kernels/bf16.cu ("rows orig") against the version in the .cu file next to this one, which
takes LNR rows per warp at a time, compiled with ROW_CHUNKS chunks a lane, loading the old residual gradient
with the row or not (LN_EARLY), with or without __launch_bounds__, L2 prefetches (LN_PREFETCH), cache hints
(LN_HINT), parts of the work left out (LN_CEIL), or 4 columns a lane (the -v4.cu file); each timed alone and with the column
sums that finish it (timing.time_ms, L2 flushed, hide_host), and checked against the course's launcher."""
import cupy as cp, numpy as np
from llmc_lessons import timing
from llmc_lessons.cuda import KERNELS_DIR, kernel_source
from llmc_lessons.layers import bf16 as k16
src = kernel_source("bf16.cu")
B, T, C = 16, 1024, 768
N = B * T
g = cp.random.default_rng(3)
r32 = lambda *s: g.standard_normal(s, dtype=cp.float32)
r16 = lambda *s: k16.float_to_bf16_cuda(r32(*s))
x, x2, dout = r16(B, T, C), r16(B, T, C), r16(B, T, C)
w, b = 1 + r32(C), r32(C)
mean, rstd = k16.residual_layernorm_forward_bf16_cuda(x, x2, b, w, b)[2:]
dres = cp.zeros((B, T, C), cp.float32)
copy = timing.copy_bandwidth_gbps()
nbytes = 14 * N * C + 8 * N
same = timing.copy_bandwidth_gbps(nbytes // 8 * 4)
print(f"copy {copy:.0f} GB/s, same-size {same:.0f} GB/s")
name = "layernorm_backward_bf16_kernel"
start = src.index(f'extern "C" __global__ void {name}(')
end = src.index("// One 8-value chunk") if "// One 8-value chunk" in src else src.index("// The largest of 8 bf16 values")
rows_src = open(__file__[:-3] + ".cu").read()     # the variant kernel, next to this file
v4_src = open(__file__.replace("experiment-layernorm-backward-h200-2026-12-02.py", "experiment-layernorm-backward-h200-2026-12-02-v4.cu")).read()
def variant(rows, bounds, chunks=4, early=0, pf=0):
    if pf == "v4":
        s = src[:start] + f"#define LNR {rows}\n#define CH4 {chunks}\n" + v4_src + "\n" + src[end:]
    else:
        s = src if rows == 0 else src[:start] + f"#define LNR {rows}\n#define LN_EARLY {early}\n#define LN_HINT {pf % 8}\n#define LN_CEIL {pf // 8 % 4}\n#define LN_PREFETCH {pf // 32}\n" + rows_src + "\n" + src[end:]
    if pf != "v4":
        s = s.replace("#define ROW_CHUNKS 4", f"#define ROW_CHUNKS {chunks}")
    if bounds:
        s = s.replace(f'extern "C" __global__ void {name}(', f'extern "C" __global__ void __launch_bounds__({bounds}) {name}(')
    return s
# (rows, chunks, early, variant, __launch_bounds__, block, grids): the union of the four runs in the log;
# variant: bits 1, 2, 4 the cache hints (run 4), 8 and 16 the "ceiling" bits (run 4), 32 and 64 the L2
# prefetches (run 2), "v4" the 4-column version (run 3).
for rows, chunks, early, pf, bounds, bs, blocks_list in (
        (0, 4, 0, 0, None, 256, (396, 256)), (0, 4, 0, 0, "256, 3", 256, (396,)),
        (2, 4, 0, 0, None, 256, (256, 264, 128)), (2, 4, 0, 0, "256, 3", 256, (256,)), (2, 3, 0, 0, None, 256, (256, 264)),
        (2, 3, 1, 0, None, 256, (256, 264, 128)), (2, 3, 1, 0, "256, 2", 256, (256,)), (1, 3, 1, 0, None, 256, (396, 256, 264)),
        (1, 3, 0, 0, None, 256, (396, 256)), (3, 3, 0, 0, None, 256, (132, 128)), (3, 3, 0, 0, None, 384, (132, 128)),
        (2, 4, 0, 8, None, 256, (256,)), (2, 4, 0, 24, None, 256, (256,)), (2, 4, 0, 3, None, 256, (256, 264)),
        (2, 4, 0, 4, None, 256, (256,)), (2, 4, 0, 7, None, 256, (256, 264)),
        (2, 4, 0, 32, None, 256, (256, 132, 264)), (2, 4, 0, 64, None, 256, (256, 132)), (2, 4, 0, 96, None, 256, (256, 264)),
        (1, 4, 0, 32, None, 256, (396, 256, 264)), (1, 4, 0, 96, None, 256, (396, 256, 264)),
        (2, 6, 0, "v4", None, 256, (256, 264, 132)), (1, 6, 0, "v4", None, 256, (396, 256, 264))):
    k = cp.RawKernel(variant(rows, bounds, chunks, early, pf), name, options=(f"-I{KERNELS_DIR}",))
    k.max_dynamic_shared_size_bytes = 227 * 1024
    print(f"rows {rows or 'orig'} chunks {chunks} early {early} variant {pf} bounds {bounds} block {bs}: {k.num_regs} registers, {k.local_size_bytes} bytes local", flush=True)
    wpb = bs // 32
    shm = 4 * wpb * 3 * C
    for blocks in blocks_list:
        partial = cp.empty((blocks, 3 * C), cp.float32)
        dinp16 = cp.empty((B, T, C), cp.uint16)
        def run():
            k((blocks,), (bs,), (dres, dinp16, partial, dout, x, w, mean, rstd, np.int32(N), np.int32(C)),
              shared_mem=shm)
        try:
            ms = timing.time_ms(run, warmup=2, repeat=10, flush_l2=True, hide_host=True)
        except Exception as e:
            print("  ", bs, blocks, "failed", type(e).__name__, str(e)[:80]); continue
        bw = timing.gbps(nbytes, ms)
        print(f"  block {bs}, {blocks} blocks: {ms*1e3:6.1f} us  {bw/copy:5.0%} of copy  {bw/same:5.0%} of same-size (main kernel alone)", flush=True)
        dw1, db1, dr1 = (cp.zeros(C, cp.float32) for _ in range(3))
        def both():
            run()
            k16.column_sum_add_cuda(dw1, db1, dr1, partial)
        ms2 = timing.time_ms(both, warmup=2, repeat=10, flush_l2=True, hide_host=True)
        bw2 = timing.gbps(nbytes, ms2)
        print(f"      with the column sums: {ms2*1e3:6.1f} us  {bw2/same:5.0%} of same-size", flush=True)
    # correctness against the library launcher (same inputs, from zero)
    d1 = cp.zeros((B, T, C), cp.float32); p1 = cp.empty((blocks_list[0], 3 * C), cp.float32); o1 = cp.empty((B, T, C), cp.uint16)
    k((blocks_list[0],), (bs,), (d1, o1, p1, dout, x, w, mean, rstd, np.int32(N), np.int32(C)), shared_mem=shm)
    d0 = cp.zeros((B, T, C), cp.float32); dw0, db0, dr0 = (cp.zeros(C, cp.float32) for _ in range(3))
    k16.layernorm_backward_bf16_cuda(d0, dout, x, w, mean, rstd, dw0, db0, dr0)
    print("   max |dinp diff|", float(cp.abs(d1 - d0).max()), " sums diff", float(cp.abs(p1.sum(0) - cp.concatenate([dw0, db0, dr0])).max()))
