"""Checks for lesson 08 (softmax + cross-entropy): dlogits of the mean loss, derived (Exercise 8.1), the fused NumPy
backward (Exercise 8.2) and the row reductions of the softmax kernel (Exercise 8.3)."""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.checks import (ExerciseFailed, assert_close, exercise_kernel, forward_outputs, numerical_jacobian,
                                 passed, poisoned, rng, run_exercise)
from llmc_lessons.layers.crossentropy import crossentropy_forward, crossentropy_softmax_backward, softmax_forward


def _backward_mistakes(dlosses, probs, targets, V) -> dict:
    """{what the student probably did: the dlogits that mistake produces}."""
    B, T, Vp = probs.shape
    b, t = np.indices((B, T))
    dl = dlosses[..., None]

    def onehot(ix):
        o = np.zeros_like(probs)
        o[b, t, ix] = 1.0
        return o

    real = np.zeros_like(probs)
    real[..., :V] = probs[..., :V]
    mistakes = {
        "the one-hot was never subtracted: dlogits = probs * dloss misses the -1 at the target column":
            real * dl,
        "dlogits was not multiplied by dlosses (chain rule: d L/d logits = d L/d loss * d loss/d logits; "
        "for the mean loss every dlosses entry is 1/(B*T))":
            real - onehot(targets),
        "the -1 went to column target + 1: an off-by-one target index":
            (real - onehot(np.minimum(targets + 1, Vp - 1))) * dl,
        "the -1 went to column target - 1: an off-by-one target index":
            (real - onehot(np.maximum(targets - 1, 0))) * dl,
        "the -1 went to every target column of the batch in every row: indexing with targets alone "
        "(dlogits[..., targets]) picks the same columns for every (b, t); each row has only its own target":
            (real - np.isin(np.arange(Vp), targets).astype(probs.dtype)) * dl,
        "the -1 went to column t (the position) instead of column targets[b, t]":
            (real - onehot(np.broadcast_to(np.minimum(np.arange(T), Vp - 1), (B, T)))) * dl,
        "dlosses was replaced by 1/(B*T): use the dlosses you are given (the loss may not be a plain mean)":
            (real - onehot(targets)) / (B * T),
        "the one-hot was multiplied by dloss but probs was not (or the other way round)":
            real - onehot(targets) * dl,
    }
    withpad = probs - onehot(targets)
    mistakes["the padded columns V..Vp-1 were copied from probs: they must be exactly 0"] = withpad * dl
    return mistakes


def _mean_loss(logits: np.ndarray, targets: np.ndarray) -> float:
    """L = the mean over the N rows of -log softmax(logits[n])[targets[n]], through the package's forward pass."""
    N, V = logits.shape
    probs = softmax_forward(logits[None], V)[0]
    return float(-np.log(probs[np.arange(N), targets]).mean())


def check_softmax_forward(fn) -> None:
    """Exercise 8.0: fn(logits (B, T, Vp), V) -> probs (B, T, Vp): the softmax of each row's first V columns, the
    padded columns 0, float32 in and out, with some rows of large logits (where exp overflows float32)."""
    ex = "Exercise 8.0"
    gen = rng()
    B, T, V = 2, int(gen.integers(3, 8)), int(gen.integers(29, 45))
    Vp = V + int(gen.integers(3, 9))
    logits = (gen.standard_normal((B, T, Vp)) * 3).astype(np.float32)
    logits[0, 1] += 100.0                                     # one row past exp's float32 range (88.7)
    logits[..., V:] = gen.uniform(-1, 1, (B, T, Vp - V)) * 50  # padding columns hold values of their own
    want = softmax_forward(logits, V)
    probs, = forward_outputs(ex, run_exercise(ex, fn, logits.copy(), V), ("probs",))
    x = logits.astype(np.float64)

    def padded(p):
        out = np.zeros((B, T, Vp))
        out[..., :V] = p
        return out
    e = np.exp(x[..., :V] - x[..., :V].max(-1, keepdims=True))
    e_all = np.exp(x - x.max(-1, keepdims=True))
    e_t = np.exp(x[..., :V] - x[..., :V].max(1, keepdims=True))
    with np.errstate(over="ignore", invalid="ignore"):
        naive = np.exp(logits[..., :V]) / np.exp(logits[..., :V]).sum(-1, keepdims=True)
    assert_close(ex, "probs", probs, want, atol=1e-6, rtol=1e-4, known_mistakes={
        "exp overflowed on the row of large logits (inf / inf = NaN): subtract the row's maximum before exp":
            padded(naive),
        "the padded columns V..Vp-1 were included: the softmax covers the first V columns, the rest stay 0":
            e_all / e_all.sum(-1, keepdims=True),
        "the padded columns were left as they were: they must be 0": np.concatenate(
            [e / e.sum(-1, keepdims=True), x[..., V:]], axis=-1),
        "the softmax ran over the wrong axis: each row (b, t) sums to 1 over its columns (the last axis)":
            padded(e_t / e_t.sum(1, keepdims=True)),
    }, hint="for each row (b, t): p = exp(x - max) / sum exp(x - max) over the first V columns (max over those "
            "columns too); columns V to Vp - 1 are 0.")
    passed(ex, f"B={B}, T={T}, V={V}, Vp={Vp}, one row of logits near 100: probs match, float32")


def check_crossentropy_forward(fn) -> None:
    """Exercise 8.0, its second function: fn(probs (B, T, Vp), targets (B, T) ints) -> losses (B, T), losses[b, t] =
    -log probs[b, t, targets[b, t]], float32 in and out (the model takes the mean itself)."""
    ex = "Exercise 8.0"
    gen = rng()
    B, T, V = 2, int(gen.integers(3, 8)), int(gen.integers(29, 45))
    Vp = V + int(gen.integers(3, 9))
    probs = softmax_forward((gen.standard_normal((B, T, Vp)) * 2).astype(np.float32), V)
    targets = gen.integers(0, V, (B, T)).astype(np.int32)
    want = crossentropy_forward(probs, targets)
    losses, = forward_outputs(ex, run_exercise(ex, fn, probs.copy(), targets.copy()), ("losses",))
    p = np.take_along_axis(probs.astype(np.float64), targets[..., None].astype(np.intp), axis=-1)[..., 0]
    assert_close(ex, "losses", losses, want, atol=1e-6, rtol=1e-5, known_mistakes={
        "the log of the row's largest probability: the loss reads the target's column": -np.log(probs.max(-1)),
        "log10 where the natural log belongs": -np.log10(p),
        "log2 where the natural log belongs": -np.log2(p),
        "the target's column was read one position along (targets[b, t] belongs to the same (b, t))":
            -np.log(np.take_along_axis(probs, np.roll(targets, 1, axis=1)[..., None].astype(np.intp), -1)[..., 0]),
    }, hint="one loss per position (B, T): losses[b, t] = -log probs[b, t, targets[b, t]]; no mean or sum here "
            "(the model takes the mean over the B T positions).")
    passed(ex, f"B={B}, T={T}, V={V}, Vp={Vp}: losses match, float32")


def check_crossentropy_grad(fn) -> None:
    """Exercise 8.1: fn(logits, targets) -> dL/dlogits, shape (N, V), for L the mean cross-entropy of the N rows,
    against central differences in float64."""
    ex = "Exercise 8.1"
    gen = rng()
    N, V = int(gen.integers(3, 8)), int(gen.integers(7, 16))
    logits = gen.standard_normal((N, V)) * 2.0
    targets = gen.integers(0, V, size=N)
    targets[0], targets[-1] = 0, V - 1                        # the first and the last column
    got = run_exercise(ex, fn, logits.copy(), targets.copy())
    want = numerical_jacobian(lambda x: _mean_loss(x, targets), logits)
    rows = np.arange(N)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    onehot = np.zeros((N, V))
    onehot[rows, targets] = 1.0
    e0 = np.exp(logits - logits.max(0, keepdims=True))

    def onehot_at(cols):
        o = np.zeros((N, V))
        o[rows, cols] = 1.0
        return o

    assert_close(ex, "dlogits", got, want, atol=1e-7, rtol=1e-6, known_mistakes={
        "the one-hot was never subtracted: softmax alone is the derivative of log sum exp(x), and the loss's "
        "other term, -x_target, gives -1 at the target column": p / N,
        "only the one-hot: the log-sum-exp term (which gives the softmax) is missing": -onehot / N,
        "the 1/N is missing: L is the mean of the N rows' losses, so each row's gradient is divided by N":
            p - onehot,
        "the softmax was taken over the wrong axis (down the N rows, axis 0); it normalises each row over the "
        "V columns (axis -1)": (e0 / e0.sum(0, keepdims=True) - onehot) / N,
        "-1/p at the target: that is dL/dprobs; the gradient with respect to the logits goes through the "
        "softmax too": -onehot / np.where(onehot > 0, p, 1.0) / N,
        "exp(x) was not divided by the row's sum: d/dx_v log sum_u exp(x_u) = exp(x_v) / sum_u exp(x_u)":
            (np.exp(logits) - onehot) / N,
        "the -1 went to column target + 1: an off-by-one target index": (p - onehot_at(np.minimum(targets + 1, V - 1))) / N,
        "the -1 went to every target column in every row: index the row too, as in x[n, targets[n]]":
            (p - np.isin(np.arange(V), targets)[None].astype(float)) / N,
    }, hint="write the row's loss as -x_target + log sum_v exp(x_v) and differentiate each term with respect to "
            "x_v; L averages the N rows.")
    passed(ex, f"dlogits of the mean loss over {N} rows of {V} logits matches finite differences")


def check_crossentropy_softmax_backward(backward_fn) -> None:
    """Exercise 8.2: backward_fn(dlosses, probs, targets, V) -> dlogits (B, T, Vp), in NumPy, float64."""
    ex = "Exercise 8.2"
    gen = rng()
    B, T = int(gen.integers(2, 4)), int(gen.integers(3, 8))
    V = int(gen.integers(20, 45))
    Vp = V + int(gen.integers(3, 11))                         # a few padded columns
    logits = gen.standard_normal((B, T, Vp)) * 2.0
    targets = gen.integers(0, V, size=(B, T)).astype(np.int32)
    targets[0, 0], targets[-1, -1] = 0, V - 1                 # the first and the last real token
    probs = softmax_forward(logits, V)
    cases = [
        ("the mean loss: dlosses = 1/(B*T) everywhere", np.full((B, T), 1.0 / (B * T)), probs),
        ("random dlosses, and junk (0.25) in the padded columns of probs",
         gen.uniform(0.1, 2.0, size=(B, T)), np.where(np.arange(Vp) < V, probs, 0.25)),
    ]
    for what, dlosses, p in cases:
        p_before, dl_before, t_before = p.copy(), dlosses.copy(), targets.copy()
        got = run_exercise(ex, backward_fn, dlosses, p, targets, V)
        if got is None:
            raise ExerciseFailed(f"{ex}: got None. Did your function forget to `return` dlogits?")
        if not (np.array_equal(p, p_before) and np.array_equal(dlosses, dl_before)
                and np.array_equal(targets, t_before)):
            raise ExerciseFailed(f"{ex}: your function changed its inputs (probs, dlosses or targets). Start from "
                                 f"a fresh array, e.g. dlogits = np.zeros_like(probs), and write into that: the "
                                 f"caller may still need probs.")
        expected = crossentropy_softmax_backward(dlosses, p, targets, V)
        try:
            assert_close(ex, f"dlogits ({what}; B={B}, T={T}, V={V}, Vp={Vp})", got, expected, atol=1e-12,
                         rtol=1e-9, known_mistakes=_backward_mistakes(dlosses, p, targets, V),
                         hint="per position (b, t): the softmax's gradient with respect to its logits, scaled by "
                              "that position's dlosses; the padded columns v >= V get nothing (see the derivation "
                              "above).")
        except ExerciseFailed as e:
            got_arr = np.asarray(got, dtype=np.float64)
            if "likely cause" in str(e) or got_arr.shape != expected.shape or not np.any(got_arr[..., V:] != 0):
                raise
            first = tuple(int(i) for i in np.argwhere(got_arr[..., V:] != 0)[0])
            at = first[:2] + (first[2] + V,)
            raise ExerciseFailed(
                f"{ex} ({what}): dlogits{list(at)} is {got_arr[at]:.4g}, but columns V..Vp-1 = {V}..{Vp - 1} "
                f"are padding: the loss never sees them, so their gradient must be exactly 0, whatever probs "
                f"holds there. Start from zeros and fill only [..., :V].\n{e}") from None
    passed(ex, f"dlogits matches the reference (B={B}, T={T}, V={V}, Vp={Vp}), padded columns are 0")


def _softmax_mistakes(logits, V) -> dict:
    ev = np.exp(logits[..., :V] - logits[..., :V].max(axis=-1, keepdims=True))
    pad = np.exp(logits[..., V:] - logits[..., :V].max(axis=-1, keepdims=True)).sum(-1, keepdims=True)
    pad_sum = np.zeros_like(logits)
    pad_sum[..., :V] = ev / (ev.sum(axis=-1, keepdims=True) + pad)
    unnorm = np.zeros_like(logits)
    unnorm[..., :V] = ev
    return {
        "the padded columns V..Vp-1 entered the sum (whether or not they entered the max: softmax does not "
        "change when every logit shifts by the same amount): loop over i < V, not i < Vp": pad_sum,
        "the row sum is missing or is 1 (the values are exp(x - max), not divided by the sum)": unnorm,
    }


def check_softmax_forward_kernel(source: str, block_sizes=(32, 96)) -> None:
    """Exercise 8.3: softmax_forward_kernel(float* probs, const float* logits, int N, int V, int Vp) in `source`,
    one block per row, against the reference; padded logits are NaN so any use of them shows."""
    ex = "Exercise 8.3"
    kernel = exercise_kernel(ex, source, "softmax_forward_kernel")
    gen = rng()
    for block_size in block_sizes:
        for V in (int(gen.integers(2, 5)) * block_size + int(gen.integers(1, block_size)),  # several per thread
                  int(gen.integers(3, block_size - 2))):                                   # idle threads
            Vp = V + int(gen.integers(5, 40))
            B, T = 2, int(gen.integers(2, 5))
            logits = (gen.standard_normal((B, T, Vp)) * 3.0).astype(np.float32)
            logits[0, 0, V // 2] = 95.0        # exp(95) overflows float32: only a max-subtracted softmax survives
            logits[-1, -1, :V] -= 60.0         # a row of very negative logits: exp(x) alone underflows to 0
            logits_big_pad = logits.copy()
            logits_big_pad[..., V:] = 20.0     # the padding: large, so using it changes every probability
            for what, x in (("padded logits = 20", logits_big_pad), ("padded logits = NaN",
                                                                    np.where(np.arange(Vp) < V, logits, np.nan))):
                x = x.astype(np.float32)
                probs = poisoned((B, T, Vp))
                kernel((B * T,), (block_size,), (probs, device.to_device(x), np.int32(B * T), np.int32(V),
                                                 np.int32(Vp)))
                device.synchronize()
                x64 = np.nan_to_num(x.astype(np.float64), nan=20.0)
                expected = softmax_forward(x64, V)
                got = device.to_host(probs)
                if what.endswith("NaN") and np.isnan(got[..., :V]).any() and np.all(got[..., V:] == 0):
                    raise ExerciseFailed(f"{ex} (block_size={block_size}, V={V}, {what}): some real columns of "
                                         f"probs are NaN. The padded logits were set to NaN here, so a loop that "
                                         f"reads columns V..Vp-1 poisons the max or the sum: stop at i < V.")
                written = np.all(got[..., V:] == 0)   # the write loop ran: non-finite values are arithmetic
                if written and not np.isfinite(got[..., :V]).all() and not what.endswith("NaN"):
                    raise ExerciseFailed(f"{ex} (block_size={block_size}, V={V}, {what}): some probs are inf or "
                                         f"NaN although the kernel wrote them. Either exp overflowed (row 0 has a "
                                         f"logit of 95 and exp(95) is inf in float32: subtract the row max), or "
                                         f"the row max or sum was never computed (the loops must update "
                                         f"thread_max and thread_sum).")
                assert_close(ex, f"probs (block_size={block_size}, B={B}, T={T}, V={V}, Vp={Vp}, {what})",
                             got, expected, atol=1e-6, rtol=1e-4, known_mistakes=_softmax_mistakes(x64, V),
                             hint="one block per row: thread k covers columns k, k + blockDim.x, k + 2 blockDim.x, "
                                  "... of the real columns only, in each of the three loops.")
    passed(ex, f"block sizes {tuple(block_sizes)}, V below and above the block size, padding never read")
