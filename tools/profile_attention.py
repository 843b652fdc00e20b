"""Causal attention's kernels, each launched a few times at GPT-2 124M's shape, for a profiler to read.

    python tools/profile_attention.py [bf16|fp32] [T] [--launch-only]
    ncu --clock-control none -k regex:'flash|fmha|cudnn|attn' --section SpeedOfLight ... \
        python tools/profile_attention.py bf16 1024 --launch-only

Launches the course's flash attention forward and backward (bf16: the version the model runs, lesson 13's
version 4 on an H100 or H200, else 2; fp32: the TF32 version), then PyTorch's scaled_dot_product_attention forward and backward as PyTorch picks its kernel, B = 16, NH = 12,
hs = 64: once to compile, then three times under torch.profiler, or (--launch-only) once more and nothing
else. Unless --launch-only (under ncu, which must not share the GPU's
counters with torch.profiler) it prints what torch.profiler saw: each GPU kernel's
name and mean time, which names the backend PyTorch chose (a cuDNN or FlashAttention kernel, built for which
architecture) for bench.bench_attention's rows.
"""
import sys

import numpy as np

from llmc_lessons import device
from llmc_lessons.layers import flash_attention as fa
from llmc_lessons.layers.bf16 import float_to_bf16_cuda
from llmc_lessons.precision import tf32

args = [a for a in sys.argv[1:] if a != "--launch-only"]
launch_only = len(args) < len(sys.argv) - 1
precision = args[0] if args else "bf16"
B, T, NH, hs = 16, int(args[1]) if len(args) > 1 else 1024, 12, 64
if precision not in ("bf16", "fp32"):
    sys.exit(f"precision {precision!r}: bf16 or fp32")
if not device.on_gpu():
    sys.exit("profile_attention.py profiles a GPU's kernels: no GPU here")

import torch                                       # noqa: E402 (after the GPU check: its message first)
import torch.nn.functional as F                    # noqa: E402
from torch.profiler import ProfilerActivity, profile   # noqa: E402

xp, gen, C = device.xp, np.random.default_rng(0), NH * hs
qkv = xp.asarray(gen.standard_normal((B, T, 3 * C), dtype=np.float32))
dout = xp.asarray(gen.standard_normal((B, T, C), dtype=np.float32))
if precision == "bf16":
    qkv, dout = float_to_bf16_cuda(qkv), float_to_bf16_cuda(dout)
    forward, backward = fa.flash_attention_forward_bf16_cuda, fa.flash_attention_backward_bf16_cuda
else:
    forward, backward = fa.flash_attention_forward_tf32_cuda, fa.flash_attention_backward_tf32_cuda
dtype = torch.bfloat16 if precision == "bf16" else torch.float32
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
q, k, v = (torch.randn(B, NH, T, hs, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
do = torch.randn(B, NH, T, hs, device="cuda", dtype=dtype)


def launch_all():
    with tf32(True):
        out, lse = forward(qkv, NH)
        backward(dout, qkv, out, lse, NH)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.autograd.grad(y, (q, k, v), do)


launch_all()                                       # compiles the course's kernels before anything is timed
device.synchronize()
if launch_only:
    launch_all()
    device.synchronize()
    sys.exit(0)
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        launch_all()
    device.synchronize()
print(f"Causal attention, {precision}, B={B}, T={T}, NH={NH}, hs={hs}: the GPU kernels of 3 forward + backward "
      f"passes, course then PyTorch SDPA ({torch.__version__})")
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=110))
