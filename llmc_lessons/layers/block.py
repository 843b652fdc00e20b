"""One GPT-2 transformer block, forward and backward, composed from the course's layers (lesson 07).

The block reads the residual stream x (B, T, C) and adds two branches onto it:

    ln1 -> qkv matmul (C -> 3C) -> attention -> attproj (C -> C) -> residual2 = x + attproj
    ln2 -> fc (C -> 4C) -> gelu -> fcproj (4C -> C)              -> residual3 = residual2 + fcproj

The forward is written one operation per line with llm.c's activation names (ln1, qkv, atty, att, attproj,
residual2, ln2, fch, fch_gelu, fcproj, residual3); the backward walks the same lines in reverse. The two
residual connections are forks: x is read by ln1 AND by the skip path, residual2 by ln2 AND by the skip
path, so in the backward the gradients arriving from the two readers add.

Parameters of one layer are a dict with llm.c's names: ln1w, ln1b (C,), qkvw (3C, C), qkvb (3C,),
attprojw (C, C), attprojb (C,), ln2w, ln2b (C,), fcw (4C, C), fcb (4C,), fcprojw (C, 4C), fcprojb (C,).

Two paths: block_forward / block_backward use the NumPy references (any float dtype);
block_forward_cuda / block_backward_cuda use each layer's kernel launcher on backend arrays (float32), with
lesson 05's attention or, when asked (flash=True), lesson 13's TF32 flash attention (version 3).
"""
from __future__ import annotations

import numpy as np

from llmc_lessons.layers.attention import (attention_backward, attention_backward_cuda, attention_forward,
                                           attention_forward_cuda)
from llmc_lessons.layers.flash_attention import flash_attention_backward_tf32_cuda, flash_attention_forward_tf32_cuda
from llmc_lessons.layers.gelu import gelu_backward, gelu_backward_cuda, gelu_forward, gelu_forward_cuda
from llmc_lessons.layers.layernorm import (layernorm_backward, layernorm_backward_cuda, layernorm_forward,
                                           layernorm_forward_cuda)
from llmc_lessons.layers.matmul import matmul_backward, matmul_backward_cuda, matmul_forward, matmul_forward_cuda
from llmc_lessons.layers.residual import residual_backward, residual_forward, residual_forward_cuda

BLOCK_PARAMETER_NAMES = ("ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
                         "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb")
"""llm.c's 12 per-layer parameter tensors, in their memory order."""


def block_parameter_shapes(C: int) -> dict:
    """{name: shape} of one layer's parameters for width C."""
    return {"ln1w": (C,), "ln1b": (C,), "qkvw": (3 * C, C), "qkvb": (3 * C,),
            "attprojw": (C, C), "attprojb": (C,), "ln2w": (C,), "ln2b": (C,),
            "fcw": (4 * C, C), "fcb": (4 * C,), "fcprojw": (C, 4 * C), "fcprojb": (C,)}


def init_block_params(C: int, gen: np.random.Generator, dtype=np.float32, std: float = 0.02) -> dict:
    """Random parameters of one block (GPT-2-like: weights N(0, std^2), layernorm weights near 1, small
    biases, so that every parameter's gradient is exercised)."""
    p = {}
    for name, shape in block_parameter_shapes(C).items():
        if name in ("ln1w", "ln2w"):
            p[name] = 1.0 + 0.1 * gen.standard_normal(shape)
        elif name.endswith("b"):
            p[name] = 0.1 * gen.standard_normal(shape)
        else:
            p[name] = std * gen.standard_normal(shape)
        p[name] = p[name].astype(dtype)
    return p


def _check(x, p: dict, NH, where: str):
    """Shapes of x (B, T, C) and of the 12 parameters; NH must divide C."""
    if getattr(x, "ndim", None) != 3:
        raise ValueError(f"{where}: x must have shape (B, T, C), got {getattr(x, 'shape', type(x).__name__)}")
    C = x.shape[2]
    if isinstance(NH, bool) or not isinstance(NH, (int, np.integer)) or NH < 1 or C % NH:
        raise ValueError(f"{where}: NH must be a positive int dividing C = {C}, got {NH!r}")
    missing = [n for n in BLOCK_PARAMETER_NAMES if n not in p]
    if missing:
        raise KeyError(f"{where}: the parameter dict lacks {missing} (it needs llm.c's 12 names "
                       f"{list(BLOCK_PARAMETER_NAMES)})")
    for name, shape in block_parameter_shapes(C).items():
        if tuple(p[name].shape) != shape:
            raise ValueError(f"{where}: p[{name!r}] must have shape {shape} for C = {C}, got {tuple(p[name].shape)}")


# ---------------------------------------------------------------------------------------------------------
# NumPy reference: forward


def block_forward(x, p: dict, NH: int):
    """x (B, T, C), p (the 12 tensors), NH -> (out (B, T, C), cache for block_backward)."""
    _check(x, p, NH, "block_forward")
    # attention branch
    ln1, ln1_mean, ln1_rstd = layernorm_forward(x, p["ln1w"], p["ln1b"])   # (B, T, C), (B, T), (B, T)
    qkv = matmul_forward(ln1, p["qkvw"], p["qkvb"])                        # (B, T, 3C)
    atty, att = attention_forward(qkv, NH)                                 # (B, T, C), (B, NH, T, T)
    attproj = matmul_forward(atty, p["attprojw"], p["attprojb"])           # (B, T, C)
    residual2 = residual_forward(x, attproj)                               # (B, T, C): fork 1 joins
    # MLP branch
    ln2, ln2_mean, ln2_rstd = layernorm_forward(residual2, p["ln2w"], p["ln2b"])  # (B, T, C), (B, T), (B, T)
    fch = matmul_forward(ln2, p["fcw"], p["fcb"])                          # (B, T, 4C)
    fch_gelu = gelu_forward(fch)                                           # (B, T, 4C)
    fcproj = matmul_forward(fch_gelu, p["fcprojw"], p["fcprojb"])          # (B, T, C)
    residual3 = residual_forward(residual2, fcproj)                        # (B, T, C): fork 2 joins
    # what the backward reads (attproj and fcproj are not needed: the residual backward ignores values)
    cache = dict(x=x, ln1=ln1, ln1_mean=ln1_mean, ln1_rstd=ln1_rstd, qkv=qkv, atty=atty, att=att,
                 residual2=residual2, ln2=ln2, ln2_mean=ln2_mean, ln2_rstd=ln2_rstd, fch=fch, fch_gelu=fch_gelu)
    return residual3, cache


# ---------------------------------------------------------------------------------------------------------
# NumPy reference: backward, the forward's lines in reverse


def mlp_backward(dfcproj, cache: dict, p: dict):
    """The MLP branch backward, fcproj -> gelu -> fc -> ln2:
    dfcproj (B, T, C) -> (dresidual2 from the MLP branch (B, T, C), {fcprojw, fcprojb, fcw, fcb, ln2w, ln2b})."""
    c = cache
    dfch_gelu, dfcprojw, dfcprojb = matmul_backward(dfcproj, c["fch_gelu"], p["fcprojw"])  # (B, T, 4C)
    dfch = gelu_backward(dfch_gelu, c["fch"])                                             # (B, T, 4C)
    dln2, dfcw, dfcb = matmul_backward(dfch, c["ln2"], p["fcw"])                           # (B, T, C)
    dresidual2, dln2w, dln2b = layernorm_backward(dln2, c["residual2"], p["ln2w"], c["ln2_mean"], c["ln2_rstd"])
    return dresidual2, dict(fcprojw=dfcprojw, fcprojb=dfcprojb, fcw=dfcw, fcb=dfcb, ln2w=dln2w, ln2b=dln2b)


def attention_branch_backward(dattproj, cache: dict, p: dict, NH: int):
    """The attention branch backward, attproj -> attention -> qkv -> ln1:
    dattproj (B, T, C) -> (dx from the attention branch (B, T, C), {attprojw, attprojb, qkvw, qkvb, ln1w, ln1b})."""
    c = cache
    datty, dattprojw, dattprojb = matmul_backward(dattproj, c["atty"], p["attprojw"])     # (B, T, C)
    dqkv = attention_backward(datty, c["qkv"], c["att"], NH)                              # (B, T, 3C)
    dln1, dqkvw, dqkvb = matmul_backward(dqkv, c["ln1"], p["qkvw"])                       # (B, T, C)
    dx, dln1w, dln1b = layernorm_backward(dln1, c["x"], p["ln1w"], c["ln1_mean"], c["ln1_rstd"])
    return dx, dict(attprojw=dattprojw, attprojb=dattprojb, qkvw=dqkvw, qkvb=dqkvb, ln1w=dln1w, ln1b=dln1b)


def _ordered(*dicts) -> dict:
    merged = {}
    for d in dicts:
        merged.update(d)
    return {name: merged[name] for name in BLOCK_PARAMETER_NAMES}


def block_backward(dout, cache: dict, p: dict, NH: int):
    """dout (B, T, C) = dL/dresidual3, the cache of block_forward, p, NH -> (dx (B, T, C), grads: the 12 names)."""
    _check(cache["x"], p, NH, "block_backward")
    if tuple(np.shape(dout)) != tuple(cache["x"].shape):
        raise ValueError(f"block_backward: dout must have the block's shape {tuple(cache['x'].shape)}, "
                         f"got {tuple(np.shape(dout))}")
    # residual3 = residual2 + fcproj: dout flows unchanged into both summands
    dresidual2_skip, dfcproj = residual_backward(dout)
    dresidual2_mlp, grads_mlp = mlp_backward(dfcproj, cache, p)
    dresidual2 = dresidual2_skip + dresidual2_mlp        # fork 2: residual2 was read by the skip AND by ln2
    # residual2 = x + attproj
    dx_skip, dattproj = residual_backward(dresidual2)
    dx_attn, grads_attn = attention_branch_backward(dattproj, cache, p, NH)
    dx = dx_skip + dx_attn                               # fork 1: x was read by the skip AND by ln1
    return dx, _ordered(grads_attn, grads_mlp)


# ---------------------------------------------------------------------------------------------------------
# The kernel path: the same lines through each layer's launcher, on backend arrays (float32)


def _launchers():
    return (layernorm_forward_cuda, layernorm_backward_cuda, matmul_forward_cuda, matmul_backward_cuda,
            attention_forward_cuda, attention_backward_cuda, gelu_forward_cuda, gelu_backward_cuda,
            residual_forward_cuda)


def block_forward_cuda(x, p: dict, NH: int, matmul_version="cublas", gelu_version=None, flash: bool = False):
    """block_forward through the kernels: x (B, T, C) float32 backend array, p of backend arrays -> (out, cache).

    matmul_version: passed to every matmul launcher ("cublas", or 1, 2, 3 for the course's own matmul kernels).
    gelu_version: passed to gelu_forward_cuda (1 or 2); None: 2 (float4 loads) where the size allows, else 1.
    flash: attention through the TF32 flash attention kernels (lesson 13, version 3: TF32 products, as cuBLAS's
    TF32 matmuls); the cache then holds lse (B, NH, T) instead of att (B, NH, T, T), and the backward follows."""
    _check(x, p, NH, "block_forward_cuda")
    (layernorm_forward_cuda, _, matmul_forward_cuda, _, attention_forward_cuda, _, gelu_forward_cuda, _,
     residual_forward_cuda) = _launchers()
    ln1, ln1_mean, ln1_rstd = layernorm_forward_cuda(x, p["ln1w"], p["ln1b"])
    qkv = matmul_forward_cuda(ln1, p["qkvw"], p["qkvb"], version=matmul_version)
    if flash:
        atty, lse = flash_attention_forward_tf32_cuda(qkv, NH)           # (B, T, C), (B, NH, T)
        attention = dict(lse=lse)
    else:
        atty, att = attention_forward_cuda(qkv, NH)                      # (B, T, C), (B, NH, T, T)
        attention = dict(att=att)
    attproj = matmul_forward_cuda(atty, p["attprojw"], p["attprojb"], version=matmul_version)
    residual2 = residual_forward_cuda(x, attproj)
    ln2, ln2_mean, ln2_rstd = layernorm_forward_cuda(residual2, p["ln2w"], p["ln2b"])
    fch = matmul_forward_cuda(ln2, p["fcw"], p["fcb"], version=matmul_version)
    fch_gelu = gelu_forward_cuda(fch, version=gelu_version or (2 if fch.size % 4 == 0 else 1))  # float4 where it fits
    fcproj = matmul_forward_cuda(fch_gelu, p["fcprojw"], p["fcprojb"], version=matmul_version)
    residual3 = residual_forward_cuda(residual2, fcproj)
    cache = dict(x=x, ln1=ln1, ln1_mean=ln1_mean, ln1_rstd=ln1_rstd, qkv=qkv, atty=atty, **attention,
                 residual2=residual2, ln2=ln2, ln2_mean=ln2_mean, ln2_rstd=ln2_rstd, fch=fch, fch_gelu=fch_gelu)
    return residual3, cache


def block_backward_cuda(dout, cache: dict, p: dict, NH: int, matmul_version="cublas"):
    """block_backward through the kernels: dout (B, T, C) float32 backend array -> (dx, grads: the 12 names).

    The residual backward needs no kernel (dout flows on unchanged); the adds at the two forks are
    residual_forward_cuda, the same kernel as the forward's residual connection. Attention's backward is the one
    of the forward that made the cache: flash attention's if it holds lse, lesson 05's if it holds att."""
    _check(cache["x"], p, NH, "block_backward_cuda")
    (_, layernorm_backward_cuda, _, matmul_backward_cuda, _, attention_backward_cuda, _, gelu_backward_cuda,
     residual_forward_cuda) = _launchers()
    c = cache
    # residual3 = residual2 + fcproj: dfcproj = dout, and dout also flows straight on to residual2
    dfch_gelu, dfcprojw, dfcprojb = matmul_backward_cuda(dout, c["fch_gelu"], p["fcprojw"], version=matmul_version)
    dfch = gelu_backward_cuda(dfch_gelu, c["fch"])
    dln2, dfcw, dfcb = matmul_backward_cuda(dfch, c["ln2"], p["fcw"], version=matmul_version)
    dresidual2_mlp, dln2w, dln2b = layernorm_backward_cuda(dln2, c["residual2"], p["ln2w"], c["ln2_mean"],
                                                           c["ln2_rstd"])
    dresidual2 = residual_forward_cuda(dout, dresidual2_mlp)          # fork 2
    # residual2 = x + attproj: dattproj = dresidual2, and it also flows straight on to x
    datty, dattprojw, dattprojb = matmul_backward_cuda(dresidual2, c["atty"], p["attprojw"], version=matmul_version)
    if "lse" in c:
        dqkv = flash_attention_backward_tf32_cuda(datty, c["qkv"], c["atty"], c["lse"], NH)
    else:
        dqkv = attention_backward_cuda(datty, c["qkv"], c["att"], NH)
    dln1, dqkvw, dqkvb = matmul_backward_cuda(dqkv, c["ln1"], p["qkvw"], version=matmul_version)
    dx_attn, dln1w, dln1b = layernorm_backward_cuda(dln1, c["x"], p["ln1w"], c["ln1_mean"], c["ln1_rstd"])
    dx = residual_forward_cuda(dresidual2, dx_attn)                   # fork 1
    grads = dict(ln1w=dln1w, ln1b=dln1b, qkvw=dqkvw, qkvb=dqkvb, attprojw=dattprojw, attprojb=dattprojb,
                 ln2w=dln2w, ln2b=dln2b, fcw=dfcw, fcb=dfcb, fcprojw=dfcprojw, fcprojb=dfcprojb)
    return dx, grads
