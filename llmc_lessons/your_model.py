"""GPT-2 built from the student's parts (lessons 10 and 11), trained beside the reference.

your_gpt2 assembles the model from the parts the exercises kept (llmc_lessons.parts): their NumPy functions on
the NumPy path, their kernels on the kernel path; the reference stands in for each part not written yet.
train_side_by_side trains it and the reference from the same seed on the same batches (llm.c's loop body,
train.training_step); when the two part ways, first_divergent_part runs each of the student's functions beside
its reference on the very inputs the reference step gives it, and names the first that disagrees.
"""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons import parts as store
from llmc_lessons.model import GPT2
from llmc_lessons.parameters import GPT2Config
from llmc_lessons.train import training_step


def model_parts(where=None) -> dict:
    """The parts of the model by key (NumPy functions and kernels), each the student's or the reason it is not."""
    return {k: p for k, p in store.load_all(where).items() if p.spec.module or p.spec.kernel_file}


def your_gpt2(config: GPT2Config, seed: int = 0, parts: dict | None = None, backend: str = "numpy") -> GPT2:
    """GPT-2 with the student's parts (default: all that the store holds): their NumPy functions on the NumPy
    path (backend "numpy"), their kernels on the fp32 kernel path (backend "kernels")."""
    parts = model_parts() if parts is None else parts
    return GPT2(config, seed=seed, backend=backend,
                parts={k: p for k, p in parts.items() if p.theirs and p.spec.is_kernel == (backend == "kernels")})


def train_side_by_side(config: GPT2Config, batches, parts: dict | None = None, lr: float = 1e-3, seed: int = 0,
                       rtol: float = 1e-4, backend: str = "numpy") -> list[dict]:
    """Train the reference GPT-2 and the student's from the same seed on the same `batches` ((x, y) pairs), a step
    a batch, both on `backend`'s path. -> one row a step: {step, reference, yours, same} (and `error` where the
    student's step failed: NaN, or an error in a part; the run stops there); `same` when the losses
    agree to `rtol` and so do the weights after the update, to `rtol` of the largest weight plus 1% of what AdamW
    may move a weight in the steps so far (lr a step, whatever the size of the gradient: rounding in a gradient
    near zero can move a weight by a fraction of that)."""
    reference = GPT2(config, seed=seed, backend=backend)
    yours = your_gpt2(config, seed, parts, backend)
    if backend == "kernels":     # the package's matmul kernel where theirs runs: the same sums, not cuBLAS's
        reference.matmul_version = yours.path.versions(yours)[1]
        reference.path.keep_lesson05_attention = yours.path.keep_lesson05_attention   # and the same attention
    rows = []
    for step, (x, y) in enumerate(batches, start=1):
        ref_loss = training_step(reference, x, y, lr, 0.0, 1.0, step)[0]
        try:
            your_loss = training_step(yours, x, y, lr, 0.0, 1.0, step)[0]
        except Exception as e:   # noqa: BLE001  (NaN, or an error in a part: first_divergent_part names it)
            rows.append(dict(step=step, reference=ref_loss, yours=float("nan"), same=False,
                             error=f"{type(e).__name__}: {e}"))
            break
        weights = float(np.max(np.abs(device.to_host(yours.params_memory - reference.params_memory))))
        scale = float(np.max(np.abs(device.to_host(reference.params_memory))))
        same = bool(abs(your_loss - ref_loss) <= rtol * abs(ref_loss) and weights <= rtol * scale + 0.01 * lr * step)
        rows.append(dict(step=step, reference=ref_loss, yours=your_loss, same=same))
    return rows


def first_divergent_part(config: GPT2Config, batches, parts: dict | None = None, seed: int = 0, lr: float = 1e-3):
    """Reference training steps on `batches`, with each of the student's NumPy parts run beside the reference
    function it replaces, on copies of the same inputs. -> (step, key, why) for the first part that disagrees
    (the innermost: a part that calls a wrong part disagrees after it), or None."""
    parts = model_parts() if parts is None else parts
    model = GPT2(config, seed=seed, backend="numpy")
    for step, batch in enumerate(batches, start=1):
        found: list = []
        with store.compared(parts.values(), found):
            training_step(model, *batch, lr, 0.0, 1.0, step)
        if found:
            return (step, *found[0])
    return None


def format_side_by_side(rows: list[dict]) -> str:
    """The side-by-side run as a table."""
    lines = [f"  {'step':>4} {'reference loss':>15} {'your loss':>12}  same"]
    for r in rows:
        lines.append(f"  {r['step']:>4} {r['reference']:>15.6f} {r['yours']:>12.6f}  {'yes' if r['same'] else 'NO'}"
                     + (f"  ({r['error']})" if "error" in r else ""))
    return "\n".join(lines)
