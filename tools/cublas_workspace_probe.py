"""Probe: the d12 bf16 step with the course's cuBLAS workspace at WS bytes (argv[1]): step time, memsets, products."""
import sys, time
import numpy as np
from llmc_lessons import cublas
cublas.WORKSPACE_BYTES = int(sys.argv[1])
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from llmc_lessons.bench import _batches, LR, WEIGHT_DECAY, GRAD_CLIP, bench_course
from llmc_lessons.model import GPT2
from llmc_lessons.llama import config_from_name
from llmc_lessons.train import training_step
config = config_from_name(sys.argv[2] if len(sys.argv) > 2 else "d12")
B = int(sys.argv[3]) if len(sys.argv) > 3 else 16
for rep in range(2):
    r = bench_course(config, B, 1024, 10, 3, precision="bf16")
    print(f"ws={cublas.WORKSPACE_BYTES}: {r['ms']:.2f} ms/step, {r['tokens_per_s']:,.0f} tok/s", flush=True)
model = GPT2(config, seed=0, backend="kernels", precision="bf16")
model.keep_logits = False
model.cuda_graph = True
batches = _batches(config, B, 1024, 8)
for i, (x, y) in enumerate(batches[:6]):
    training_step(model, x, y, LR, WEIGHT_DECAY, GRAD_CLIP, i + 1)
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    training_step(model, *batches[6], LR, WEIGHT_DECAY, GRAD_CLIP, 7)
ev = sorted([(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
             if e.device_type == DeviceType.CUDA], key=lambda r: r[0])
busy = sum(e - s for s, e, _ in ev)
span = ev[-1][1] - ev[0][0]
mem = [(e - s) for s, e, n in ev if "emset" in n]
mm = {}
for s, e, n in ev:
    if any(k in n.lower() for k in ("nvjet", "gemm", "splitk", "cutlass", "xmma")):
        mm.setdefault(n[:70], []).append(e - s)
print(f"  profiled: {len(ev)} GPU ops, busy {busy/1e3:.2f} ms, span {span/1e3:.2f} ms, memsets {len(mem)} "
      f"{sum(mem)/1e3:.3f} ms, products {sum(len(v) for v in mm.values())} {sum(sum(v) for v in mm.values())/1e3:.2f} ms")
for n, v in sorted(mm.items(), key=lambda kv: -sum(kv[1])):
    print(f"    {sum(v)/1e3:7.3f} ms {len(v):4d}x  {n}")
