"""Checks for lesson 07 (residual and the transformer block): the gradient at the two residual forks
(Exercise 7.1) and the MLP branch backward (Exercise 7.2), both against the package's block_backward."""
from __future__ import annotations

import numpy as np

from llmc_lessons.checks import ExerciseFailed, assert_close, forward_outputs, passed, rng, run_exercise
from llmc_lessons.layers.block import (BLOCK_PARAMETER_NAMES, attention_branch_backward, block_backward,
                                       block_forward, init_block_params, mlp_backward)
from llmc_lessons.layers.gelu import gelu_backward
from llmc_lessons.layers.layernorm import layernorm_backward
from llmc_lessons.layers.matmul import matmul_backward
from llmc_lessons.layers.residual import residual_forward

MLP_GRAD_NAMES = ("fcprojw", "fcprojb", "fcw", "fcb", "ln2w", "ln2b")


def _block_inputs(gen):
    """A random block in float64 at an awkward size, its cache, and an upstream gradient."""
    B, T, C, NH = 2, int(gen.integers(3, 7)), 12, 3
    p = init_block_params(C, gen, dtype=np.float64, std=0.3)
    x = gen.standard_normal((B, T, C))
    _, cache = block_forward(x, p, NH)
    dout = gen.standard_normal((B, T, C))
    return x, p, NH, cache, dout


def _unpack(ex: str, result, what: str, names):
    """The student's (dgradient, grads) pair, with a clear message when it has the wrong form."""
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)):
        raise ExerciseFailed(f"{ex}: your function must return a pair ({what}, grads) with grads a dict of "
                             f"gradients by name; got {type(result).__name__}")
    missing = [n for n in names if n not in result[1]]
    if missing:
        raise ExerciseFailed(f"{ex}: grads lacks {missing}; it needs the names {list(names)}")
    return result


def _fork_mistakes(dout, cache, p, NH) -> dict:
    """{what the student probably did: (dx, grads) that mistake produces} for Exercise 7.1."""
    dres2_mlp, g_mlp = mlp_backward(dout, cache, p)

    def rest(dresidual2, add_skip_1=True):
        dx_attn, g_attn = attention_branch_backward(dresidual2, cache, p, NH)
        dx = dresidual2 + dx_attn if add_skip_1 else dx_attn
        return dx, {**g_attn, **g_mlp}

    dres2 = dout + dres2_mlp
    dx_attn_from_dout, g_attn_from_dout = attention_branch_backward(dout, cache, p, NH)
    return {
        "at fork 2 the skip-path gradient is missing: residual2 is read by ln2 AND carried on to residual3, so "
        "dresidual2 = dout + (gradient from the MLP branch)": rest(dres2_mlp),
        "at fork 1 the skip-path gradient is missing: x is read by ln1 AND carried on to residual2, so "
        "dx = dresidual2 + (gradient from the attention branch)": rest(dres2, add_skip_1=False),
        "both skip-path gradients are missing: at each residual connection the gradient also flows straight "
        "through": rest(dres2_mlp, add_skip_1=False),
        "the attention branch's gradient is missing at fork 1 (dx = dresidual2 alone)": (dres2, rest(dres2)[1]),
        "the MLP branch's gradient is missing at fork 2 (dresidual2 = dout alone)": rest(dout),
        "the attention branch was given dout instead of dresidual2: the gradient reaching attproj is that of "
        "residual2, which includes what came back through the MLP branch":
            (dres2 + dx_attn_from_dout, {**g_attn_from_dout, **g_mlp}),
    }


def check_residual_forward(fn) -> None:
    """Exercise 7.0: fn(inp1, inp2) -> out = inp1 + inp2, a new array (neither input changed), float32."""
    ex = "Exercise 7.0"
    gen = rng()
    shape = (2, int(gen.integers(3, 9)), 13)
    inp1, inp2 = (gen.standard_normal(shape).astype(np.float32) for _ in range(2))
    given1, given2 = inp1.copy(), inp2.copy()
    out, = forward_outputs(ex, run_exercise(ex, fn, given1, given2), ("out",))
    if not (np.array_equal(given1, inp1) and np.array_equal(given2, inp2)):
        raise ExerciseFailed(f"{ex}: your function changed an input in place (`inp1 += inp2`?). The block keeps x "
                             f"for its backward (the cache), so the sum must be a new array.")
    assert_close(ex, "out", out, residual_forward(inp1, inp2), atol=0, rtol=1e-7, known_mistakes={
        "only inp1 was returned: the branch's output inp2 was never added": inp1,
        "only inp2 was returned: the skip path inp1 was never added": inp2,
    }, hint="out = inp1 + inp2, elementwise.")
    passed(ex, f"shape {shape}: out = inp1 + inp2, inputs unchanged, float32")


def check_block_backward_forks(block_backward_fn) -> None:
    """Exercise 7.1: block_backward_fn(dout, cache, p, NH) -> (dx, grads), against the package's block_backward."""
    ex = "Exercise 7.1"
    gen = rng()
    x, p, NH, cache, dout = _block_inputs(gen)
    want_dx, want = block_backward(dout, cache, p, NH)
    mistakes = _fork_mistakes(dout, cache, p, NH)
    dx, grads = _unpack(ex, run_exercise(ex, block_backward_fn, dout.copy(), cache, p, NH), "dx",
                        BLOCK_PARAMETER_NAMES)
    hint = ("two forks, two adds: dresidual2 = dout + dresidual2_mlp, then dx = dresidual2 + dx_attn; the "
            "attention branch starts from dresidual2.")
    assert_close(ex, "dx", dx, want_dx, atol=1e-9, rtol=1e-6,
                 known_mistakes={k: v[0] for k, v in mistakes.items()}, hint=hint)
    for name in BLOCK_PARAMETER_NAMES:
        assert_close(ex, f"grads[{name!r}]", grads[name], want[name], atol=1e-9, rtol=1e-6,
                     known_mistakes={k: v[1][name] for k, v in mistakes.items()}, hint=hint)
    passed(ex, f"dx and all 12 parameter gradients match block_backward (B, T, C, NH = {x.shape + (NH,)})")


def _mlp_mistakes(dfcproj, cache, p) -> dict:
    """{what the student probably did: (dresidual2, grads)} for Exercise 7.2."""
    c = cache

    def tail(dfch, fch_gelu_for_w=None, ln2_for_w=None, ln2_inp=None):
        dfch_gelu, dfcprojw, dfcprojb = matmul_backward(dfcproj, c["fch_gelu"] if fch_gelu_for_w is None
                                                        else fch_gelu_for_w, p["fcprojw"])
        dln2, dfcw, dfcb = matmul_backward(dfch(dfch_gelu), c["ln2"] if ln2_for_w is None else ln2_for_w, p["fcw"])
        dres2, dln2w, dln2b = layernorm_backward(dln2, c["residual2"] if ln2_inp is None else ln2_inp, p["ln2w"],
                                                 c["ln2_mean"], c["ln2_rstd"])
        return dres2, dict(fcprojw=dfcprojw, fcprojb=dfcprojb, fcw=dfcw, fcb=dfcb, ln2w=dln2w, ln2b=dln2b)

    good = lambda d: gelu_backward(d, c["fch"])  # noqa: E731
    return {
        "the gelu backward is missing: fch_gelu = gelu(fch), so dfch = gelu_backward(dfch_gelu, fch)":
            tail(lambda d: d),
        "gelu_backward was given fch_gelu (the gelu's output); it needs the gelu's input, fch":
            tail(lambda d: gelu_backward(d, c["fch_gelu"])),
        "the fcproj backward used fch instead of fch_gelu: fcproj's input (what dfcprojw pairs with) is fch_gelu":
            tail(good, fch_gelu_for_w=c["fch"]),
        "the fc backward used residual2 instead of ln2: fc's input is ln2, the layernorm's output":
            tail(good, ln2_for_w=c["residual2"]),
        "layernorm_backward was given ln2 (its output) as inp; it needs its input, residual2":
            tail(good, ln2_inp=c["ln2"]),
    }


def check_mlp_backward(mlp_backward_fn) -> None:
    """Exercise 7.2: mlp_backward_fn(dfcproj, cache, p) -> (dresidual2, grads), against the package's mlp_backward."""
    ex = "Exercise 7.2"
    gen = rng()
    x, p, NH, cache, dfcproj = _block_inputs(gen)
    want_dres2, want = mlp_backward(dfcproj, cache, p)
    mistakes = _mlp_mistakes(dfcproj, cache, p)
    try:
        result = run_exercise(ex, mlp_backward_fn, dfcproj.copy(), cache, p)
    except ExerciseFailed as e:
        if not isinstance(e.__cause__, (ValueError, KeyError)):
            raise
        raise ExerciseFailed(f"{e}\n  hint: walk the forward in "
                             f"reverse: fcproj (matmul) -> gelu -> fc (matmul) -> ln2 (layernorm); each backward "
                             f"takes the gradient of its output and its own forward input from the cache.") from None
    dres2, grads = _unpack(ex, result, "dresidual2", MLP_GRAD_NAMES)
    hint = ("matmul_backward(dfcproj, fch_gelu, fcprojw) -> gelu_backward(., fch) -> "
            "matmul_backward(., ln2, fcw) -> layernorm_backward(., residual2, ln2w, ln2_mean, ln2_rstd)")
    for name in ("fcprojw", "fcprojb", "fcw", "fcb", "ln2w", "ln2b"):
        assert_close(ex, f"grads[{name!r}]", grads[name], want[name], atol=1e-9, rtol=1e-6,
                     known_mistakes={k: v[1][name] for k, v in mistakes.items()}, hint=hint)
    assert_close(ex, "dresidual2", dres2, want_dres2, atol=1e-9, rtol=1e-6,
                 known_mistakes={k: v[0] for k, v in mistakes.items()}, hint=hint)
    passed(ex, "dresidual2 and the six MLP gradients match mlp_backward")
