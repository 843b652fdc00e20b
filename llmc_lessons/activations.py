"""Activation memory: what a GPT-2 forward keeps for the backward, as llm.c's ActivationTensors count it
(activation_bytes, format_activation_table) and as a model holds it after a forward (held_activation_bytes).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from llmc_lessons.parameters import GPT2Config


class ActivationRow(NamedTuple):
    name: str          # llm.c's name (ActivationTensors)
    shape: tuple       # llm.c's shape, float32
    bytes: int         # what llm.c allocates for it
    course_bytes: int  # what this course's forward keeps for it (NumPy path)
    note: str          # where the course differs, and why


def activation_bytes(config: GPT2Config, B: int, T: int) -> list:
    """The activations a forward keeps for the backward, as rows (name, shape, bytes, course_bytes, note)
    following llm.c's ActivationTensors (23 tensors, float32), with what this course keeps next to them."""
    C, NH, L, Vp = config.channels, config.num_heads, config.num_layers, config.padded_vocab_size
    same, f32 = "", 4
    rows = [
        ("encoded", (B, T, C), same),
        ("ln1", (L, B, T, C), same), ("ln1_mean", (L, B, T), same), ("ln1_rstd", (L, B, T), same),
        ("qkv", (L, B, T, 3 * C), same), ("atty", (L, B, T, C), same),
        ("preatt", (L, B, NH, T, T), "not kept: the softmax backward needs only att"),
        ("att", (L, B, NH, T, T), same),
        ("attproj", (L, B, T, C), "not kept: residual2 = residual + attproj is all that is needed later"),
        ("residual2", (L, B, T, C), same),
        ("ln2", (L, B, T, C), same), ("ln2_mean", (L, B, T), same), ("ln2_rstd", (L, B, T), same),
        ("fch", (L, B, T, 4 * C), same), ("fch_gelu", (L, B, T, 4 * C), same),
        ("fcproj", (L, B, T, C), "not kept: residual3 = residual2 + fcproj is all that is needed later"),
        ("residual3", (L, B, T, C), same),
        ("lnf", (B, T, C), same), ("lnf_mean", (B, T), same), ("lnf_rstd", (B, T), same),
        ("logits", (B, T, Vp), same),
        ("probs", (B, T, Vp), "NumPy path; the kernel path keeps the fused classifier's dlogits (same size) instead"), ("losses", (B, T), same),
    ]
    table = []
    for name, shape, note in rows:
        nbytes = math.prod(shape) * f32
        table.append(ActivationRow(name, shape, nbytes, 0 if note.startswith("not kept") else nbytes, note))
    return table


def format_activation_table(rows) -> str:
    """The rows of activation_bytes as aligned text, with totals in MiB."""
    mib = 1 / 2 ** 20
    lines = [f"{'tensor':<10} {'shape (llm.c)':<26} {'llm.c MiB':>10} {'course MiB':>11}  note"]
    for r in rows:
        lines.append(f"{r.name:<10} {str(r.shape):<26} {r.bytes * mib:>10.2f} {r.course_bytes * mib:>11.2f}  {r.note}")
    total, course = sum(r.bytes for r in rows), sum(r.course_bytes for r in rows)
    lines.append(f"{'total':<10} {'':<26} {total * mib:>10.2f} {course * mib:>11.2f}")
    return "\n".join(lines)


def held_activation_bytes(model) -> int:
    """Bytes of the distinct float arrays the model holds from its last forward (logits, losses and the
    cache for the backward): the measured counterpart of activation_bytes' course column."""
    seen, total = set(), 0

    def walk(obj):
        nonlocal total
        if isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
        elif hasattr(obj, "nbytes") and hasattr(obj, "dtype") and np.issubdtype(obj.dtype, np.floating):
            base = obj
            while getattr(base, "base", None) is not None:
                base = base.base
            if id(base) not in seen:
                seen.add(id(base))
                total += base.nbytes

    walk([model.logits, model.losses, model._cache])
    return total
