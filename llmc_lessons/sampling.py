"""Sampling from GPT-2: the next-token distribution of one position, and generation one token at a time.
"""
from __future__ import annotations

import numpy as np

from llmc_lessons import device


def next_token_probs(logits, vocab_size: int, temperature: float = 1.0, top_k: int | None = None) -> np.ndarray:
    """(Vp,) logits of one position -> (V,) float64 probabilities of the next token.

    Only the V real columns count; logits are divided by the temperature; with top_k, all but the k largest
    logits are dropped before the softmax (ties at the k-th value are all kept).
    """
    z = np.asarray(device.to_host(logits), dtype=np.float64)[:vocab_size] / temperature
    if top_k is not None and top_k < vocab_size:
        kth_largest = np.partition(z, vocab_size - top_k)[vocab_size - top_k]
        z = np.where(z >= kth_largest, z, -np.inf)
    p = np.exp(z - z.max())
    return p / p.sum()


def prompt_list(prompt_tokens, temperature: float, top_k: int | None) -> list:
    """Check generate's arguments -> the prompt as a list of ints, to which the new tokens are appended."""
    tokens = [int(t) for t in prompt_tokens]
    if not tokens:
        raise ValueError("prompt_tokens is empty: start from at least one token (GPT-2's <|endoftext|> is 50256)")
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"need temperature >= 0 and top_k >= 1 or None, got {temperature}, {top_k}")
    return tokens


def next_token(logits, vocab_size: int, temperature: float, top_k: int | None, rng) -> int:
    """(Vp,) host logits of the last position -> the next token: the most likely one at temperature 0, else one
    drawn by `rng` (a NumPy Generator) from next_token_probs."""
    if temperature == 0:
        return int(np.argmax(logits[:vocab_size]))
    return int(rng.choice(vocab_size, p=next_token_probs(logits, vocab_size, temperature, top_k)))


def generate(model, prompt_tokens, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, seed: int | None = None) -> list:
    """Sample max_new_tokens tokens after prompt_tokens; returns the prompt followed by the new tokens.

    Each step reruns the forward on the last max_seq_len tokens (no key/value cache) and samples on the host
    with a NumPy Generator seeded by `seed`. temperature=0 picks the most likely token (greedy).
    Overwrites the model's logits and forward cache, so call it between training steps, not inside one.
    """
    tokens = prompt_list(prompt_tokens, temperature, top_k)
    V, maxT = model.config.vocab_size, model.config.max_seq_len
    rng = np.random.default_rng(seed)
    for _ in range(int(max_new_tokens)):
        context = np.array([tokens[-maxT:]], dtype=np.int32)   # (1, T)
        model.forward(context)
        last = device.to_host(model.logits[0, -1])              # (Vp,): the next-token logits
        tokens.append(next_token(last, V, temperature, top_k, rng))
    return tokens
