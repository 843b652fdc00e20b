"""Checks for lesson 02 (embeddings): Exercise 2.1 (the encoder's Jacobians, derived), Exercise 2.2 (NumPy
encoder_backward), Exercise 2.3 (the forward kernel)."""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.checks import (ExerciseFailed, assert_close, assert_coalesced, exercise_kernel, forward_outputs,
                                 numerical_jacobian, passed, poisoned, rng, run_exercise, trace_of)
from llmc_lessons.cuda import load_kernel
from llmc_lessons.layers.encoder import encoder_backward, encoder_forward


def _ids_with_repeats(gen, B, T, n_distinct, V):
    """(B, T) int32 ids drawn from n_distinct of the V ids, so that several tokens repeat (the point of 2.2)."""
    vocab = gen.choice(V, size=n_distinct, replace=False)
    inp = vocab[gen.integers(0, n_distinct, size=(B, T))].astype(np.int32)
    inp[1, 2] = inp[0, 0]          # at least one repeat across sequences
    inp[0, 3] = inp[0, 1]          # and one inside a sequence
    return inp


def check_encoder_forward(fn) -> None:
    """Exercise 2.0: fn(inp, wte, wpe) -> out (B, T, C) = wte[inp[b, t]] + wpe[t], float32 in and out."""
    ex = "Exercise 2.0"
    gen = rng()
    B, T, V, maxT, C = 3, 7, 19, 23, int(gen.integers(5, 14))   # V < maxT: wpe[inp] runs, and is wrong
    inp = gen.integers(0, V, (B, T)).astype(np.int32)
    wte = gen.standard_normal((V, C)).astype(np.float32)
    wpe = gen.standard_normal((maxT, C)).astype(np.float32)
    want = encoder_forward(inp, wte, wpe)
    out, = (forward_outputs(ex, run_exercise(ex, fn, inp.copy(), wte.copy(), wpe.copy()), ("out",)))
    assert_close(ex, "out", out, want, atol=1e-6, rtol=1e-6, known_mistakes={
        "wpe is indexed by the token id; it is indexed by the position t": wte[inp] + wpe[inp],
        "the position embedding wpe is missing": wte[inp],
        "wpe is indexed by the sequence b, not the position t": wte[inp] + wpe[:B][:, None, :],
    }, hint="out[b, t] = wte[inp[b, t]] + wpe[t]: the token's row of wte plus the position's row of wpe (only "
            "the first T rows of wpe are used).")
    passed(ex, f"B={B}, T={T}, C={C}: out matches, float32")

def check_encoder_jacobian(fn) -> None:
    """Exercise 2.1: fn(inp, V, maxT) -> (J_wte (B, T, V), J_wpe (B, T, maxT)), J_wte[b, t, v] = d out[b, t, c] /
    d wte[v, c] and J_wpe[b, t, p] = d out[b, t, c] / d wpe[p, c] (the same for every channel c), against central
    differences in float64."""
    ex = "Exercise 2.1"
    gen = rng()
    B, T, maxT = 3, int(gen.integers(4, 7)), 9
    V = B * T + int(gen.integers(3, 9))                       # more ids than positions
    inp = _ids_with_repeats(gen, B, T, 5, V)
    wte, wpe = gen.standard_normal((V, 1)), gen.standard_normal((maxT, 1))   # C = 1: the same for every c
    result = run_exercise(ex, fn, inp.copy(), V, maxT)
    if not isinstance(result, tuple) or len(result) != 2:
        raise ExerciseFailed(f"{ex}: return the pair (J_wte, J_wpe), got {type(result).__name__}"
                             + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""))
    J_wte, J_wpe = result
    want_wte = numerical_jacobian(lambda w: encoder_forward(inp, w, wpe)[..., 0], wte)[..., 0]
    want_wpe = numerical_jacobian(lambda w: encoder_forward(inp, wte, w)[..., 0], wpe)[..., 0]
    b, t = np.indices((B, T))

    def at(shape, col):
        J = np.zeros(shape)
        J[b, t, col] = 1.0
        return J

    counts = np.zeros((B, T, V))
    counts[b, t, inp] = np.bincount(inp.ravel(), minlength=V)[inp]
    shape_hint = (f"J_wte has one row per output position (b, t) and one column per table row v: shape (B, T, V) = "
                  f"{(B, T, V)}; J_wpe likewise, shape (B, T, maxT) = {(B, T, maxT)}.")
    assert_close(ex, "J_wte", J_wte, want_wte, atol=1e-7, rtol=1e-6, known_mistakes={
        "the column is the position b*T + t, not the token id inp[b, t]: out[b, t] reads wte at its token's row":
            at((B, T, V), b * T + t),
        "every position got a 1 at every token of the batch: index the position too, as in J[b, t, inp[b, t]]":
            np.broadcast_to(np.isin(np.arange(V), inp), (B, T, V)),
        "a repeated token got its count: out[b, t] reads wte[inp[b, t]] once, so each entry is 0 or 1 (the "
        "repeats add up later, in dwte)": counts,
    }, hint="out[b, t, c] = wte[inp[b, t], c] + wpe[t, c]: which single row of wte does position (b, t) read? "
            + shape_hint)
    assert_close(ex, "J_wpe", J_wpe, want_wpe, atol=1e-7, rtol=1e-6, known_mistakes={
        "the column is the sequence index b, not the position t: every sequence reads wpe[t] at position t":
            at((B, T, maxT), np.minimum(b, maxT - 1)),
        "a 1 at every used position t' < T: position t reads wpe[t] only":
            np.broadcast_to((np.arange(maxT) < T).astype(float), (B, T, maxT)),
        "only the first sequence (b = 0) has its 1: every sequence b reads wpe[t]": at((B, T, maxT), t) * (b == 0)[..., None],
    }, hint="out[b, t, c] = wte[inp[b, t], c] + wpe[t, c]: which single row of wpe does position (b, t) read? "
            + shape_hint)
    passed(ex, f"both Jacobians match finite differences, {int(B * T - np.unique(inp).size)} repeated tokens included")


def check_encoder_backward(fn) -> None:
    """Exercise 2.2: fn(dout, inp, V, maxT) -> (dwte (V, C), dwpe (maxT, C)), compared in float64."""
    ex = "Exercise 2.2"
    gen = rng()
    B, T, C, V, maxT = 3, 5, 7, 23, 9
    inp = _ids_with_repeats(gen, B, T, 6, V)
    dout = gen.standard_normal((B, T, C))
    result = run_exercise(ex, fn, dout.copy(), inp.copy(), V, maxT)
    if not isinstance(result, tuple) or len(result) != 2:
        raise ExerciseFailed(f"{ex}: return the pair (dwte, dwpe), got {type(result).__name__}"
                             + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""))
    dwte, dwpe = result
    want_dwte, want_dwpe = encoder_backward(dout, inp, V, maxT)

    overwrite = np.zeros((V, C))
    overwrite[inp] = dout          # what `dwte[inp] = dout` or `dwte[inp] += dout` leaves: one write per token
    no_scatter = np.zeros((V, C))
    no_scatter[:B * T] = dout.reshape(B * T, C)  # rows indexed by position instead of by token id
    assert_close(ex, "dwte", dwte, want_dwte, atol=1e-10, rtol=1e-9, known_mistakes={
        "`dwte[inp] = dout` or `dwte[inp] += dout`: with fancy indexing a repeated token id is written only once, "
        "so repeated tokens lose all but one gradient. Use np.add.at(dwte, inp, dout), which adds once per "
        "occurrence": overwrite,
        "dwte rows were indexed by the position b*T+t instead of by the token id inp[b, t]": no_scatter,
    }, hint="dwte[v] is the sum of dout[b, t] over every (b, t) with inp[b, t] == v; a token that appears "
            "twice gets two contributions.")

    only_b0 = np.zeros((maxT, C))
    only_b0[:T] = dout[0]
    mean_b = np.zeros((maxT, C))
    mean_b[:T] = dout.mean(axis=0)
    assert_close(ex, "dwpe", dwpe, want_dwpe, atol=1e-10, rtol=1e-9, known_mistakes={
        "only the first sequence (b = 0) was used: dwpe[t] must add dout[b, t] over every b": only_b0,
        "the mean over the batch was taken instead of the sum": mean_b,
    }, hint="dwpe has shape (maxT, C): rows t < T hold dout[:, t, :] summed over the batch axis (axis 0), "
            "rows t >= T stay zero because those positions were not used.")
    passed(ex, f"dwte and dwpe match the reference, including {int(B * T - np.unique(inp).size)} repeated tokens")


def check_encoder_forward_kernel(source: str) -> None:
    """Exercise 2.3: the body of encoder_forward_kernel1 in `source`, launched at awkward sizes and two block sizes."""
    ex = "Exercise 2.3"
    kernel = exercise_kernel(ex, source, "encoder_forward_kernel1")
    gen = rng()
    B, T, C, V, maxT = 3, 7, 37, 50, 9          # C is not a multiple of anything; B*T*C = 777 elements
    inp = gen.integers(0, V, size=(B, T)).astype(np.int32)
    wte = gen.standard_normal((V, C)).astype(np.float32)
    wpe = gen.standard_normal((maxT, C)).astype(np.float32)
    want = encoder_forward(inp, wte, wpe)
    bt = np.arange(B * T).reshape(B, T)
    mistakes = {
        "wpe was left out: out must be wte[token] + wpe[t]": wte[inp],
        "wte was left out: out must be wte[token] + wpe[t]": np.broadcast_to(wpe[:T], (B, T, C)),
        "wte was indexed by the position b*T+t instead of by the token id inp[b*T+t]": wte[bt] + wpe[:T],
        "the position t was computed as bt / T (that is b) instead of bt % T": wte[inp] + wpe[bt // T],
    }
    d_inp, d_wte, d_wpe = (device.to_device(a) for a in (inp, wte, wpe))
    for block_size in (32, 128):
        out = poisoned((B, T, C))
        grid = (-(-(B * T * C) // block_size),)
        kernel(grid, (block_size,), (out, d_inp, d_wte, d_wpe, np.int32(B), np.int32(T), np.int32(C)))
        assert_close(f"{ex} at block_size={block_size}", "out", out, want, atol=1e-6, rtol=1e-6,
                     known_mistakes=mistakes,
                     hint="thread idx owns out's flat element idx = (b*T + t)*C + c: recover (b*T + t), t and c from "
                          "idx with / and %, then the token id at that position.")
    # The memory behaviour: neighbouring threads own neighbouring channels, so a warp's accesses coalesce.
    launch_args = (poisoned((B, T, C)), d_inp, d_wte, d_wpe, np.int32(B), np.int32(T), np.int32(C))
    grid = (-(-(B * T * C) // 128),)
    reference = trace_of(lambda: load_kernel("encoder.cu", "encoder_forward_kernel1")(grid, (128,), launch_args))
    if reference is not None:                 # the student's last, so that trace.last is theirs
        got = trace_of(lambda: kernel(grid, (128,), launch_args))
        assert_coalesced(ex, got, reference, ("out", "wte", "wpe"),
                         hint="Thread idx must own element idx of out, in the order of memory: channel c = idx % C "
                              "is the fastest-moving index, so threads idx and idx + 1 touch neighbouring floats.")
    passed(ex, f"B={B}, T={T}, C={C}, block sizes 32 and 128, every element written, accesses coalesced")
