"""Finite-difference gradient checks in float64, with one report format for every lesson.

For a layer y = f(x1, x2, ...) and a random upstream gradient dy, the scalar L = sum(y * dy) has
dL/dxi = the layer's backward applied to dy. Each element of each input is nudged by +-eps and

    dL/dx[i] ~ (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)        (central difference, error O(eps^2))

In float64 with eps = 1e-6 the two agree to about 1e-8 relative error for a correct backward; a wrong
backward is off by order 1. The default tolerance, 1e-6, sits far from both.

Asked to (theirs=True: the lessons' gradient checks), a report also says what the student's own parts say
(llmc_lessons.parts): their gradient checker (Exercise 0.3) on the same gradients, and the same backward run again
with their functions in place of the package's (their layernorm_backward wherever it calls layernorm_backward),
checked by both checkers. The package's own checks (gradcheck_gpt2, the tests) leave the student's code alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np


@dataclass
class GradRow:
    name: str
    shape: tuple
    max_abs: float
    rel: float
    checked: int
    passed: bool


@dataclass
class GradReport:
    """One row per input: max |analytic - numeric|, relative error, elements checked, pass/fail."""
    title: str
    tol: float
    rows: list[GradRow] = field(default_factory=list)
    analytic: dict = field(default_factory=dict, repr=False)
    numeric: dict = field(default_factory=dict, repr=False)
    theirs: list[str] = field(default_factory=list)   # lines on the student's checker and parts

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def __str__(self) -> str:
        lines = [f"gradient check: {self.title} (float64, tolerance {self.tol:.0e} on the relative error)",
                 f"  {'input':<10} {'shape':<16} {'max abs err':>12} {'rel err':>10} {'checked':>8}  result"]
        for r in self.rows:
            lines.append(f"  {r.name:<10} {str(r.shape):<16} {r.max_abs:>12.2e} {r.rel:>10.2e} {r.checked:>8}  "
                         + ("ok" if r.passed else "FAIL"))
        return "\n".join(lines + self.theirs)

    def _repr_pretty_(self, p, cycle):  # IPython shows the table, not the dataclass fields
        p.text(str(self))

    def assert_ok(self) -> "GradReport":
        """Raise AssertionError naming the failing inputs; return self when all pass."""
        bad = [r for r in self.rows if not r.passed]
        if bad:
            names = ", ".join(f"d{r.name} (rel err {r.rel:.1e})" for r in bad)
            raise AssertionError(f"{self}\n\nThe analytic gradient disagrees with finite differences for {names}.")
        return self

    def plot(self, ax=None):
        """Scatter analytic against numeric gradient for every input: a correct backward lies on y = x."""
        import matplotlib.pyplot as plt
        if ax is None:
            _, ax = plt.subplots(figsize=(4, 4))
        for name in self.analytic:
            a, n = self.analytic[name], self.numeric[name]
            ax.scatter(n, a, s=8, label=f"d{name}")
        lo = min(min(v.min() for v in self.numeric.values()), min(v.min() for v in self.analytic.values()))
        hi = max(max(v.max() for v in self.numeric.values()), max(v.max() for v in self.analytic.values()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel("numeric (finite differences)")
        ax.set_ylabel("analytic (backward)")
        ax.set_title(self.title)
        ax.legend(fontsize=8)
        return ax


def numerical_grad(loss: Callable[[], float], x: np.ndarray, eps: float = 1e-6, indices=None) -> np.ndarray:
    """Central differences of the scalar `loss()` with respect to `x`, changing `x` in place and restoring it.

    `indices`: flat indices to check (default: all). Unchecked entries of the result are NaN.
    """
    grad = np.full(x.shape, np.nan)
    flat = x.reshape(-1)  # a view: writing it moves x
    for i in (range(flat.size) if indices is None else indices):
        old = flat[i]
        flat[i] = old + eps
        plus = loss()
        flat[i] = old - eps
        minus = loss()
        flat[i] = old
        grad.reshape(-1)[i] = (plus - minus) / (2 * eps)
    return grad


def gradcheck(forward: Callable[..., np.ndarray], backward: Callable[..., Mapping[str, np.ndarray]],
              inputs: Mapping[str, np.ndarray], wrt=None, title: str = "", tol: float = 1e-6,
              eps: float = 1e-6, max_checks: int = 400, seed: int = 0, theirs: bool = False) -> GradReport:
    """Check `backward` against finite differences of `forward`.

    forward(**inputs) -> y (any shape); backward(dy, **inputs) -> {name: dname} for the names in `wrt`
    (default: every floating input). Inputs are converted to float64 copies. At most `max_checks` randomly
    chosen elements per input are checked (all of them for small inputs). theirs=True adds the report's lines on
    the student's parts (their checker, their backward); the verdict stays the package's.
    """
    rng = np.random.default_rng(seed)
    x = {k: (np.array(v, dtype=np.float64) if np.issubdtype(np.asarray(v).dtype, np.floating) else np.asarray(v))
         for k, v in inputs.items()}
    wrt = [k for k in x if np.issubdtype(x[k].dtype, np.floating)] if wrt is None else list(wrt)
    y = np.asarray(forward(**x), dtype=np.float64)
    dy = rng.standard_normal(y.shape)
    grads = backward(dy, **x)
    report = GradReport(title=title or getattr(forward, "__name__", "forward"), tol=tol)
    selected = {}
    for name in wrt:
        if name not in grads:
            raise KeyError(f"backward returned no gradient for {name!r} (it returned {sorted(grads)})")
        a = np.asarray(grads[name], dtype=np.float64)
        if a.shape != x[name].shape:
            raise ValueError(f"d{name} has shape {a.shape} but {name} has shape {x[name].shape}")
        n_el = x[name].size
        idx = None if n_el <= max_checks else np.sort(rng.choice(n_el, max_checks, replace=False))
        num = numerical_grad(lambda: float(np.sum(np.asarray(forward(**x)) * dy)), x[name], eps, idx)
        sel = np.arange(n_el) if idx is None else idx
        a_sel, n_sel = a.reshape(-1)[sel], num.reshape(-1)[sel]
        max_abs = float(np.max(np.abs(a_sel - n_sel))) if sel.size else 0.0
        scale = max(float(np.max(np.abs(n_sel), initial=0.0)), float(np.max(np.abs(a_sel), initial=0.0)), 1e-12)
        rel = max_abs / scale
        report.rows.append(GradRow(name, tuple(x[name].shape), max_abs, rel, int(sel.size),
                                   bool(np.isfinite(rel) and rel <= tol)))
        report.analytic[name], report.numeric[name] = a_sel, n_sel
        selected[name] = sel
    if theirs:
        report.theirs = _theirs(forward, backward, x, dy, wrt, grads, report, selected, seed)
    return report


CHECKER_TOL = 1e-5
"""The student's checker passes a gradient below this relative error. Along one direction v, rounding in the loss
costs about 1e-16 |L| / (eps |<g, v>|): for an input whose gradient is small beside the loss (a bias deep in a
block), that nears 1e-6 even for a right gradient; a wrong one is off by far more than 1e-5."""


def _theirs(forward, backward, x, dy, wrt, grads, report, selected, seed) -> list[str]:
    """The report's lines on the student's parts: their checker (Exercise 0.3) on the backward's gradients, and
    the backward again with their functions in place of the package's, checked by the package and by their
    checker."""
    from llmc_lessons import parts
    loaded = parts.load_all(kernels=False)
    checker = loaded["gradient_checker"]
    used: set = set()
    try:
        with parts.substituted(loaded.values(), [getattr(backward, "__globals__", {})], used):
            their_grads = backward(dy, **x)
        problem = None
    except Exception as e:   # noqa: BLE001  (their code failing is a finding, not a crash)
        their_grads, problem = None, f"raised {type(e).__name__}: {e}"

    def verdict(rels: dict, tol: float = report.tol) -> str:
        """Each input's relative error and verdict; for many inputs, the failures or the largest error."""
        bad = {k: r for k, r in rels.items() if not (np.isfinite(r) and r <= tol)}
        if len(rels) <= 4:
            return ", ".join(f"d{k} {r:.1e} " + ("FAIL" if k in bad else "ok") for k, r in rels.items())
        if bad:
            return "FAIL for " + ", ".join(f"d{k} ({r:.1e})" for k, r in bad.items())
        return f"all {len(rels)} ok (largest relative error {max(rels.values()):.1e})"

    def by_package(g):
        rels = {}
        for name in wrt:
            try:
                a = np.asarray(g[name], dtype=np.float64).reshape(-1)[selected[name]]
            except (KeyError, TypeError, ValueError, IndexError):
                return f"no usable d{name}"
            n = report.numeric[name]
            rels[name] = float(np.max(np.abs(a - n), initial=0.0)) / max(
                float(np.max(np.abs(n), initial=0.0)), float(np.max(np.abs(a), initial=0.0)), 1e-12)
        return verdict(rels)

    def by_checker(g):
        rels = {}
        for name in wrt:
            def loss(v, name=name):
                return float(np.sum(np.asarray(forward(**{**x, name: v}), dtype=np.float64) * dy))
            try:
                rels[name] = float(checker.value(loss, x[name].copy(), np.asarray(g[name], dtype=np.float64), seed))
            except Exception as e:   # noqa: BLE001
                return f"raised {type(e).__name__}: {e}"
        return verdict(rels, CHECKER_TOL)

    yours = f"your {sorted(used)[0]}" if len(used) == 1 else f"your parts ({', '.join(sorted(used))})"
    lines = []
    if problem:
        lines.append(f"  with {yours}: the backward {problem}")
    elif used:
        lines.append(f"  with {yours}, checked by the package: {by_package(their_grads)}")
    else:
        lines.append("  none of your parts is in this backward yet (a passing exercise check keeps one)")
    if not checker.theirs:
        lines.append(f"  your gradient checker: {checker.reason} (lesson 00 ends with it)")
    else:
        lines.append(f"  your gradient checker (ok below {CHECKER_TOL:.0e}) on the package's backward: "
                     f"{by_checker(grads)}")
        if used and not problem:
            lines.append(f"  your gradient checker with {yours}: {by_checker(their_grads)}")
    return lines
