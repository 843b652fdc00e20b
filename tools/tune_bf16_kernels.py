"""Launch configurations of the bf16 step's memory-bound kernels, timed at GPT-2 124M's shapes on a GPU:
`python tools/tune_bf16_kernels.py`. Each row: the kernel, its configuration, microseconds (the GPU's time
alone: L2 flushed, Python's enqueue hidden) and the fraction of the 1 GiB copy bandwidth. The defaults of the
bf16 launchers (the bf16 sections of llmc_lessons/layers/<layer>.py) are the fastest rows seen on the H200
(the RMSNorm launchers of the LLaMA-style step take the layernorm's); rerun this after changing a kernel, then `python -m llmc_lessons.bench --only-kernels` for the table at the defaults.
"""
from llmc_lessons import device, timing
from llmc_lessons.layers.bf16 import float_to_bf16_cuda
from llmc_lessons.layers.crossentropy import fused_classifier_bf16_cuda
from llmc_lessons.layers.gelu import gelu_bias_backward_bf16_cuda, gelu_bias_forward_bf16_cuda
from llmc_lessons.layers.layernorm import (column_sum_add_cuda, layernorm_backward_bf16_cuda,
                                           residual_layernorm_forward_bf16_cuda)
from llmc_lessons.layers.rmsnorm import residual_rmsnorm_forward_bf16_cuda, rmsnorm_backward_bf16_cuda

if not device.on_gpu():
    raise SystemExit("tuning needs a GPU")
xp = device.xp
g = xp.random.default_rng(3)
B, T, C, V, Vp = 16, 1024, 768, 50257, 50304
BT = B * T
r32 = lambda *s: g.standard_normal(s, dtype=xp.float32)
r16 = lambda *s: float_to_bf16_cuda(r32(*s))
x, x2, h, dh = r16(B, T, C), r16(B, T, C), r16(B, T, 4 * C), r16(B, T, 4 * C)
w, b, b4 = 1 + r32(C), r32(C), r32(4 * C)
mean, rstd = residual_layernorm_forward_bf16_cuda(x, x2, b, w, b)[2:]
dres, dw, db, dr = xp.zeros((B, T, C), xp.float32), *(xp.zeros(C, xp.uint16) for _ in range(3))  # bf16 gradients
logits, targets = r16(B, T, Vp), g.integers(0, V, (B, T)).astype(xp.int32)
copy = timing.copy_bandwidth_gbps()
print(f"copy bandwidth {copy:,.0f} GB/s (1 GiB)")


def row(name, config, fn, nbytes):
    ms = timing.time_ms(fn, warmup=2, repeat=10, flush_l2=True, hide_host=True)
    print(f"{name:<24}{config:<32}{ms * 1e3:9.1f} us{timing.gbps(nbytes, ms) / copy:7.0%}", flush=True)


for bs in (64, 128, 256):
    row("residual + layernorm", f"block {bs}",
        lambda: residual_layernorm_forward_bf16_cuda(x, x2, b, w, b, block_size=bs), 8 * BT * C + 8 * BT)
db4 = xp.zeros(4 * C, xp.uint16)
for bs in (128, 256, 512):
    row("gelu forward", f"block {bs}", lambda: gelu_bias_forward_bf16_cuda(h, b4, block_size=bs), 4 * BT * 4 * C)
for X, Y, R in ((8, 32, None), (8, 16, None), (16, 16, None), (8, 32, 64)):
    row("gelu backward + dbias", f"block ({X}, {Y}), grid rows {R or 'default'}",
        lambda: gelu_bias_backward_bf16_cuda(dh, h, b4, db4, block_columns=X, block_rows=Y, grid_rows=R),
        6 * BT * 4 * C)
for bs, blocks in ((128, 512), (128, 528), (256, 256), (256, 264), (256, 396), (512, 128), (512, 132)):
    row("layernorm backward", f"block {bs}, {blocks} blocks",
        lambda: layernorm_backward_bf16_cuda(dres, x, x2, w, mean, rstd, dw, db, dr, block_size=bs,
                                                 max_blocks=blocks),
        14 * BT * C + 8 * BT)
rms_rstd = residual_rmsnorm_forward_bf16_cuda(x, x2, w)[2]    # the LLaMA-style step's RMSNorm kernels
for bs in (64, 128, 256):
    row("residual + rmsnorm", f"block {bs}", lambda: residual_rmsnorm_forward_bf16_cuda(x, x2, w, block_size=bs),
        8 * BT * C + 4 * BT)
for bs, blocks in ((128, 512), (128, 528), (256, 256), (256, 264), (256, 396), (512, 128), (512, 132)):
    row("rmsnorm backward", f"block {bs}, {blocks} blocks",
        lambda: rmsnorm_backward_bf16_cuda(dres, x, x2, w, rms_rstd, dw, block_size=bs, max_blocks=blocks),
        14 * BT * C + 4 * BT)
for bs in (256, 512, 1024):
    row("fused classifier", f"block {bs}",
        lambda: fused_classifier_bf16_cuda(logits, targets, V, 1 / BT, block_size=bs), 4 * BT * Vp)
for R in (132, 256, 396):   # the end of the layernorm and flash attention backwards' bias sums
    partial = r32(R, 3 * C)
    for X, Y in ((8, 32), (16, 16), (32, 8), (8, 64)):
        row("column sums", f"{R} rows, block ({X}, {Y})",
            lambda: column_sum_add_cuda(dw, db, dr, partial, columns_per_block=X, rows_per_block=Y),
            4 * partial.size + 12 * C)
