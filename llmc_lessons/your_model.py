"""GPT-2 built from the student's parts (lessons 10 and 11), trained beside the reference.

your_gpt2 assembles the model on the NumPy path from the parts the exercises kept (llmc_lessons.parts); the
reference stands in for each part not written yet. train_side_by_side trains it and the reference from the same
seed on the same batches; when the losses part ways, first_divergent_part runs each of the student's functions
beside its reference on the very inputs the reference step gives it, and names the first that disagrees.
"""
from __future__ import annotations

import numpy as np

from llmc_lessons import parts as store
from llmc_lessons.layers.adamw import global_norm
from llmc_lessons.model import GPT2
from llmc_lessons.parameters import GPT2Config


def model_parts(where=None) -> dict:
    """The parts of the model by key (NumPy functions and kernels), each the student's or the reason it is not."""
    return {k: p for k, p in store.load_all(where).items() if p.spec.module or p.spec.kernel_file}


def your_gpt2(config: GPT2Config, seed: int = 0, parts: dict | None = None) -> GPT2:
    """GPT-2 on the NumPy path with the student's NumPy parts (default: all that the store holds)."""
    parts = model_parts() if parts is None else parts
    return GPT2(config, seed=seed, backend="numpy",
                parts={k: p for k, p in parts.items() if p.theirs and not p.spec.is_kernel})


def _step(model: GPT2, x, y, lr: float) -> float:
    """llm.c's loop body (no weight decay, gradients clipped at 1): -> the loss before the update."""
    loss = model.forward(x, y)
    model.zero_grad()
    model.backward()
    norm = global_norm(model.grads_memory)
    model.update(lr, weight_decay=0.0, grad_scale=min(1.0, 1.0 / norm) if np.isfinite(norm) else 1.0)
    return loss


def train_side_by_side(config: GPT2Config, batches, parts: dict | None = None, lr: float = 1e-3, seed: int = 0,
                       rtol: float = 1e-4) -> list[dict]:
    """Train the reference GPT-2 and the student's from the same seed on the same `batches` ((x, y) pairs), a step
    a batch. -> one row a step: {step, reference, yours, same}; `same` when the losses agree to `rtol` and so do
    the weights after the update."""
    reference, yours = GPT2(config, seed=seed, backend="numpy"), your_gpt2(config, seed, parts)
    rows = []
    for step, (x, y) in enumerate(batches, start=1):
        ref_loss, your_loss = _step(reference, x, y, lr), _step(yours, x, y, lr)
        weights = float(np.max(np.abs(yours.params_memory - reference.params_memory)))
        scale = float(np.max(np.abs(reference.params_memory)))
        same = bool(abs(your_loss - ref_loss) <= rtol * abs(ref_loss) and weights <= rtol * scale)
        rows.append(dict(step=step, reference=ref_loss, yours=your_loss, same=same))
    return rows


def first_divergent_part(config: GPT2Config, batch, parts: dict | None = None, seed: int = 0):
    """One reference training step on `batch` with each of the student's NumPy parts run beside the reference
    function it replaces, on copies of the same inputs. -> (key, why) for the first part that disagrees (the
    innermost: a part that calls a wrong part disagrees after it), or None."""
    parts = model_parts() if parts is None else parts
    found: list = []
    model = GPT2(config, seed=seed, backend="numpy")
    with store.compared(parts.values(), found):
        _step(model, *batch, lr=1e-3)
    return found[0] if found else None


def format_side_by_side(rows: list[dict]) -> str:
    """The side-by-side run as a table."""
    lines = [f"  {'step':>4} {'reference loss':>15} {'your loss':>12}  same"]
    for r in rows:
        lines.append(f"  {r['step']:>4} {r['reference']:>15.6f} {r['yours']:>12.6f}  {'yes' if r['same'] else 'NO'}")
    return "\n".join(lines)
