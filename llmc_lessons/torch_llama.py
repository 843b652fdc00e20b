"""A LLaMA-style model in PyTorch, written independently of the course's layers: the reference the course's
LLaMA-style model (llmc_lessons/llama.py) is checked against (tests, lesson 16) and the baseline it is timed
against (`python -m llmc_lessons.bench --model llama-124m`).

Written as Meta's LLaMA writes it: separate wq, wk, wv, wo; RoPE as a multiplication by complex numbers made
of neighbouring channel pairs; RMSNorm; the MLP w2(silu(w1 x) * w3 x); no biases; an untied output head;
key/value heads repeated for their query heads (repeat_interleave). flash=True, for speed: RoPE in real
arithmetic (torch.compile does not fuse complex numbers) and scaled_dot_product_attention with enable_gqa. `llmc_tensors` maps its weights onto the course's flat layout (qkvw = [wq; wk; wv],
fcw = [w3; w1]: up, then gate).

PyTorch is not a dependency of the course: import this module only where torch is installed.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmc_lessons.llama import LlamaConfig
# the twins share the code between a twin and the course's layout: llmc_params and llmc_grads serve both
from llmc_lessons.torch_gpt2 import TorchGPT2, copy_course_weights, llmc_grads, llmc_params, with_loss  # noqa: F401

UNSTACKED = ("wte", "lnfw", "lm_head")


class RMSNorm(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(C))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_table(hs: int, T: int, theta: float) -> torch.Tensor:
    """(T, hs/2) complex: e^(i t theta^(-2j/hs)) for position t and pair j."""
    freqs = 1.0 / theta ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), freqs)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x, table):
    """x (B, T, heads, hs) real -> the same, each neighbouring pair (2j, 2j+1) times table[t, j] as a complex."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * table[None, :, None, :]).flatten(3).type_as(x)


def apply_rope_real(x, table):
    """apply_rope in real arithmetic, table (T, hs/2, 2) = [cos, sin] (the complex product written out), which
    torch.compile fuses."""
    pairs = x.float().unflatten(-1, (-1, 2))                      # (B, T, heads, hs/2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig, flash: bool):
        super().__init__()
        self.NH, self.NKV, self.hs, self.flash = c.num_heads, c.num_kv_heads, c.head_size, flash
        self.wq = nn.Linear(c.channels, c.num_heads * c.head_size, bias=False)
        self.wk = nn.Linear(c.channels, c.num_kv_heads * c.head_size, bias=False)
        self.wv = nn.Linear(c.channels, c.num_kv_heads * c.head_size, bias=False)
        self.wo = nn.Linear(c.num_heads * c.head_size, c.channels, bias=False)

    def forward(self, x, table):
        B, T, _ = x.shape
        rope = apply_rope_real if self.flash else apply_rope
        q = rope(self.wq(x).view(B, T, self.NH, self.hs), table).transpose(1, 2)          # (B, NH, T, hs)
        k = rope(self.wk(x).view(B, T, self.NKV, self.hs), table).transpose(1, 2)         # (B, NKV, T, hs)
        v = self.wv(x).view(B, T, self.NKV, self.hs).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.NKV != self.NH)
        else:
            group = self.NH // self.NKV
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)   # (B, NH, T, hs)
            scores = q @ k.transpose(-2, -1) / self.hs ** 0.5
            future = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=1)
            y = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, C: int, H: int):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(C, H, bias=False), nn.Linear(H, C, bias=False), nn.Linear(C, H, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, c: LlamaConfig, flash: bool):
        super().__init__()
        self.attention_norm, self.attention = RMSNorm(c.channels, c.norm_eps), Attention(c, flash)
        self.ffn_norm, self.feed_forward = RMSNorm(c.channels, c.norm_eps), FeedForward(c.channels, c.ffn_hidden)

    def forward(self, x, table):
        x = x + self.attention(self.attention_norm(x), table)
        return x + self.feed_forward(self.ffn_norm(x))


class TorchLlama(nn.Module):
    """The LLaMA-style model; flash=True uses scaled_dot_product_attention. padded: the vocabulary as TorchGPT2's
    (Vp rows of tok_embeddings and output, the padded rows starting at zero, the loss on the first V columns)."""

    def __init__(self, c: LlamaConfig, flash: bool = False, padded: bool = False):
        super().__init__()
        self.config, self.padded, self.unstacked = c, padded, UNSTACKED
        V = c.padded_vocab_size if padded else c.vocab_size
        self.tok_embeddings = nn.Embedding(V, c.channels)
        self.layers = nn.ModuleList(Block(c, flash) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.channels, c.norm_eps)
        self.output = nn.Linear(c.channels, V, bias=False)     # untied
        with torch.no_grad():
            self.tok_embeddings.weight[c.vocab_size:] = 0
            self.output.weight[c.vocab_size:] = 0
        table = rope_table(c.head_size, c.max_seq_len, c.rope_theta)
        # flash: the table as real [cos, sin] pairs, so that no complex tensor reaches torch.compile
        self.register_buffer("table", torch.view_as_real(table).clone() if flash else table, persistent=False)

    def forward(self, idx, targets=None):
        """idx, targets (B, T) -> logits (B, T, V or Vp), mean loss over the V real tokens (or None)."""
        T = idx.shape[1]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, self.table[:T])
        return with_loss(self.output(self.norm(x)), targets, self.config.vocab_size)

    def llmc_tensors(self) -> dict:
        """{course name: (list of torch tensors per layer, each split into parts concatenated along rows)}."""
        h = self.layers
        return {
            "wte": [[self.tok_embeddings.weight]],
            "ln1w": [[b.attention_norm.weight] for b in h],
            "qkvw": [[b.attention.wq.weight, b.attention.wk.weight, b.attention.wv.weight] for b in h],
            "attprojw": [[b.attention.wo.weight] for b in h],
            "ln2w": [[b.ffn_norm.weight] for b in h],
            "fcw": [[b.feed_forward.w3.weight, b.feed_forward.w1.weight] for b in h],    # up, then gate
            "fcprojw": [[b.feed_forward.w2.weight] for b in h],
            "lnfw": [[self.norm.weight]],
            "lm_head": [[self.output.weight]],
        }

    decay_groups = TorchGPT2.decay_groups   # decay on the 2-D weights only (LLAMA_DECAYED_PARAMETER_NAMES)


def from_course(model, flash: bool = False, torch_device: str = "cpu", padded: bool = False) -> TorchLlama:
    """A TorchLlama holding the same weights as the course's Llama `model` (wte and lm_head without their padded
    rows unless padded)."""
    return copy_course_weights(TorchLlama(model.config, flash, padded).to(torch_device), model)
