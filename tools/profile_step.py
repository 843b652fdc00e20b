"""Where the wall time of one GPT-2 124M training step goes on the host: `python tools/profile_step.py [bf16|fp32]`.

Prints, per phase of the step (forward with its loss, backward, norm + AdamW), the wall time, the GPU time
between CUDA events, and how long Python took to enqueue the phase's work; then the Python functions that
take the most time (cProfile, tottime) over three steps. A phase whose enqueue time is close to its wall time
is bound by the host, not the GPU. Last, the longest host gaps between consecutive launches of one step: a gap
far longer than a launch is Python work or a wait for the GPU, and the launch after it says where.
"""
import cProfile
import pstats
import sys
import time

from llmc_lessons import device
from llmc_lessons.bench import GRAD_CLIP, LR, WEIGHT_DECAY, _batches
from llmc_lessons.layers.adamw import global_norm_cuda
from llmc_lessons.precision import tf32
from llmc_lessons.model import GPT2, GPT2Config
from llmc_lessons.train import training_step

precision = sys.argv[1] if len(sys.argv) > 1 else "bf16"
config, B, T = GPT2Config.from_name("d12"), 16, 1024
model = GPT2(config, seed=0, backend="kernels", precision=precision)
model.keep_logits = False
batches = _batches(config, B, T, 12)
xp = device.xp
with tf32(True):
    for i in range(3):
        training_step(model, *batches[i], LR, WEIGHT_DECAY, GRAD_CLIP, i + 1)
    rows = []
    for i in range(3, 8):
        x, y = batches[i]
        ev = [xp.cuda.Event() for _ in range(4)]
        t0 = time.perf_counter(); ev[0].record()
        model.forward(x, y)                       # ends with the loss on the host: a sync
        t1 = time.perf_counter(); ev[1].record()
        model.zero_grad(); model.backward()
        t2 = time.perf_counter(); ev[2].record(); ev[2].synchronize()
        t3 = time.perf_counter()
        norm = global_norm_cuda(model.grads_memory)
        model.update(LR, weight_decay=WEIGHT_DECAY, grad_scale=min(1.0, GRAD_CLIP / norm), t=i + 1)
        ev[3].record(); ev[3].synchronize()
        t4 = time.perf_counter()
        rows.append((t1 - t0, xp.cuda.get_elapsed_time(ev[0], ev[1]), t3 - t1, t2 - t1,
                     xp.cuda.get_elapsed_time(ev[1], ev[2]), t4 - t3, xp.cuda.get_elapsed_time(ev[2], ev[3])))
    print(f"{precision}: ms per phase (median of {len(rows)} steps)")
    import numpy as np
    r = np.median(np.array(rows), axis=0)
    print(f"  forward + loss:  wall {r[0] * 1e3:7.2f}   GPU {r[1]:7.2f}")
    print(f"  backward:        wall {r[2] * 1e3:7.2f}   GPU {r[4]:7.2f}   enqueue {r[3] * 1e3:7.2f}")
    print(f"  norm + AdamW:    wall {r[5] * 1e3:7.2f}   GPU {r[6]:7.2f}")
    prof = cProfile.Profile()
    prof.enable()
    for i in range(8, 11):
        training_step(model, *batches[i], LR, WEIGHT_DECAY, GRAD_CLIP, i + 1)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    from llmc_lessons.cuda import launch_listeners
    stamps = []
    launch_listeners.append(lambda name: stamps.append((time.perf_counter(), name)))
    t0 = time.perf_counter()
    training_step(model, *batches[11], LR, WEIGHT_DECAY, GRAD_CLIP, 12)
    t_end = time.perf_counter()
    launch_listeners.pop()
    gaps = sorted(((b[0] - a[0], i, a[1], b[1]) for i, (a, b) in enumerate(zip(stamps, stamps[1:]))), reverse=True)
    print(f"one step: {len(stamps)} launches in {(t_end - t0) * 1e3:.2f} ms of wall time; first launch after "
          f"{(stamps[0][0] - t0) * 1e3:.2f} ms, {(t_end - stamps[-1][0]) * 1e3:.2f} ms from the last to the end")
    print(f"median host time between launches {np.median([g[0] for g in gaps]) * 1e6:.1f} us; the longest gaps:")
    for gap, i, before, after in gaps[:15]:
        print(f"  {gap * 1e3:7.3f} ms  before launch {i + 1:4d} {after:45s} (after {before})")
