"""Data-parallel scaling of the course's trainer against PyTorch's DDP and ZeRO-1, in one run (lesson 17).

    python tools/multigpu_bench.py --model d12 --json bench.json              # 1, 2, 4, ... all GPUs; fp32 and bf16
    python tools/multigpu_bench.py --cpu --model tiny --ranks 1 2 --steps 2   # the same plumbing on the CPU (gloo)

Weak scaling, as llm.c is run: every rank takes --batch-size sequences of --seq-len tokens per step, so N ranks
train on a global batch N times as large. For each N and precision, three systems run the same step (forward,
backward, gradient averaging, global-norm clip, AdamW) on random tokens:
  course       llmc_lessons' kernels, NCCL through CuPy, ZeRO-1 (llmc_lessons.distributed.DataParallel)
  torch-ddp    llmc_lessons.bench's PyTorch step at its best (TorchStep: the vocabulary padded to Vp, SDPA,
               torch.compile, fused AdamW; TF32 matmuls in fp32, autocast in bf16) in DistributedDataParallel
  torch-zero1  the same with torch's ZeroRedundancyOptimizer around AdamW (ZeRO-1)
Each system runs as N processes started by llmc_lessons.distributed.launch; rank 0 times the steps (median wall
clock, each step ending synchronised) and reports tokens/s of the whole group. Scaling efficiency is tokens/s at N
over N times tokens/s at 1 of the same system. --cpu runs the NumPy reference path and gloo instead (a check of
the script, not a measurement).
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SYSTEMS = ("course", "torch-ddp", "torch-zero1")


def worker_course(a, world: int) -> list:
    from llmc_lessons import device
    from llmc_lessons.bench import GRAD_CLIP, LR, WEIGHT_DECAY, _batches
    from llmc_lessons.distributed import DataParallel, connect
    from llmc_lessons.model import GPT2, GPT2Config
    from llmc_lessons.precision import set_tf32
    from llmc_lessons.train import training_step
    comm = connect("gloo" if a.cpu else "nccl")
    config = GPT2Config.from_name(a.model)
    model = GPT2(config, seed=0, backend="numpy" if a.cpu else "kernels", precision=a.precision)
    model.keep_logits = False
    model.cuda_graph = not a.cpu
    set_tf32(True)
    dp = DataParallel(comm, model.num_parameters, grad_accum=1, zero_stage=1)
    times = []
    comm.barrier()
    for i, (x, y) in enumerate(_batches(config, a.batch_size * world, a.seq_len, a.warmup + a.steps)):
        t0 = time.perf_counter()
        training_step(model, x, y, LR, WEIGHT_DECAY, GRAD_CLIP, i + 1, dp)   # ends synchronised
        times.append(time.perf_counter() - t0)
    peak = device.xp.get_default_memory_pool().total_bytes() if device.on_gpu() else 0
    comm.close()
    return times[a.warmup:], peak


def worker_torch(a, world: int, zero: bool) -> list:
    import functools
    import torch
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel
    from llmc_lessons.bench import TorchStep, _batches
    from llmc_lessons.parameters import GPT2Config
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if not a.cpu:
        torch.cuda.set_device(local)
    dist.init_process_group("gloo" if a.cpu else "nccl")
    config = GPT2Config.from_name(a.model)
    step = TorchStep(config, torch_mode(a), padded=True, torch_device="cpu" if a.cpu else f"cuda:{local}",
                     wrap=lambda model: DistributedDataParallel(model, device_ids=None if a.cpu else [local]),
                     # ZeRO-1: each rank keeps AdamW's state for its share of the parameters, then broadcasts them
                     optimizer_class=functools.partial(ZeroRedundancyOptimizer, optimizer_class=torch.optim.AdamW)
                     if zero else None)
    rows = a.batch_size
    times = []
    dist.barrier()
    for x, y in _batches(config, a.batch_size * world, a.seq_len, a.warmup + a.steps):
        t0 = time.perf_counter()
        step(x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows])   # ends synchronised (.item())
        times.append(time.perf_counter() - t0)
    peak = 0 if a.cpu else torch.cuda.max_memory_reserved()
    dist.barrier()
    return times[a.warmup:], peak


def torch_mode(a) -> str:
    """llmc_lessons.bench.TorchStep's mode: on a GPU its compiled step (SDPA, torch.compile, fused AdamW) in fp32
    with TF32 matmuls or with bf16 autocast; on the CPU (--cpu checks the plumbing only) the eager fp32 step."""
    return "eager-tf32" if a.cpu else f"compiled-{'bf16' if a.precision == 'bf16' else 'tf32'}"


def worker(a) -> None:
    faulthandler.dump_traceback_later(a.timeout, exit=True)   # a rank stuck in a collective shows where, and ends
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if a.system == "course":
        times, peak = worker_course(a, world)
    else:
        times, peak = worker_torch(a, world, zero=a.system == "torch-zero1")
    if rank == 0:
        ms = float(np.median(times)) * 1e3
        result = dict(system=a.system, model=a.model, precision=a.precision, ranks=world, batch_size=a.batch_size,
                      seq_len=a.seq_len, ms=ms, tokens_per_s=a.batch_size * world * a.seq_len / (ms / 1e3),
                      peak_bytes_rank0=int(peak), steps_ms=[round(t * 1e3, 3) for t in times])
        from llmc_lessons.files import atomic_write
        atomic_write(a.result, json.dumps(result).encode())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)   # skips tearing down DDP and its process group, which can hang after the last step (seen with
                  # gloo and ZeroRedundancyOptimizer); every collective is done by now


def measure(a, system: str, precision: str, ranks: int) -> dict | None:
    """Run one system at `ranks` ranks in fresh processes; its result, or None (with the error shown) if it failed."""
    from llmc_lessons.distributed import launch
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        command = [str(Path(__file__).resolve()), "--worker", system, "--result", str(result), "--model", a.model,
                   "--precision", precision, "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len),
                   "--steps", str(a.steps), "--warmup", str(a.warmup)] + (["--cpu"] if a.cpu else [])
        code = launch(command + ["--timeout", str(a.timeout)], ranks, gpus=not a.cpu)
        if code != 0 or not result.exists():
            print(f"{system} {precision} at {ranks} rank(s): failed (exit code {code})", file=sys.stderr)
            return None
        return json.loads(result.read_text())


def table(rows: list) -> str:
    base = {(r["system"], r["precision"]): r["tokens_per_s"] for r in rows if r["ranks"] == 1}
    torch_at = {(r["precision"], r["ranks"]): r["tokens_per_s"] for r in rows if r["system"] == "torch-ddp"}
    lines = [f"{'system':<12} {'prec':<5} {'ranks':>5} {'ms/step':>9} {'tokens/s':>12} {'efficiency':>11} "
             f"{'/ torch-ddp':>11}"]
    for r in rows:
        one = base.get((r["system"], r["precision"]))
        eff = f"{r['tokens_per_s'] / (r['ranks'] * one):.1%}" if one else "-"
        ddp = torch_at.get((r["precision"], r["ranks"]))
        lines.append(f"{r['system']:<12} {r['precision']:<5} {r['ranks']:>5} {r['ms']:>9.1f} {r['tokens_per_s']:>12,.0f} "
                     f"{eff:>11} {r['tokens_per_s'] / ddp if ddp else float('nan'):>11.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="d12")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per rank and step (16)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="timed steps (20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (5)")
    p.add_argument("--ranks", type=int, nargs="+", help="rank counts (default: 1, 2, 4, ... up to every GPU)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--cpu", action="store_true", help="NumPy reference path and gloo: checks the script only")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--timeout", type=float, default=900, help="seconds one system at one rank count may take before "
                   "its ranks print their stacks and stop (900)")
    p.add_argument("--worker", choices=SYSTEMS, dest="system", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.system:
        worker(a)
    if a.ranks is None:
        from llmc_lessons import device
        gpus = device.xp.cuda.runtime.getDeviceCount() if device.on_gpu() else 1
        a.ranks = [n for n in (1, 2, 4, 8, 16) if n <= gpus]
    precisions = ["fp32"] if a.cpu else a.precisions
    rows, failed = [], 0
    for precision in precisions:
        for ranks in a.ranks:
            for system in a.systems:
                row = measure(a, system, precision, ranks)
                if row is None:
                    failed += 1
                    continue
                rows.append(row)
                print(f"{system} {precision} at {ranks} rank(s): {row['tokens_per_s']:,.0f} tokens/s", flush=True)
    print(table(rows))
    if a.json:
        from llmc_lessons.files import atomic_write
        from llmc_lessons.bench import versions
        record = dict(rows=rows, versions=versions(), cpu=a.cpu)
        atomic_write(a.json, (json.dumps(record, indent=1) + "\n").encode())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
