"""GPT-2's configuration and llm.c's parameter layout: which tensors, their shapes and order in one flat
buffer, which of them AdamW decays, and GPT-2's initialisation. Nothing here allocates a model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llmc_lessons.layers.block import BLOCK_PARAMETER_NAMES


@dataclass(frozen=True)
class GPT2Config:
    """The six numbers llm.c's checkpoint header stores (header[2..7])."""
    max_seq_len: int = 1024         # maxT: the longest context (rows of wpe)
    vocab_size: int = 50257         # V: real tokens
    padded_vocab_size: int = 50304  # Vp: V rounded up (to a multiple of 128) so the lm_head matmul is GPU-friendly
    num_layers: int = 12            # L: transformer blocks
    num_heads: int = 12             # NH: attention heads; head size hs = C / NH
    channels: int = 768             # C: width of the residual stream

    def __post_init__(self):
        for name in ("max_seq_len", "vocab_size", "padded_vocab_size", "num_layers", "num_heads", "channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"GPT2Config.{name} must be a positive int, got {value!r}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size ({self.padded_vocab_size}) must be >= vocab_size ({self.vocab_size})")
        if self.channels % self.num_heads:
            raise ValueError(f"channels ({self.channels}) must be a multiple of num_heads ({self.num_heads})")

    @classmethod
    def from_name(cls, name: str) -> "GPT2Config":
        """A preset: 'd12' (GPT-2 124M), 'd24' (350M), 'd36' (774M), 'd48' (1558M), or 'tiny' (the CPU trainer's)."""
        presets = {
            "d12": dict(num_layers=12, num_heads=12, channels=768),
            "d24": dict(num_layers=24, num_heads=16, channels=1024),
            "d36": dict(num_layers=36, num_heads=20, channels=1280),
            "d48": dict(num_layers=48, num_heads=25, channels=1600),
            "tiny": dict(num_layers=2, num_heads=4, channels=64, max_seq_len=64),
        }
        if name not in presets:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {sorted(presets)}")
        return cls(**presets[name])

    @property
    def head_size(self) -> int:
        """hs = C / NH."""
        return self.channels // self.num_heads


PARAMETER_NAMES = ("wte", "wpe") + BLOCK_PARAMETER_NAMES + ("lnfw", "lnfb")
"""llm.c's 16 parameter tensors, in the order they sit in memory and in the checkpoint file. The 12 of
BLOCK_PARAMETER_NAMES (layers/block.py) are stacked over layers: params[name][l] is layer l's tensor."""

DECAYED_PARAMETER_NAMES = ("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw")
"""AdamW's weight decay applies to the matrices only (as llm.c and its PyTorch reference do); biases and
layernorm parameters are not decayed."""


def parameter_shapes(config: GPT2Config) -> dict:
    """{name: shape} for llm.c's 16 tensors, in memory order (wte is padded to Vp rows)."""
    Vp, C, maxT, L = config.padded_vocab_size, config.channels, config.max_seq_len, config.num_layers
    return {
        "wte": (Vp, C), "wpe": (maxT, C),
        "ln1w": (L, C), "ln1b": (L, C),
        "qkvw": (L, 3 * C, C), "qkvb": (L, 3 * C),
        "attprojw": (L, C, C), "attprojb": (L, C),
        "ln2w": (L, C), "ln2b": (L, C),
        "fcw": (L, 4 * C, C), "fcb": (L, 4 * C),
        "fcprojw": (L, C, 4 * C), "fcprojb": (L, C),
        "lnfw": (C,), "lnfb": (C,),
    }


def num_parameters(config: GPT2Config, padded: bool = True) -> int:
    """Total parameter count from the shapes alone (nothing allocated).

    padded=True counts wte as (Vp, C), as llm.c allocates and reports it (124,475,904 for d12);
    padded=False counts the V real rows (124,439,808 for d12, the usual "GPT-2 124M").
    The lm_head shares wte, so it adds nothing.
    """
    total = sum(math.prod(s) for s in parameter_shapes(config).values())
    if not padded:
        total -= (config.padded_vocab_size - config.vocab_size) * config.channels
    return total


def parameter_table(config: GPT2Config) -> list:
    """Rows (name, shape, count) for the 16 tensors, in memory order."""
    return [(name, shape, math.prod(shape)) for name, shape in parameter_shapes(config).items()]


def decay_runs(config: GPT2Config) -> list:
    """(start, stop, decays) offsets into the flat buffer: maximal runs of neighbouring tensors that are all
    weight-decayed or all not, so AdamW can run over a few flat slices instead of 16 tensors."""
    return flat_runs(parameter_shapes(config), DECAYED_PARAMETER_NAMES)


def flat_runs(shapes: dict, decayed) -> list:
    """decay_runs of any layout: (start, stop, decays) for the tensors of `shapes` in order, `decayed` naming
    those that AdamW decays."""
    runs, offset = [], 0
    for name, shape in shapes.items():
        n, decays = math.prod(shape), name in decayed
        if runs and runs[-1][2] == decays:
            runs[-1][1] += n
        else:
            runs.append([offset, offset + n, decays])
        offset += n
    return [tuple(r) for r in runs]


def point_views(memory, shapes: dict) -> dict:
    """Named views into one flat buffer, laid out back to back in `shapes` order (llm.c's malloc_and_point)."""
    views, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        views[name] = memory[offset:offset + n].reshape(shape)
        offset += n
    return views


def gpt2_init(p: dict, config: GPT2Config, seed: int):
    """GPT-2's initialisation in place: N(0, 0.02) matrices, residual projections scaled by 1/sqrt(2L),
    zero biases, layernorm weight 1 and bias 0, padded vocab rows of wte zero."""
    rng = np.random.default_rng(seed)
    std = 0.02
    for name in ("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"):
        scale = std / math.sqrt(2 * config.num_layers) if name in ("attprojw", "fcprojw") else std
        rng.standard_normal(dtype=np.float32, out=p[name].reshape(-1))
        p[name] *= np.float32(scale)
    p["wte"][config.vocab_size:] = 0
    for name in ("ln1w", "ln2w", "lnfw"):
        p[name][...] = 1
    # biases (and layernorm biases) stay zero: the buffer starts zeroed
