"""The gradient check of the whole model: finite differences of the mean loss in float64 against the NumPy
reference backward (paths.gpt2_backward), on a few sampled elements of each of the 16 parameter tensors.
"""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.gradcheck import gradcheck
from llmc_lessons.model import GPT2
from llmc_lessons.parameters import PARAMETER_NAMES, GPT2Config
from llmc_lessons.paths import gpt2_backward, gpt2_forward


def gradcheck_gpt2(config: GPT2Config, B: int = 2, T: int = 5, seed: int = 0, checks_per_tensor: int = 20,
                   params: dict | None = None):
    """Finite differences of the mean loss in float64 against gpt2_backward, on a few sampled elements of
    each of the 16 tensors. Returns llmc_lessons.gradcheck's report (print it; .assert_ok() raises on failure).

    params: the 16 tensors to use (default: a fresh seeded GPT-2 initialisation), copied to float64. The
    padded rows of wte and the rows of wpe past T take no part in the loss and are not sampled.
    """
    gen = np.random.default_rng(seed)
    if params is None:
        params = GPT2(config, seed=seed, backend="numpy").params
    p64 = {name: np.array(device.to_host(params[name]), dtype=np.float64) for name in PARAMETER_NAMES}
    # Larger than GPT-2's 0.02 init, so every path through the network carries a visible gradient.
    for name in ("qkvw", "attprojw", "fcw", "fcprojw", "wpe"):
        p64[name] += gen.standard_normal(p64[name].shape) * 0.3
    p64["wte"][:config.vocab_size] += gen.standard_normal((config.vocab_size, config.channels)) * 0.3
    for name in ("ln1w", "ln1b", "qkvb", "attprojb", "ln2w", "ln2b", "fcb", "fcprojb", "lnfw", "lnfb"):
        p64[name] += gen.standard_normal(p64[name].shape) * 0.1
    idx = gen.integers(0, config.vocab_size, size=(B, T)).astype(np.int32)
    targets = gen.integers(0, config.vocab_size, size=(B, T)).astype(np.int32)
    V = config.vocab_size

    def unpad(name, a):  # rows that take no part in the loss (padded vocab, positions >= T): not checked
        return a[:V] if name == "wte" else a[:T] if name == "wpe" else a

    def full(p):
        out = dict(p)
        out["wte"] = np.concatenate([p["wte"], p64["wte"][V:]])
        out["wpe"] = np.concatenate([p["wpe"], p64["wpe"][T:]])
        return out

    def forward(**p):
        _, losses, _ = gpt2_forward(full(p), config, idx, targets)
        return np.array(losses.mean())

    def backward(dy, **p):
        f = full(p)
        _, _, cache = gpt2_forward(f, config, idx, targets)
        grads = gpt2_backward(f, config, cache)
        return {name: dy * unpad(name, g) for name, g in grads.items()}

    inputs = {name: unpad(name, p64[name]) for name in PARAMETER_NAMES}
    return gradcheck(forward, backward, inputs, title=f"GPT-2 (L={config.num_layers}, C={config.channels}), "
                     f"mean loss over B={B}, T={T}", max_checks=checks_per_tensor, seed=seed)
