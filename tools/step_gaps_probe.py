"""Probe: where a bf16 d12 step's wall time goes beyond its kernels' time (GPU idle gaps), graphs on and off."""
import sys, time
import numpy as np
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from llmc_lessons import device
from llmc_lessons.bench import _batches, LR, WEIGHT_DECAY, GRAD_CLIP, _free_gpu_memory
from llmc_lessons.model import GPT2, GPT2Config
from llmc_lessons.llama import config_from_name
from llmc_lessons.train import training_step

import os
B, T = int(os.environ.get("B", 16)), int(os.environ.get("T", 1024))
config = config_from_name(sys.argv[1] if len(sys.argv) > 1 else "d12")
for graphs in (True, False):
    _free_gpu_memory()
    model = GPT2(config, seed=0, backend="kernels", precision="bf16")
    model.keep_logits = False
    model.cuda_graph = graphs
    batches = _batches(config, B, T, 12)
    walls = []
    for i, (x, y) in enumerate(batches[:10]):
        t0 = time.perf_counter()
        training_step(model, x, y, LR, WEIGHT_DECAY, GRAD_CLIP, i + 1)
        walls.append(time.perf_counter() - t0)
    print(f"graphs={graphs}: wall ms (steps 5-10) median {np.median(walls[4:]) * 1e3:.2f}")
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        training_step(model, *batches[10], LR, WEIGHT_DECAY, GRAD_CLIP, 11)
        wall = time.perf_counter() - t0
    ev = sorted([(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if e.device_type == DeviceType.CUDA], key=lambda r: r[0])
    if not ev:
        print("  no CUDA events"); continue
    busy = sum(e - s for s, e, _ in ev)
    span = ev[-1][1] - ev[0][0]
    gaps = [(ev[i + 1][0] - ev[i][1], ev[i][2][:50], ev[i + 1][2][:50], i) for i in range(len(ev) - 1)]
    print(f"  profiled wall {wall * 1e3:.2f} ms, kernels {len(ev)}, busy {busy / 1e3:.2f} ms, span {span / 1e3:.2f} ms, "
          f"gaps {sum(max(g[0], 0) for g in gaps) / 1e3:.2f} ms (>5us: {sum(g[0] for g in gaps if g[0] > 5) / 1e3:.2f} ms in "
          f"{sum(1 for g in gaps if g[0] > 5)})")
    for g in sorted(gaps, reverse=True)[:15]:
        print(f"    gap {g[0]:8.1f} us after #{g[3]} {g[1]!r} before {g[2]!r}")
    cpu = sorted([(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                  if e.device_type != DeviceType.CUDA and e.name.startswith(("cuda", "cu"))], key=lambda r: r[0])
    sync = [(e - s, n) for s, e, n in cpu if "ynchron" in n or "Memcpy" in n]
    print(f"  host sync/memcpy calls: {len(sync)}, {sum(d for d, _ in sync) / 1e3:.2f} ms: "
          + ", ".join(f"{n} {d:.0f}us" for d, n in sync[:12]))
    model.cuda_graph, model._graphs, model._cache = False, None, None
    del model
