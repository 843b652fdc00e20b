"""Checks for lesson 10 (GPT-2 assembled): the parameter count, the tied embedding's gradient, and the
next-token distribution used for sampling."""
from __future__ import annotations

import numpy as np

from llmc_lessons.checks import ExerciseFailed, assert_close, passed, rng, run_exercise
from llmc_lessons.parameters import GPT2Config, num_parameters
from llmc_lessons.sampling import next_token_probs


def _configs(gen):
    """GPT-2 124M, the tiny trainer config, and a random odd one (so a formula tuned to one config fails)."""
    NH = int(gen.integers(2, 5))
    odd = GPT2Config(max_seq_len=int(gen.integers(9, 40)), vocab_size=int(gen.integers(50, 90)),
                     padded_vocab_size=96, num_layers=int(gen.integers(2, 6)), num_heads=NH,
                     channels=NH * int(gen.integers(3, 9)))
    return [GPT2Config.from_name("d12"), GPT2Config.from_name("tiny"), odd]


def check_parameter_count(count_parameters):
    """Exercise 10.1: count_parameters(config, padded) equals the sum of the 16 tensors' sizes."""
    ex = "Exercise 10.1"
    for config in _configs(rng()):
        V, Vp, C, L, maxT = (config.vocab_size, config.padded_vocab_size, config.channels, config.num_layers,
                             config.max_seq_len)
        for padded in (True, False):
            got = run_exercise(ex, count_parameters, config, padded)
            expected = num_parameters(config, padded=padded)
            if got is None:
                raise ExerciseFailed(f"{ex}: got None. Did your function forget to `return` the count?")
            if isinstance(got, float) or not isinstance(got, (int, np.integer)):
                raise ExerciseFailed(f"{ex}: return an int (a count of numbers), got {type(got).__name__} {got!r}")
            if got == expected:
                continue
            rows = V if not padded else Vp
            mistakes = {
                "the lm_head counted as its own (V, C) matrix: it IS wte (tied weights), so it adds nothing":
                    [expected + rows * C, expected + V * C, expected + Vp * C],
                "padded and unpadded swapped: padded=True counts wte as (Vp, C), padded=False as (V, C)":
                    [num_parameters(config, padded=not padded)],
                "the biases are missing (qkvb 3C, attprojb C, fcb 4C, fcprojb C per layer)":
                    [expected - L * 9 * C],
                "the layernorm parameters are missing (ln1w, ln1b, ln2w, ln2b per layer, and lnfw, lnfb)":
                    [expected - L * 4 * C - 2 * C],
                "the final layernorm (lnfw, lnfb: 2C) is missing": [expected - 2 * C],
                "the position embedding wpe (maxT, C) is missing": [expected - maxT * C],
                "the MLP is 4C wide: fcw is (4C, C) and fcprojw is (C, 4C)":
                    [expected - L * 6 * C * C, expected - L * 6 * C * C - L * 3 * C],
                "the per-layer tensors are counted once instead of L times":
                    [expected - (L - 1) * (12 * C * C + 13 * C)],
            }
            cause = next((why for why, values in mistakes.items() if got in values), None)
            raise ExerciseFailed(
                f"{ex}: for L={L}, NH={config.num_heads}, C={C}, maxT={maxT}, V={V}, Vp={Vp}, padded={padded} "
                f"expected {expected:,} parameters, got {got:,} (off by {got - expected:+,}).\n"
                + (f"  likely cause: {cause}\n" if cause else "")
                + "  hint: add up the 16 shapes of the parameter table; only wte depends on padded.")
    passed(ex, "124,439,808 for GPT-2 124M (124,475,904 with the padded vocab)")


def _wte_inputs(gen):
    B, T, C, V, Vp = 3, 5, 7, 11, 16
    idx = gen.integers(0, V, size=(B, T)).astype(np.int32)
    idx[0, :3] = idx[1, 4] = 2          # repeated tokens: their gradients must add up
    dlogits = gen.standard_normal((B, T, Vp)).astype(np.float32)
    dlogits[..., V:] = 0                # the loss never sees the padded columns
    lnf = gen.standard_normal((B, T, C)).astype(np.float32)
    dencoded = gen.standard_normal((B, T, C)).astype(np.float32)
    return dlogits, lnf, dencoded, idx, Vp


def check_wte_gradient(wte_gradient):
    """Exercise 10.2: dwte = (lm_head share) + (encoder share), with repeated tokens accumulated."""
    ex = "Exercise 10.2"
    dlogits, lnf, dencoded, idx, Vp = _wte_inputs(rng())
    C = lnf.shape[-1]
    head = dlogits.reshape(-1, Vp).T.astype(np.float64) @ lnf.reshape(-1, C)      # (Vp, C)
    encoder = np.zeros((Vp, C))
    np.add.at(encoder, idx.reshape(-1), dencoded.reshape(-1, C))
    overwrite = np.zeros((Vp, C))
    overwrite[idx.reshape(-1)] += dencoded.reshape(-1, C)   # fancy-index += keeps one of the repeated rows
    got = run_exercise(ex, wte_gradient, dlogits.copy(), lnf.copy(), dencoded.copy(), idx.copy())
    assert_close(ex, "dwte", got, head + encoder, atol=1e-4, rtol=1e-4, known_mistakes={
        "only the lm_head's share (dlogits^T lnf): the encoder's share, scattered to the rows of the input "
        "tokens, is missing": head,
        "only the encoder's share: the lm_head uses wte too, so dlogits^T lnf must be added": encoder,
        "dwte[idx] += ... with repeated tokens: NumPy applies a fancy-index += once per distinct row, so a token "
        "that appears twice is counted once. Use np.add.at": head + overwrite,
        "the lm_head's share with the wrong sign": -head + encoder,
    }, hint="dwte has two terms because wte is used twice: as the embedding table and as the lm_head matrix.")
    passed(ex, "both uses of wte contribute, repeated tokens add up")


def check_next_token_probs(probs_fn):
    """Exercise 10.3: next_token_probs(logits, V, temperature, top_k) -> (V,) probabilities."""
    ex = "Exercise 10.3"
    gen = rng()
    V, Vp = 45, 48
    for temperature, top_k in ((1.0, None), (0.7, None), (1.3, 5), (0.5, 1), (1.0, 44)):
        logits = (gen.standard_normal(Vp) * 2).astype(np.float32)
        logits[V:] = gen.standard_normal(Vp - V) * 2 + 8   # padded columns hold junk, larger than any real one
        expected = next_token_probs(logits, V, temperature, top_k)
        got = run_exercise(ex, probs_fn, logits.copy(), V, temperature, top_k)
        where = f"probs (temperature={temperature}, top_k={top_k})"
        wrong = {}
        z = logits[:V].astype(np.float64)
        wrong["the temperature multiplies the logits: divide them by it (T < 1 sharpens, T > 1 flattens)"] = \
            next_token_probs(logits * temperature ** 2, V, temperature, top_k)
        if top_k is not None:
            for k, why in ((top_k + 1, "top-k kept k+1 tokens: an off-by-one in the cut-off"),
                           (top_k - 1, "top-k kept k-1 tokens: an off-by-one in the cut-off")):
                if 1 <= k <= V:
                    wrong[why] = next_token_probs(logits, V, temperature, k)
            full = np.exp((z - z.max()) / temperature)
            full /= full.sum()
            wrong["the probabilities were cut to the top k but not renormalised to sum to 1"] = \
                np.where(z >= np.sort(z)[V - top_k], full, 0)
            wrong["top-k kept the k SMALLEST logits"] = _bottom_k(z / temperature, top_k)
        else:
            allz = logits.astype(np.float64) / temperature
            wrong["the softmax ran over all Vp columns, padding included: use logits[:V] only"] = \
                (np.exp(allz - allz.max()) / np.exp(allz - allz.max()).sum())[:V]
        if got is not None and np.shape(got) == (Vp,):
            raise ExerciseFailed(f"{ex} ({where}): got {Vp} probabilities, expected {V}. The last Vp - V = {Vp - V} "
                                 f"columns are padding (logits[V:] are meaningless): keep only logits[:V].")
        assert_close(ex, where, got, expected, atol=1e-6, rtol=1e-5, known_mistakes=wrong,
                     hint="divide by the temperature, drop all but the top_k largest, softmax over what is left.")
        if abs(float(np.sum(got)) - 1) > 1e-5:
            raise ExerciseFailed(f"{ex}: the probabilities sum to {float(np.sum(got))}, not 1")
    passed(ex, "temperature, top-k and the padded columns handled")


def _bottom_k(z, k):
    keep = z <= np.sort(z)[k - 1]
    p = np.where(keep, np.exp(z - z[keep].max()), 0)
    return p / p.sum()
