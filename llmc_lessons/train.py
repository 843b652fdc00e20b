"""Train GPT-2 with the course's own kernels: `python -m llmc_lessons.train --help`.

    python -m llmc_lessons.train --model d12 --batch-size 16 --seq-len 1024 --steps 500 --out runs/d12
    python -m llmc_lessons.train --model tiny --steps 20 --out runs/tiny          # CPU-sized
    python -m llmc_lessons.train --model llama-tiny --steps 20 --out runs/llama   # the LLaMA-style model (lesson 16)
    python -m llmc_lessons.train --resume runs/tiny --steps 40                    # continue to step 40
    python -m llmc_lessons.train --init-from gpt2_124M.bin --steps 50 --out runs/ft   # fine-tune OpenAI's GPT-2
    python -m llmc_lessons.train --gpus 4 --model d12 --batch-size 64 --grad-accum 2 --out runs/d12x4  # lesson 17
    python -m llmc_lessons.train --ranks 2 --steps 20 --out runs/tiny2      # data-parallel on the CPU (gloo)

One optimizer step is llm.c's loop body: forward (with the loss), zero_grad, backward, the global gradient
norm and its clip factor, AdamW with a warm-up + cosine learning rate. `--out DIR` receives `log.jsonl` (one
JSON object per step) and checkpoints `ckpt_<step>.npz` holding the model, AdamW's moments, the step, the
data loaders' positions and the sampler's random state, so a resumed run continues exactly where it stopped.

Data-parallel (lesson 17, llmc_lessons/distributed.py): --batch-size is the GLOBAL batch of an optimizer step;
with --ranks N (CPU processes, gloo), --gpus N (one process per GPU, NCCL) or torchrun's environment, each rank
takes B / N of its rows, in --grad-accum micro-batches, the gradients are averaged over all of them, and with
--zero-stage 1 (the default) each rank keeps AdamW's state for its shard of the parameters only. Only rank 0
logs and writes; a checkpoint holds the whole optimizer state, so a run resumes at any number of ranks.

A run is never destroyed by accident: a new run refuses an `--out` that holds a run (log.jsonl, summary.json
or a checkpoint) unless told `--resume` (continue it) or `--overwrite` (replace it, naming the files it
replaces). Every file is written atomically; the newest two checkpoints are kept, and `--resume` falls back
to the older one, naming the damaged file, when the newest cannot be read. Every argument is checked before
the model is built.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmc_lessons import device
from llmc_lessons.data import DataLoader, prepare_shakespeare
from llmc_lessons.distributed import DataParallel, Single, connect, environment, launch
from llmc_lessons.files import atomic_write
from llmc_lessons.hf import load_weights
from llmc_lessons.llama import config_from_name, model_class
from llmc_lessons.model import GPT2
from llmc_lessons.precision import tf32 as tf32_matmuls
from llmc_lessons.sampling import generate
from llmc_lessons.tokenizer import decode

DEFAULTS = dict(model="tiny", batch_size=4, seq_len=64, steps=20, epochs=None, lr=6e-4, warmup=None,
                final_lr_frac=0.1, weight_decay=0.1, grad_clip=1.0, eval_every=None, eval_batches=4,
                sample_every=None, sample_tokens=32, checkpoint_every=None, seed=1337, out=None,
                train_bin=None, val_bin=None, reference=False, tf32=1, precision="fp32", cuda_graph=1,
                init_from=None, recompute=0, grad_accum=1, zero_stage=1)
EOT = 50256


CHECKPOINT_RE = re.compile(r"^ckpt_(\d+)\.npz$")
RUN_FILES = ("log.jsonl", "summary.json")
# temporaries of atomic_write (".<name>.<random>.tmp"), and of the trainer's older versions ("ckpt_*.npz<random>.tmp")
TEMP_GLOBS = (".ckpt_*.npz.*.tmp", ".log.jsonl.*.tmp", ".summary.json.*.tmp", "ckpt_*.npz*.tmp")


class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN or infinite; the message names the step and the tensor."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read (damaged, cut short, not the trainer's) or used; the message names the file."""


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
    for name in model.params:
        t = model.gradient(name) if which == "gradient" else model.params[name]
        if not bool(model.xp.isfinite(t).all()):
            return f"{which} of {name}"
    return f"a {which}"


def training_step(model: GPT2, x, y, lr: float, weight_decay: float, grad_clip: float, step: int,
                  dp: DataParallel | None = None):
    """One optimizer step, llm.c's loop body; returns (loss, gradient norm). Raises NonFiniteError on NaN/inf.

    forward with the loss -> zero_grad -> backward -> global gradient norm -> clip factor -> AdamW.
    x, y: the global batch (B, T); dp (lesson 17): this rank's share of a data-parallel step (its rows in
    micro-batches whose gradients add up, the average over ranks, ZeRO-1); None is one rank, one micro-batch.
    """
    dp = dp or DataParallel(Single(), model.num_parameters)
    micro = dp.micro_batches(x, y)
    total = 0.0
    for i, (xm, ym) in enumerate(micro):
        total += model.forward(xm, ym)
        if i == 0:
            model.zero_grad()
        model.backward()
    loss = dp.mean(model, total, len(micro))
    if not math.isfinite(loss):
        raise NonFiniteError(f"step {step}: the loss is {loss} (first bad tensor: "
                             f"{_first_nonfinite(model, 'parameter')})")
    norm = dp.reduce_gradients(model)
    if not math.isfinite(norm):
        raise NonFiniteError(f"step {step}: the gradient norm is {norm}: the "
                             f"{_first_nonfinite(model, 'gradient')} holds NaN or inf")
    scale = grad_clip / norm if grad_clip and norm > grad_clip else 1.0
    dp.update(model, lr, weight_decay, scale)
    device.synchronize()
    return loss, norm


def checkpoints(out) -> list[Path]:
    """The run's checkpoints ckpt_<step>.npz in `out`, newest (largest step) first."""
    found = [(int(m.group(1)), p) for p in Path(out).glob("ckpt_*.npz") if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(out) -> Path | None:
    """The newest checkpoint of the run in `out`, or None."""
    found = checkpoints(out)
    return found[0] if found else None


_META_KEYS = ("step", "args", "train_loader", "val_loader", "rng", "adamw_t")


def read_checkpoint(path) -> dict:
    """Read and check a checkpoint: {path, meta, params, m, v (None for a run without AdamW state yet)}.

    Raises CheckpointError naming the file when it is cut short, damaged or not one of the trainer's.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            start = f.read(4)
        if start != b"PK\x03\x04":
            raise CheckpointError(f"{path}: not a checkpoint (an .npz archive starts with 'PK\\x03\\x04', this "
                                  f"file with {start!r}): damaged, or written by something else")
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("params", "meta") if k not in z.files]
            if missing:
                raise CheckpointError(f"{path}: not a checkpoint of this trainer (no {' or '.join(missing)} inside)")
            arrays = {k: z[k] for k in z.files}  # reading every member checks its CRC: a damaged one fails here
        meta = json.loads(str(arrays.pop("meta")))
    except CheckpointError:
        raise
    except Exception as e:  # zipfile, zlib, NumPy and JSON each have their own ways of saying "damaged"
        raise CheckpointError(f"{path}: damaged checkpoint ({type(e).__name__}: {e})") from None
    params, m, v = arrays.get("params"), arrays.get("m"), arrays.get("v")
    problem = None
    if not isinstance(meta, dict) or any(k not in meta for k in _META_KEYS):
        lacks = [k for k in _META_KEYS if k not in meta] if isinstance(meta, dict) else "all"
        problem = f"its metadata lacks {lacks}"
    elif not isinstance(meta["step"], int) or meta["step"] < 0:
        problem = f"step {meta['step']!r} is not a step number"
    elif params.ndim != 1 or params.dtype != np.float32:
        problem = f"params is {params.dtype} of shape {params.shape}, not a flat float32 buffer"
    elif (m is None) != (v is None) or (m is not None and (m.shape != params.shape or v.shape != params.shape)):
        problem = "AdamW's m and v do not match the parameters"
    if problem:
        raise CheckpointError(f"{path}: damaged checkpoint ({problem})")
    return dict(path=path, meta=meta, params=params, m=m, v=v)


def read_latest_checkpoint(out) -> dict:
    """read_checkpoint of the newest readable checkpoint in `out`; a damaged one is reported on stderr and the
    next older one is tried. Raises CheckpointError when none is readable (the message names every file)."""
    problems = []
    for path in checkpoints(out):
        try:
            return read_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            print(f"warning: {e}; trying the previous checkpoint", file=sys.stderr)
    if not problems:
        raise CheckpointError(f"{out}: no checkpoint (ckpt_<step>.npz) there to resume from")
    raise CheckpointError(f"{out}: no readable checkpoint:\n  " + "\n  ".join(problems))


def run_files(out) -> list[Path]:
    """The files of a run in `out` (log, summary, checkpoints): what a new run there would replace."""
    out = Path(out)
    return [p for p in (out / n for n in RUN_FILES) if p.exists()] + sorted(checkpoints(out))


def _int_option(a: dict, key: str, minimum: int, optional: bool = False) -> None:
    v = a.get(key)
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"--{key.replace('_', '-')} {v}: must be an integer >= {minimum}")


def _float_option(a: dict, key: str, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
    v = a.get(key)
    ok = not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v) \
        and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        rng = f"> {lo:g}" if lo_open else f">= {lo:g}"
        raise ValueError(f"--{key.replace('_', '-')} {v}: must be a finite number {rng}"
                         + (f" and <= {hi:g}" if hi != math.inf else ""))


def check_args(a: dict) -> None:
    """Raise ValueError, naming the option, for any argument out of its range (nothing is built or read)."""
    if a.get("epochs") is None:
        _int_option(a, "steps", 1)
    else:
        _float_option(a, "epochs", 0.0, lo_open=True)
    for key in ("batch_size", "seq_len", "eval_batches", "sample_tokens", "grad_accum"):
        _int_option(a, key, 1)
    for key in ("eval_every", "sample_every", "checkpoint_every"):
        _int_option(a, key, 1, optional=True)
    _int_option(a, "warmup", 0, optional=True)
    _int_option(a, "seed", 0)
    _float_option(a, "lr", 0.0, lo_open=True)
    _float_option(a, "final_lr_frac", 0.0, 1.0)
    _float_option(a, "weight_decay", 0.0)
    _float_option(a, "grad_clip", 0.0)
    for key in ("tf32", "cuda_graph", "zero_stage"):
        if a.get(key) not in (0, 1):
            raise ValueError(f"--{key.replace('_', '-')} {a.get(key)!r}: must be 0 or 1")
    if a.get("recompute") not in (0, 1, 2):
        raise ValueError(f"--recompute {a.get('recompute')!r}: must be 0, 1 or 2")
    if a.get("recompute") and str(a.get("model", "")).startswith("llama"):
        raise ValueError(f"--recompute {a['recompute']}: the LLaMA-style model's paths keep their activations "
                         f"(recomputation is GPT-2's); leave it out with --model {a['model']}")
    if a.get("precision") not in ("fp32", "bf16"):
        raise ValueError(f"--precision {a.get('precision')!r}: must be fp32 or bf16")
    if a.get("reference") and a["precision"] != "fp32":
        raise ValueError("--reference runs the NumPy layers in float32: it cannot be combined with --precision bf16")
    config = config_from_name(a.get("model"))
    if a["seq_len"] > config.max_seq_len:
        raise ValueError(f"--seq-len {a['seq_len']} exceeds the model's context of {config.max_seq_len}")
    if a.get("out") and Path(a["out"]).exists() and not Path(a["out"]).is_dir():
        raise ValueError(f"--out {a['out']}: exists and is not a directory")


def _check_resume(a: dict, meta: dict, where: str) -> None:
    """The run in a checkpoint can continue with these arguments (same model, B, T; more steps than done)."""
    saved = meta["args"]
    for key in ("model", "batch_size", "seq_len"):
        if key in saved and saved[key] != a[key]:
            raise ValueError(f"--{key.replace('_', '-')} {a[key]}: the run in {where} was trained with "
                             f"--{key.replace('_', '-')} {saved[key]}, and a checkpoint continues only with the "
                             f"same value (leave the option out when resuming; start a new --out to change it)")
    if meta["step"] >= a["steps"]:
        raise ValueError(f"--steps {a['steps']}: the run in {where} has done {meta['step']} steps already; "
                         f"pass a larger --steps to continue it")


class Trainer:
    """The training loop's state: model, data loaders, sampler, log; `run()` trains to `args['steps']`.

    resume_from: a checkpoint path or read_checkpoint()'s dict, to continue that run. overwrite=True lets a new
    run replace the run already in `out` (its files are listed, then removed when training starts); without it
    an `out` holding a run is refused. Every argument is checked before anything is built.
    comm: the collectives of a data-parallel run (llmc_lessons.distributed.connect; None: one rank). Every rank
    builds a Trainer and calls run(); rank 0 alone logs, samples and writes files.
    """

    def __init__(self, args: dict, resume_from=None, overwrite: bool = False, comm=None):
        self.args = a = args
        check_args(a)
        self.comm = comm or Single()
        self.writes = self.comm.rank == 0
        self.out = Path(a["out"]) if a["out"] else None
        state = resume_from
        if state is not None and not isinstance(state, dict):
            state = read_checkpoint(state)
        same_dir = state is not None and self.out is not None and \
            self.out.resolve() == state["path"].parent.resolve()
        self._replace = []
        if self.out is not None and not same_dir and run_files(self.out):
            found = ", ".join(p.name for p in run_files(self.out))
            if not overwrite:
                raise FileExistsError(f"--out {self.out} holds a run already ({found}): continue it with --resume "
                                      f"{self.out}, choose another --out, or replace it with --overwrite")
            self._replace = run_files(self.out)
        backend = "numpy" if a["reference"] else "kernels"
        init = None
        if a["init_from"]:   # llm.c's train_gpt2.c: start from saved weights, with a fresh optimizer
            init = load_weights(a["init_from"], backend=backend, precision=a["precision"])
        config = init.config if init else config_from_name(a["model"])
        if a["seq_len"] > config.max_seq_len:
            raise ValueError(f"--seq-len {a['seq_len']} exceeds the model's context of {config.max_seq_len}")
        if a["train_bin"]:
            train_path, val_path = Path(a["train_bin"]), Path(a["val_bin"] or a["train_bin"])
        else:
            train_path, val_path = prepare_shakespeare()
        self.train_loader = DataLoader(train_path, a["batch_size"], a["seq_len"], seed=a["seed"], shuffle=True)
        self.val_loader = DataLoader(val_path, a["batch_size"], a["seq_len"])
        for path, loader in ((train_path, self.train_loader), (val_path, self.val_loader)):
            top = int(loader.tokens.max())   # once per run, on the host: the steps' batches need no check
            if top >= config.vocab_size:
                raise ValueError(f"{path}: holds token id {top}, outside the model's vocabulary "
                                 f"0..{config.vocab_size - 1}")
        if a["epochs"] is not None:
            a["steps"] = int(a["epochs"] * len(self.train_loader))
            if a["steps"] < 1:
                raise ValueError(f"--epochs {a['epochs']}: less than one step ({len(self.train_loader)} batches "
                                 f"make an epoch)")
        if a["warmup"] is None:
            a["warmup"] = max(1, a["steps"] // 10)
        if state is not None:
            _check_resume(a, state["meta"], str(state["path"].parent))
        self.model = init or model_class(config)(config, seed=a["seed"], backend=backend, precision=a["precision"])
        self.dp = DataParallel(self.comm, self.model.num_parameters, a["grad_accum"], a["zero_stage"])
        self.dp.check_batch(a["batch_size"])
        self.model.keep_logits = False  # the loop never reads the logits of a training forward
        self.model.cuda_graph = bool(a["cuda_graph"])   # replay the forward and backward (GPU only)
        self.model.recompute = a["recompute"]           # kernel paths: recompute GELU (1), and LayerNorm (2)
        self.rng = np.random.default_rng(a["seed"])
        self.step = 0
        self.peak_bytes = 0
        self._previous = None     # this run's newest checkpoint before the one being written: kept as a fallback
        self._started = False     # run() has cleaned the folder and checked the log
        if state is not None:
            self._load(state)
            self._previous = state["path"] if same_dir else None
        self.comm.barrier()       # every rank has checked its arguments before rank 0 writes anything

    # -- checkpoints -----------------------------------------------------------------------------------------

    def save(self) -> Path:
        """Write ckpt_<step>.npz atomically, then remove this folder's other checkpoints except the previous one
        of this run: the newest two are kept, so a damaged newest one still leaves one to resume from."""
        m = self.model
        moments = self.dp.full_moments(m)     # every rank takes part (ZeRO-1 gathers the shards)
        if not self.writes:
            return None
        meta = dict(step=self.step, args=self.args, train_loader=self.train_loader.state(),
                    val_loader=self.val_loader.state(), rng=self.rng.bit_generator.state, adamw_t=m.step)
        path = self.out / f"ckpt_{self.step:06d}.npz"
        arrays = dict(params=device.to_host(m.params_memory), meta=np.array(json.dumps(meta)))
        if moments[0] is not None:
            arrays.update(m=moments[0], v=moments[1])
        atomic_write(path, lambda f: np.savez(f, **arrays))
        keep = {path.resolve()} | ({self._previous.resolve()} if self._previous is not None else set())
        for old in checkpoints(self.out):
            if old.resolve() not in keep:
                old.unlink()
        self._previous = path
        return path

    def _load(self, state: dict) -> None:
        meta, m = state["meta"], self.model
        if state["params"].shape != (m.num_parameters,):
            raise CheckpointError(f"{state['path']}: holds {state['params'].size:,} parameters, the "
                                  f"{self.args['model']} model has {m.num_parameters:,}")
        m.params_memory[...] = m.xp.asarray(state["params"])  # the model's own array module (NumPy path too)
        self.dp.load_moments(m, state["m"], state["v"])   # all of them, or this rank's shard (ZeRO-1)
        try:
            m.step = int(meta["adamw_t"])
            m.sync_params()          # bf16: the weights' bf16 copy, rounded as the last update rounded it
            self.step = meta["step"]
            self.train_loader.load_state(meta["train_loader"])
            self.val_loader.load_state(meta["val_loader"])
            self.rng.bit_generator.state = meta["rng"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{state['path']}: cannot resume from it ({type(e).__name__}: {e})") from None

    def _start(self) -> None:
        """Before the first step: remove the run being replaced (--overwrite) and stale temporary files."""
        self._started = True
        self.out.mkdir(parents=True, exist_ok=True)
        if not self._replace:
            _log_lines(self.out / "log.jsonl", warn=False)   # a damaged log stops the run before its first step
        if self._replace:
            print(f"--overwrite: replacing the run in {self.out}: " + ", ".join(p.name for p in self._replace),
                  file=sys.stderr)
            for p in self._replace:
                p.unlink(missing_ok=True)
        for pattern in TEMP_GLOBS:   # left by a kill during a write; only the trainer's own names
            for tmp in self.out.glob(pattern):
                print(f"removing {tmp.name} ({tmp.stat().st_size:,} bytes), left by an interrupted write",
                      file=sys.stderr)
                tmp.unlink(missing_ok=True)

    # -- one step --------------------------------------------------------------------------------------------

    def _tf32(self):
        """As llm.c's fp32 trainer: TF32 tensor cores for the matmuls (a no-op on a CPU), during the trainer's own
        work only; the setting is restored after, so code run after a training cell keeps its float32 products."""
        return tf32_matmuls(bool(self.args["tf32"]))

    def train_step(self) -> StepStats:
        a = self.args
        t0 = time.perf_counter()
        x, y = self.train_loader.next_batch()
        lr = learning_rate(self.step, a["steps"], a["lr"], a["warmup"], a["final_lr_frac"])
        with self._tf32():
            loss, norm = training_step(self.model, x, y, lr, a["weight_decay"], a["grad_clip"], self.step + 1,
                                       self.dp)
        self.step += 1
        ms = (time.perf_counter() - t0) * 1e3
        if device.on_gpu():
            self.peak_bytes = max(self.peak_bytes, device.xp.get_default_memory_pool().total_bytes())
        return StepStats(self.step, loss, lr, norm, ms, x.size / (ms / 1e3))

    def val_loss(self) -> float:
        """The mean loss of the first eval_batches validation batches; each rank computes its rows of each."""
        self.val_loader.reset()
        n = min(self.args["eval_batches"], len(self.val_loader))
        with self._tf32():
            losses = [self.model.forward(xm, ym) for _ in range(n)
                      for xm, ym in self.dp.micro_batches(*self.val_loader.next_batch())]
        return self.dp.mean(self.model, float(np.sum(losses)), len(losses))

    def sample(self) -> str:
        seed = int(self.rng.integers(2**31))
        with self._tf32():
            tokens = generate(self.model, [EOT], self.args["sample_tokens"], temperature=1.0, top_k=40, seed=seed)
        return decode(tokens[1:])

    # -- the loop --------------------------------------------------------------------------------------------

    def run(self, progress: bool = True, stop_at: int | None = None) -> dict:
        """Train from the current step to args['steps'] (or stop_at); log, evaluate, sample, checkpoint.

        Returns a summary. Stopping early writes a checkpoint from which --resume continues the same run.
        """
        from tqdm.auto import tqdm
        a = self.args
        log_path = self.out / "log.jsonl" if self.out and self.writes else None
        if log_path and not self._started:
            self._start()
        log_synced = False
        speeds, last, val = [], None, None
        bar = tqdm(total=a["steps"], initial=self.step, disable=not (progress and self.writes), unit="step",
                   dynamic_ncols=True)
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
                if self.writes:
                    bar.write(f"step {s.step}: train loss {s.loss:.4f}, val loss {val:.4f}")
            if self.writes and a["sample_every"] and (s.step % a["sample_every"] == 0 or final):
                record["sample"] = self.sample()
                bar.write(f"step {s.step} sample: {record['sample']!r}")
            if log_path:
                if not log_synced:   # only now that there is a new line: a run that fails first loses nothing
                    _truncate_log(log_path, s.step - 1)
                    log_synced = True
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
        if self.out and self.writes and last is not None:   # a call that trained nothing keeps the summary of the steps before
            atomic_write(self.out / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())
        return summary


def _log_lines(path: Path, warn: bool) -> list[tuple[int, str]]:
    """(step, line) of every record of the log. A torn last line (a disk that filled during an append) is
    dropped, with a warning if `warn`; a damaged line elsewhere is an error naming the file and the line, since
    dropping it would lose a step's record."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    found = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            found.append((int(json.loads(line)["step"]), line))
        except (ValueError, TypeError, KeyError):
            if any(rest.strip() for rest in lines[i + 1:]):
                raise ValueError(f"{path}, line {i + 1}: not a log record ({line[:60]!r}); repair or remove that "
                                 f"line to continue the run") from None
            if warn:
                print(f"warning: {path}: dropping its torn last line {line[:60]!r} (an append cut short)",
                      file=sys.stderr)
    return found


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps 1..`step` (drop those written after the checkpoint we resume from), atomically."""
    if not path.exists():
        return
    new = "".join(line + "\n" for s, line in _log_lines(path, warn=True) if s <= step)
    if new != path.read_text(encoding="utf-8", errors="replace"):
        atomic_write(path, new.encode("utf-8"))


def parse_args(argv=None) -> tuple[dict, Path | None]:
    p = argparse.ArgumentParser(prog="python -m llmc_lessons.train", description=__doc__.split("\n")[0],
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--model", choices=["tiny", "d12", "d24", "d36", "d48", "llama-tiny", "llama-124m"],
                   help="GPT-2 size (default tiny), or a LLaMA-style model (lesson 16)")
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
    p.add_argument("--init-from", dest="init_from", help="start from these weights (an llm.c model file or a "
                   "Hugging Face GPT-2 folder, README.md) with a fresh optimizer; they set the model's size")
    p.add_argument("--stop-at", type=int, dest="stop_at", help="stop (with a checkpoint) at this step, to "
                   "--resume later with the same learning-rate schedule")
    p.add_argument("--train-bin", dest="train_bin", help="llm.c token file to train on (default: Shakespeare)")
    p.add_argument("--val-bin", dest="val_bin", help="llm.c token file for validation")
    p.add_argument("--reference", action="store_true", help="use the NumPy reference layers, not the kernels")
    p.add_argument("--tf32", type=int, choices=[0, 1], help="float32 matmuls on TF32 tensor cores (GPU; default 1)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="fp32 (default), or bf16 activations, "
                   "matmuls and weight gradients with float32 master weights (lesson 14)")
    p.add_argument("--cuda-graph", type=int, choices=[0, 1], dest="cuda_graph", help="record the forward and "
                   "backward into CUDA graphs and replay them (GPU; default 1)")
    p.add_argument("--recompute", "-r", type=int, choices=[0, 1, 2], help="recompute activations in the backward "
                   "instead of keeping them (kernel paths, llm.c's -r): 1 GELU, 2 GELU and LayerNorm (default 0)")
    p.add_argument("--overwrite", action="store_true", help="let a new run replace the run already in --out "
                   "(its files are named, then removed when training starts)")
    p.add_argument("--grad-accum", type=int, dest="grad_accum", help="micro-batches per rank and step, whose "
                   "gradients add up (default 1); --batch-size must split into ranks x grad-accum pieces")
    p.add_argument("--zero-stage", type=int, choices=[0, 1], dest="zero_stage", help="1 (default): each rank "
                   "keeps AdamW's state for its shard of the parameters (ZeRO-1); 0: every rank keeps all of it")
    p.add_argument("--ranks", type=int, help="data-parallel over N processes of this CPU (gloo; lesson 17)")
    p.add_argument("--gpus", type=int, help="data-parallel over N GPUs of this host, one process each (NCCL)")
    given = vars(p.parse_args(argv))
    resume = given.pop("resume", None)
    stop_at = given.pop("stop_at", None)
    overwrite = given.pop("overwrite", False)
    ranks, gpus = given.pop("ranks", None), given.pop("gpus", None)
    if ranks is not None and gpus is not None:
        p.error("give --ranks (CPU processes) or --gpus (one process per GPU), not both")
    if (ranks or gpus or 1) < 1:
        p.error(f"--{'ranks' if ranks is not None else 'gpus'} {ranks or gpus}: must be an integer >= 1")
    if "steps" in given and "epochs" in given:
        p.error("give --steps or --epochs, not both")
    if "steps" in given:
        given["epochs"] = None   # a resumed run's saved --epochs gives way to the --steps given now
    if "init_from" in given:
        if resume:
            p.error("--init-from starts a new run from weights, --resume continues a run from its checkpoint: "
                    "give one of them")
        if "model" in given:
            p.error("--init-from: the weights set the model's size, so leave out --model")
    saved, state = {}, None
    if resume:
        if overwrite:
            p.error("--resume continues a run, --overwrite replaces one: give only one of them")
        try:
            state = read_latest_checkpoint(resume)
        except CheckpointError as e:
            p.error(f"--resume {resume}: {e}")
        saved = state["meta"]["args"]
        given.setdefault("out", resume)
    args = {**DEFAULTS, **saved, **given}
    try:
        check_args(args)
    except ValueError as e:
        p.error(str(e))
    if args["init_from"] and not Path(args["init_from"]).exists():   # a resumed run reads its size from them too
        p.error(f"--init-from {args['init_from']}: no such llm.c model file or Hugging Face folder")
    try:
        world = environment()[1] if "WORLD_SIZE" in os.environ else ranks or gpus or 1
    except ValueError as e:
        p.error(str(e))
    if args["batch_size"] % (world * args["grad_accum"]):
        p.error(f"--batch-size {args['batch_size']}: the global batch must split evenly into {world} rank(s) x "
                f"{args['grad_accum']} micro-batch(es) (--grad-accum)")
    if stop_at is not None and (stop_at < 1 or (state is not None and stop_at <= state["meta"]["step"])):
        done = state["meta"]["step"] if state is not None else 0
        p.error(f"--stop-at {stop_at}: must be a step after {done}, the step the run starts from")
    return args, state, stop_at, overwrite, (ranks or gpus or 1, gpus is not None)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, state, stop_at, overwrite, (ranks, gpus) = parse_args(argv)
    if gpus and (not device.on_gpu() or ranks > device.xp.cuda.runtime.getDeviceCount()):
        found = device.xp.cuda.runtime.getDeviceCount() if device.on_gpu() else 0
        print(f"error: --gpus {ranks}: this machine has {found} usable GPU(s) ({device.REASON})", file=sys.stderr)
        return 2
    if ranks > 1 and "WORLD_SIZE" not in os.environ:   # the launcher: start the ranks, each runs this main
        try:
            return launch(["-m", "llmc_lessons.train", *argv], ranks, gpus=gpus)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    comm = connect("nccl" if device.on_gpu() and not args["reference"] else "gloo")
    try:
        return _train(args, state, stop_at, overwrite, comm)
    finally:
        comm.close()


def _train(args, state, stop_at, overwrite, comm) -> int:
    talk = comm.rank == 0
    try:
        trainer = Trainer(args, resume_from=state, overwrite=overwrite, comm=comm)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = trainer.model
    if talk:
        print(f"{device.describe()}\n{m!r}")
        print(f"B={args['batch_size']} T={args['seq_len']} steps={args['steps']} lr={args['lr']} "
              f"warmup={args['warmup']} train batches/epoch={len(trainer.train_loader)}"
              + (f" ranks={comm.world_size} grad_accum={args['grad_accum']} zero_stage={args['zero_stage']}"
                 if comm.world_size > 1 or args["grad_accum"] > 1 else "")
              + (f"; resuming at step {trainer.step} from {state['path'].name}" if state else ""))
    try:
        summary = trainer.run(stop_at=stop_at)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        kept = latest_checkpoint(trainer.out) if trainer.out else None
        if talk:
            print(f"stopped: {e}\nthe last good checkpoint is {kept}", file=sys.stderr)
        return 2
    if talk:
        print("summary: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
