"""Train GPT-2 with the course's own kernels: `python -m llmc_lessons.train --help`.

    python -m llmc_lessons.train --model d12 --batch-size 16 --seq-len 1024 --steps 500 --out runs/d12
    python -m llmc_lessons.train --model tiny --steps 20 --out runs/tiny          # CPU-sized
    python -m llmc_lessons.train --resume runs/tiny --steps 40                    # continue to step 40

One optimizer step is llm.c's loop body: forward (with the loss), zero_grad, backward, the global gradient
norm and its clip factor, AdamW with a warm-up + cosine learning rate. `--out DIR` receives `log.jsonl` (one
JSON object per step) and checkpoints `ckpt_<step>.npz` holding the model, AdamW's moments, the step, the
data loaders' positions and the sampler's random state, so a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmc_lessons import device
from llmc_lessons.data import DataLoader, prepare_shakespeare
from llmc_lessons.layers.adamw import global_norm, global_norm_cuda
from llmc_lessons.model import GPT2, GPT2Config
from llmc_lessons.precision import set_tf32
from llmc_lessons.sampling import generate
from llmc_lessons.tokenizer import decode

DEFAULTS = dict(model="tiny", batch_size=4, seq_len=64, steps=20, epochs=None, lr=6e-4, warmup=None,
                final_lr_frac=0.1, weight_decay=0.1, grad_clip=1.0, eval_every=None, eval_batches=4,
                sample_every=None, sample_tokens=32, checkpoint_every=None, seed=1337, out=None,
                train_bin=None, val_bin=None, reference=False, tf32=1, precision="fp32", cuda_graph=1)
EOT = 50256


class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN or infinite; the message names the step and the tensor."""


@dataclass
class StepStats:
    step: int
    loss: float
    lr: float
    grad_norm: float
    ms: float
    tokens_per_s: float


def learning_rate(step: int, total: int, lr: float, warmup: int, final_frac: float) -> float:
    """llm.c's schedule for optimizer step `step` (0-based): linear warm-up, then cosine decay to final_frac*lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if total <= warmup:
        return lr
    ratio = min(1.0, (step - warmup) / (total - warmup))
    lr_min = lr * final_frac
    return lr_min + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - lr_min)


def _first_nonfinite(model, which: str) -> str:
    tensors = model.grads if which == "gradient" else model.params
    for name, t in tensors.items():
        if not bool(model.xp.isfinite(t).all()):
            return f"{which} of {name}"
    return f"a {which}"


def training_step(model: GPT2, x, y, lr: float, weight_decay: float, grad_clip: float, step: int):
    """One optimizer step, llm.c's loop body; returns (loss, gradient norm). Raises NonFiniteError on NaN/inf.

    forward with the loss -> zero_grad -> backward -> global gradient norm -> clip factor -> AdamW.
    """
    loss = model.forward(x, y)
    if not math.isfinite(loss):
        raise NonFiniteError(f"step {step}: the loss is {loss} (first bad tensor: "
                             f"{_first_nonfinite(model, 'parameter')})")
    model.zero_grad()
    model.backward()
    if model.use_kernels:
        norm = global_norm_cuda(model.grads_memory)
    else:
        norm = global_norm(model.grads_memory)
    if not math.isfinite(norm):
        raise NonFiniteError(f"step {step}: the gradient norm is {norm}: the "
                             f"{_first_nonfinite(model, 'gradient')} holds NaN or inf")
    scale = grad_clip / norm if grad_clip and norm > grad_clip else 1.0
    model.update(lr, weight_decay=weight_decay, grad_scale=scale)
    device.synchronize()
    return loss, norm


def _atomic_save(path: Path, **arrays) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted(out.glob("ckpt_*.npz"))
    return ckpts[-1] if ckpts else None


class Trainer:
    """The training loop's state: model, data loaders, sampler, log; `run()` trains to `args['steps']`."""

    def __init__(self, args: dict, resume_from: Path | None = None):
        self.args = args
        a = args
        self.out = Path(a["out"]) if a["out"] else None
        config = GPT2Config.from_name(a["model"])
        if a["seq_len"] > config.max_seq_len:
            raise ValueError(f"--seq-len {a['seq_len']} exceeds the model's context of {config.max_seq_len}")
        if a["train_bin"]:
            train_path, val_path = Path(a["train_bin"]), Path(a["val_bin"] or a["train_bin"])
        else:
            train_path, val_path = prepare_shakespeare()
        self.train_loader = DataLoader(train_path, a["batch_size"], a["seq_len"], seed=a["seed"], shuffle=True)
        self.val_loader = DataLoader(val_path, a["batch_size"], a["seq_len"])
        if a["epochs"] is not None:
            a["steps"] = int(a["epochs"] * len(self.train_loader))
        backend = "numpy" if a["reference"] else "kernels"
        if a["reference"] and a["precision"] != "fp32":
            raise ValueError("--reference runs the NumPy layers in float32: it cannot be combined with --precision bf16")
        self.model = GPT2(config, seed=a["seed"], backend=backend, precision=a["precision"])
        self.model.keep_logits = False  # the loop never reads the logits of a training forward
        self.model.cuda_graph = bool(a["cuda_graph"])   # replay the forward and backward (GPU only)
        set_tf32(bool(a["tf32"]))  # as llm.c's fp32 trainer: TF32 tensor cores for the matmuls (a no-op on a CPU)
        self.rng = np.random.default_rng(a["seed"])
        self.step = 0
        self.peak_bytes = 0
        if resume_from is not None:
            self._load(resume_from)

    # -- checkpoints -----------------------------------------------------------------------------------------

    def save(self) -> Path:
        """Write ckpt_<step>.npz atomically, then remove older checkpoints of this run."""
        m = self.model
        meta = dict(step=self.step, args=self.args, train_loader=self.train_loader.state(),
                    val_loader=self.val_loader.state(), rng=self.rng.bit_generator.state, adamw_t=m.step)
        path = self.out / f"ckpt_{self.step:06d}.npz"
        arrays = dict(params=device.to_host(m.params_memory), meta=np.array(json.dumps(meta)))
        if m.m_memory is not None:
            arrays.update(m=device.to_host(m.m_memory), v=device.to_host(m.v_memory))
        _atomic_save(path, **arrays)
        for old in self.out.glob("ckpt_*.npz"):
            if old != path:
                old.unlink()
        return path

    def _load(self, path: Path) -> None:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            m = self.model
            m.params_memory[...] = m.xp.asarray(z["params"])  # the model's own array module (NumPy path too)
            if "m" in z:
                m.m_memory, m.v_memory = m.xp.asarray(z["m"]), m.xp.asarray(z["v"])
        m.step = meta["adamw_t"]
        m.sync_params()          # bf16: the weights' bf16 copy, rounded as the last update rounded it
        self.step = meta["step"]
        self.train_loader.load_state(meta["train_loader"])
        self.val_loader.load_state(meta["val_loader"])
        self.rng.bit_generator.state = meta["rng"]

    # -- one step --------------------------------------------------------------------------------------------

    def train_step(self) -> StepStats:
        a = self.args
        t0 = time.perf_counter()
        x, y = self.train_loader.next_batch()
        lr = learning_rate(self.step, a["steps"], a["lr"], a["warmup"], a["final_lr_frac"])
        loss, norm = training_step(self.model, x, y, lr, a["weight_decay"], a["grad_clip"], self.step + 1)
        self.step += 1
        ms = (time.perf_counter() - t0) * 1e3
        if device.on_gpu():
            self.peak_bytes = max(self.peak_bytes, device.xp.get_default_memory_pool().total_bytes())
        return StepStats(self.step, loss, lr, norm, ms, x.size / (ms / 1e3))

    def val_loss(self) -> float:
        self.val_loader.reset()
        n = min(self.args["eval_batches"], len(self.val_loader))
        return float(np.mean([self.model.forward(*self.val_loader.next_batch()) for _ in range(n)]))

    def sample(self) -> str:
        seed = int(self.rng.integers(2**31))
        tokens = generate(self.model, [EOT], self.args["sample_tokens"], temperature=1.0, top_k=40, seed=seed)
        return decode(tokens[1:])

    # -- the loop --------------------------------------------------------------------------------------------

    def run(self, progress: bool = True, stop_at: int | None = None) -> dict:
        """Train from the current step to args['steps'] (or stop_at); log, evaluate, sample, checkpoint.

        Returns a summary. Stopping early writes a checkpoint from which --resume continues the same run.
        """
        from tqdm.auto import tqdm
        a = self.args
        log_path = self.out / "log.jsonl" if self.out else None
        if log_path:
            self.out.mkdir(parents=True, exist_ok=True)
            _truncate_log(log_path, self.step)
        speeds, last, val = [], None, None
        bar = tqdm(total=a["steps"], initial=self.step, disable=not progress, unit="step", dynamic_ncols=True)
        end = a["steps"] if stop_at is None else min(stop_at, a["steps"])
        while self.step < end:
            s = self.train_step()
            if s.step > 1:
                speeds.append(s.tokens_per_s)  # the first step includes compiling and allocating
            record = dict(step=s.step, loss=s.loss, lr=s.lr, grad_norm=s.grad_norm, ms=round(s.ms, 3),
                          tokens_per_s=round(s.tokens_per_s, 1))
            final = s.step == a["steps"]
            stopping = s.step == end
            if a["eval_every"] and (s.step % a["eval_every"] == 0 or final):
                record["val_loss"] = val = self.val_loss()
                bar.write(f"step {s.step}: train loss {s.loss:.4f}, val loss {val:.4f}")
            if a["sample_every"] and (s.step % a["sample_every"] == 0 or final):
                record["sample"] = self.sample()
                bar.write(f"step {s.step} sample: {record['sample']!r}")
            if log_path:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if self.out and ((a["checkpoint_every"] and s.step % a["checkpoint_every"] == 0) or stopping):
                self.save()
            bar.set_postfix(loss=f"{s.loss:.4f}", tok_s=f"{s.tokens_per_s:,.0f}", ms=f"{s.ms:.1f}")
            bar.update(1)
            last = s
        bar.close()
        summary = dict(steps=self.step, final_train_loss=last.loss if last else None, final_val_loss=val,
                       mean_tokens_per_s=float(np.mean(speeds)) if speeds else None,
                       peak_gpu_bytes=self.peak_bytes if device.on_gpu() else None, device=device.describe())
        if self.out:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines of steps after `step` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
    path.write_text("".join(l + "\n" for l in keep))


def parse_args(argv=None) -> tuple[dict, Path | None]:
    p = argparse.ArgumentParser(prog="python -m llmc_lessons.train", description=__doc__.split("\n")[0],
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--model", choices=["tiny", "d12", "d24", "d36", "d48"], help="GPT-2 size (default tiny)")
    p.add_argument("--batch-size", "-b", type=int, dest="batch_size", help="B, sequences per step (default 4)")
    p.add_argument("--seq-len", "-t", type=int, dest="seq_len", help="T, tokens per sequence (default 64)")
    p.add_argument("--steps", "-x", type=int, help="total optimizer steps of the run (default 20)")
    p.add_argument("--epochs", type=float, help="instead of --steps: passes over the training tokens")
    p.add_argument("--lr", "-l", type=float, help="peak learning rate (default 6e-4)")
    p.add_argument("--warmup", "-u", type=int, help="warm-up steps (default: 10%% of the steps)")
    p.add_argument("--final-lr-frac", "-q", type=float, dest="final_lr_frac", help="final lr / peak lr (0.1)")
    p.add_argument("--weight-decay", "-c", type=float, dest="weight_decay", help="AdamW weight decay (0.1)")
    p.add_argument("--grad-clip", type=float, dest="grad_clip", help="global gradient-norm clip, 0 = off (1.0)")
    p.add_argument("--eval-every", "-v", type=int, dest="eval_every", help="validation loss every N steps")
    p.add_argument("--eval-batches", "-m", type=int, dest="eval_batches", help="validation batches (4)")
    p.add_argument("--sample-every", "-s", type=int, dest="sample_every", help="print a sample every N steps")
    p.add_argument("--sample-tokens", "-g", type=int, dest="sample_tokens", help="tokens per sample (32)")
    p.add_argument("--checkpoint-every", "-n", type=int, dest="checkpoint_every", help="checkpoint every N steps")
    p.add_argument("--seed", type=int, help="seed of the initialisation, data order and samples (1337)")
    p.add_argument("--out", "-o", help="output directory: log.jsonl, checkpoints, summary.json")
    p.add_argument("--resume", help="continue the run in this directory from its latest checkpoint")
    p.add_argument("--stop-at", type=int, dest="stop_at", help="stop (with a checkpoint) at this step, to "
                   "--resume later with the same learning-rate schedule")
    p.add_argument("--train-bin", dest="train_bin", help="llm.c token file to train on (default: Shakespeare)")
    p.add_argument("--val-bin", dest="val_bin", help="llm.c token file for validation")
    p.add_argument("--reference", action="store_true", help="use the NumPy reference layers, not the kernels")
    p.add_argument("--tf32", type=int, choices=[0, 1], help="float32 matmuls on TF32 tensor cores (GPU; default 1)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="fp32 (default), or bf16 activations and "
                   "matmuls with float32 master weights (lesson 14)")
    p.add_argument("--cuda-graph", type=int, choices=[0, 1], dest="cuda_graph", help="record the forward and "
                   "backward into CUDA graphs and replay them (GPU; default 1)")
    given = vars(p.parse_args(argv))
    resume = given.pop("resume", None)
    stop_at = given.pop("stop_at", None)
    saved = {}
    ckpt = None
    if resume:
        ckpt = latest_checkpoint(Path(resume))
        if ckpt is None:
            p.error(f"--resume {resume}: no ckpt_*.npz there")
        with np.load(ckpt) as z:
            saved = json.loads(str(z["meta"]))["args"]
        given.setdefault("out", resume)
    args = {**DEFAULTS, **saved, **given}
    if args["warmup"] is None:
        args["warmup"] = max(1, args["steps"] // 10)
    for k in ("batch_size", "seq_len", "steps", "eval_batches", "sample_tokens"):
        if args[k] is not None and args[k] < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    return args, ckpt, stop_at


def main(argv=None) -> int:
    args, ckpt, stop_at = parse_args(argv)
    trainer = Trainer(args, resume_from=ckpt)
    m = trainer.model
    print(f"{device.describe()}\n{m!r}")
    print(f"B={args['batch_size']} T={args['seq_len']} steps={args['steps']} lr={args['lr']} "
          f"warmup={args['warmup']} train batches/epoch={len(trainer.train_loader)}"
          + (f"; resuming at step {trainer.step}" if ckpt else ""))
    try:
        summary = trainer.run(stop_at=stop_at)
    except NonFiniteError as e:
        kept = latest_checkpoint(trainer.out) if trainer.out else None
        print(f"stopped: {e}\nthe last good checkpoint is {kept}", file=sys.stderr)
        return 2
    print("summary: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
