"""Checks for lesson 03 (LayerNorm): Exercise 3.1 (the Jacobian dn_i/dx_j, derived), Exercise 3.2 (NumPy
layernorm_backward), Exercise 3.3 (kernel2's reductions)."""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.checks import (ExerciseFailed, assert_close, assert_coalesced, exercise_kernel, forward_outputs,
                                 numerical_jacobian, passed, poisoned, rng, run_exercise, trace_of)
from llmc_lessons.cuda import load_kernel
from llmc_lessons.layers.layernorm import layernorm_backward, layernorm_forward


def _inputs(gen, B, T, C, dtype):
    inp = (gen.standard_normal((B, T, C)) * 2.0 + 3.0).astype(dtype)   # rows with a clear mean and spread
    weight = (gen.standard_normal(C) + 1.0).astype(dtype)               # not all ones: dout*weight != dout
    bias = gen.standard_normal(C).astype(dtype)
    return inp, weight, bias


def check_layernorm_forward(fn) -> None:
    """Exercise 3.0: fn(inp, weight, bias) -> (out (B, T, C), mean (B, T), rstd (B, T)), float32 in and out, on
    rows of very different spreads (some with a variance near eps, where the place of eps shows)."""
    ex = "Exercise 3.0"
    gen = rng()
    B, T, C = 3, 5, int(gen.integers(37, 70))
    scale = 10.0 ** gen.uniform(-2.7, 1.0, (B, T, 1))                  # row spreads from 0.002 to 10
    inp = ((gen.standard_normal((B, T, C)) + gen.uniform(-2, 2, (B, T, 1))) * scale).astype(np.float32)
    weight = (gen.standard_normal(C) + 1.0).astype(np.float32)
    bias = gen.standard_normal(C).astype(np.float32)
    want_out, want_mean, want_rstd = layernorm_forward(inp, weight, bias)
    result = run_exercise(ex, fn, inp.copy(), weight.copy(), bias.copy())
    out, mean, rstd = forward_outputs(ex, result, ("out", "mean", "rstd"))
    x, eps = inp.astype(np.float64), 1e-5
    var = ((x - x.mean(-1, keepdims=True)) ** 2).mean(-1)
    assert_close(ex, "mean", mean, want_mean, atol=1e-6, rtol=1e-5,
                 hint="mean has one number per row (b, t): the average of its C channels, the last axis.")
    assert_close(ex, "rstd", rstd, want_rstd, atol=1e-5, rtol=1e-4, known_mistakes={
        "the variance divides by C - 1; LayerNorm uses the biased variance (divide by C)":
            1 / np.sqrt(var * C / (C - 1) + eps),
        "eps is added outside the square root: it belongs inside, 1 / sqrt(var + eps)": 1 / (np.sqrt(var) + eps),
        "eps is missing: a row of nearly equal values would divide by almost 0": 1 / np.sqrt(var),
        "that is the standard deviation; rstd is its reciprocal": np.sqrt(var + eps),
        "the squares were taken of x, not of x - mean": 1 / np.sqrt((x ** 2).mean(-1) + eps),
    }, hint="rstd = 1 / sqrt(var + eps), var the mean over the row's C channels of (x - mean)^2.")
    norm = (x - x.mean(-1, keepdims=True)) / np.sqrt(var + eps)[..., None]
    assert_close(ex, "out", out, want_out, atol=1e-4, rtol=1e-4, known_mistakes={
        "weight and bias are swapped: out = norm * weight + bias": norm * bias + weight,
        "weight and bias are not applied: out = norm * weight + bias": norm,
    }, hint="out = (x - mean) * rstd * weight + bias, weight and bias broadcast over (b, t).")
    passed(ex, f"out, mean and rstd of {B * T} rows of C={C} (spreads 0.002 to 10) match, all float32")

def check_layernorm_jacobian(fn) -> None:
    """Exercise 3.1: fn(x, eps) -> J of shape (C, C), J[i, j] = dn_i/dx_j for one row x of shape (C,), against
    central differences in float64."""
    ex = "Exercise 3.1"
    gen = rng()
    C = int(gen.integers(5, 14))
    eps = 1e-5
    x = gen.standard_normal(C) * 2.0 + 3.0
    ones, zeros = np.ones(C), np.zeros(C)
    want = numerical_jacobian(lambda v: layernorm_forward(v[None, None], ones, zeros, eps)[0][0, 0], x)
    got = run_exercise(ex, fn, x.copy(), eps)
    mu = x.mean()
    r = 1.0 / np.sqrt(((x - mu) ** 2).mean() + eps)
    n = (x - mu) * r
    eye, outer = np.eye(C), np.outer(n, n)
    assert_close(ex, "J", got, want, atol=1e-6, rtol=1e-5, known_mistakes={
        "the term -1/C is missing: mu depends on every x_j, with dmu/dx_j = 1/C": r * (eye - outer / C),
        "the term -n_i n_j / C is missing: rstd depends on every x_j (through the variance)": r * (eye - 1 / C),
        "only the diagonal r * delta_ij: mu and rstd were treated as constants": r * eye,
        "a sign error in the term from rstd: r decreases when the variance grows": r * (eye - 1 / C + outer / C),
        "the leading factor r (rstd) is missing": eye - 1 / C - outer / C,
        "the term from rstd lacks its 1/C (dvar/dx_j = 2 (x_j - mu) / C)": r * (eye - 1 / C - outer),
        "the term from rstd uses (x_i - mu)(x_j - mu) where n_i n_j belongs: drstd/dx_j = -r^3 (x_j - mu) / C, "
        "one more factor r than (x_j - mu) * r":
            r * (eye - 1 / C - np.outer(x - mu, x - mu) / C),
    }, hint="n_i = (x_i - mu) * r. Product rule: d(x_i - mu)/dx_j * r + (x_i - mu) * dr/dx_j; the first part gives "
            "delta_ij and a term from mu, the second needs dr/dx_j through the variance. Rows i, columns j.")
    passed(ex, f"the {C} x {C} Jacobian of the normalisation matches finite differences")


def check_layernorm_backward(fn) -> None:
    """Exercise 3.2: fn(dout, inp, weight, mean, rstd) -> (dinp, dweight, dbias), compared in float64."""
    ex = "Exercise 3.2"
    gen = rng()
    B, T, C = 2, 5, 11
    inp, weight, bias = _inputs(gen, B, T, C, np.float64)
    _, mean, rstd = layernorm_forward(inp, weight, bias)
    dout = gen.standard_normal((B, T, C))
    result = run_exercise(ex, fn, dout.copy(), inp.copy(), weight.copy(), mean.copy(), rstd.copy())
    if not isinstance(result, tuple) or len(result) != 3:
        raise ExerciseFailed(f"{ex}: return the triple (dinp, dweight, dbias), got {type(result).__name__}"
                             + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""))
    dinp, dweight, dbias = result
    want_dinp, want_dweight, want_dbias = layernorm_backward(dout, inp, weight, mean, rstd)

    r = rstd[..., None]
    norm = (inp - mean[..., None]) * r
    dnorm = dout * weight
    m1 = dnorm.mean(-1, keepdims=True)
    m2 = (dnorm * norm).mean(-1, keepdims=True)
    u1 = dout.mean(-1, keepdims=True)
    u2 = (dout * norm).mean(-1, keepdims=True)
    assert_close(ex, "dinp", dinp, want_dinp, atol=1e-9, rtol=1e-7, known_mistakes={
        "the term - mean(dnorm) is missing (it comes from mean depending on every x_c)": r * (dnorm - norm * m2),
        "the term - norm * mean(dnorm * norm) is missing (it comes from rstd depending on every x_c)":
            r * (dnorm - m1),
        "dout was used where dnorm = dout * weight belongs (weight multiplies norm in the forward pass)":
            r * (dout - u1 - norm * u2),
        "a sign error: the norm * mean(dnorm * norm) term must be subtracted": r * (dnorm - m1 + norm * m2),
        "a sign error: mean(dnorm) must be subtracted": r * (dnorm + m1 - norm * m2),
        "the leading factor rstd is missing": dnorm - m1 - norm * m2,
        "a sum over the channels where the mean belongs: both terms average over the C channels of the row "
        "(the forward pass's mean and variance are means)": r * (dnorm - C * m1 - norm * C * m2),
        "a sum over the channels where mean(dnorm) belongs (the forward pass's mean is a mean over C channels)":
            r * (dnorm - C * m1 - norm * m2),
        "a sum over the channels where mean(dnorm * norm) belongs (the forward pass's variance is a mean over C "
        "channels)": r * (dnorm - m1 - norm * C * m2),
    }, hint="dinp has three terms inside rstd * (...): dnorm = dout * weight itself, one from mean depending on every "
            "x_c, one from rstd depending on every x_c; each is an average over the C channels of the row (your "
            "derivation above).")
    assert_close(ex, "dweight", dweight, want_dweight, atol=1e-9, rtol=1e-7, known_mistakes={
        "dweight used inp where norm = (inp - mean) * rstd belongs": (dout * inp).sum(axis=(0, 1)),
        "dweight was averaged over (b, t) instead of summed": (dout * norm).mean(axis=(0, 1)),
    }, hint="out = norm * weight + bias, so dweight[c] = sum over every (b, t) of dout[b, t, c] * norm[b, t, c] (axes 0 and 1).")
    assert_close(ex, "dbias", dbias, want_dbias, atol=1e-9, rtol=1e-7, known_mistakes={
        "dbias was averaged over (b, t) instead of summed": dout.mean(axis=(0, 1)),
    }, hint="dbias[c] = sum over every (b, t) of dout[b, t, c] (sum over axes 0 and 1).")
    passed(ex, "dinp, dweight and dbias match the reference")


def check_layernorm_forward_kernel2(source: str) -> None:
    """Exercise 3.3: the warp reductions of layernorm_forward_kernel2 in `source`, at awkward sizes."""
    ex = "Exercise 3.3"
    kernel = exercise_kernel(ex, source, "layernorm_forward_kernel2")
    gen = rng()
    B, T, C = 3, 5, 77                        # 15 rows; C = 77 is 2 full passes of 32 lanes plus 13
    N = B * T
    inp, weight, bias = _inputs(gen, B, T, C, np.float32)
    want_out, want_mean, want_rstd = layernorm_forward(inp, weight, bias)
    x = inp.astype(np.float64)
    lane0_mean = x[..., 0::32].sum(-1) / C                       # lane 0's partial sum, never reduced
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1)
    lane0_var = ((x - mu)[..., 0::32] ** 2).sum(-1) / C
    d_inp, d_w, d_b = (device.to_device(a) for a in (inp, weight, bias))
    for block_size in (64, 96):               # 2 and 3 rows per block; 15 rows fill neither evenly
        out, mean, rstd = poisoned((B, T, C)), poisoned((B, T)), poisoned((B, T))
        grid = (-(-N // (block_size // 32)),)
        kernel(grid, (block_size,), (out, mean, rstd, d_inp, d_w, d_b, np.int32(N), np.int32(C), np.float32(1e-5)))
        at = f"{ex} at block_size={block_size}"
        assert_close(at, "mean", mean, want_mean, atol=1e-5, rtol=1e-5, known_mistakes={
            "the lanes' partial sums were never combined: call warpReduceSum(sum) after the strided loop":
                lane0_mean,
        }, hint="lane l adds x[l], x[l+32], x[l+64], ... (c < C); warpReduceSum then gives every lane the row total; "
                "mean = total / C.")
        assert_close(at, "rstd", rstd, want_rstd, atol=1e-5, rtol=1e-4, known_mistakes={
            "the variance divides by C - 1; LayerNorm uses the biased variance (divide by C)":
                1 / np.sqrt(var * C / (C - 1) + 1e-5),
            "the squares were taken of x, not of x - mean": 1 / np.sqrt((x ** 2).mean(-1) + 1e-5),
            "the lanes' partial sums of squares were never combined: call warpReduceSum(sumsq)":
                1 / np.sqrt(lane0_var + 1e-5),
        }, hint="sumsq adds (x[c] - m)^2 over the lane's channels; after warpReduceSum, rstd = rsqrtf(sumsq / C + eps).")
        assert_close(at, "out", out, want_out, atol=1e-5, rtol=1e-4,
                     hint="out is written by the code after your reductions; if mean and rstd are right but out is "
                          "wrong, check that every lane (not only lane 0) holds the reduced values.")
    # The memory behaviour: the 32 lanes of a warp read 32 neighbouring floats of the row at a time.
    launch_args = (poisoned((B, T, C)), poisoned((B, T)), poisoned((B, T)), d_inp, d_w, d_b, np.int32(N), np.int32(C),
                   np.float32(1e-5))
    grid = (-(-N // 2),)
    reference = trace_of(lambda: load_kernel("layernorm.cu", "layernorm_forward_kernel2")(grid, (64,), launch_args))
    if reference is not None:                 # the student's last, so that trace.last is theirs
        got = trace_of(lambda: kernel(grid, (64,), launch_args))
        assert_coalesced(ex, got, reference, ("inp",),
                         hint="In each pass of the strided loop lane l reads channel l + 32 i, so the warp reads 32 "
                              "neighbouring floats at once; a lane that walks a block of channels of its own makes "
                              "every load of the warp touch floats far apart.")
    passed(ex, f"{N} rows of C={C} at block sizes 64 and 96: mean, rstd and out all match, loads coalesced")


# ---------------------------------------------------------------------------------------------------------
# Exercises 3.4 to 3.9 (optional): the backward one intermediate at a time

LAYERNORM_STEPS = ("dnorm", "drstd", "dvar", "dxmu", "dmean", "dinp")
"""The optional step-by-step exercises in order: Exercise 3.4 asks for dnorm, ..., Exercise 3.9 for dinp."""


def check_layernorm_step(step: str, fn) -> None:
    """Exercises 3.4 to 3.9 (optional): fn gives the gradient of one intermediate of the forward pass written out,

        mean = inp.mean(-1, keepdims=True); xmu = inp - mean; var = (xmu ** 2).mean(-1, keepdims=True)
        rstd = (var + eps) ** -0.5; norm = xmu * rstd; out = norm * weight + bias

    using the gradients after it. It gets the right values of those, so that one step's mistake does not spill into
    the next, and is compared with central differences (float64) of the loss as a function of that intermediate."""
    if step not in LAYERNORM_STEPS:
        raise ValueError(f"step must be one of {LAYERNORM_STEPS}, got {step!r}")
    ex = f"Exercise 3.{4 + LAYERNORM_STEPS.index(step)}"
    gen = rng()
    B, T, C, eps = 2, 3, int(gen.integers(5, 12)), 1e-5
    inp, weight, bias = _inputs(gen, B, T, C, np.float64)
    dout = gen.standard_normal((B, T, C))
    mean = inp.mean(-1, keepdims=True)
    xmu = inp - mean
    var = (xmu ** 2).mean(-1, keepdims=True)
    rstd = (var + eps) ** -0.5
    norm = xmu * rstd

    def loss_norm(n):       # the loss from each intermediate on: what the finite differences nudge
        return float((dout * (n * weight + bias)).sum())

    def loss_xmu(d):        # xmu reaches the loss twice: in norm, and in var
        return loss_norm(d * ((d ** 2).mean(-1, keepdims=True) + eps) ** -0.5)

    dnorm = dout * weight
    drstd = (dnorm * xmu).sum(-1, keepdims=True)
    dvar = -0.5 * drstd * (var + eps) ** -1.5
    dxmu = dnorm * rstd + dvar * 2 * xmu / C
    dmean = -dxmu.sum(-1, keepdims=True)
    row = "(B, T, 1): one number per row, shared by its C channels, so its gradient sums over them (axis -1)"
    steps = {
        "dnorm": ((dout, weight), loss_norm, norm, {
            "dout alone: out = norm * weight + bias, so each dnorm carries its channel's weight": dout},
            "out = norm * weight + bias; dnorm has the shape of norm, (B, T, C)."),
        "drstd": ((dnorm, xmu), lambda r: loss_norm(xmu * r), rstd, {
            "norm where xmu belongs: norm = xmu * rstd, so d norm / d rstd = xmu": (dnorm * norm).sum(-1, keepdims=True),
        }, f"norm = xmu * rstd; rstd is {row}."),
        "dvar": ((drstd, var, eps), lambda v: loss_norm(xmu * (v + eps) ** -0.5), var, {
            "the power is -1/2; the derivative of (var + eps)^(-1/2) is -1/2 (var + eps)^(-3/2)":
                -0.5 * drstd * (var + eps) ** -0.5,
        }, "rstd = (var + eps)^(-1/2): the power rule."),
        "dxmu": ((dnorm, rstd, dvar, xmu), loss_xmu, xmu, {
            "the path through var is missing: xmu reaches the loss through norm and through var": dnorm * rstd,
            "the path through norm is missing: xmu reaches the loss through norm and through var":
                dvar * 2 * xmu / C,
            "the 1/C of var's mean is missing (var = mean over C of xmu^2)": dnorm * rstd + dvar * 2 * xmu,
            "the factor 2 of d(xmu^2)/dxmu is missing": dnorm * rstd + dvar * xmu / C,
        }, "xmu is used twice, in norm = xmu * rstd and in var = mean(xmu^2): add the two paths."),
        "dmean": ((dxmu,), lambda m: loss_xmu(inp - m), mean, {
            "the sign: xmu = inp - mean, so d xmu / d mean = -1": dxmu.sum(-1, keepdims=True),
        }, f"xmu = inp - mean; mean is {row}."),
        "dinp": ((dxmu, dmean), lambda v: loss_xmu(v - v.mean(-1, keepdims=True)), inp, {
            "the path through mean is missing: inp reaches the loss through xmu and through mean": dxmu,
            "the 1/C of the mean is missing (d mean / d inp_c = 1/C)": dxmu + dmean,
            "the sign of the path through mean: dmean already carries the minus of xmu = inp - mean":
                dxmu - dmean / C,
        }, "inp is used twice, in xmu = inp - mean and in mean = inp.mean(-1): add the two paths."),
    }
    args, loss, at, mistakes, hint = steps[step]
    got = run_exercise(ex, fn, *(a.copy() if isinstance(a, np.ndarray) else a for a in args))
    assert_close(ex, step, got, numerical_jacobian(loss, at), atol=1e-7, rtol=1e-6, known_mistakes=mistakes,
                 hint=hint)
    passed(ex, f"{step} matches finite differences of the loss through {step[1:]}")
