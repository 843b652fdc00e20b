"""GPT-2's forward, backward and AdamW update, once per execution path. Each path mirrors llm.c's
gpt2_forward / gpt2_backward / gpt2_update:

    encoder -> L x block -> layernorm (lnf) -> matmul with wte (lm_head) -> softmax -> cross-entropy

  * NumpyPath: the layers' NumPy references on the host (llm.c's train_gpt2.c); gpt2_forward and
    gpt2_backward are that path as plain functions of the 16 tensors, for any float dtype (float64 in the
    gradient check).
  * Fp32KernelPath: the layers' `*_cuda` launchers on backend arrays (llm.c's train_gpt2_fp32.cu): CUDA kernels
    through CuPy on a GPU, the same kernels through the CPU emulator otherwise. With cuBLAS's matmuls in TF32,
    attention is lesson 13's TF32 flash attention (version 3) for the head sizes it takes and unless a student's
    softmax kernel asks for lesson 05's (flash_tf32); otherwise lesson 05's exact float32 attention.
  * Bf16KernelPath: the bf16 training step of lesson 14 (llm.c's train_gpt2.cu): bf16 activations, bf16
    copies of the weights and bf16 weight gradients (llm.c's layout), float32 master weights and AdamW moments.

A GPT2 model holds one path object and calls it; the paths hold no state of their own: they read and write
the model's buffers (params, params_bf16, grads, m_memory, v_memory). The NumPy and fp32 kernel paths may take
the student's parts (llmc_lessons.parts): their functions and kernels then stand in for the package's.
"""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np

from llmc_lessons import device
from llmc_lessons.cublas import gemm
from llmc_lessons.cuda import kernels_replaced
from llmc_lessons.layers.adamw import adamw_update, adamw_update_bf16_cuda, adamw_update_cuda
from llmc_lessons.layers.bf16 import float_to_bf16_cuda
from llmc_lessons.layers.block import (BLOCK_PARAMETER_NAMES, block_backward, block_backward_cuda, block_forward,
                                       block_forward_cuda)
from llmc_lessons.layers.crossentropy import (crossentropy_forward, crossentropy_softmax_backward,
                                              fused_classifier_bf16_cuda, fused_classifier_cuda, softmax_forward)
from llmc_lessons.layers.encoder import (_token_buckets, encoder_backward, encoder_backward_cuda, encoder_forward,
                                         encoder_forward_bf16_cuda, encoder_forward_cuda)
from llmc_lessons.layers.flash_attention import (BF16_HEAD_SIZES, TF32_HEAD_SIZES, flash_attention_backward_bf16_cuda,
                                                 flash_attention_forward_bf16_cuda)
from llmc_lessons.layers.gelu import gelu_bias_backward_bf16_cuda, gelu_bias_forward_bf16_cuda, gelu_forward_cuda
from llmc_lessons.layers.layernorm import (ROW_MAX_C, layernorm_backward, layernorm_backward_bf16_cuda,
                                           layernorm_backward_cuda, layernorm_forward, layernorm_forward_bf16_cuda,
                                           layernorm_forward_cuda, residual_layernorm_forward_bf16_cuda)
from llmc_lessons.layers.matmul import (linear_bf16, matmul_backward, matmul_backward_cuda, matmul_forward,
                                        matmul_forward_cuda)
from llmc_lessons.parameters import PARAMETER_NAMES, GPT2Config, point_views
from llmc_lessons.parts import substituted
from llmc_lessons.precision import from_bf16, tf32_enabled

# ---------------------------------------------------------------------------------------------------------
# The NumPy reference, as functions of the parameters


def gpt2_forward(params: dict, config: GPT2Config, idx, targets=None):
    """The NumPy reference forward in any float dtype: -> (logits (B, T, Vp), losses (B, T) or None, cache).

    params: the 16 tensors by name (a model's `params`, or float64 copies for a gradient check).
    """
    p = params
    encoded = encoder_forward(idx, p["wte"], p["wpe"])                  # (B, T, C)
    residual, block_caches = encoded, []
    for l in range(config.num_layers):
        layer = {name: p[name][l] for name in BLOCK_PARAMETER_NAMES}
        residual, cache = block_forward(residual, layer, config.num_heads)   # (B, T, C)
        block_caches.append(cache)
    lnf, lnf_mean, lnf_rstd = layernorm_forward(residual, p["lnfw"], p["lnfb"])  # (B, T, C), (B, T), (B, T)
    logits = matmul_forward(lnf, p["wte"])                              # (B, T, Vp): the lm_head is wte itself
    probs = softmax_forward(logits, config.vocab_size)                  # (B, T, Vp), padded columns 0
    losses = crossentropy_forward(probs, targets) if targets is not None else None  # (B, T)
    cache = dict(idx=idx, targets=targets, block_caches=block_caches, residual=residual,
                 lnf=lnf, lnf_mean=lnf_mean, lnf_rstd=lnf_rstd, probs=probs)
    return logits, losses, cache


def gpt2_backward(params: dict, config: GPT2Config, cache: dict) -> dict:
    """The NumPy reference backward of the mean loss: -> {name: gradient} for the 16 tensors (fresh arrays)."""
    p = params
    if cache.get("targets") is None:
        raise RuntimeError("the backward needs a forward with targets")
    B, T = cache["idx"].shape
    dtype = cache["probs"].dtype
    dlosses = np.full((B, T), 1.0 / (B * T), dtype=dtype)        # d(mean loss)/d(each position's loss)
    dlogits = crossentropy_softmax_backward(dlosses, cache["probs"], cache["targets"], config.vocab_size)
    dlnf, dwte_head, _ = matmul_backward(dlogits, cache["lnf"], p["wte"])   # the lm_head's share of dwte
    dresidual, dlnfw, dlnfb = layernorm_backward(dlnf, cache["residual"], p["lnfw"],
                                                 cache["lnf_mean"], cache["lnf_rstd"])
    grads = {name: np.zeros_like(p[name]) for name in BLOCK_PARAMETER_NAMES}
    for l in reversed(range(config.num_layers)):
        layer = {name: p[name][l] for name in BLOCK_PARAMETER_NAMES}
        dresidual, block_grads = block_backward(dresidual, cache["block_caches"][l], layer, config.num_heads)
        for name in BLOCK_PARAMETER_NAMES:
            grads[name][l] = block_grads[name]
    dwte_enc, dwpe = encoder_backward(dresidual, cache["idx"], config.padded_vocab_size, config.max_seq_len)
    grads["wte"] = dwte_head + dwte_enc      # tied weights: the lm_head's share plus the encoder's share
    grads["wpe"] = dwpe
    grads["lnfw"], grads["lnfb"] = dlnfw, dlnfb
    return {name: grads[name] for name in PARAMETER_NAMES}


# ---------------------------------------------------------------------------------------------------------
# The three paths


class NumpyPath:
    """The layers' NumPy references on the host, in float32; with `parts` ({key: llmc_lessons.parts.Part}), the
    student's functions wherever the forward, the backward or the AdamW update calls one they have written."""
    on_backend = False      # arrays are NumPy arrays on the host: no token buckets, no CUDA graphs
    xp = np
    grad_dtype = np.float32  # of the gradient buffer, model.grads_memory

    def __init__(self, parts: dict | None = None):
        self.parts = parts or {}

    def _theirs(self):
        return substituted(self.parts.values()) if self.parts else nullcontext()

    def check(self, config: GPT2Config) -> None:
        """Raise a ValueError when this path cannot run `config` (every config runs here)."""

    def sync_params(self, model) -> None:
        """Bring what the path derives from params_memory up to date (nothing here)."""

    def forward(self, model, idx, targets):
        """-> (logits (B, T, Vp), losses (B, T) or None, cache for the backward)."""
        with self._theirs():
            return gpt2_forward(model.params, model.config, idx, targets)

    def after_forward(self, model, cache: dict, host_idx) -> None:
        """Add to the forward's cache what the backward needs from the host ids, outside any CUDA graph
        (nothing here)."""

    def backward(self, model, cache):
        """Add every gradient into model.grads; the encoder's too, so there is nothing left for finish_backward."""
        with self._theirs():
            grads = gpt2_backward(model.params, model.config, cache)
        for name, grad in grads.items():
            model.grads[name] += grad

    def finish_backward(self, model, cache, dres) -> None:
        """The part of the backward that stays outside a CUDA graph (nothing here)."""

    def update(self, model, start: int, stop: int, t: int, lr, beta1, beta2, eps, wd, grad_scale) -> None:
        """AdamW step t on the flat run [start, stop) of the parameters, gradients and moments."""
        p, g = model.params_memory[start:stop], model.grads_memory[start:stop]
        m, v = model.moments(start, stop)
        if grad_scale != 1.0:
            g = g * np.float32(grad_scale)
        with self._theirs():
            p[...], m[...], v[...] = adamw_update(p, g, m, v, t, lr, beta1, beta2, eps, wd)


class Fp32KernelPath(NumpyPath):
    """The course's float32 kernels on backend arrays; the classifier is llm.c's fused kernel. With `parts`, the
    student's kernels wherever the path launches one (their layernorm_forward_kernel2 in place of kernel 3, which
    it launches alike; their encoder_forward_kernel1, matmul_kernel2 and gelu_forward_kernel1 make the path take
    those versions)."""
    on_backend = True

    def __init__(self, parts: dict | None = None):
        super().__init__(parts)
        softmax = self.parts.get("attention.cu:softmax_forward_kernel")
        # the student's softmax kernel (Exercise 5.3) runs inside lesson 05's attention: keep it where it is a part
        # (and in the reference trained beside it, llmc_lessons.your_model)
        self.keep_lesson05_attention = softmax is not None and softmax.theirs

    def _theirs(self):
        replaced = {}
        for part in self.parts.values():
            if part.theirs and part.spec.is_kernel:
                replaced[part.spec.kernel_file, part.spec.name] = (part.value, part.spec.name)
                if part.spec.name == "layernorm_forward_kernel2":   # same arguments and launch as kernel 3
                    replaced["layernorm.cu", "layernorm_forward_kernel3"] = (part.value, part.spec.name)
        return kernels_replaced(replaced)

    def versions(self, model) -> tuple:
        """(the encoder's version, the matmuls', the GELU forward's): the student's kernels where they wrote them
        (the GELU's input, (B, T, 4C), always fits the float4 kernel 2)."""
        def theirs(key):
            return key in self.parts and self.parts[key].theirs
        encoder = 1 if theirs("encoder.cu:encoder_forward_kernel1") or model.config.channels % 4 else 2
        return (encoder, 2 if theirs("matmul.cu:matmul_kernel2") else model.matmul_version,
                1 if theirs("gelu.cu:gelu_forward_kernel1") else 2)

    def flash_tf32(self, model) -> bool:
        """Whether attention runs as TF32 flash attention (lesson 13, version 3) rather than lesson 05's kernels: when
        the matmuls are cuBLAS's with TF32 on (its products are TF32, as theirs then are; the course's matmul
        kernels are exact float32), the kernels take the head size, and no student's softmax kernel asks for
        lesson 05's (keep_lesson05_attention)."""
        return (tf32_enabled() and self.versions(model)[1] == "cublas" and model.config.head_size in TF32_HEAD_SIZES
                and not self.keep_lesson05_attention)

    @property
    def xp(self):
        return device.xp

    def after_forward(self, model, cache: dict, host_idx) -> None:
        # the encoder backward's token buckets, sorted here on the host so that the backward never waits
        xp = device.xp
        cache["buckets"] = tuple(xp.ascontiguousarray(xp.asarray(a, dtype=np.int32)) for a in _token_buckets(host_idx))

    def forward(self, model, idx, targets):
        """The forward through the course's kernels (backend arrays); the classifier is llm.c's fused kernel."""
        with self._theirs():
            return self._forward(model, idx, targets)

    def _forward(self, model, idx, targets):
        c, p = model.config, model.params
        encoder_version, version, gelu_version = self.versions(model)
        # ids were checked on the host (_tokens): no range check that would wait for the GPU; float4 where C allows
        encoded = encoder_forward_cuda(idx, p["wte"], p["wpe"], version=encoder_version, check_ids=False)  # (B, T, C)
        residual, block_caches = encoded, []
        level, flash = recompute_level(model), self.flash_tf32(model)   # decided once: each cache records it
        for l in range(c.num_layers):
            residual, cache = block_forward_cuda(residual, model.layer_params(l), c.num_heads, matmul_version=version,
                                                 gelu_version=gelu_version, flash=flash)
            block_caches.append({k: None if k in RECOMPUTED[level] else v for k, v in cache.items()})
        lnf, lnf_mean, lnf_rstd = layernorm_forward_cuda(residual, p["lnfw"], p["lnfb"])
        logits = matmul_forward_cuda(lnf, p["wte"], None, version=version)  # (B, T, Vp)
        losses = dlogits = None
        if targets is not None:
            # The fused classifier overwrites its input with dlogits (softmax - onehot) / (B T), as llm.c does;
            # it gets a copy so that model.logits survives for the caller, unless the caller does not need them
            # (the trainer: model.keep_logits = False saves a (B, T, Vp) copy, 3.3 GB at B = 16, T = 1024).
            losses, dlogits = fused_classifier_cuda(logits.copy() if model.keep_logits else logits, targets,
                                                    c.vocab_size)
            if not model.keep_logits:
                logits = None
        cache = dict(idx=idx, targets=targets, block_caches=block_caches, residual=residual,
                     lnf=lnf, lnf_mean=lnf_mean, lnf_rstd=lnf_rstd, dlogits=dlogits)
        return logits, losses, cache

    def backward(self, model, cache):
        with self._theirs():
            return self._backward(model, cache)

    def _backward(self, model, cache):
        c, p, g = model.config, model.params, model.grads
        _, version, gelu_version = self.versions(model)
        # dlogits came out of the fused classifier in the forward; used once, then freed
        dlnf, dwte_head, _ = matmul_backward_cuda(cache.pop("dlogits"), cache["lnf"], p["wte"], version=version,
                                                  has_bias=False)
        cache["dlogits"] = None
        g["wte"] += dwte_head
        dresidual, dlnfw, dlnfb = layernorm_backward_cuda(dlnf, cache["residual"], p["lnfw"],
                                                          cache["lnf_mean"], cache["lnf_rstd"])
        g["lnfw"] += dlnfw
        g["lnfb"] += dlnfb
        for l in reversed(range(c.num_layers)):
            a, lp = cache["block_caches"][l], model.layer_params(l)
            if a["fch_gelu"] is None:       # recomputed (model.recompute): the forward's kernels on the same inputs
                a = dict(a, fch_gelu=gelu_forward_cuda(a["fch"], version=gelu_version))
            if a["ln1"] is None:
                a = dict(a, ln1=layernorm_forward_cuda(a["x"], lp["ln1w"], lp["ln1b"])[0],
                         ln2=layernorm_forward_cuda(a["residual2"], lp["ln2w"], lp["ln2b"])[0])
            dresidual, block_grads = block_backward_cuda(dresidual, a, lp, c.num_heads, matmul_version=version)
            del a
            for name in BLOCK_PARAMETER_NAMES:
                g[name][l] += block_grads[name]
        return dresidual       # the encoder's dout: finish_backward adds the encoder's gradients

    def finish_backward(self, model, cache, dres) -> None:
        # The encoder's backward stays outside any graph: its token buckets change size with every batch.
        c = model.config
        encoder_backward_cuda(dres, cache["idx"], c.padded_vocab_size, c.max_seq_len, buckets=cache["buckets"],
                              dwte=model.grads["wte"], dwpe=model.grads["wpe"])

    def update(self, model, start: int, stop: int, t: int, lr, beta1, beta2, eps, wd, grad_scale) -> None:
        p, g = model.params_memory[start:stop], model.grads_memory[start:stop]
        m, v = model.moments(start, stop)
        with self._theirs():
            adamw_update_cuda(p, g, m, v, t, lr, beta1, beta2, eps, wd, grad_scale=grad_scale)


class Bf16KernelPath(Fp32KernelPath):
    """The bf16 training step (lesson 14): bf16 activations, weight copies and weight gradients (llm.c's layout),
    float32 masters and moments."""

    grad_dtype = np.uint16   # bf16 bits: every kernel that adds into a gradient rounds its float32 sum once

    def check(self, config: GPT2Config) -> None:
        if config.channels % 8 or config.padded_vocab_size % 8:
            raise ValueError(f"precision='bf16' moves 8 bf16 values at a time: C ({config.channels}) and Vp "
                             f"({config.padded_vocab_size}) must be multiples of 8")
        if config.head_size not in BF16_HEAD_SIZES:
            raise ValueError(f"precision='bf16' runs attention on the tensor cores, for a head size in "
                             f"{BF16_HEAD_SIZES}; this config has {config.head_size}")
        if config.channels > ROW_MAX_C:
            raise ValueError(f"precision='bf16' keeps a row of C values in a warp's registers for its normalisations: "
                             f"C ({config.channels}) must be at most {ROW_MAX_C}")

    def sync_params(self, model) -> None:
        """Make the bf16 copy of the weights match params_memory again. Each tensor run is rounded as the last
        AdamW step rounded it (stochastically, with that step's seed), so a run resumed from a checkpoint
        continues bit for bit."""
        if model.params_bf16_memory is None:
            model.params_bf16_memory = device.xp.empty(model.num_parameters, dtype=np.uint16)
            model.params_bf16 = point_views(model.params_bf16_memory, model.param_shapes)
        for start, stop, _ in model.decay_runs(model.config):
            float_to_bf16_cuda(model.params_memory[start:stop], out=model.params_bf16_memory[start:stop],
                               stochastic=model.step > 0, seed=rounding_seed(model.step, start))

    def forward(self, model, idx, targets):
        """The forward in bf16 (lesson 14): llm.c's train_gpt2.cu order, the qkv bias in its product's cuBLASLt
        epilogue and the other biases fused into the kernels after their products, each residual add fused with
        the layernorm that reads it. -> (logits as float32 or None, losses, cache)."""
        c, p, w = model.config, model.params, model.params_bf16       # float32 masters, bf16 copies
        B, T = idx.shape
        idx = bf16_padded(idx, targets)
        T_run = idx.shape[1]
        BT, L, NH = B * T_run, c.num_layers, c.num_heads

        def linear(x, weight):               # (..., in) bf16 @ weight^T -> (BT, out) bf16, no bias
            return gemm(x.reshape(BT, -1), weight, trans_b=True).reshape(B, T_run, -1)

        residual = encoder_forward_bf16_cuda(idx, w["wte"], w["wpe"], check_ids=False)   # checked by _tokens
        ln, mean, rstd = layernorm_forward_bf16_cuda(residual, p["ln1w"][0], p["ln1b"][0], version=2)
        block_caches, level = [], recompute_level(model)
        for l in range(L):
            qkv = linear_bf16(ln, w["qkvw"][l], w["qkvb"][l])                        # the bias in the epilogue
            atty, lse = flash_attention_forward_bf16_cuda(qkv, NH)                   # on the tensor cores
            attproj = linear(atty, w["attprojw"][l])
            residual2, ln2, ln2_mean, ln2_rstd = residual_layernorm_forward_bf16_cuda(
                residual, attproj, p["attprojb"][l], p["ln2w"][l], p["ln2b"][l])
            del attproj
            fch = linear(ln2, w["fcw"][l])                                           # (B, T, 4C), no bias
            fch_gelu = gelu_bias_forward_bf16_cuda(fch, p["fcb"][l])
            fcproj = linear(fch_gelu, w["fcprojw"][l])
            next_w, next_b = (p["ln1w"][l + 1], p["ln1b"][l + 1]) if l + 1 < L else (p["lnfw"], p["lnfb"])
            residual3, ln_next, mean_next, rstd_next = residual_layernorm_forward_bf16_cuda(
                residual2, fcproj, p["fcprojb"][l], next_w, next_b)
            del fcproj
            kept = dict(x=residual, ln1=ln, ln1_mean=mean, ln1_rstd=rstd, qkv=qkv, lse=lse, atty=atty,
                        residual2=residual2, ln2=ln2, ln2_mean=ln2_mean, ln2_rstd=ln2_rstd, fch=fch, fch_gelu=fch_gelu)
            block_caches.append({k: None if k in RECOMPUTED[level] else v for k, v in kept.items()})
            del kept, fch_gelu, ln2
            residual, ln, mean, rstd = residual3, ln_next, mean_next, rstd_next
        logits, losses, dlogits = bf16_classifier(model, linear(ln, w["wte"]), targets, T)
        cache = dict(idx=idx, targets=targets, block_caches=block_caches, residual=residual, lnf=ln, lnf_mean=mean,
                     lnf_rstd=rstd, dlogits=dlogits)
        return logits, losses, cache

    def backward(self, model, cache):
        """The backward in bf16: activation gradients in bf16, except the residual stream's, which accumulates in
        float32 (dres); weight gradients are added straight into their bf16 gradients by cuBLAS (bf16 in, float32
        sums, one rounding of old gradient plus product) and by the kernels that sum the bias gradients."""
        c, p, w, g = model.config, model.params, model.params_bf16, model.grads
        B, T = cache["idx"].shape
        BT, C, NH = B * T, c.channels, c.num_heads

        def linear_backward(dout, inp, weight, dweight):
            """out = inp @ weight^T (+ bias): returns dinp (B, T, in) bf16; dweight += its gradient (the bias
            gradients come out of the kernels that write dout, below)."""
            d2 = dout.reshape(BT, -1)
            gemm(d2, inp.reshape(BT, -1), trans_a=True, out=dweight, accumulate=True)   # bf16 out
            return gemm(d2, weight).reshape(B, T, -1)

        dres = device.xp.zeros((B, T, C), dtype=np.float32)     # d loss / d residual stream, float32
        dlnf = linear_backward(cache.pop("dlogits"), cache["lnf"], w["wte"], g["wte"])   # dlogits used once, freed
        cache["dlogits"] = None
        # Each LayerNorm backward also sums its bf16 output over the rows: that is the bias gradient of the
        # projection whose output joined the residual stream there (fcproj after lnf and after ln1, attproj after
        # ln2), so those linear_backward calls take no bias.
        L = c.num_layers
        dres_bf16 = layernorm_backward_bf16_cuda(dres, dlnf, cache["residual"], p["lnfw"], cache["lnf_mean"],
                                                   cache["lnf_rstd"], g["lnfw"], g["lnfb"], g["fcprojb"][L - 1])
        for l in reversed(range(L)):
            a = cache["block_caches"][l]
            if a["fch_gelu"] is None:       # recomputed (model.recompute): the forward's kernels on the same inputs
                a = dict(a, fch_gelu=gelu_bias_forward_bf16_cuda(a["fch"], p["fcb"][l]))
            if a["ln1"] is None:            # the fused residual + layernorm's output, from the residual it stored
                a = dict(a, ln1=layernorm_forward_bf16_cuda(a["x"], p["ln1w"][l], p["ln1b"][l], version=2)[0],
                         ln2=layernorm_forward_bf16_cuda(a["residual2"], p["ln2w"][l], p["ln2b"][l], version=2)[0])
            # residual3 = residual2 + fcproj: dres is also d loss / d fcproj
            dfch_gelu = linear_backward(dres_bf16, a["fch_gelu"], w["fcprojw"][l], g["fcprojw"][l])
            # the GELU backward adds the fc bias's gradient (the column sums of dfch) on the way
            dfch = gelu_bias_backward_bf16_cuda(dfch_gelu, a["fch"], p["fcb"][l], g["fcb"][l], out=dfch_gelu)
            dln2 = linear_backward(dfch, a["ln2"], w["fcw"][l], g["fcw"][l])
            dres_bf16 = layernorm_backward_bf16_cuda(dres, dln2, a["residual2"], p["ln2w"][l], a["ln2_mean"],
                                                       a["ln2_rstd"], g["ln2w"][l], g["ln2b"][l], g["attprojb"][l])
            # residual2 = x + attproj
            datty = linear_backward(dres_bf16, a["atty"], w["attprojw"][l], g["attprojw"][l])
            # the flash backward sums the qkv bias's gradient from the dqkv it writes
            dqkv = flash_attention_backward_bf16_cuda(datty, a["qkv"], a["atty"], a["lse"], NH, g["qkvb"][l])
            dln1 = linear_backward(dqkv, a["ln1"], w["qkvw"][l], g["qkvw"][l])
            dres_bf16 = layernorm_backward_bf16_cuda(dres, dln1, a["x"], p["ln1w"][l], a["ln1_mean"],
                                                       a["ln1_rstd"], g["ln1w"][l], g["ln1b"][l],
                                                       g["fcprojb"][l - 1] if l > 0 else None)
        return dres            # the encoder's dout: finish_backward adds the encoder's gradients

    def update(self, model, start: int, stop: int, t: int, lr, beta1, beta2, eps, wd, grad_scale) -> None:
        # the float32 master weights, then their bf16 copy, stochastically rounded
        p, g = model.params_memory[start:stop], model.grads_memory[start:stop]
        m, v = model.moments(start, stop)
        adamw_update_bf16_cuda(p, model.params_bf16_memory[start:stop], g, m, v, t, lr, beta1, beta2, eps, wd,
                               stochastic=True, seed=rounding_seed(t, start), grad_scale=grad_scale)


RECOMPUTED = {0: (), 1: ("fch_gelu",), 2: ("fch_gelu", "ln1", "ln2")}
"""What the kernel paths drop after the forward and recompute in the backward, by model.recompute (llm.c's -r):
1 the GELU's output, 2 also the two LayerNorms' outputs of every block (their means and rstds are kept)."""


def bf16_padded(idx, targets):
    """The bf16 kernels move 8 values at a time: (B, T) token ids -> (B, T_run), T_run the multiple of 8 at or above
    T. Training needs T itself a multiple of 8; without targets (sampling) the ids are padded on the right with
    zeros, and causal attention keeps the first T positions unchanged."""
    B, T = idx.shape
    T_run = -(-T // 8) * 8
    if T_run == T:
        return idx
    if targets is not None:
        raise ValueError(f"precision='bf16' trains on T that is a multiple of 8 (the kernels move 8 values at "
                         f"a time), got T = {T}")
    return device.xp.concatenate([idx, device.xp.zeros((B, T_run - T), dtype=np.int32)], axis=1)


def bf16_classifier(model, logits, targets, T: int) -> tuple:
    """The end of a bf16 forward, from the (B, T_run, Vp) bf16 logits. With targets: the fused classifier's (B, T)
    losses, the logits turned into dlogits in place (a float32 copy kept first if model.keep_logits); without: the
    float32 logits of the first T positions. -> (logits or None, losses or None, dlogits or None)."""
    if targets is None:
        return from_bf16(logits[:, :T]), None, None
    kept = from_bf16(logits) if model.keep_logits else None
    losses = fused_classifier_bf16_cuda(logits, targets, model.config.vocab_size, 1.0 / targets.size)
    return kept, losses, logits


def recompute_level(model) -> int:
    """model.recompute, checked: 0, 1 or 2."""
    level = model.recompute
    if isinstance(level, bool) or level not in RECOMPUTED:
        raise ValueError(f"model.recompute must be 0, 1 or 2 (llm.c's -r), got {level!r}")
    return level


def rounding_seed(t: int, start: int) -> int:
    """The stochastic-rounding seed of AdamW step t for the tensor run starting at offset `start`."""
    return (t * 0x9E3779B1 + start) & 0xFFFFFFFF
