"""Checks for lesson 05 (attention): Exercise 5.1, the softmax's backward inside attention, derived; Exercise 5.2,
the NumPy backward; Exercise 5.3, the softmax kernel's body.

Each check runs the student's code on fresh random inputs of awkward sizes (T = 13 and 37, NH = 3 heads of
hs = 5 channels) and compares with finite differences (5.1) or the package's reference; a failure names the output, the first wrong
element and, where it recognises one, the mistake that produces exactly that result.
"""
from __future__ import annotations

import math

import numpy as np

from llmc_lessons.checks import (ExerciseFailed, assert_close, assert_coalesced, exercise_kernel, forward_outputs,
                                 numerical_jacobian, passed, poisoned, randn, rng, run_exercise, trace_of)
from llmc_lessons.cuda import RawKernel, load_kernel
from llmc_lessons.device import to_host
from llmc_lessons.layers.attention import attention_backward, attention_forward, causal_softmax

# ---------------------------------------------------------------------------------------------------------
# Exercise 5.0: the forward


def check_attention_forward(fn) -> None:
    """Exercise 5.0: fn(qkv, NH) -> (out (B, T, C), att (B, NH, T, T)): causal self-attention with NH heads,
    att the post-softmax weights (zeros above the diagonal), float32 in and out."""
    ex = "Exercise 5.0"
    gen = rng()
    B, T, NH, hs = 2, int(gen.integers(7, 14)), 3, 5
    C = NH * hs
    qkv = (gen.standard_normal((B, T, 3 * C)) * 1.5).astype(np.float32)
    want_out, want_att = attention_forward(qkv, NH)
    out, att = forward_outputs(ex, run_exercise(ex, fn, qkv.copy(), NH), ("out", "att"))
    x = qkv.astype(np.float64)
    q, k, v = (x[:, :, i * C:(i + 1) * C].reshape(B, T, NH, hs).transpose(0, 2, 1, 3) for i in range(3))
    preatt = q @ k.transpose(0, 1, 3, 2)                                 # (B, NH, T, T), unscaled

    def softmax(z, axis=-1):
        e = np.exp(z - z.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)
    future = np.triu(np.ones((T, T), dtype=bool), 1)
    masked = np.where(future, -np.inf, preatt)
    assert_close(ex, "att", att, want_att, atol=1e-5, rtol=1e-4, known_mistakes={
        "the causal mask is missing: position t may only attend to positions t2 <= t": softmax(preatt / math.sqrt(hs)),
        "the 1/sqrt(hs) scale is missing: att = softmax(q k^T / sqrt(hs) + mask)": softmax(masked),
        "the scale is 1/hs; it is 1/sqrt(hs)": softmax(masked / hs),
        "the mask was applied after the softmax: the future entries are 0 but each row no longer sums to 1":
            np.where(future, 0.0, softmax(preatt / math.sqrt(hs))),
        "the softmax ran over the wrong axis: each row t (over the keys t2, the last axis) sums to 1":
            np.nan_to_num(softmax(masked / math.sqrt(hs), axis=-2)),
    }, hint="per head: att = softmax over the last axis of (q k^T / sqrt(hs), with -inf above the diagonal).")
    assert_close(ex, "out", out, want_out, atol=1e-5, rtol=1e-4, known_mistakes={
        "the heads were reshaped to (B, T, C) without moving the head axis back next to hs first":
            (want_att.astype(np.float64) @ v).reshape(B, T, C),
    }, hint="out_h = att @ v per head (B, NH, T, hs), then the heads side by side: (B, T, C), head h at channels "
            "h*hs to (h+1)*hs - 1.")
    passed(ex, f"B={B}, T={T}, NH={NH}, hs={hs}: att and out match, float32")


# ---------------------------------------------------------------------------------------------------------
# Exercise 5.1: the softmax's backward, datt -> dz, derived

def check_softmax_backward(fn) -> None:
    """Exercise 5.1: fn(datt, att) -> dz, the gradient with respect to the scores z of att = causal softmax(z)
    (rows along the last axis, zeros above the diagonal), against central differences in float64."""
    ex = "Exercise 5.1"
    gen = rng()
    B, NH, T = 1, 2, int(gen.integers(5, 9))
    z = gen.standard_normal((B, NH, T, T)) * 1.5
    att = causal_softmax(z)
    datt = gen.standard_normal((B, NH, T, T))
    got = run_exercise(ex, fn, datt.copy(), att.copy())
    # d/dz of sum(att * datt); a score above the diagonal never reaches att, so its derivative is 0
    want = numerical_jacobian(lambda v: float((causal_softmax(v) * datt).sum()), z)
    row = (att * datt).sum(-1, keepdims=True)
    assert_close(ex, "dz", got, want, atol=1e-7, rtol=1e-6, known_mistakes={
        "the row term - sum_j att_j datt_j is missing: each probability depends on every score of its row, "
        "through the normalisation": att * datt,
        "only the diagonal of the softmax's Jacobian, att_i (1 - att_i): the other entries, -att_i att_j, "
        "are missing": att * (1 - att) * datt,
        "the row term sums datt alone; it is sum_j att_j datt_j": att * (datt - datt.sum(-1, keepdims=True)),
        "the row term was summed down the columns (axis -2); it sums along each row (axis -1)":
            att * (datt - (att * datt).sum(-2, keepdims=True)),
        "the leading factor att_i is missing: gradient leaks into the masked future positions, whose att is 0":
            datt - row,
    }, hint="d att_j / d z_i = att_j (delta_ij - att_i) within a row; the chain rule sums datt_j times it over j. "
            "Simplify the sum so that no T x T matrix per row is built.")
    passed(ex, f"dz matches finite differences on {B * NH * T} rows of T = {T}, masked entries included")


# ---------------------------------------------------------------------------------------------------------
# Exercise 5.2: attention_backward in NumPy

EX_BACKWARD = "Exercise 5.2"

# Mistakes the check recognises, each the backward with one thing done wrong (see _backward_variant).
BACKWARD_MISTAKES = {
    "no_sum_term": "the softmax backward (step 2) lacks its row term, the one with sum(att * datt): every "
                   "probability depends on every visible score through the normalisation",
    "no_att_factor": "the softmax backward (step 2) lacks its factor att: gradient leaks into the masked future "
                     "positions, whose att is 0",
    "no_scale": "the 1/sqrt(hs) scale is missing in the backward (the forward multiplied the scores by it, so "
                "the backward must multiply dpreatt by it too)",
    "swapped_qk": "dq and dk are swapped (step 4: row t of preatt belongs to query t, column t2 to key t2)",
    "heads_interleaved": "wrong head slicing: head h taken as channels h, h+NH, h+2NH, ... instead of the "
                         "contiguous block h*hs:(h+1)*hs",
    "qkv_per_head": "wrong q/k/v slicing: qkv read as (B, T, NH, 3, hs) instead of (B, T, 3, NH, hs) "
                    "(qkv is [all of q | all of k | all of v], each C = NH*hs wide)",
}


# Where each part of dqkv comes from in the derivation of section 4: the step to check, not the formula.
_PART_HINTS = {
    "dv": "dv needs step 1 only (Y = P V): which factor is transposed, and on which side does dY go?",
    "dq": "dq needs steps 2, 3 and 4 in that order: the softmax backward row by row, the scale, then the product "
          "with the keys",
    "dk": "dk needs steps 2, 3 and 4 like dq, but in step 4 a key t2 meets the scores through column t2",
}


def _split(x, NH, layout):
    """(B, T, C) -> (B, NH, T, hs) for the right layout, or a wrong one."""
    B, T, C = x.shape
    hs = C // NH
    if layout == "heads_interleaved":
        return x.reshape(B, T, hs, NH).transpose(0, 3, 1, 2)
    return x.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)


def _merge(x, layout):
    """The inverse of _split."""
    B, NH, T, hs = x.shape
    if layout == "heads_interleaved":
        return x.transpose(0, 2, 3, 1).reshape(B, T, NH * hs)
    return x.transpose(0, 2, 1, 3).reshape(B, T, NH * hs)


def _backward_variant(dout, qkv, att, NH, mistake=None):
    """The attention backward in float64, with one named mistake (or none: then it equals the reference)."""
    dout, qkv, att = (np.asarray(a, dtype=np.float64) for a in (dout, qkv, att))
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // NH
    layout = mistake if mistake in ("heads_interleaved", "qkv_per_head") else "right"
    if layout == "qkv_per_head":   # q, k, v of head h read from qkv[..., h, 0/1/2, :] of a (B, T, NH, 3, hs) view
        per_head = qkv.reshape(B, T, NH, 3, hs)
        q, k, v = (per_head[:, :, :, j, :].transpose(0, 2, 1, 3) for j in range(3))
    else:
        q, k, v = (_split(qkv[:, :, j * C:(j + 1) * C], NH, layout) for j in range(3))
    dout_h = _split(dout, NH, "heads_interleaved" if layout == "heads_interleaved" else "right")
    datt = dout_h @ v.transpose(0, 1, 3, 2)
    dv = att.transpose(0, 1, 3, 2) @ dout_h
    dot = (att * datt).sum(axis=-1, keepdims=True)
    if mistake == "no_sum_term":
        dpreatt = att * datt
    elif mistake == "no_att_factor":
        dpreatt = datt - dot
    else:
        dpreatt = att * (datt - dot)
    if mistake != "no_scale":
        dpreatt = dpreatt / math.sqrt(hs)
    dq, dk = dpreatt @ k, dpreatt.transpose(0, 1, 3, 2) @ q
    if mistake == "swapped_qk":
        dq, dk = dpreatt.transpose(0, 1, 3, 2) @ k, dpreatt @ q
    if layout == "qkv_per_head":
        out = np.stack([dq, dk, dv], axis=3)                 # (B, NH, T, 3, hs)
        return out.transpose(0, 2, 1, 3, 4).reshape(B, T, 3 * C)
    return np.concatenate([_merge(g, layout) for g in (dq, dk, dv)], axis=2)


def _causality(fn, B, T, NH, hs, gen):
    """dout nonzero at one position t0 only: dq may be nonzero only at t0, dk and dv only at t <= t0."""
    C = NH * hs
    qkv = gen.standard_normal((B, T, 3 * C))
    _, att = attention_forward(qkv, NH)
    t0 = T // 2
    dout = np.zeros((B, T, C))
    dout[:, t0, :] = gen.standard_normal((B, C))
    got = run_exercise(EX_BACKWARD, fn, dout, qkv, att, NH)
    if got is None:
        raise ExerciseFailed(f"{EX_BACKWARD}: your function returned None. Did it forget to `return dqkv`?")
    got = np.asarray(to_host(got), dtype=np.float64)
    if got.shape != (B, T, 3 * C):
        raise ExerciseFailed(f"{EX_BACKWARD}: dqkv must have the shape of qkv, (B, T, 3C) = {(B, T, 3 * C)}, "
                             f"got {got.shape}")
    for mistake, why in BACKWARD_MISTAKES.items():  # a mistake we know by name gets its own message
        if np.allclose(got, _backward_variant(dout, qkv, att, NH, mistake), atol=1e-8, rtol=1e-6):
            raise ExerciseFailed(f"{EX_BACKWARD}: dqkv is wrong (probed with dout nonzero only at position t0 = {t0}).\n"
                                 f"  likely cause: {why}")
    tiny = 1e-9 * max(1.0, float(np.abs(got).max()))
    dk_future = np.abs(got[:, t0 + 1:, C:3 * C]).max(initial=0.0)
    if dk_future > tiny:
        raise ExerciseFailed(
            f"{EX_BACKWARD}: gradient leaked into the future. With dout nonzero only at position t0 = {t0}, dk and dv must "
            f"be 0 at every position t2 > {t0} (query t0 never saw those keys and values: the causal mask set "
            f"their probability to 0), but they reach {dk_future:.3g}.\n  likely cause: dpreatt is not 0 above "
            f"the diagonal. In step 2 of the derivation, find the factor that is 0 for every future key: it must "
            f"multiply the whole softmax backward.")
    others = np.abs(np.delete(got[:, :, 0:C], t0, axis=1)).max(initial=0.0)
    if others > tiny:
        raise ExerciseFailed(
            f"{EX_BACKWARD}: with dout nonzero only at position t0 = {t0}, dq must be 0 at every other position (query t "
            f"only affects out[t]), but it reaches {others:.3g} elsewhere.\n  likely cause: dq and dk mixed up, "
            f"dpreatt transposed (row t of dpreatt belongs to query t), or q, k, v sliced from the wrong columns "
            f"of qkv (it is [q | k | v], each C wide).")


def check_attention_backward(fn) -> None:
    """Exercise 5.2: fn(dout, qkv, att, NH) -> dqkv must match the reference attention_backward."""
    gen = rng()
    _causality(fn, 2, 11, 3, 5, gen)   # first: a leak gets its own, specific message
    for B, T, NH, hs in ((2, 13, 3, 5), (1, 37, 2, 4)):
        C = NH * hs
        qkv = gen.standard_normal((B, T, 3 * C))
        out, att = attention_forward(qkv, NH)
        dout = gen.standard_normal((B, T, C))
        expected = attention_backward(dout, qkv, att, NH)
        got = run_exercise(EX_BACKWARD, fn, dout.copy(), qkv.copy(), att.copy(), NH)
        if got is None:
            raise ExerciseFailed(f"{EX_BACKWARD}: your function returned None. Did it forget to `return dqkv`?")
        got = np.asarray(to_host(got), dtype=np.float64)
        if got.shape != expected.shape:
            raise ExerciseFailed(f"{EX_BACKWARD}: dqkv must have the shape of qkv, (B, T, 3C) = {expected.shape}, "
                                 f"got {got.shape}. Concatenate [dq | dk | dv] along the last axis.")
        wrong = {m: _backward_variant(dout, qkv, att, NH, m) for m in BACKWARD_MISTAKES}
        # in backward order: dv first (it needs no softmax backward), then dq and dk
        for j, part in ((2, "dv"), (0, "dq"), (1, "dk")):
            sl = slice(j * C, (j + 1) * C)
            assert_close(EX_BACKWARD, part, got[:, :, sl], expected[:, :, sl], atol=1e-8, rtol=1e-6,
                         known_mistakes={BACKWARD_MISTAKES[m]: w[:, :, sl] for m, w in wrong.items()},
                         hint=f"{_PART_HINTS[part]}; it sits in dqkv[:, :, {j}*C:{j + 1}*C]. This test had "
                              f"B={B}, T={T}, NH={NH}, hs={hs}, C={C}")
    passed(EX_BACKWARD, "dq, dk, dv match the reference at T = 13 and 37, and no gradient flows to the future")


# ---------------------------------------------------------------------------------------------------------
# Exercise 5.3: the body of softmax_forward_kernel (one warp per row, causal half only)

EX_KERNEL = "Exercise 5.3"


def _lane_partials(x, inv_temperature, own_max: bool, own_sum: bool):
    """What the kernel computes if lanes skip the warp reduction of the max (own_max) or of the sum (own_sum)."""
    N, T, _ = x.shape
    out = np.zeros_like(x)
    for n in range(N):
        for t in range(T):
            row = x[n, t, :t + 1]
            lanes = np.arange(t + 1) % 32
            lane_max = np.array([row[lanes == l].max() for l in lanes]) if own_max else np.full(t + 1, row.max())
            e = np.exp(inv_temperature * (row - lane_max))
            if own_sum:
                s = np.array([e[lanes == l].sum() for l in lanes])
            else:
                s = e.sum()
            out[n, t, :t + 1] = e / s
    return out


def _shifted_mask_softmax(x, inv_temperature, k):
    """Softmax over t2 <= t + k (clipped to the row), zeros elsewhere: an off-by-k causal bound."""
    T = x.shape[-1]
    visible = np.tril(np.ones((T, T), dtype=bool), k=k)
    s = np.where(visible, x * inv_temperature, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _launch_softmax(kernel, preatt, inv_temperature, block_size):
    N, T, _ = preatt.shape
    out = poisoned((N, T, T))
    warps = block_size // 32
    grid = ((N * T + warps - 1) // warps,)
    run_exercise(EX_KERNEL, kernel, grid, (block_size,), (out, np.float32(inv_temperature), preatt, np.int32(N),
                                                    np.int32(T)))
    return np.asarray(to_host(out), dtype=np.float64)


def _diagnose_nan(got, T, where):
    """A specific message when the unwritten (NaN) elements form a pattern we recognise."""
    nan = np.isnan(got)
    if not nan.any():
        return
    causal = np.tril(np.ones((T, T), dtype=bool))
    if nan[:, causal].all():
        raise ExerciseFailed(
            f"{EX_KERNEL} ({where}): no element of the causal half (t2 <= t) was written: every one is still NaN, "
            f"the poison put there before the launch. Write the max, exp-sum and normalise steps in the "
            f"kernel body, run the cell, then this check again.")
    diag = np.eye(T, dtype=bool)
    if nan[:, diag].all() and not nan[:, ~diag].any():
        raise ExerciseFailed(
            f"{EX_KERNEL} ({where}): the diagonal att[t, t] was never written (still NaN).\n  likely cause: an "
            f"off-by-one causal bound, `i < own_pos` where it must be `i <= own_pos`: a token attends to the "
            f"previous tokens AND to itself.")


def check_softmax_forward_kernel(source) -> None:
    """Exercise 5.3: softmax_forward_kernel in `source` (CUDA text, or a loaded kernel) must compute the causal
    softmax of each row, launched as kernel(grid, block, (out, inv_temperature, inp, N, T))."""
    if isinstance(source, str):
        kernel = exercise_kernel(EX_KERNEL, source, "softmax_forward_kernel")
    else:
        kernel = source
    gen = rng()
    cases = ((5, 13, 64, 1.0), (5, 37, 128, 1.0), (3, 37, 96, 60.0))  # N rows of T x T, block size, logit scale
    for N, T, block_size, scale in cases:
        inv_temperature = 1.0 / math.sqrt(5.0)
        preatt = randn(gen, N, T, T, scale=scale)
        if scale > 1.0:
            preatt[:, T - 1, 0] = 300.0   # a visible score of 300 * inv_temperature = 134 for sure: expf(134) = inf
        x = np.asarray(to_host(preatt), dtype=np.float64)
        expected = causal_softmax(x, inv_temperature)
        got = _launch_softmax(kernel, preatt, inv_temperature, block_size)
        where = f"N={N}, T={T}, block_size={block_size}"
        if scale > 1.0:
            where += f", scores up to {np.abs(x).max() * inv_temperature:.0f}"
            if (~np.isfinite(got) & np.isfinite(expected)).any() or not np.isfinite(got).all():
                raise ExerciseFailed(
                    f"{EX_KERNEL} ({where}): the output holds inf or NaN for large scores, although it was right for "
                    f"small ones.\n  likely cause: expf overflowed (expf(x) is inf for x > 88.7). Step 1's row "
                    f"maximum is there to keep every exponent at or below 0: is it used inside expf?")
        _diagnose_nan(got, T, where)
        mistakes = {
            "the causal bound is off by one: keys up to own_pos + 1 are included (use i <= own_pos)":
                _shifted_mask_softmax(x, inv_temperature, 1),
            "the softmax runs over the whole row: the future keys t2 > t must stay masked (loop to own_pos)":
                _shifted_mask_softmax(x, inv_temperature, T),
            "inv_temperature is missing: the scores are exponentiated unscaled":
                causal_softmax(x, 1.0),
            "each lane used its own maximum: combine them across the warp with warpReduceMax first":
                _lane_partials(x, inv_temperature, own_max=True, own_sum=False),
            "each lane divided by its own partial sum: combine the sums across the warp with warpReduceSum":
                _lane_partials(x, inv_temperature, own_max=False, own_sum=True),
        }
        assert_close(EX_KERNEL, "att", got, expected, atol=1e-6, rtol=1e-4, known_mistakes=mistakes,
                     hint=f"follow steps 1 to 3 of the section above, each over this lane's own visible keys "
                          f"and each combined across the warp before the next step uses it; this launch had "
                          f"{where}")
    if isinstance(kernel, RawKernel):      # the memory behaviour: lane l reads keys l, l + 32, ... (coalesced)
        preatt = randn(gen, 2, 128, 128)
        reference = trace_of(lambda: _launch_softmax(load_kernel("attention.cu", "softmax_forward_kernel"), preatt,
                                                     0.5, 64))
        if reference is not None:             # the student's last, so that trace.last is theirs
            got = trace_of(lambda: _launch_softmax(kernel, preatt, 0.5, 64))
            assert_coalesced(EX_KERNEL, got, reference, ("inp", "out"),
                             hint="In each pass of the loops lane l takes key l + 32 k, so the warp reads 32 "
                                  "neighbouring scores at once; a lane that walks a block of keys of its own makes "
                                  "every load of the warp touch scores far apart.")
    passed(EX_KERNEL, "causal softmax correct at T = 13 and 37, three block sizes, and with large scores; accesses "
                "coalesced")


# ---------------------------------------------------------------------------------------------------------
# Exercises 5.4 to 5.8 (optional): the backward one intermediate at a time

ATTENTION_STEPS = ("datt", "dv", "dpreatt", "dq", "dk")
"""The optional step-by-step exercises in order: Exercise 5.4 asks for datt, ..., Exercise 5.8 for dk."""


def check_attention_step(step: str, fn) -> None:
    """Exercises 5.4 to 5.8 (optional): fn gives the gradient of one intermediate of one head's forward pass,
    on (B, NH, T, hs) arrays q, k, v,

        preatt = q @ k^T; att = causal_softmax(preatt, 1 / sqrt(hs)); y = att @ v

    using the gradients after it. It gets the right values of those, so that one step's mistake does not spill into
    the next, and is compared with central differences (float64) of the loss as a function of that intermediate."""
    if step not in ATTENTION_STEPS:
        raise ValueError(f"step must be one of {ATTENTION_STEPS}, got {step!r}")
    ex = f"Exercise 5.{4 + ATTENTION_STEPS.index(step)}"
    gen = rng()
    B, NH, T, hs = 1, 2, int(gen.integers(5, 9)), 3
    q, k, v = (gen.standard_normal((B, NH, T, hs)) for _ in range(3))
    dy = gen.standard_normal((B, NH, T, hs))
    scale = 1.0 / math.sqrt(hs)
    att = causal_softmax(q @ k.swapaxes(-1, -2), scale)

    def loss_att(a):
        return float((dy * (a @ v)).sum())

    def loss_preatt(p):
        return loss_att(causal_softmax(p, scale))

    def tr(x):
        return x.swapaxes(-1, -2)

    datt = dy @ tr(v)
    row = (att * datt).sum(-1, keepdims=True)
    dpreatt = att * (datt - row) * scale
    steps = {
        "datt": ((dy, v), loss_att, att, {
            "datt is transposed: datt[t, t2] = sum_i dy[t, i] v[t2, i], which is dy @ v^T": v @ tr(dy),
        }, "y = att @ v: row t of y mixes the rows v[t2] with the weights att[t, t2]; datt is (T, T) per head."),
        "dv": ((dy, att), lambda x: float((dy * (att @ x)).sum()), v, {
            "att was not transposed: v[t2] is used by every query t that attends to it, with weight att[t, t2], so "
            "dv = att^T @ dy": att @ dy,
        }, "y = att @ v: which rows of y use v[t2], and with which weights? dv is (T, hs) per head."),
        "dpreatt": ((datt, att, hs), loss_preatt, q @ tr(k), {
            "the scale 1/sqrt(hs) is missing: the softmax reads preatt / sqrt(hs)": att * (datt - row),
            "the softmax's row term - sum_j att_j datt_j is missing": att * datt * scale,
            "the softmax's factor att_i is missing: gradient leaks into the masked future": (datt - row) * scale,
            "multiplied by sqrt(hs) where 1/sqrt(hs) belongs": att * (datt - row) / scale,
        }, "two steps: the softmax's backward of Exercise 5.1, then the scale 1/sqrt(hs) the forward applied."),
        "dq": ((dpreatt, k), lambda x: loss_preatt(x @ tr(k)), q, {
            "dpreatt was transposed: preatt[t, t2] = q_t . k_t2, so query t collects row t of dpreatt: "
            "dpreatt @ k": tr(dpreatt) @ k,
        }, "preatt = q @ k^T: which entries of preatt use q[t]? dq is (T, hs) per head."),
        "dk": ((dpreatt, q), lambda x: loss_preatt(q @ tr(x)), k, {
            "dpreatt was not transposed: key t2 is used by column t2 of preatt, so dk = dpreatt^T @ q":
                dpreatt @ q,
        }, "preatt = q @ k^T: which entries of preatt use k[t2]? dk is (T, hs) per head."),
    }
    args, loss, at, mistakes, hint = steps[step]
    got = run_exercise(ex, fn, *(a.copy() if isinstance(a, np.ndarray) else a for a in args))
    assert_close(ex, step, got, numerical_jacobian(loss, at), atol=1e-7, rtol=1e-6, known_mistakes=mistakes,
                 hint=hint)
    passed(ex, f"{step} matches finite differences of the loss through {step[1:]}")
