"""The gradient check every lesson uses: it passes a correct backward, fails a wrong one, and reports clearly."""
from __future__ import annotations

import numpy as np
import pytest

from llmc_lessons.gradcheck import GradReport, gradcheck, numerical_grad


# A small layer with two inputs and an integer one: y[b, i] = tanh(x[b, i]) * w[i] + x[b, idx[b]]
def forward(x, w, idx):
    return np.tanh(x) * w + x[np.arange(x.shape[0]), idx][:, None]


def backward(dy, x, w, idx):
    dx = dy * w * (1 - np.tanh(x) ** 2)
    np.add.at(dx, (np.arange(x.shape[0]), idx), dy.sum(axis=1))
    dw = (dy * np.tanh(x)).sum(axis=0)
    return {"x": dx, "w": dw}


def inputs(B=3, C=5, seed=0, dtype=np.float64):
    g = np.random.default_rng(seed)
    return {"x": g.standard_normal((B, C)).astype(dtype), "w": g.standard_normal(C).astype(dtype),
            "idx": g.integers(0, C, size=B)}


def test_a_correct_backward_passes():
    report = gradcheck(forward, backward, inputs(), title="toy")
    assert report.passed
    assert report.assert_ok() is report
    assert [r.name for r in report.rows] == ["x", "w"]  # the integer input is not differentiated
    for r in report.rows:
        assert r.rel < 1e-8, r


def test_float32_inputs_are_checked_in_float64():
    seen = []

    def fwd(x, w, idx):
        seen.append((x.dtype, w.dtype))
        return forward(x, w, idx)

    report = gradcheck(fwd, backward, inputs(dtype=np.float32))
    assert report.passed
    assert seen and all(x == np.float64 and w == np.float64 for x, w in seen)


def backward_sign_error(dy, x, w, idx):
    g = backward(dy, x, w, idx)
    return {"x": g["x"], "w": -g["w"]}


def backward_missing_term(dy, x, w, idx):
    """Forgets that x also reaches y through the gather x[b, idx[b]]."""
    return {"x": dy * w * (1 - np.tanh(x) ** 2), "w": backward(dy, x, w, idx)["w"]}


def backward_scale_error(dy, x, w, idx):
    g = backward(dy, x, w, idx)
    return {"x": 2 * g["x"], "w": g["w"]}


@pytest.mark.parametrize("wrong, failing", [(backward_sign_error, "w"), (backward_missing_term, "x"),
                                            (backward_scale_error, "x")])
def test_a_wrong_backward_fails_and_names_the_input(wrong, failing):
    report = gradcheck(forward, wrong, inputs(), title=wrong.__name__)
    assert not report.passed
    assert [r.name for r in report.rows if not r.passed] == [failing]
    with pytest.raises(AssertionError) as info:
        report.assert_ok()
    msg = str(info.value)
    assert f"d{failing} (rel err" in msg and "disagrees with finite differences" in msg and "FAIL" in msg


def test_report_format():
    report = gradcheck(forward, backward, inputs(B=2, C=3), title="toy layer", tol=1e-6)
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == "gradient check: toy layer (float64, tolerance 1e-06 on the relative error)"
    assert lines[1].split() == ["input", "shape", "max", "abs", "err", "rel", "err", "checked", "result"]
    assert lines[2].split()[0] == "x" and "(2, 3)" in lines[2] and lines[2].rstrip().endswith("ok")
    assert lines[3].split()[0] == "w" and "(3,)" in lines[3] and lines[3].split()[-2] == "3"
    assert lines[4:] == report.theirs and len(lines) == 4 + len(report.theirs)   # then the student's parts' lines


def test_title_defaults_to_the_forward_name():
    assert gradcheck(forward, backward, inputs()).title == "forward"


def test_max_checks_samples_that_many_elements_per_input():
    calls = {"n": 0}

    def fwd(x, w, idx):
        calls["n"] += 1
        return forward(x, w, idx)

    ins = inputs(B=40, C=25)  # x has 1000 elements, w 25
    report = gradcheck(fwd, backward, ins, max_checks=50)
    rows = {r.name: r for r in report.rows}
    assert rows["x"].checked == 50 and rows["w"].checked == 25
    assert report.analytic["x"].shape == (50,) and report.numeric["x"].shape == (50,)
    assert calls["n"] == 1 + 2 * 50 + 2 * 25  # one forward, then +-eps per checked element
    assert report.passed


def test_sampling_catches_a_wrong_backward_spread_over_the_input():
    def wrong(dy, **kw):
        g = backward(dy, **kw)
        g["x"] = g["x"] * 1.01
        return g
    report = gradcheck(forward, wrong, inputs(B=40, C=25), max_checks=20)
    assert not report.passed and not report.rows[0].passed


def test_wrt_selects_inputs():
    report = gradcheck(forward, lambda dy, **kw: {"w": backward(dy, **kw)["w"]}, inputs(), wrt=["w"])
    assert [r.name for r in report.rows] == ["w"] and report.passed


def test_a_missing_gradient_or_a_wrong_shape_is_a_clear_error():
    with pytest.raises(KeyError, match=r"backward returned no gradient for 'w' \(it returned \['x'\]\)"):
        gradcheck(forward, lambda dy, **kw: {"x": backward(dy, **kw)["x"]}, inputs())
    with pytest.raises(ValueError, match=r"dw has shape \(1, 5\) but w has shape \(5,\)"):
        gradcheck(forward, lambda dy, **kw: {"x": backward(dy, **kw)["x"], "w": backward(dy, **kw)["w"][None]},
                  inputs())


def test_numerical_grad_restores_the_input_and_marks_unchecked_entries():
    x = np.array([1.0, -2.0, 3.0])
    before = x.copy()
    g = numerical_grad(lambda: float(np.sum(x ** 3)), x, indices=[0, 2])
    assert np.array_equal(x, before)
    assert np.allclose(g[[0, 2]], 3 * before[[0, 2]] ** 2, rtol=1e-6)
    assert np.isnan(g[1])


def test_plot_draws_every_input(monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    report = gradcheck(forward, backward, inputs(), title="toy")
    ax = report.plot()
    assert ax.get_title() == "toy"
    assert len(ax.collections) == 2  # one scatter per input
    assert isinstance(report, GradReport)
