"""Lesson 08, softmax + cross-entropy: references, gradient check, every kernel, bad input, exercise checks."""
from __future__ import annotations

import math

import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.checks import crossentropy as checks
from llmc_lessons.checks import poisoned
from llmc_lessons.cuda import kernel_source, load_kernel
from llmc_lessons.device import to_device, to_host
from llmc_lessons.gradcheck import gradcheck
from llmc_lessons.layers.crossentropy import (crossentropy_forward, crossentropy_forward_cuda,
                                              crossentropy_softmax_backward, crossentropy_softmax_backward_cuda,
                                              fused_classifier_cuda, softmax_forward, softmax_forward_cuda)


def _inputs(seed, B=2, T=3, V=37, Vp=45, scale=3.0, dtype=np.float64):
    gen = np.random.default_rng(seed)
    logits = (gen.standard_normal((B, T, Vp)) * scale).astype(dtype)
    targets = gen.integers(0, V, size=(B, T)).astype(np.int32)
    targets[0, 0], targets[-1, -1] = 0, V - 1
    return logits, targets


# ---------------------------------------------------------------------------------------------------------
# NumPy reference


def test_softmax_matches_scalar_loops_and_pads_with_zero():
    logits, _ = _inputs(0)
    V = 37
    probs = softmax_forward(logits, V)
    for b in range(2):
        for t in range(3):
            row = [math.exp(x) for x in logits[b, t, :V]]
            s = sum(row)
            np.testing.assert_allclose(probs[b, t, :V], [r / s for r in row], rtol=1e-12)
    assert np.all(probs[..., V:] == 0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-12)


def test_softmax_is_stable_for_huge_logits_and_ignores_padding():
    logits = np.array([[[1000.0, 999.0, 998.0, np.nan, np.inf]]])  # padding may hold anything
    with np.errstate(all="raise"):
        probs = softmax_forward(logits, 3)
    e = np.exp([0.0, -1.0, -2.0])
    np.testing.assert_allclose(probs[0, 0, :3], e / e.sum(), rtol=1e-12)
    assert np.all(probs[0, 0, 3:] == 0)


def test_crossentropy_forward_is_minus_log_prob_at_target():
    logits, targets = _inputs(1)
    probs = softmax_forward(logits, 37)
    losses = crossentropy_forward(probs, targets)
    for b in range(2):
        for t in range(3):
            assert losses[b, t] == pytest.approx(-math.log(probs[b, t, targets[b, t]]), rel=1e-12)
    # uniform logits: the loss is log(V) everywhere
    assert np.allclose(crossentropy_forward(softmax_forward(np.zeros((1, 2, 8)), 5), np.array([[0, 4]])),
                       math.log(5))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_references_preserve_dtype(dtype):
    logits, targets = _inputs(2, dtype=dtype)
    probs = softmax_forward(logits, 37)
    losses = crossentropy_forward(probs, targets)
    dlogits = crossentropy_softmax_backward(np.full((2, 3), 1 / 6, dtype), probs, targets, 37)
    assert probs.dtype == losses.dtype == dlogits.dtype == dtype


def test_backward_rows_sum_to_zero_and_padding_is_zero_even_with_junk_probs():
    logits, targets = _inputs(3)
    probs = softmax_forward(logits, 37)
    probs[..., 37:] = 0.5                         # junk in the padding must not leak into dlogits
    dl = np.random.default_rng(3).uniform(0.1, 1, (2, 3))
    dlogits = crossentropy_softmax_backward(dl, probs, targets, 37)
    assert np.all(dlogits[..., 37:] == 0)
    np.testing.assert_allclose(dlogits.sum(-1), 0, atol=1e-14)  # sum of probs is 1, minus the one 1
    b, t = np.indices((2, 3))
    np.testing.assert_allclose(dlogits[b, t, targets], (probs[b, t, targets] - 1) * dl, rtol=1e-14)


def test_gradcheck_loss_wrt_logits_float64():
    B, T, V, Vp = 2, 3, 11, 16
    logits, targets = _inputs(4, B, T, V, Vp)

    def forward(logits):
        return crossentropy_forward(softmax_forward(logits, V), targets)

    def backward(dlosses, logits):
        return {"logits": crossentropy_softmax_backward(dlosses, softmax_forward(logits, V), targets, V)}

    report = gradcheck(forward, backward, {"logits": logits}, title="cross-entropy(softmax(logits))")
    report.assert_ok()
    assert report.rows[0].rel < 1e-7
    # the padded columns: the numeric gradient is 0 (the loss never reads them) and the analytic one exactly 0
    dl = np.random.default_rng(0).standard_normal((B, T))
    assert np.all(backward(dl, logits)["logits"][..., V:] == 0)


def test_gradcheck_catches_a_wrong_backward():
    V = 7
    logits, targets = _inputs(5, 2, 2, V, 9)

    def forward(logits):
        return crossentropy_forward(softmax_forward(logits, V), targets)

    def wrong(dlosses, logits):
        return {"logits": softmax_forward(logits, V) * dlosses[..., None]}  # forgot the one-hot

    assert not gradcheck(forward, wrong, {"logits": logits}).passed


@pytest.mark.parametrize("bad, err", [
    (dict(targets=np.zeros((2, 3), np.float32)), TypeError),
    (dict(targets=np.zeros((3, 2), np.int32)), ValueError),
    (dict(targets=np.full((2, 3), 37, np.int32)), ValueError),
    (dict(targets=np.full((2, 3), -1, np.int32)), ValueError),
    (dict(V=46), ValueError), (dict(V=0), ValueError), (dict(V=37.0), ValueError),
    (dict(dlosses=np.ones((2, 3, 1))), ValueError),
])
def test_reference_backward_rejects_bad_input(bad, err):
    logits, targets = _inputs(6)
    args = dict(dlosses=np.ones((2, 3)), probs=softmax_forward(logits, 37), targets=targets, V=37)
    args.update(bad)
    with pytest.raises(err):
        crossentropy_softmax_backward(**args)


# ---------------------------------------------------------------------------------------------------------
# Kernels


SIZES = [(2, 3, 100, 131), (1, 5, 37, 45), (3, 2, 257, 300)]   # (B, T, V, Vp): V, Vp not multiples of a block


@pytest.mark.parametrize("B, T, V, Vp", SIZES)
@pytest.mark.parametrize("block_size", [32, 96, 256])
def test_softmax_kernel_matches_reference_with_poisoned_output_and_nan_padding(B, T, V, Vp, block_size):
    logits, _ = _inputs(7 + V + block_size, B, T, V, Vp, scale=5.0, dtype=np.float32)
    logits[0, 0, 0] = 90.0                       # exp(90) overflows float32 unless the max is subtracted
    logits[..., V:] = np.nan                     # padding must never be read into the max or the sum
    probs = poisoned((B, T, Vp))
    load_kernel("crossentropy.cu", "softmax_forward_kernel")(
        (B * T,), (block_size,), (probs, to_device(logits), np.int32(B * T), np.int32(V), np.int32(Vp)))
    expected = softmax_forward(logits.astype(np.float64), V)
    got = to_host(probs)
    np.testing.assert_allclose(got, expected, atol=1e-7, rtol=1e-5)
    assert np.all(got[..., V:] == 0)
    # and through the launcher
    clean = np.nan_to_num(logits, nan=1.0)
    np.testing.assert_allclose(to_host(softmax_forward_cuda(to_device(clean), V, block_size=block_size)),
                               softmax_forward(clean.astype(np.float64), V), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("block_size", [1, 32, 100])
def test_crossentropy_forward_kernel_matches_reference_with_poisoned_output(block_size):
    B, T, V, Vp = 3, 7, 50, 64
    logits, targets = _inputs(8, B, T, V, Vp)
    probs = softmax_forward(logits, V).astype(np.float32)
    losses = poisoned((B, T))
    load_kernel("crossentropy.cu", "crossentropy_forward_kernel")(
        (-(-B * T // block_size),), (block_size,),
        (losses, to_device(probs), to_device(targets), np.int32(B * T), np.int32(Vp)))
    np.testing.assert_allclose(to_host(losses), crossentropy_forward(probs.astype(np.float64), targets), rtol=1e-6)
    np.testing.assert_allclose(to_host(crossentropy_forward_cuda(to_device(probs), to_device(targets),
                                                                 block_size=block_size)),
                               crossentropy_forward(probs.astype(np.float64), targets), rtol=1e-6)


@pytest.mark.parametrize("B, T, V, Vp", SIZES)
@pytest.mark.parametrize("block_size", [32, 160])
def test_backward_kernel_matches_reference_with_poisoned_output(B, T, V, Vp, block_size):
    logits, targets = _inputs(9, B, T, V, Vp)
    probs = softmax_forward(logits, V).astype(np.float32)
    probs[..., V:] = 0.5                                   # junk padding: dlogits there must still be 0
    dl = np.random.default_rng(9).uniform(0.1, 2, (B, T)).astype(np.float32)
    dlogits = poisoned((B, T, Vp))
    load_kernel("crossentropy.cu", "crossentropy_softmax_backward_kernel")(
        (B * T,), (block_size,), (dlogits, to_device(dl), to_device(probs), to_device(targets), np.int32(B * T),
                                  np.int32(V), np.int32(Vp)))
    expected = crossentropy_softmax_backward(dl.astype(np.float64), probs.astype(np.float64), targets, V)
    np.testing.assert_allclose(to_host(dlogits), expected, atol=1e-7, rtol=1e-5)
    got = crossentropy_softmax_backward_cuda(to_device(dl), to_device(probs), to_device(targets), V,
                                             block_size=block_size)
    np.testing.assert_allclose(to_host(got), expected, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("B, T, V, Vp, version", [s + (1,) for s in SIZES] + [(2, 3, 100, 132, 2), (1, 5, 37, 44, 2),
                                                                             (3, 2, 257, 300, 2), (2, 2, 257, 300, None)])
@pytest.mark.parametrize("block_size", [32, 96, 512])
def test_fused_classifier_matches_unfused_reference_in_place(B, T, V, Vp, version, block_size, poisoned_allocations):
    logits, targets = _inputs(10 + block_size, B, T, V, Vp, scale=5.0, dtype=np.float32)
    logits[-1, -1, 3] = 95.0                                 # overflow without the max
    logits[..., V:] = np.nan                                 # padding: never read into the max, sum or loss
    ref_probs = softmax_forward(logits.astype(np.float64), V)
    ref_losses = crossentropy_forward(ref_probs, targets)
    ref_dlogits = crossentropy_softmax_backward(np.full((B, T), 1 / (B * T)), ref_probs, targets, V)
    buf = to_device(logits)
    losses, dlogits = fused_classifier_cuda(buf, to_device(targets), V, block_size=block_size, version=version)
    assert dlogits is buf                                    # in place, as documented
    np.testing.assert_allclose(to_host(losses), ref_losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_host(dlogits), ref_dlogits, atol=1e-8, rtol=1e-4)
    assert np.all(to_host(dlogits)[..., V:] == 0)


def test_fused_classifier_custom_dloss_and_poisoned_losses():
    B, T, V, Vp = 2, 3, 70, 80
    logits, targets = _inputs(11, B, T, V, Vp, dtype=np.float32)
    ref_probs = softmax_forward(logits.astype(np.float64), V)
    losses = poisoned((B, T))
    buf = to_device(logits)
    load_kernel("crossentropy.cu", "fused_classifier_kernel")(
        (B * T,), (64,), (buf, losses, to_device(targets), np.float32(0.37), np.int32(B * T), np.int32(V),
                          np.int32(Vp)))
    np.testing.assert_allclose(to_host(losses), crossentropy_forward(ref_probs, targets), rtol=1e-5)
    np.testing.assert_allclose(to_host(buf), crossentropy_softmax_backward(np.full((B, T), 0.37), ref_probs,
                                                                           targets, V), atol=1e-7, rtol=1e-4)
    _, d2 = fused_classifier_cuda(to_device(logits), to_device(targets), V, dloss=0.37)
    np.testing.assert_allclose(to_host(d2), to_host(buf), rtol=1e-6, atol=1e-9)


def _ok_args():
    logits, targets = _inputs(12, dtype=np.float32)
    return to_device(logits), to_device(targets)


@pytest.mark.parametrize("launcher", ["softmax", "fused", "backward"])
@pytest.mark.parametrize("mutate, err", [
    (lambda a: a.astype(np.float64), TypeError),
    (lambda a: a[:, :, ::2], ValueError),
    (lambda a: a[0], ValueError),
    (lambda a: to_host(a).tolist(), TypeError),
])
def test_launchers_reject_bad_logits(launcher, mutate, err):
    logits, targets = _ok_args()
    bad = mutate(logits)
    with pytest.raises(err):
        if launcher == "softmax":
            softmax_forward_cuda(bad, 37)
        elif launcher == "fused":
            fused_classifier_cuda(bad, targets, 37)
        else:
            crossentropy_softmax_backward_cuda(device.xp.ones((2, 3), dtype=np.float32), bad, targets, 37)


@pytest.mark.parametrize("kwargs, err", [
    (dict(targets=lambda t: t.astype(np.int64)), TypeError),
    (dict(targets=lambda t: t.astype(np.float32)), TypeError),
    (dict(targets=lambda t: t[:, :2].copy()), ValueError),
    (dict(V=46), ValueError), (dict(V=0), ValueError),
    (dict(block_size=48), ValueError), (dict(block_size=2048), ValueError), (dict(block_size=64.0), TypeError),
    (dict(dloss="mean"), TypeError), (dict(dloss=float("nan")), TypeError),
    (dict(version=3), ValueError), (dict(version=2), ValueError),   # Vp = 45: no float4s
])
def test_fused_classifier_rejects_bad_arguments(kwargs, err):
    logits, targets = _ok_args()
    args = dict(logits=logits, targets=targets, V=37)
    for k, val in kwargs.items():
        args[k] = val(targets) if k == "targets" else val
    with pytest.raises(err):
        fused_classifier_cuda(**args)


def test_crossentropy_forward_cuda_rejects_bad_targets_and_numpy_on_gpu():
    logits, targets = _ok_args()
    probs = softmax_forward_cuda(logits, 37)
    with pytest.raises(TypeError):
        crossentropy_forward_cuda(probs, targets.astype(np.int64))
    with pytest.raises(ValueError):
        crossentropy_forward_cuda(probs, targets.reshape(3, 2))
    if device.on_gpu():
        with pytest.raises(TypeError):
            softmax_forward_cuda(to_host(logits), 37)


# ---------------------------------------------------------------------------------------------------------
# Exercise checks: pass on the answer, fail on the stub and on plausible wrong answers, and say why


def test_check_8_2_passes_on_the_reference():
    checks.check_crossentropy_softmax_backward(crossentropy_softmax_backward)


def _real(probs, V):
    out = np.zeros_like(probs)
    out[..., :V] = probs[..., :V]
    return out


def _onehot(probs, targets):
    o = np.zeros_like(probs)
    b, t = np.indices(targets.shape)
    o[b, t, targets] = 1
    return o


def _stub(dlosses, probs, targets, V):
    raise NotImplementedError("Exercise 8.2: write crossentropy_softmax_backward")


def _in_place(dlosses, probs, targets, V):
    probs[..., V:] = 0
    b, t = np.indices(targets.shape)
    probs[b, t, targets] -= 1
    probs *= dlosses[..., None]
    return probs


WRONG_8_2 = {
    "not done yet": _stub,
    "one-hot was never subtracted": lambda dl, p, tg, V: _real(p, V) * dl[..., None],
    "not multiplied by dlosses": lambda dl, p, tg, V: _real(p, V) - _onehot(p, tg),
    "target + 1": lambda dl, p, tg, V: (_real(p, V) - _onehot(p, np.minimum(tg + 1, p.shape[-1] - 1))) * dl[..., None],
    "target - 1": lambda dl, p, tg, V: (_real(p, V) - _onehot(p, np.maximum(tg - 1, 0))) * dl[..., None],
    "sign error": lambda dl, p, tg, V: (_onehot(p, tg) - _real(p, V)) * dl[..., None],
    "exactly 0": lambda dl, p, tg, V: (p - _onehot(p, tg)) * dl[..., None],
    "1/(B*T)": lambda dl, p, tg, V: (_real(p, V) - _onehot(p, tg)) / tg.size,
    "changed its inputs": _in_place,
    "forget to `return`": lambda dl, p, tg, V: None,
}


@pytest.mark.parametrize("why", list(WRONG_8_2))
def test_check_8_2_fails_on_wrong_answers_and_names_the_mistake(why):
    with pytest.raises(AssertionError) as info:
        checks.check_crossentropy_softmax_backward(WRONG_8_2[why])
    msg = str(info.value)
    assert "Exercise 8.2" in msg
    assert why in msg, msg


SOFTMAX_SRC = kernel_source("crossentropy.cu")
MAX_LOOP = "for (int i = threadIdx.x; i < V; i += blockDim.x) { thread_max = fmaxf(thread_max, x[i]); }"
SUM_LOOP = "for (int i = threadIdx.x; i < V; i += blockDim.x) { thread_sum += expf(x[i] - row_max); }"


def test_the_solution_loops_are_in_the_kernel_file():
    assert MAX_LOOP in SOFTMAX_SRC and SUM_LOOP in SOFTMAX_SRC


def test_check_8_3_passes_on_the_course_kernel():
    checks.check_softmax_forward_kernel(SOFTMAX_SRC)


WRONG_8_3 = {
    "not done yet": SOFTMAX_SRC.replace(MAX_LOOP, "// TODO (Exercise 8.3): the max").replace(SUM_LOOP, ""),
    "never computed": SOFTMAX_SRC.replace(MAX_LOOP, "").replace(SUM_LOOP, ""),                # stub as generated
    "entered the sum": SOFTMAX_SRC.replace(MAX_LOOP, MAX_LOOP.replace("i < V", "i < Vp"))
                                              .replace(SUM_LOOP, SUM_LOOP.replace("i < V", "i < Vp")),
    "sum (whether": SOFTMAX_SRC.replace(SUM_LOOP, SUM_LOOP.replace("i < V", "i < Vp")),
    "the row sum is missing": SOFTMAX_SRC.replace(SUM_LOOP, SUM_LOOP.replace("+= expf(x[i] - row_max)",
                                                                             "= 1.0f / blockDim.x")),
    "exp overflowed": SOFTMAX_SRC.replace(SUM_LOOP, SUM_LOOP.replace("x[i] - row_max", "x[i]"))
                      .replace("expf(x[i] - row_max) * inv_sum", "expf(x[i]) * inv_sum"),         # no max subtraction
    "wrong": SOFTMAX_SRC.replace(SUM_LOOP, SUM_LOOP.replace("i < V", "i < V - 1")),             # off by one
}


@pytest.mark.parametrize("why", list(WRONG_8_3))
def test_check_8_3_fails_on_wrong_kernels(why):
    src = WRONG_8_3[why]
    assert src != SOFTMAX_SRC
    with pytest.raises(AssertionError) as info:
        checks.check_softmax_forward_kernel(src)
    msg = str(info.value)
    assert "Exercise 8.3" in msg
    assert why in msg, msg


# ---------------------------------------------------------------------------------------------------------
# Targets out of range: an error, never a crash or a silently wrong loss (targets index a row of the logits)


@pytest.mark.parametrize("bad", [-1, 37, 44, 2**31 - 1, -2**31])
@pytest.mark.parametrize("launcher", ["fused", "backward"])
def test_launchers_range_check_targets_against_V(launcher, bad):
    logits, targets = _ok_args()
    host = to_host(targets).copy()
    host[1, 2] = bad
    dlosses = to_device(np.full((2, 3), 1 / 6, np.float32))
    call = {"fused": lambda t, **kw: fused_classifier_cuda(logits, t, 37, **kw),
            "backward": lambda t, **kw: crossentropy_softmax_backward_cuda(
                dlosses, softmax_forward_cuda(logits, 37), t, 37, **kw)}[launcher]
    for kw in ({}, {"check_targets": True}):   # None checks on the CPU backend; True on a GPU too
        if kw or not device.on_gpu():
            with pytest.raises(ValueError, match=rf"every target must be a token id in 0..36, got values in "
                                                 rf"{min(bad, 0)}..{max(bad, 36)}"):
                call(to_device(host), **kw)


@pytest.mark.parametrize("bad", [-1, 45, 2**31 - 1])
def test_crossentropy_forward_cuda_range_checks_targets_against_Vp(bad):
    logits, targets = _ok_args()
    probs = softmax_forward_cuda(logits, 37)
    host = to_host(targets).copy()
    host[0, 1] = bad
    with pytest.raises(ValueError, match=r"every target must be a token id in 0..44"):
        crossentropy_forward_cuda(probs, to_device(host), check_targets=True)
    host[0, 1] = 40   # a padded column: probability 0, loss inf, as crossentropy_forward gives
    losses = to_host(crossentropy_forward_cuda(probs, to_device(host)))
    with np.errstate(divide="ignore"):
        assert np.isinf(losses[0, 1]) and np.isinf(crossentropy_forward(to_host(probs), host)[0, 1])


def test_fused_classifier_leaves_the_logits_untouched_when_it_refuses_the_targets():
    logits, targets = _ok_args()
    before = to_host(logits).copy()
    host = to_host(targets).copy()
    host[0, 0] = 99
    with pytest.raises(ValueError):
        fused_classifier_cuda(logits, to_device(host), 37, check_targets=True)
    np.testing.assert_array_equal(to_host(logits), before)


def test_fuzz_the_argument_checks_of_the_classifier_launchers():
    """Random targets (dtype, shape, values, extremes included) and V: either an error naming the problem, or
    the reference's answer; never a crash, a hang or a silently wrong loss."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    logits, targets = _inputs(3, dtype=np.float32)      # (2, 3, 45), V = 37
    value = st.one_of(st.integers(0, 36), st.integers(-3, 48), st.sampled_from([-2**31, 2**31 - 1]))

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(dtype=st.sampled_from([np.int32, np.int32, np.int64, np.uint32, np.float32]),
           shape=st.sampled_from([(2, 3), (2, 3), (3, 2), (6,), (2, 3, 1)]),
           values=st.lists(value, min_size=6, max_size=6), V=st.sampled_from([37, 37, 45, 0, 46]),
           which=st.sampled_from(["fused", "backward", "forward"]))
    def run(dtype, shape, values, V, which):
        t = np.array(values, dtype=np.int64).astype(dtype).reshape(shape)
        hi = 45 if which == "forward" else V
        valid = (dtype is np.int32 and shape == (2, 3) and (which == "forward" or 1 <= V <= 45)
                 and min(values) >= 0 and max(values) < hi)
        d_logits = to_device(logits.copy())
        try:
            if which == "fused":
                losses, _ = fused_classifier_cuda(d_logits, to_device(t), V, check_targets=True)
            elif which == "backward":
                dl = crossentropy_softmax_backward_cuda(to_device(np.full((2, 3), 1 / 6, np.float32)),
                                                        softmax_forward_cuda(d_logits, 37), to_device(t), V,
                                                        check_targets=True)
            else:
                losses = crossentropy_forward_cuda(softmax_forward_cuda(d_logits, 37), to_device(t),
                                                   check_targets=True)
        except (TypeError, ValueError) as e:
            assert not valid, f"valid arguments refused: {e}"
            return
        assert valid, f"invalid arguments accepted: dtype {np.dtype(dtype)}, shape {shape}, V {V}, {values}"
        if which == "fused":
            want = crossentropy_forward(softmax_forward(logits.astype(np.float64), V), t)
            np.testing.assert_allclose(to_host(losses), want, rtol=1e-4)
        elif which == "backward":
            assert np.isfinite(to_host(dl)).all()
    run()
