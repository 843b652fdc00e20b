"""GPT-2 in PyTorch, under llm.c's parameter names: the independent implementation the course is checked
against (tests, lesson 10) and the baseline it is timed against (`python -m llmc_lessons.bench`).

PyTorch is not a dependency of the course: import this module only where torch is installed.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmc_lessons import device
from llmc_lessons.parameters import PARAMETER_NAMES, GPT2Config

UNSTACKED = ("wte", "wpe", "lnfw", "lnfb")


class CausalSelfAttention(nn.Module):
    def __init__(self, C: int, NH: int, flash: bool = False):
        super().__init__()
        self.NH, self.flash = NH, flash
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)

    def forward(self, x):
        B, T, C = x.shape
        hs = C // self.NH
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.NH, hs).transpose(1, 2) for t in (q, k, v))  # (B, NH, T, hs)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)                   # (B, NH, T, T)
            causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
            y = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, C: int, NH: int, flash: bool = False):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(C), CausalSelfAttention(C, NH, flash), nn.LayerNorm(C)
        self.c_fc, self.c_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


def with_loss(logits, targets, V: int):
    """(logits (B, T, V or Vp), the mean cross-entropy over the V real tokens, or None without targets): the padded
    columns never reach the loss."""
    real = logits[..., :V]
    return logits, None if targets is None else F.cross_entropy(real.float().reshape(-1, V), targets.view(-1))


class TorchGPT2(nn.Module):
    """GPT-2 with a tied lm_head; flash=True uses scaled_dot_product_attention.

    padded=False: wte and the logits have the V real tokens. padded=True: Vp rows and columns, as llm.c and
    nanoGPT have them (Vp a multiple of 64 lets the classifier's matmuls use whole tiles); the padded rows of wte
    start at zero and the loss reads the first V columns only, so the logits, loss and gradients on the real
    vocabulary are the unpadded model's, and the padded rows get no gradient."""

    def __init__(self, c: GPT2Config, flash: bool = False, padded: bool = False):
        super().__init__()
        self.config, self.padded, self.unstacked = c, padded, UNSTACKED
        V = c.padded_vocab_size if padded else c.vocab_size
        self.wte, self.wpe = nn.Embedding(V, c.channels), nn.Embedding(c.max_seq_len, c.channels)
        with torch.no_grad():
            self.wte.weight[c.vocab_size:] = 0
        self.h = nn.ModuleList(Block(c.channels, c.num_heads, flash) for _ in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.channels)
        self.lm_head = nn.Linear(c.channels, V, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, idx, targets=None):
        """idx, targets (B, T) -> logits (B, T, V or Vp), mean loss over the V real tokens (or None)."""
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.h:
            x = block(x)
        return self.head(x, targets)

    def head(self, x, targets=None):
        """The final layernorm, the lm_head and the loss: (B, T, C) -> (logits, loss or None)."""
        return with_loss(self.lm_head(self.ln_f(x)), targets, self.config.vocab_size)

    def llmc_tensors(self) -> dict:
        """This model's tensors under llm.c's 16 names: a list per name, one tensor per layer where llm.c stacks."""
        h = self.h
        return {
            "wte": [self.wte.weight], "wpe": [self.wpe.weight],
            "ln1w": [b.ln_1.weight for b in h], "ln1b": [b.ln_1.bias for b in h],
            "qkvw": [b.attn.c_attn.weight for b in h], "qkvb": [b.attn.c_attn.bias for b in h],
            "attprojw": [b.attn.c_proj.weight for b in h], "attprojb": [b.attn.c_proj.bias for b in h],
            "ln2w": [b.ln_2.weight for b in h], "ln2b": [b.ln_2.bias for b in h],
            "fcw": [b.c_fc.weight for b in h], "fcb": [b.c_fc.bias for b in h],
            "fcprojw": [b.c_proj.weight for b in h], "fcprojb": [b.c_proj.bias for b in h],
            "lnfw": [self.ln_f.weight], "lnfb": [self.ln_f.bias],
        }

    def decay_groups(self, weight_decay: float) -> list:
        """AdamW parameter groups as llm.c makes them: decay on the 2-D weights only."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def from_course(model, flash: bool = False, torch_device: str = "cpu", padded: bool = False) -> TorchGPT2:
    """A TorchGPT2 holding the same weights as the course's `model` (wte without its padded rows unless
    padded)."""
    return copy_course_weights(TorchGPT2(model.config, flash, padded).to(torch_device), model)


def _pieces(tensors) -> list:
    """One course tensor of one layer as a twin holds it: a tensor, or the tensors it concatenates along rows."""
    return tensors if isinstance(tensors, list) else [tensors]


def copy_course_weights(ref, model):
    """`ref`, a PyTorch twin (TorchGPT2, TorchLlama), with the weights of the course's `model` copied in. The twin's
    llmc_tensors() gives, per course name, a list over layers (one entry for the names in its `unstacked`) of a
    tensor or of the tensors the course's one concatenates along rows; its wte (and lm_head) take the first V rows
    of the course's Vp unless the twin is padded."""
    with torch.no_grad():
        for name, layers in ref.llmc_tensors().items():
            ours = device.to_host(model.params[name])
            for l, tensors in enumerate(layers):
                pieces = _pieces(tensors)
                rows = [p.shape[0] for p in pieces]
                whole = torch.from_numpy(np.array(ours if name in ref.unstacked else ours[l]))
                if name in ("wte", "lm_head"):
                    whole = whole[:sum(rows)]       # V of the course's Vp rows unless the twin is padded
                for piece, value in zip(pieces, whole.split(rows)):
                    piece.copy_(value)
    return ref


def _llmc_arrays(ref, get) -> dict:
    """get(tensor) -> array for the course's names of the twin `ref`, stacked over layers, pieces concatenated;
    wte (and lm_head) (Vp, C), padded with zero rows if the twin has V."""
    c = ref.config
    out = {}
    for name, layers in ref.llmc_tensors().items():
        arrays = [torch.cat([get(p).detach() for p in _pieces(tensors)]).cpu().numpy() for tensors in layers]
        out[name] = arrays[0] if name in ref.unstacked else np.stack(arrays)
        if name in ("wte", "lm_head"):
            pad = np.zeros((c.padded_vocab_size - out[name].shape[0], c.channels), np.float32)
            out[name] = np.concatenate([out[name], pad])
    return out


def llmc_params(ref) -> dict:
    """The weights of a twin (TorchGPT2, TorchLlama) under the course's names as NumPy arrays (its layout)."""
    return _llmc_arrays(ref, lambda t: t)


def llmc_grads(ref) -> dict:
    """The gradients of a twin (TorchGPT2, TorchLlama) under the course's names as NumPy arrays (its layout)."""
    return _llmc_arrays(ref, lambda t: t.grad)


def write_debug_state(path, ref: TorchGPT2, x, y) -> None:
    """llm.c's debug-state file (magic 20240327) from this model: x, y, logits, loss and every gradient."""
    ref.zero_grad()
    logits, loss = ref(torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64)))
    loss.backward()
    grads = llmc_grads(ref)
    header = np.zeros(256, np.int32)
    header[:4] = [20240327, 2, x.shape[0], x.shape[1]]
    with open(path, "wb") as f:
        for part in (header, x.astype(np.int32), y.astype(np.int32), logits.detach().numpy(),
                     np.array([loss.item()], np.float32)):
            f.write(np.ascontiguousarray(part).tobytes())
        for name in PARAMETER_NAMES:
            f.write(np.ascontiguousarray(grads[name], np.float32).tobytes())
