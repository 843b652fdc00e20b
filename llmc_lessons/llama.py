"""A LLaMA-style model beside GPT-2 (lesson 16): the same flat buffers, AdamW, trainer, data and checkpoints,
with LLaMA's layers in place of GPT-2's.

    tokens -> wte -> L x [rmsnorm (ln1) -> qkv matmul -> RoPE on q, k -> grouped-query attention -> attproj
                          -> residual -> rmsnorm (ln2) -> fc (C -> 2H: up, gate) -> SwiGLU -> fcproj -> residual]
           -> rmsnorm (lnf) -> lm_head (its own matrix, not wte) -> softmax / cross-entropy

What changes from GPT-2, and where each layer lives:
  * no wpe: positions enter as rotations of q and k (layers/rope.py), so attention sees relative positions;
  * RMSNorm instead of LayerNorm (layers/rmsnorm.py): no mean, no bias;
  * the MLP is SwiGLU (layers/swiglu.py), with a hidden width H chosen freely (ffn_hidden);
  * NKV <= NH key/value heads (grouped-query attention, layers/attention.py): a smaller KV cache;
  * no biases anywhere, and an untied output head lm_head (Vp, C).

The parameters sit in one flat float32 buffer in the order the data moves (LLAMA_PARAMETER_NAMES). The class
Llama is GPT2 (llmc_lessons/model.py) with this config, layout, initialisation and two execution paths: the
NumPy reference (LlamaNumpyPath), the fp32 kernels (LlamaKernelPath) and lesson 14's bf16 step
(LlamaBf16KernelPath), with GPT-2's CUDA graphs. It has its own checkpoint header (LLAMA_MODEL_MAGIC), and
generates with a key/value cache (KVCache). Its flash attention kernels (bf16, and TF32 on the fp32 path where
Fp32KernelPath.flash_tf32 allows: TF32 matmuls on) read a group's key/value head directly; otherwise the fp32 path
copies the heads with repkv before lesson 5's attention kernels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llmc_lessons import device
from llmc_lessons.layers.attention import (attention_backward, attention_backward_cuda, attention_forward,
                                           attention_forward_cuda)
from llmc_lessons.cublas import gemm
from llmc_lessons.layers.crossentropy import (crossentropy_forward, crossentropy_softmax_backward,
                                              fused_classifier_cuda, softmax_forward)
from llmc_lessons.layers.flash_attention import flash_attention_backward_bf16_cuda, flash_attention_forward_bf16_cuda
from llmc_lessons.layers.flash_attention import flash_attention_backward_tf32_cuda, flash_attention_forward_tf32_cuda
from llmc_lessons.layers.encoder import encoder_backward_cuda
from llmc_lessons.layers.matmul import matmul_backward, matmul_backward_cuda, matmul_forward, matmul_forward_cuda
from llmc_lessons.layers.residual import residual_backward, residual_forward, residual_forward_cuda
from llmc_lessons.layers.rmsnorm import (residual_rmsnorm_forward_bf16_cuda, rmsnorm_backward,
                                         rmsnorm_backward_bf16_cuda, rmsnorm_backward_cuda, rmsnorm_forward,
                                         rmsnorm_forward_bf16_cuda, rmsnorm_forward_cuda)
from llmc_lessons.layers.rope import (ROPE_THETA, precompute_freqs_cis, rope_backward, rope_forward,
                                      rope_qkv_backward_bf16_cuda, rope_qkv_backward_cuda,
                                      rope_qkv_forward_bf16_cuda, rope_qkv_forward_cuda)
from llmc_lessons.layers.swiglu import (swiglu_backward, swiglu_backward_bf16_cuda, swiglu_backward_cuda,
                                        swiglu_forward, swiglu_forward_bf16_cuda, swiglu_forward_cuda)
from llmc_lessons.model import _HEADER_INTS, GPT2, LLAMA_MODEL_MAGIC, model_file, write_model_file
from llmc_lessons.parameters import GPT2Config, flat_runs
from llmc_lessons.paths import Bf16KernelPath, Fp32KernelPath, NumpyPath, bf16_classifier, bf16_padded
from llmc_lessons.sampling import next_token, prompt_list

# ---------------------------------------------------------------------------------------------------------
# Configuration and parameter layout


@dataclass(frozen=True)
class LlamaConfig:
    """The sizes of a LLaMA-style model (the numbers its checkpoint header stores)."""
    max_seq_len: int = 1024         # maxT: the longest context (rows of the RoPE table)
    vocab_size: int = 50257         # V: real tokens (GPT-2's tokenizer)
    padded_vocab_size: int = 50304  # Vp: V rounded up to a multiple of 128
    num_layers: int = 12            # L
    num_heads: int = 12             # NH: query heads; head size hs = C / NH
    num_kv_heads: int = 4           # NKV: key/value heads, dividing NH (NKV = NH is multi-head attention)
    channels: int = 768             # C
    ffn_hidden: int = 1024          # H: SwiGLU's hidden width (fc is (2H, C): up, then gate)
    rope_theta: float = ROPE_THETA  # theta of RoPE's angles t * theta^(-2i/hs)
    norm_eps: float = 1e-5          # RMSNorm's eps

    def __post_init__(self):
        for name in ("max_seq_len", "vocab_size", "padded_vocab_size", "num_layers", "num_heads", "num_kv_heads",
                     "channels", "ffn_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size ({self.padded_vocab_size}) must be >= vocab_size ({self.vocab_size})")
        if self.channels % self.num_heads or (self.channels // self.num_heads) % 2:
            raise ValueError(f"channels ({self.channels}) must be num_heads ({self.num_heads}) times an even head "
                             f"size (RoPE turns pairs of channels)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"LlamaConfig.{name} must be a positive number, got {value!r}")

    @classmethod
    def from_name(cls, name: str) -> "LlamaConfig":
        """A preset: 'llama-124m' (GPT-2 small's L, NH, C and parameter count) or 'llama-tiny' (the CPU's)."""
        presets = {
            # The untied lm_head costs V * C = 38.6M parameters; a SwiGLU of H = 1024 (4C/3) pays for it, so
            # that the model has GPT-2 124M's count within 0.03% (124,399,872 against 124,439,808).
            "llama-124m": dict(num_layers=12, num_heads=12, num_kv_heads=4, channels=768, ffn_hidden=1024),
            "llama-tiny": dict(num_layers=2, num_heads=4, num_kv_heads=2, channels=64, ffn_hidden=96,
                               max_seq_len=64),
        }
        if name not in presets:
            raise ValueError(f"unknown LLaMA-style preset {name!r}; choose one of {sorted(presets)}")
        return cls(**presets[name])

    @property
    def head_size(self) -> int:
        """hs = C / NH."""
        return self.channels // self.num_heads


LLAMA_BLOCK_PARAMETER_NAMES = ("ln1w", "qkvw", "attprojw", "ln2w", "fcw", "fcprojw")
"""One layer's tensors, in the order the data moves through the block."""

LLAMA_PARAMETER_NAMES = ("wte",) + LLAMA_BLOCK_PARAMETER_NAMES + ("lnfw", "lm_head")
"""The 9 tensors in memory order; the block's 6 are stacked over layers (params[name][l] is layer l's)."""

LLAMA_DECAYED_PARAMETER_NAMES = ("wte", "qkvw", "attprojw", "fcw", "fcprojw", "lm_head")
"""AdamW decays the matrices only, as for GPT-2; the RMSNorm weights are not decayed."""


def llama_parameter_shapes(config: LlamaConfig) -> dict:
    """{name: shape} for the 9 tensors, in memory order (wte and lm_head padded to Vp rows)."""
    c = config
    Vp, C, L, H = c.padded_vocab_size, c.channels, c.num_layers, c.ffn_hidden
    qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_size
    return {"wte": (Vp, C), "ln1w": (L, C), "qkvw": (L, qkv, C), "attprojw": (L, C, C), "ln2w": (L, C),
            "fcw": (L, 2 * H, C), "fcprojw": (L, C, H), "lnfw": (C,), "lm_head": (Vp, C)}


def llama_num_parameters(config: LlamaConfig, padded: bool = True) -> int:
    """The parameter count; padded=False leaves out the padded rows of wte and lm_head."""
    total = sum(math.prod(s) for s in llama_parameter_shapes(config).values())
    return total if padded else total - 2 * (config.padded_vocab_size - config.vocab_size) * config.channels


def llama_decay_runs(config: LlamaConfig) -> list:
    """(start, stop, decays) runs of the flat buffer for AdamW (parameters.decay_runs for this layout)."""
    return flat_runs(llama_parameter_shapes(config), LLAMA_DECAYED_PARAMETER_NAMES)


def llama_init(p: dict, config: LlamaConfig, seed: int):
    """GPT-2's initialisation carried over: N(0, 0.02) matrices, residual projections scaled by 1/sqrt(2L), RMSNorm
    weights 1, padded vocab rows zero."""
    rng = np.random.default_rng(seed)
    for name in LLAMA_DECAYED_PARAMETER_NAMES:
        scale = 0.02 / math.sqrt(2 * config.num_layers) if name in ("attprojw", "fcprojw") else 0.02
        rng.standard_normal(dtype=np.float32, out=p[name].reshape(-1))
        p[name] *= np.float32(scale)
    p["wte"][config.vocab_size:] = 0
    p["lm_head"][config.vocab_size:] = 0
    for name in ("ln1w", "ln2w", "lnfw"):
        p[name][...] = 1


# ---------------------------------------------------------------------------------------------------------
# RoPE on the q and k parts of qkv, then grouped-query attention


def _rope_qkv(qkv, freqs_cis, NH: int, NKV: int, rotate):
    """qkv (B, T, (NH + 2 NKV) hs) with its q and k parts passed through `rotate` (B, T, heads, hs) each."""
    qkv = np.asarray(qkv)
    B, T, W = qkv.shape
    hs = W // (NH + 2 * NKV)
    q = rotate(qkv[:, :, :NH * hs].reshape(B, T, NH, hs), freqs_cis)
    k = rotate(qkv[:, :, NH * hs:(NH + NKV) * hs].reshape(B, T, NKV, hs), freqs_cis)
    return np.concatenate([q.reshape(B, T, -1), k.reshape(B, T, -1), qkv[:, :, (NH + NKV) * hs:]], axis=2)


def rope_qkv_forward(qkv, freqs_cis, NH: int, NKV: int):
    """qkv (B, T, (NH + 2 NKV) hs) -> the same with q and k rotated by RoPE (v unchanged); freqs_cis (T, hs/2, 2).
    The kernel path does it in place with rope_qkv_forward_cuda (layers/rope.py)."""
    return _rope_qkv(qkv, freqs_cis, NH, NKV, rope_forward)


def rope_qkv_backward(dqkv, freqs_cis, NH: int, NKV: int):
    """The backward of rope_qkv_forward: dq and dk turned back by the inverse rotation, dv unchanged."""
    return _rope_qkv(dqkv, freqs_cis, NH, NKV, rope_backward)


# ---------------------------------------------------------------------------------------------------------
# The NumPy reference: one block, then the model


def llama_block_forward(x, p: dict, config: LlamaConfig, freqs_cis):
    """x (B, T, C), p (one layer's 6 tensors), freqs_cis (T, hs/2, 2) -> (out (B, T, C), cache)."""
    NH, NKV, eps = config.num_heads, config.num_kv_heads, config.norm_eps
    ln1, ln1_rstd = rmsnorm_forward(x, p["ln1w"], eps)                    # (B, T, C), (B, T)
    qkv = matmul_forward(ln1, p["qkvw"])                                  # (B, T, (NH + 2 NKV) hs)
    qkvr = rope_qkv_forward(qkv, freqs_cis, NH, NKV)                      # q and k rotated
    atty, att = attention_forward(qkvr, NH, NKV)                          # (B, T, C), (B, NH, T, T)
    attproj = matmul_forward(atty, p["attprojw"])                         # (B, T, C)
    residual2 = residual_forward(x, attproj)                              # (B, T, C)
    ln2, ln2_rstd = rmsnorm_forward(residual2, p["ln2w"], eps)            # (B, T, C), (B, T)
    fch = matmul_forward(ln2, p["fcw"])                                   # (B, T, 2H): up, gate
    fch_swiglu = swiglu_forward(fch)                                      # (B, T, H)
    fcproj = matmul_forward(fch_swiglu, p["fcprojw"])                     # (B, T, C)
    residual3 = residual_forward(residual2, fcproj)                       # (B, T, C)
    cache = dict(x=x, ln1=ln1, ln1_rstd=ln1_rstd, qkvr=qkvr, atty=atty, att=att, residual2=residual2, ln2=ln2,
                 ln2_rstd=ln2_rstd, fch=fch, fch_swiglu=fch_swiglu)
    return residual3, cache


def llama_block_backward(dout, cache: dict, p: dict, config: LlamaConfig, freqs_cis):
    """dout (B, T, C) = dL/dresidual3 -> (dx (B, T, C), {name: gradient} for the layer's 6 tensors)."""
    NH, NKV, c = config.num_heads, config.num_kv_heads, cache
    dresidual2, dfcproj = residual_backward(dout)
    dfch_swiglu, dfcprojw, _ = matmul_backward(dfcproj, c["fch_swiglu"], p["fcprojw"])
    dfch = swiglu_backward(dfch_swiglu, c["fch"])
    dln2, dfcw, _ = matmul_backward(dfch, c["ln2"], p["fcw"])
    dres2_mlp, dln2w = rmsnorm_backward(dln2, c["residual2"], p["ln2w"], c["ln2_rstd"])
    dresidual2 = dresidual2 + dres2_mlp                  # residual2 was read by the skip AND by ln2
    dx, dattproj = residual_backward(dresidual2)
    datty, dattprojw, _ = matmul_backward(dattproj, c["atty"], p["attprojw"])
    dqkvr = attention_backward(datty, c["qkvr"], c["att"], NH, NKV)
    dqkv = rope_qkv_backward(dqkvr, freqs_cis, NH, NKV)
    dln1, dqkvw, _ = matmul_backward(dqkv, c["ln1"], p["qkvw"])
    dx_attn, dln1w = rmsnorm_backward(dln1, c["x"], p["ln1w"], c["ln1_rstd"])
    dx = dx + dx_attn                                    # x was read by the skip AND by ln1
    return dx, dict(ln1w=dln1w, qkvw=dqkvw, attprojw=dattprojw, ln2w=dln2w, fcw=dfcw, fcprojw=dfcprojw)


def llama_forward(params: dict, config: LlamaConfig, idx, targets=None):
    """The NumPy reference forward in any float dtype: -> (logits (B, T, Vp), losses (B, T) or None, cache)."""
    p = params
    T = idx.shape[1]
    freqs_cis = precompute_freqs_cis(config.head_size, T, config.rope_theta, dtype=p["wte"].dtype)
    residual, block_caches = p["wte"][idx], []                           # (B, T, C): no position embedding
    for l in range(config.num_layers):
        layer = {name: p[name][l] for name in LLAMA_BLOCK_PARAMETER_NAMES}
        residual, cache = llama_block_forward(residual, layer, config, freqs_cis)
        block_caches.append(cache)
    lnf, lnf_rstd = rmsnorm_forward(residual, p["lnfw"], config.norm_eps)
    logits = matmul_forward(lnf, p["lm_head"])                           # (B, T, Vp): the untied head
    probs = softmax_forward(logits, config.vocab_size)
    losses = crossentropy_forward(probs, targets) if targets is not None else None
    cache = dict(idx=idx, targets=targets, freqs_cis=freqs_cis, block_caches=block_caches, residual=residual,
                 lnf=lnf, lnf_rstd=lnf_rstd, probs=probs)
    return logits, losses, cache


def llama_backward(params: dict, config: LlamaConfig, cache: dict) -> dict:
    """The NumPy reference backward of the mean loss: -> {name: gradient} for the 9 tensors (fresh arrays)."""
    p = params
    if cache.get("targets") is None:
        raise RuntimeError("the backward needs a forward with targets")
    idx = cache["idx"]
    B, T = idx.shape
    dlosses = np.full((B, T), 1.0 / (B * T), dtype=cache["probs"].dtype)
    dlogits = crossentropy_softmax_backward(dlosses, cache["probs"], cache["targets"], config.vocab_size)
    dlnf, dlm_head, _ = matmul_backward(dlogits, cache["lnf"], p["lm_head"])
    dresidual, dlnfw = rmsnorm_backward(dlnf, cache["residual"], p["lnfw"], cache["lnf_rstd"])
    grads = {name: np.zeros_like(p[name]) for name in LLAMA_BLOCK_PARAMETER_NAMES}
    for l in reversed(range(config.num_layers)):
        layer = {name: p[name][l] for name in LLAMA_BLOCK_PARAMETER_NAMES}
        dresidual, block_grads = llama_block_backward(dresidual, cache["block_caches"][l], layer, config,
                                                      cache["freqs_cis"])
        for name in LLAMA_BLOCK_PARAMETER_NAMES:
            grads[name][l] = block_grads[name]
    dwte = np.zeros_like(p["wte"])
    np.add.at(dwte, idx, dresidual)                      # a token at several positions collects every gradient
    grads.update(wte=dwte, lnfw=dlnfw, lm_head=dlm_head)
    return {name: grads[name] for name in LLAMA_PARAMETER_NAMES}


class LlamaNumpyPath(NumpyPath):
    """The LLaMA-style model's NumPy reference on the host, in float32 (AdamW as GPT-2's NumpyPath)."""

    def forward(self, model, idx, targets):
        return llama_forward(model.params, model.config, idx, targets)

    def backward(self, model, cache):
        for name, grad in llama_backward(model.params, model.config, cache).items():
            model.grads[name] += grad


class LlamaKernelPath(Fp32KernelPath):
    """The same lines through the course's fp32 kernels on backend arrays (CuPy on a GPU, the emulator on a CPU):
    rmsnorm.cu, rope.cu, swiglu.cu, attention (with TF32 matmuls on: flash_attention_tf32.cu, which reads each
    group's key/value head in place; else attention.cu with repkv copies), matmuls through cuBLAS, llm.c's fused
    classifier, and the encoder's deterministic backward for wte."""

    def check(self, config) -> None:
        """Every config runs here."""

    @staticmethod
    def _table(model, T: int):
        """RoPE's (T, hs/2, 2) table on the backend, made once per model (not inside a CUDA graph's recording)."""
        table = getattr(model, "_rope_table", None)
        if table is None or not isinstance(table, type(model.params_memory)):
            c = model.config
            rows = -(-c.max_seq_len // 8) * 8        # the bf16 path runs T rounded up to a multiple of 8
            table = model._rope_table = model._asarray(precompute_freqs_cis(c.head_size, rows, c.rope_theta))
        return table[:T]

    def forward(self, model, idx, targets):
        c, p, version, xp = model.config, model.params, model.matmul_version, device.xp
        NH, NKV, eps = c.num_heads, c.num_kv_heads, c.norm_eps
        freqs_cis = self._table(model, idx.shape[1])
        flash = self.flash_tf32(model)                                       # decided once: each cache records it
        residual, block_caches = xp.take(p["wte"], idx, axis=0), []          # (B, T, C)
        for l in range(c.num_layers):
            w = model.layer_params(l)
            x = residual
            ln1, ln1_rstd = rmsnorm_forward_cuda(x, w["ln1w"], eps=eps)
            qkvr = matmul_forward_cuda(ln1, w["qkvw"], None, version=version)
            rope_qkv_forward_cuda(qkvr, freqs_cis, NH, NKV)                   # q and k rotated in place
            if flash:
                atty, lse = flash_attention_forward_tf32_cuda(qkvr, NH, NKV)  # (B, T, C), (B, NH, T)
                attention = dict(lse=lse)
            else:
                atty, att = attention_forward_cuda(qkvr, NH, NKV=NKV)         # (B, T, C), (B, NH, T, T)
                attention = dict(att=att)
            residual2 = residual_forward_cuda(x, matmul_forward_cuda(atty, w["attprojw"], None, version=version))
            ln2, ln2_rstd = rmsnorm_forward_cuda(residual2, w["ln2w"], eps=eps)
            fch = matmul_forward_cuda(ln2, w["fcw"], None, version=version)
            fch_swiglu = swiglu_forward_cuda(fch)
            residual = residual_forward_cuda(residual2,
                                             matmul_forward_cuda(fch_swiglu, w["fcprojw"], None, version=version))
            block_caches.append(dict(x=x, ln1=ln1, ln1_rstd=ln1_rstd, qkvr=qkvr, atty=atty, **attention,
                                     residual2=residual2, ln2=ln2, ln2_rstd=ln2_rstd, fch=fch, fch_swiglu=fch_swiglu))
        lnf, lnf_rstd = rmsnorm_forward_cuda(residual, p["lnfw"], eps=eps)
        logits = matmul_forward_cuda(lnf, p["lm_head"], None, version=version)    # (B, T, Vp)
        losses = dlogits = None
        if targets is not None:     # the fused classifier writes dlogits over its input (see Fp32KernelPath)
            losses, dlogits = fused_classifier_cuda(logits.copy() if model.keep_logits else logits, targets,
                                                    c.vocab_size)
            if not model.keep_logits:
                logits = None
        cache = dict(idx=idx, targets=targets, block_caches=block_caches, residual=residual, lnf=lnf,
                     lnf_rstd=lnf_rstd, dlogits=dlogits)
        return logits, losses, cache

    def backward(self, model, cache):
        c, p, g, version = model.config, model.params, model.grads, model.matmul_version
        NH, NKV = c.num_heads, c.num_kv_heads
        freqs_cis = self._table(model, cache["idx"].shape[1])
        dlnf, dlm_head, _ = matmul_backward_cuda(cache.pop("dlogits"), cache["lnf"], p["lm_head"], version=version,
                                                 has_bias=False)
        cache["dlogits"] = None
        g["lm_head"] += dlm_head
        dres, dlnfw = rmsnorm_backward_cuda(dlnf, cache["residual"], p["lnfw"], cache["lnf_rstd"])
        g["lnfw"] += dlnfw
        for l in reversed(range(c.num_layers)):
            a, w, gl = cache["block_caches"][l], model.layer_params(l), model.layer_params(l, grads=True)
            dfch_swiglu, dw, _ = matmul_backward_cuda(dres, a["fch_swiglu"], w["fcprojw"], version=version,
                                                      has_bias=False)
            gl["fcprojw"] += dw
            dfch = swiglu_backward_cuda(dfch_swiglu, a["fch"])
            dln2, dw, _ = matmul_backward_cuda(dfch, a["ln2"], w["fcw"], version=version, has_bias=False)
            gl["fcw"] += dw
            dres2_mlp, dw = rmsnorm_backward_cuda(dln2, a["residual2"], w["ln2w"], a["ln2_rstd"])
            gl["ln2w"] += dw
            dres = residual_forward_cuda(dres, dres2_mlp)                     # residual2's two readers
            datty, dw, _ = matmul_backward_cuda(dres, a["atty"], w["attprojw"], version=version, has_bias=False)
            gl["attprojw"] += dw
            if "lse" in a:                                                    # the forward's attention
                dqkvr = flash_attention_backward_tf32_cuda(datty, a["qkvr"], a["atty"], a["lse"], NH, NKV)
            else:
                dqkvr = attention_backward_cuda(datty, a["qkvr"], a["att"], NH, NKV=NKV)
            dqkv = rope_qkv_backward_cuda(dqkvr, freqs_cis, NH, NKV)          # in place: dqkv is dqkvr
            dln1, dw, _ = matmul_backward_cuda(dqkv, a["ln1"], w["qkvw"], version=version, has_bias=False)
            gl["qkvw"] += dw
            dx_attn, dw = rmsnorm_backward_cuda(dln1, a["x"], w["ln1w"], a["ln1_rstd"])
            gl["ln1w"] += dw
            dres = residual_forward_cuda(dres, dx_attn)                       # x's two readers
        return dres

    def finish_backward(self, model, cache, dres) -> None:
        # wte's gradient through the encoder's deterministic backward; its position part goes to a scratch array
        T = cache["idx"].shape[1]
        encoder_backward_cuda(dres, cache["idx"], model.config.padded_vocab_size, T, buckets=cache["buckets"],
                              dwte=model.grads["wte"],
                              dwpe=device.xp.zeros((T, model.config.channels), model.grads["wte"].dtype))


class LlamaBf16KernelPath(Bf16KernelPath):
    """The bf16 step of lesson 14 for the LLaMA-style model: bf16 activations, weight copies and weight
    gradients, float32 master weights and AdamW moments; flash attention on the tensor cores, reading the NKV
    key/value heads where they lie (no repkv copy); the residual stream in bf16 (each add computed in float32 and
    rounded once), its gradient in float32."""
    _table = staticmethod(LlamaKernelPath._table)
    finish_backward = LlamaKernelPath.finish_backward

    def check(self, config) -> None:
        """GPT-2's bf16 conditions (paths.Bf16KernelPath.check), and H a multiple of 8 for SwiGLU's kernels."""
        if config.ffn_hidden % 8:
            raise ValueError(f"precision='bf16' moves 8 bf16 values at a time: H ({config.ffn_hidden}) must be a "
                             f"multiple of 8")
        super().check(config)

    def forward(self, model, idx, targets):
        c, p, w, xp = model.config, model.params, model.params_bf16, device.xp
        B, T = idx.shape
        idx = bf16_padded(idx, targets)
        T_run = idx.shape[1]
        BT, NH, NKV, eps = B * T_run, c.num_heads, c.num_kv_heads, c.norm_eps
        freqs_cis = self._table(model, T_run)

        def linear(x, weight):               # (B, T, in) bf16 @ weight^T -> (B, T, out) bf16
            return gemm(x.reshape(BT, -1), weight, trans_b=True).reshape(B, T_run, -1)

        residual, block_caches = xp.take(w["wte"], idx, axis=0), []            # (B, T, C) bf16
        ln1, ln1_rstd = rmsnorm_forward_bf16_cuda(residual, p["ln1w"][0], eps=eps)  # the later ones: fused below
        for l in range(c.num_layers):
            x = residual
            qkv = linear(ln1, w["qkvw"][l])
            rope_qkv_forward_bf16_cuda(qkv, freqs_cis, NH, NKV)                  # in place
            atty, lse = flash_attention_forward_bf16_cuda(qkv, NH, NKV)          # (B, T, C), (B, NH, T)
            residual2, ln2, ln2_rstd = residual_rmsnorm_forward_bf16_cuda(x, linear(atty, w["attprojw"][l]),
                                                                          p["ln2w"][l], eps=eps)
            fch = linear(ln2, w["fcw"][l])
            fch_swiglu = swiglu_forward_bf16_cuda(fch)
            next_w = p["ln1w"][l + 1] if l + 1 < c.num_layers else p["lnfw"]   # the next RMSNorm: ln1 or lnf
            residual, ln_next, rstd_next = residual_rmsnorm_forward_bf16_cuda(
                residual2, linear(fch_swiglu, w["fcprojw"][l]), next_w, eps=eps)
            block_caches.append(dict(x=x, ln1=ln1, ln1_rstd=ln1_rstd, qkv=qkv, atty=atty, lse=lse,
                                     residual2=residual2, ln2=ln2, ln2_rstd=ln2_rstd, fch=fch, fch_swiglu=fch_swiglu))
            ln1, ln1_rstd = ln_next, rstd_next
        lnf, lnf_rstd = ln1, ln1_rstd
        logits, losses, dlogits = bf16_classifier(model, linear(lnf, w["lm_head"]), targets, T)
        cache = dict(idx=idx, targets=targets, block_caches=block_caches, residual=residual, lnf=lnf,
                     lnf_rstd=lnf_rstd, dlogits=dlogits)
        return logits, losses, cache

    def backward(self, model, cache):
        """dres, the gradient of the residual stream, accumulates in float32: each RMSNorm backward adds its input
        gradient into it and returns it in bf16 for the next matmul backward."""
        c, p, w, g = model.config, model.params, model.params_bf16, model.grads
        B, T = cache["idx"].shape
        BT, C, NH, NKV = B * T, c.channels, c.num_heads, c.num_kv_heads
        freqs_cis = self._table(model, T)

        def linear_backward(dout, inp, weight, dweight):
            d2 = dout.reshape(BT, -1)
            gemm(d2, inp.reshape(BT, -1), trans_a=True, out=dweight, accumulate=True)   # bf16 out
            return gemm(d2, weight).reshape(B, T, -1)

        dres = device.xp.zeros((B, T, C), dtype=np.float32)
        dlnf = linear_backward(cache.pop("dlogits"), cache["lnf"], w["lm_head"], g["lm_head"])
        cache["dlogits"] = None
        dres_bf16 = rmsnorm_backward_bf16_cuda(dres, dlnf, cache["residual"], p["lnfw"], cache["lnf_rstd"], g["lnfw"])
        for l in reversed(range(c.num_layers)):
            a = cache["block_caches"][l]
            dfch_swiglu = linear_backward(dres_bf16, a["fch_swiglu"], w["fcprojw"][l], g["fcprojw"][l])
            dfch = swiglu_backward_bf16_cuda(dfch_swiglu, a["fch"])
            dln2 = linear_backward(dfch, a["ln2"], w["fcw"][l], g["fcw"][l])
            dres_bf16 = rmsnorm_backward_bf16_cuda(dres, dln2, a["residual2"], p["ln2w"][l], a["ln2_rstd"],
                                                   g["ln2w"][l])
            datty = linear_backward(dres_bf16, a["atty"], w["attprojw"][l], g["attprojw"][l])
            dqkv = flash_attention_backward_bf16_cuda(datty, a["qkv"], a["atty"], a["lse"], NH, NKV=NKV)
            rope_qkv_backward_bf16_cuda(dqkv, freqs_cis, NH, NKV)                # in place
            dln1 = linear_backward(dqkv, a["ln1"], w["qkvw"][l], g["qkvw"][l])
            dres_bf16 = rmsnorm_backward_bf16_cuda(dres, dln1, a["x"], p["ln1w"][l], a["ln1_rstd"], g["ln1w"][l])
        return dres


# ---------------------------------------------------------------------------------------------------------
# The model

_VERSION_FP32 = 1


class Llama(GPT2):
    """The LLaMA-style model with GPT-2's buffers, AdamW and trainer: forward(idx, targets), backward(), update()."""
    config_type = LlamaConfig
    parameter_shapes = staticmethod(llama_parameter_shapes)
    init_params = staticmethod(llama_init)
    decay_runs = staticmethod(llama_decay_runs)
    block_parameter_names = LLAMA_BLOCK_PARAMETER_NAMES

    @staticmethod
    def _path(precision: str, backend: str, parts: dict | None = None):
        if parts:
            raise ValueError("the student's parts are GPT-2's layers: a LLaMA-style model takes no parts")
        if precision == "bf16":
            return LlamaBf16KernelPath()
        return LlamaKernelPath() if backend == "kernels" else LlamaNumpyPath()

    # -- checkpoint files: GPT-2's layout of a 256-int header, then the flat float32 buffer ----------------

    @classmethod
    def from_llmc_checkpoint(cls, path, backend: str | None = None, precision: str = "fp32") -> "Llama":
        """Load a LLaMA-style model file written by save_llmc_checkpoint (magic LLAMA_MODEL_MAGIC)."""
        with model_file(path, LLAMA_MODEL_MAGIC) as (f, header, file_bytes):
            if header[1] != _VERSION_FP32:
                raise ValueError(f"{path}: LLaMA-style model file version {header[1]} is not supported "
                                 f"({_VERSION_FP32} = fp32 is)")
            maxT, V, Vp, L, NH, NKV, C, H = (int(x) for x in header[2:10])
            theta, eps = (float(x) for x in header[10:14].view("<f8"))
            try:
                config = LlamaConfig(max_seq_len=maxT, vocab_size=V, padded_vocab_size=Vp, num_layers=L,
                                     num_heads=NH, num_kv_heads=NKV, channels=C, ffn_hidden=H, rope_theta=theta,
                                     norm_eps=eps)
            except ValueError as e:
                raise ValueError(f"{path}: the header's sizes are not a LLaMA-style model: {e}") from None
            n = llama_num_parameters(config)
            if file_bytes != _HEADER_INTS * 4 + 4 * n:
                raise ValueError(f"{path}: the header describes {n:,} parameters ({4 * n + 1024:,} bytes), but the "
                                 f"file has {file_bytes:,}")
            flat = np.fromfile(f, dtype="<f4", count=n)
        model = cls(config, seed=None, backend=backend, precision=precision)
        model._set_params_memory(flat.astype(np.float32, copy=False))
        return model

    def save_llmc_checkpoint(self, path):
        """Write the model file (header: magic, version, maxT, V, Vp, L, NH, NKV, C, H, then theta and eps as
        float64 (two int32 slots each); then the parameters) atomically; returns the path."""
        c = self.config
        header = np.zeros(_HEADER_INTS, dtype="<i4")
        header[:10] = [LLAMA_MODEL_MAGIC, _VERSION_FP32, c.max_seq_len, c.vocab_size, c.padded_vocab_size,
                       c.num_layers, c.num_heads, c.num_kv_heads, c.channels, c.ffn_hidden]
        header[10:14] = np.array([c.rope_theta, c.norm_eps], dtype="<f8").view("<i4")
        return write_model_file(path, header, self.params_memory)

    def __repr__(self):
        c = self.config
        return (f"Llama(L={c.num_layers}, NH={c.num_heads}, NKV={c.num_kv_heads}, C={c.channels}, H={c.ffn_hidden}, "
                f"maxT={c.max_seq_len}, V={c.vocab_size}, Vp={c.padded_vocab_size}; "
                f"{llama_num_parameters(c, padded=False):,} parameters, {self.num_parameters:,} with the padded "
                f"vocab; {'kernels' if self.path.on_backend else 'NumPy reference'} path)")


# ---------------------------------------------------------------------------------------------------------
# Generation with a key/value cache


class KVCache:
    """The rotated keys and the values of every layer for the positions seen so far (one sequence, B = 1).

    Without a cache, each new token reruns the forward over the whole context. With it, a step runs the new
    positions only: their q, k, v come from their own rows, and attention reads the cached keys and values of
    the earlier ones. GQA keeps NKV heads per position, NH / NKV times less than multi-head attention would.
    """

    def __init__(self, model: Llama):
        config = model.config
        hs, NKV = config.head_size, config.num_kv_heads
        self.config = config
        # the weights on the host (a copy on a GPU, the model's own arrays on a CPU): the cache runs in NumPy
        self.params = {name: np.asarray(device.to_host(a)) for name, a in model.params.items()}
        self.k = [np.zeros((0, NKV * hs), np.float32) for _ in range(config.num_layers)]   # (T so far, NKV hs)
        self.v = [np.zeros((0, NKV * hs), np.float32) for _ in range(config.num_layers)]
        self.freqs_cis = precompute_freqs_cis(hs, config.max_seq_len, config.rope_theta)

    @property
    def length(self) -> int:
        """Positions held."""
        return self.k[0].shape[0]


def forward_cached(cache: KVCache, tokens) -> np.ndarray:
    """Run the new `tokens` (a list of ids) at positions cache.length.. with the weights the cache was made with,
    and return their logits (n, Vp); their keys and values join the cache."""
    c, p = cache.config, cache.params
    NH, NKV, hs, C = c.num_heads, c.num_kv_heads, c.head_size, c.channels
    start, n = cache.length, len(tokens)
    if start + n > c.max_seq_len:
        raise ValueError(f"the cache holds {start} positions; {n} more pass max_seq_len = {c.max_seq_len}")
    freqs_cis = cache.freqs_cis[start:start + n]
    x = p["wte"][np.asarray(tokens)][None]                                    # (1, n, C)
    for l in range(c.num_layers):
        ln1, _ = rmsnorm_forward(x, p["ln1w"][l], c.norm_eps)
        qkvr = rope_qkv_forward(matmul_forward(ln1, p["qkvw"][l]), freqs_cis, NH, NKV)   # (1, n, (NH+2NKV) hs)
        cache.k[l] = np.concatenate([cache.k[l], qkvr[0, :, C:C + NKV * hs]])
        cache.v[l] = np.concatenate([cache.v[l], qkvr[0, :, C + NKV * hs:]])
        # grouped-query attention without copying the cache: query head h = g * group + j reads kv head g
        group, T_all = NH // NKV, start + n
        q = qkvr[0, :, :C].reshape(n, NKV, group, hs).transpose(1, 2, 0, 3)   # (NKV, group, n, hs)
        k = cache.k[l].reshape(T_all, NKV, hs).transpose(1, 0, 2)[:, None]    # (NKV, 1, T_all, hs)
        v = cache.v[l].reshape(T_all, NKV, hs).transpose(1, 0, 2)[:, None]
        scores = q @ k.transpose(0, 1, 3, 2) / np.float32(math.sqrt(hs))       # (NKV, group, n, T_all)
        visible = np.arange(T_all)[None, :] <= (start + np.arange(n))[:, None]   # key t2 <= the query's t
        scores = np.where(visible, scores, -np.inf)
        att = np.exp(scores - scores.max(axis=-1, keepdims=True))
        att /= att.sum(axis=-1, keepdims=True)
        atty = (att @ v).reshape(NH, n, hs).transpose(1, 0, 2).reshape(1, n, C)   # heads in order h
        x = x + matmul_forward(atty, p["attprojw"][l])
        ln2, _ = rmsnorm_forward(x, p["ln2w"][l], c.norm_eps)
        x = x + matmul_forward(swiglu_forward(matmul_forward(ln2, p["fcw"][l])), p["fcprojw"][l])
    lnf, _ = rmsnorm_forward(x, p["lnfw"], c.norm_eps)
    return matmul_forward(lnf, p["lm_head"])[0]                              # (n, Vp)


def generate_cached(model: Llama, prompt_tokens, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, seed: int | None = None) -> list:
    """sampling.generate with a key/value cache: the prompt runs once, then one position per new token. The
    same seed samples the same tokens as sampling.generate (which reruns the whole context at every step)."""
    tokens = prompt_list(prompt_tokens, temperature, top_k)
    V, maxT = model.config.vocab_size, model.config.max_seq_len
    if len(tokens) + max_new_tokens > maxT:
        raise ValueError(f"{len(tokens)} prompt tokens + {max_new_tokens} new ones exceed max_seq_len = {maxT} "
                         f"(the cache holds one window; sampling.generate slides it)")
    rng = np.random.default_rng(seed)
    cache = KVCache(model)
    logits = forward_cached(cache, tokens)
    for i in range(int(max_new_tokens)):
        if i:
            logits = forward_cached(cache, tokens[-1:])                        # the newest token only
        tokens.append(next_token(logits[-1], V, temperature, top_k, rng))
    return tokens


# ---------------------------------------------------------------------------------------------------------
# Choosing between the two models by name (the trainer's and the benchmark's --model)


def config_from_name(name: str):
    """A GPT2Config preset ('tiny', 'd12', ...) or a LlamaConfig one ('llama-tiny', 'llama-124m')."""
    return LlamaConfig.from_name(name) if str(name).startswith("llama") else GPT2Config.from_name(name)


def model_class(config):
    """Llama for a LlamaConfig, GPT2 for a GPT2Config."""
    return Llama if isinstance(config, LlamaConfig) else GPT2
