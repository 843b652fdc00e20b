"""The bf16 LayerNorm backward at GPT-2 124M's shapes (B=16, T=1024, C=768) on the GPU: HEAD's kernel (commit
01ab968: two rows a warp loaded into registers, the old residual gradient loaded after the row's reductions,
the column sums in shared memory; before the run: `mkdir -p scratch; git show 01ab968:llmc_lessons/kernels/bf16.cu
> scratch/bf16_head.cu`) against the working tree's
cp.async pipeline (layernorm_backward_bf16_cuda) at several pipeline depths (LAYERNORM_BACKWARD_STAGES),
warps per block and grids. Each row: the kernel and the column sums that finish it, timed together
(timing.time_ms, L2 flushed, hide_host), against a 1 GiB copy and a copy of the same bytes; then the largest
difference from HEAD's results on the same inputs (dinp bit-identical expected: each row's arithmetic is the
same; the column sums add rows in another order)."""
import cupy as cp
import numpy as np

from llmc_lessons import timing
from llmc_lessons.cuda import KERNELS_DIR, SHARED_LIMIT_OPT_IN
from llmc_lessons.layers import bf16 as k16

B, T, C = 16, 1024, 768
N = B * T
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
sms = cp.cuda.Device().attributes["MultiProcessorCount"]
print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, {sms} multiprocessors; copy {copy:.0f} GB/s "
      f"(1 GiB), same-size {same:.0f} GB/s ({nbytes / 1e6:.0f} MB moved)", flush=True)


def row(label, fn):
    ms = timing.time_ms(fn, warmup=3, repeat=30, flush_l2=True, hide_host=True)
    bw = timing.gbps(nbytes, ms)
    print(f"{label:<44}{ms * 1e3:7.1f} us {bw / copy:5.0%} of copy {bw / same:5.0%} of same-size", flush=True)
    return ms


def results(fn):
    """dinp (from dres0), dweight, dbias, dresidual_bias of one call."""
    dres[...] = dres0
    sums = [cp.zeros(C, cp.float32) for _ in range(3)]
    fn(dres, *sums)
    return [dres.copy(), *sums]


head = cp.RawKernel(open("scratch/bf16_head.cu").read(), "layernorm_backward_bf16_kernel",
                    options=(f"-I{KERNELS_DIR}",))
head.max_dynamic_shared_size_bytes = SHARED_LIMIT_OPT_IN
print(f"HEAD kernel: {head.num_regs} registers, {head.local_size_bytes} bytes local", flush=True)


def head_call(d, dw, db, dr, blocks=256, bs=256):
    partial = cp.empty((blocks, 3 * C), cp.float32)
    o = cp.empty((B, T, C), cp.uint16)
    head((blocks,), (bs,), (d, o, partial, dout, x, w, mean, rstd, np.int32(N), np.int32(C)),
         shared_mem=4 * (bs // 32) * 3 * C)
    k16.column_sum_add_cuda(dw, db, dr, partial)


reference = results(head_call)
best = {}
for blocks in (256, 264, 396):
    best[("HEAD", blocks)] = row(f"HEAD, block 256, {blocks} blocks",
                                 lambda: head_call(dres, *(cp.zeros(C, cp.float32) for _ in range(3)), blocks))
dw, db, dr = (cp.zeros(C, cp.float32) for _ in range(3))
for stages in (2, 3, 4):
    k16.LAYERNORM_BACKWARD_STAGES = stages
    per_warp = max(16 * C * stages, 12 * C)
    for wpb in (2, 4, 6, 8):
        shared = wpb * per_warp
        if shared > SHARED_LIMIT_OPT_IN:
            continue
        per_sm = min(228 * 1024 // (shared + 1024), 64 // wpb)
        kernel = k16._kernel_with_shared("layernorm_backward_bf16_kernel", shared, "",
                                         (f"-DLNB_CHUNKS={-(-C // 256)}", f"-DLNB_STAGES={stages}"))
        print(f"pipeline, {stages} stages, {wpb} warps a block: {shared // 1024} KiB shared, {kernel.num_regs} "
              f"registers, {kernel.local_size_bytes} bytes local; {per_sm} blocks a multiprocessor by shared "
              f"memory", flush=True)
        for blocks in sorted({sms * per_sm, sms * per_sm * 2, 256}):
            call = lambda d, dw, db, dr: k16.layernorm_backward_bf16_cuda(d, dout, x, w, mean, rstd, dw, db, dr,
                                                                          block_size=32 * wpb, max_blocks=blocks)
            best[(stages, wpb, blocks)] = row(f"  {blocks} blocks", lambda: call(dres, dw, db, dr))
            got = results(call)
            diffs = [float(cp.abs(a - r).max()) for a, r in zip(got, reference)]
            print(f"    max |diff| from HEAD: dinp {diffs[0]:.3g}, dweight {diffs[1]:.3g}, dbias {diffs[2]:.3g}, "
                  f"dresidual_bias {diffs[3]:.3g}", flush=True)
print("fastest five:")
for key, ms in sorted(best.items(), key=lambda kv: kv[1])[:5]:
    bw = timing.gbps(nbytes, ms)
    print(f"  {str(key):<20}{ms * 1e3:7.1f} us {bw / same:5.0%} of same-size")
