"""Checks for lesson 09 (AdamW): the NumPy update (Exercise 9.1) and the update kernel (Exercise 9.2)."""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.checks import ExerciseFailed, assert_close, exercise_kernel, passed, rng, run_exercise
from llmc_lessons.layers.adamw import adamw_update


def _variant(param, grad, m, v, t, lr, beta1, beta2, eps, wd, *, bias_correction=True, l2=False,
             eps_inside=False, store_corrected=False, grad_scale=1.0, wd_after=False, swap_moments=False):
    """A (possibly wrong) AdamW step in float64: the flags switch on one known mistake each."""
    g = grad * grad_scale
    if l2:
        g = g + wd * param                       # L2 regularisation: the decay goes through Adam's scaling
    mb1, mb2 = (beta2, beta1) if swap_moments else (beta1, beta2)   # betas swapped in the moments only
    m = mb1 * m + (1 - mb1) * g
    v = mb2 * v + (1 - mb2) * g * g
    m_hat = m / (1 - beta1 ** t) if bias_correction else m
    v_hat = v / (1 - beta2 ** t) if bias_correction else v
    denom = np.sqrt(v_hat + eps) if eps_inside else np.sqrt(v_hat) + eps
    step = m_hat / denom
    if l2:
        new = param - lr * step
    elif wd_after:
        new = param - lr * step
        new = new - lr * wd * new
    else:
        new = param - lr * (step + wd * param)
    if store_corrected:
        m, v = m_hat, v_hat
    return new, m, v


def _mistakes(param, grad, m, v, t, lr, beta1, beta2, eps, wd, grad_scale=1.0) -> dict[str, tuple]:
    """{mistake: (param, m, v) that it produces}."""
    a = (param, grad, m, v, t, lr)
    return {
        "the bias correction is missing: m and v are used as stored (see 'Why the bias correction')":
            _variant(*a, beta1, beta2, eps, wd, bias_correction=False, grad_scale=grad_scale),
        "the weight decay was added to the gradient (L2 regularisation, Adam's way): AdamW decouples it from "
        "Adam's rescaling (see 'Decoupled weight decay')":
            _variant(*a, beta1, beta2, eps, wd, l2=True, grad_scale=grad_scale),
        "eps is inside the square root: it guards the division, after the square root is taken":
            _variant(*a, beta1, beta2, eps, wd, eps_inside=True, grad_scale=grad_scale),
        "beta1 and beta2 are swapped: beta1 belongs to m (the gradient), beta2 to v (the squared gradient)":
            _variant(*a, beta2, beta1, eps, wd, grad_scale=grad_scale),
        "beta1 and beta2 are swapped in the running averages, though the corrections use them right":
            _variant(*a, beta1, beta2, eps, wd, swap_moments=True, grad_scale=grad_scale),
        "the bias-corrected m_hat and v_hat were stored as m and v: store the raw running averages; the "
        "correction is applied afresh at every step":
            _variant(*a, beta1, beta2, eps, wd, store_corrected=True, grad_scale=grad_scale),
        "the weight decay used the already-updated parameter: decay the parameter as it was before this step":
            _variant(*a, beta1, beta2, eps, wd, wd_after=True, grad_scale=grad_scale),
        "grad_scale (the clip factor) was not applied to the gradient":
            _variant(*a, beta1, beta2, eps, wd),
    }


def _compare(ex, where, got, expected, mistakes, atol, rtol, hint):
    for k, name in enumerate(("param", "m", "v")):
        assert_close(ex, f"{name} ({where})", got[k], expected[k], atol=atol, rtol=rtol,
                     known_mistakes={why: arrays[k] for why, arrays in mistakes.items()
                                     if not np.allclose(arrays[k], expected[k], atol=atol, rtol=rtol)},
                     hint=hint)


def check_adamw_update(adamw_fn) -> None:
    """Exercise 9.1: adamw_fn(param, grad, m, v, t, lr, beta1, beta2, eps, weight_decay) -> (param, m, v)."""
    ex = "Exercise 9.1"
    gen = rng()
    shape = (int(gen.integers(3, 8)), int(gen.integers(5, 14)))
    hint = ("go through section 1's formulas in order: the two moments (which beta goes with g, which with g^2), "
            "their corrections (which power of which beta), then the step: where eps sits relative to the square "
            "root, and which parameter value the weight decay multiplies")
    # eps large enough that where it sits matters; grads of mixed scales; several steps t
    hyper = [dict(lr=0.05, beta1=0.8, beta2=0.97, eps=1e-2, weight_decay=0.2), dict(lr=1e-2, beta1=0.9, beta2=0.95,
                                                                                   eps=1e-3, weight_decay=0.1)]
    for t in (1, 2, 7):
        for h in hyper:
            param = gen.standard_normal(shape)
            grad = gen.standard_normal(shape) * np.exp(gen.uniform(-4, 1, size=shape))
            m = 0.0 * param if t == 1 else gen.standard_normal(shape) * 0.1
            v = 0.0 * param if t == 1 else gen.uniform(0, 0.05, size=shape)
            inputs = [param.copy(), grad.copy(), m.copy(), v.copy()]
            got = run_exercise(ex, adamw_fn, *inputs, t, h["lr"], h["beta1"], h["beta2"], h["eps"],
                               h["weight_decay"])
            if not isinstance(got, tuple) or len(got) != 3:
                raise ExerciseFailed(f"{ex}: return the tuple (param, m, v) of new arrays, got {type(got).__name__}"
                                     + (f" of length {len(got)}" if isinstance(got, tuple) else ""))
            if not all(np.array_equal(a, b) for a, b in zip(inputs, (param, grad, m, v))):
                raise ExerciseFailed(f"{ex}: your function changed its input arrays in place. Return new arrays "
                                     f"(write m = beta1 * m + ..., not m *= ...), as the reference does.")
            where = f"t={t}, " + ", ".join(f"{k}={val:g}" for k, val in h.items())
            expected = adamw_update(param, grad, m, v, t, **h)
            _compare(ex, where, got, expected, _mistakes(param, grad, m, v, t, h["lr"], h["beta1"], h["beta2"],
                                                         h["eps"], h["weight_decay"]),
                     atol=1e-12, rtol=1e-9, hint=hint)
    # the defaults: beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0
    param, grad = gen.standard_normal(shape), gen.standard_normal(shape)
    m, v = gen.standard_normal(shape) * 0.1, gen.uniform(0, 0.05, size=shape)
    try:
        got = run_exercise(ex, adamw_fn, param.copy(), grad.copy(), m.copy(), v.copy(), 3, 0.01)
    except ExerciseFailed as e:
        if not isinstance(e.__cause__, TypeError):
            raise
        raise ExerciseFailed(f"{ex}: calling adamw_update(param, grad, m, v, t, lr) with the default "
                             f"hyperparameters failed ({e.__cause__}). Keep the defaults beta1=0.9, beta2=0.95, eps=1e-8, "
                             f"weight_decay=0.0 in the signature.") from None
    _compare(ex, "t=3, lr=0.01, the default beta1, beta2, eps, weight_decay", got,
             adamw_update(param, grad, m, v, 3, 0.01), {}, atol=1e-12, rtol=1e-9,
             hint="the defaults are beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0")
    passed(ex, "param, m and v match the reference at t = 1, 2, 7, with and without the defaults")


def check_adamw_kernel(source: str, block_sizes=(128, 96)) -> None:
    """Exercise 9.2: adamw_kernel(params, grads, m, v, N, lr, beta1, beta2, beta1_correction, beta2_correction,
    eps, weight_decay, grad_scale) in `source`, against the reference, at an awkward N and two block sizes."""
    ex = "Exercise 9.2"
    kernel = exercise_kernel(ex, source, "adamw_kernel")
    gen = rng()
    hint = ("Exercise 9.1's update, one element per thread: which element does a thread own, which threads of "
            "the last block must do nothing, where does grad_scale enter, and which values go back to memory "
            "(m and v as running averages, uncorrected)?")
    for block_size in block_sizes:
        N = int(gen.integers(3, 9)) * block_size + int(gen.integers(1, block_size))   # not a multiple
        t = int(gen.integers(2, 6))
        lr, beta1, beta2, eps, wd, grad_scale = 0.01, 0.9, 0.95, 1e-3, 0.1, 0.7
        param = gen.standard_normal(N).astype(np.float32)
        grad = (gen.standard_normal(N) * np.exp(gen.uniform(-4, 1, size=N))).astype(np.float32)
        m = (gen.standard_normal(N) * 0.1).astype(np.float32)
        v = gen.uniform(0, 0.05, size=N).astype(np.float32)
        # The update is in place, so there is no fresh output to fill with NaN. Instead each array is the front
        # of a longer one: grads is NaN past N, so a thread without the bounds check (i < N) turns the tail of
        # params, m and v to NaN, and we look there.
        guard = block_size
        bufs = [device.to_device(np.concatenate([a, np.full(guard, 1.0, np.float32)])) for a in (param, m, v)]
        g_buf = device.to_device(np.concatenate([grad, np.full(guard, np.nan, np.float32)]))
        args = (bufs[0][:N], g_buf[:N], bufs[1][:N], bufs[2][:N], np.int32(N), np.float32(lr), np.float32(beta1),
                np.float32(beta2), np.float32(1 - beta1 ** t), np.float32(1 - beta2 ** t), np.float32(eps),
                np.float32(wd), np.float32(grad_scale))
        kernel(((N + block_size - 1) // block_size,), (block_size,), args)
        device.synchronize()
        got = [device.to_host(b) for b in bufs]
        where = f"N={N}, block_size={block_size}, t={t}"
        if np.array_equal(got[0][:N], param) and np.array_equal(got[1][:N], m) and np.array_equal(got[2][:N], v):
            raise ExerciseFailed(f"{ex} ({where}): params, m and v are unchanged: the kernel wrote nothing. Each "
                                 f"thread must store its new m[i], v[i] and params[i].")
        p64, g64, m64, v64 = (a.astype(np.float64) for a in (param, grad, m, v))
        expected = adamw_update(p64, g64 * grad_scale, m64, v64, t, lr, beta1, beta2, eps, wd)
        unchanged = {"this array was never written (the kernel stores nothing into it)": None}
        for k, name in enumerate(("params", "m", "v")):
            mist = {why: arrays[k] for why, arrays in _mistakes(p64, g64, m64, v64, t, lr, beta1, beta2, eps, wd,
                                                                 grad_scale).items()}
            mist[next(iter(unchanged))] = (p64, m64, v64)[k]
            assert_close(ex, f"{name} ({where})", got[k][:N], expected[k], atol=2e-6, rtol=2e-5,
                         known_mistakes={w: a for w, a in mist.items()
                                         if not np.allclose(a, expected[k], atol=2e-6, rtol=2e-5)}, hint=hint)
            if not np.all(got[k][N:] == 1.0):
                raise ExerciseFailed(f"{ex} ({where}): the kernel changed {name} past its end (element N = {N} or "
                                     f"later). The last block has threads with i >= N; guard the body with "
                                     f"`if (i < N)`.")
    passed(ex, f"block sizes {tuple(block_sizes)}, awkward N, nothing written past N")
