"""The bf16 LayerNorm backward at GPT-2 124M's shapes (B=16, T=1024, C=768) on the GPU: HEAD's kernel (commit
2833fc2: the kernel, then column_sum_add_kernel adds its blocks' partial rows) against a version that finishes
the column sums in the same launch (two rounds of last blocks, groups of `group` blocks; the .patch next to this
file, applied to 2833fc2, is the working tree it ran in). Before the run: `mkdir -p scratch; git show
2833fc2:llmc_lessons/kernels/bf16.cu > scratch/bf16_head.cu`. Each row timed with timing.time_ms (L2 flushed,
hide_host), against a 1 GiB copy and a copy of the same bytes; then the results compared."""
import cupy as cp
import numpy as np

from llmc_lessons import timing
from llmc_lessons.cuda import KERNELS_DIR, SHARED_LIMIT_OPT_IN
from llmc_lessons.layers import bf16 as k16

B, T, C = 16, 1024, 768
N, C3 = B * T, 3 * C
g = cp.random.default_rng(5)
r32 = lambda *s: g.standard_normal(s, dtype=cp.float32)
r16 = lambda *s: k16.float_to_bf16_cuda(r32(*s))
x, x2, dout = r16(B, T, C), r16(B, T, C), r16(B, T, C)
w, b = 1 + r32(C), r32(C)
mean, rstd = k16.residual_layernorm_forward_bf16_cuda(x, x2, b, w, b)[2:]
dres = r32(B, T, C)
dres0 = dres.copy()
nbytes = 14 * N * C + 8 * N
copy = timing.copy_bandwidth_gbps()
same = timing.copy_bandwidth_gbps(nbytes // 2)
props = cp.cuda.runtime.getDeviceProperties(0)
print(f"{props['name'].decode()}, {props['multiProcessorCount']} multiprocessors; copy {copy:.0f} GB/s (1 GiB), "
      f"same-size {same:.0f} GB/s ({nbytes / 1e6:.1f} MB moved)", flush=True)


def row(label, fn, nb=nbytes, same_gbps=same):
    ms = timing.time_ms(fn, warmup=3, repeat=30, flush_l2=True, hide_host=True)
    bw = timing.gbps(nb, ms)
    print(f"{label:<52}{ms * 1e3:7.1f} us {bw:6.0f} GB/s {bw / copy:5.0%} of copy {bw / same_gbps:5.0%} of same-size",
          flush=True)
    return ms


head = cp.RawKernel(open("scratch/bf16_head.cu").read(), "layernorm_backward_bf16_kernel", options=(f"-I{KERNELS_DIR}",))
head.max_dynamic_shared_size_bytes = SHARED_LIMIT_OPT_IN
out16 = cp.empty((B, T, C), cp.uint16)
sums = [cp.zeros(C, cp.float32) for _ in range(3)]


def head_main(blocks, bs, partial, d=dres, o=out16):
    head((blocks,), (bs,), (d, o, partial, dout, x, w, mean, rstd, np.int32(N), np.int32(C)),
         shared_mem=4 * (bs // 32) * C3)


def head_call(d, s, blocks=256, bs=256):
    p, o = cp.empty((blocks, C3), cp.float32), cp.empty((B, T, C), cp.uint16)
    head_main(blocks, bs, p, d, o)
    k16.column_sum_add_cuda(*s, p)
    return o


def new_call(d, s, blocks=256, bs=256, group=16):
    return k16.layernorm_backward_bf16_cuda(d, dout, x, w, mean, rstd, *s, block_size=bs, max_blocks=blocks,
                                            group=group)


print("\n## HEAD: the kernel, then column_sum_add", flush=True)
for blocks, bs in ((256, 256), (132, 512)):
    p = cp.empty((blocks, C3), cp.float32)
    row(f"HEAD, both launches, {blocks} x {bs}", lambda: head_call(dres, sums, blocks, bs))
    row(f"HEAD, the kernel alone, {blocks} x {bs}", lambda: head_main(blocks, bs, p), nbytes + 4 * blocks * C3)
    row(f"HEAD, column_sum_add alone, {blocks} rows", lambda: k16.column_sum_add_cuda(*sums, p),
        4 * blocks * C3 + 8 * C3, timing.copy_bandwidth_gbps(2 * blocks * C3))

print("\n## working tree: one launch, the column sums finished by last blocks", flush=True)
for blocks, bs, group in ((256, 256, 16), (256, 256, 8), (256, 256, 32), (264, 256, 12), (132, 512, 12),
                          (132, 512, 6)):
    row(f"one launch, {blocks} x {bs}, groups of {group}", lambda: new_call(dres, sums, blocks, bs, group))
row("HEAD, both launches, 256 x 256 (again)", lambda: head_call(dres, sums))

print("\n## results against HEAD's (same inputs)", flush=True)


def results(fn):
    d = dres0.copy()
    s = [cp.zeros(C, cp.float32) for _ in range(3)]
    o = fn(d, s)
    return [d, o.astype(cp.float64), *s]


ref = results(head_call)
for blocks, bs, group in ((256, 256, 16), (132, 512, 12)):
    runs = [results(lambda d, s: new_call(d, s, blocks, bs, group)) for _ in range(3)]
    same_bits = all(bool((a == b_).all()) for r in runs[1:] for a, b_ in zip(r, runs[0]))
    diffs = [float(cp.abs(a.astype(cp.float64) - r.astype(cp.float64)).max()) for a, r in zip(runs[0], ref)]
    print(f"{blocks} x {bs}, groups of {group}: three runs bit-identical: {same_bits}; max |difference| from HEAD: "
          f"dinp {diffs[0]:.3g}, dinp_bf16 (as bits) {diffs[1]:.3g}, dweight {diffs[2]:.3g}, dbias {diffs[3]:.3g}, "
          f"dresidual_bias {diffs[4]:.3g}; counters back at 0: {not bool(k16._zero_counters(1).any())}", flush=True)
