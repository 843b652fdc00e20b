"""Checks for lesson 04 (matmul): Exercise 4.1 (one position's Jacobians, derived), Exercise 4.2 (NumPy
matmul_backward), Exercise 4.3 (kernel2's tile loop)."""
from __future__ import annotations

import inspect

import numpy as np

from llmc_lessons import device
from llmc_lessons.checks import (ExerciseFailed, TRACE_TIP, assert_close, exercise_kernel, forward_outputs,
                                 numerical_jacobian, passed, poisoned, rng, run_exercise, trace_of)
from llmc_lessons.layers.matmul import gemm_cuda, matmul_backward, matmul_forward

_DINP_HINT = ("dinp has inp's shape (B, T, C): write down the shapes of dout and weight and find the product that "
              "gives it.")
_DWEIGHT_HINT = ("dweight has weight's shape (OC, C) and collects a contribution from every position (b, t): view "
                 "dout and inp as matrices of B*T rows, then find the product of that shape.")
_DBIAS_HINT = "dbias (OC,) collects dout from every position (b, t) that the bias was added at."


def check_matmul_forward(fn) -> None:
    """Exercise 4.0: fn(inp, weight, bias=None) -> out (B, T, OC) = inp @ weight^T + bias, float32, with a square
    and a non-square weight, and with no bias (GPT-2's lm_head)."""
    ex = "Exercise 4.0"
    try:
        inspect.signature(fn).bind(None, None)
    except (TypeError, ValueError):
        raise ExerciseFailed(f"{ex}: call it as fn(inp, weight) too: give bias a default of None. GPT-2's lm_head "
                             f"is matmul_forward(lnf, wte), with no bias.") from None
    gen = rng()
    B, T, C = 2, 5, int(gen.integers(7, 20))
    for OC, with_bias in ((C, True), (C + 6, True), (C + 3, False)):   # square first: weight untransposed runs
        inp = gen.standard_normal((B, T, C)).astype(np.float32)
        weight = gen.standard_normal((OC, C)).astype(np.float32)
        bias = gen.standard_normal(OC).astype(np.float32) if with_bias else None
        args = (inp.copy(), weight.copy()) + ((bias.copy(),) if with_bias else ())
        want = matmul_forward(inp, weight, bias)
        out, = forward_outputs(ex, run_exercise(ex, fn, *args), ("out",))
        x, w, b = inp.astype(np.float64), weight.astype(np.float64), 0.0 if bias is None else bias
        mistakes = {"the bias is missing: out = inp @ weight.T + bias": x @ w.T} if with_bias else {}
        if OC == C:
            mistakes["weight is not transposed: weight is (OC, C), so out = inp @ weight.T"] = x @ w + b
        at = f"{ex} with weight ({OC}, {C})" + ("" if with_bias else " and bias None")
        assert_close(at, "out", out, want, atol=1e-4, rtol=1e-4, known_mistakes=mistakes,
                     hint="out[b, t, o] = bias[o] + sum over c of inp[b, t, c] * weight[o, c]; with bias None, no "
                          "bias is added.")
    passed(ex, f"weights ({C}, {C}) and ({C + 6}, {C}) with a bias, ({C + 3}, {C}) without: out matches, float32")

def check_linear_jacobians(fn) -> None:
    """Exercise 4.1: fn(x, weight) -> (J_x (OC, C), J_w (OC, OC, C), J_b (OC, OC)), the Jacobians of one position's
    y = weight @ x + bias: J_x[o, c] = dy_o/dx_c, J_w[o, p, c] = dy_o/dweight[p, c], J_b[o, p] = dy_o/dbias[p],
    against central differences in float64, for a square and a non-square weight."""
    ex = "Exercise 4.1"
    gen = rng()
    for C, OC in ((4, 4), (int(gen.integers(3, 6)), int(gen.integers(6, 9)))):
        x, weight, bias = gen.standard_normal(C), gen.standard_normal((OC, C)), gen.standard_normal(OC)
        result = run_exercise(ex, fn, x.copy(), weight.copy())
        if not isinstance(result, tuple) or len(result) != 3:
            raise ExerciseFailed(f"{ex}: return the triple (J_x, J_w, J_b), got {type(result).__name__}"
                                 + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""))
        J_x, J_w, J_b = result

        def y(x=x, weight=weight, bias=bias):
            return matmul_forward(x[None, None], weight, bias)[0, 0]

        eye = np.eye(OC)
        shapes = (f"one row per output y_o, then the shape of what is differentiated: J_x (OC, C) = {(OC, C)}, "
                  f"J_w (OC, OC, C) = {(OC, OC, C)}, J_b (OC, OC) = {(OC, OC)}.")
        assert_close(ex, f"J_x (C={C}, OC={OC})", J_x, numerical_jacobian(lambda v: y(x=v), x), atol=1e-7, rtol=1e-6,
                     known_mistakes={
                         "J_x is transposed: J_x[o, c] = dy_o/dx_c is weight[o, c] itself, shape (OC, C)": weight.T,
                         "that is x broadcast: x_c is the derivative with respect to weight[o, c], not x_c":
                             np.broadcast_to(x, (OC, C)),
                     }, hint="y_o = sum_c weight[o, c] x_c + bias[o]: differentiate with respect to one x_c. " + shapes)
        assert_close(ex, f"J_w (C={C}, OC={OC})", J_w, numerical_jacobian(lambda w: y(weight=w), weight), atol=1e-7,
                     rtol=1e-6, known_mistakes={
                         "J_w[o, p, c] is x_c for every p: y_o reads row o of weight only, so it is 0 unless p = o":
                             np.broadcast_to(x, (OC, OC, C)),
                         "weight[o, c] where x_c belongs: y_o changes by x_c when weight[o, c] does":
                             eye[:, :, None] * weight[:, None, :],
                     }, hint="y_o = sum_c weight[o, c] x_c + bias[o]: which entries weight[p, c] does y_o read, and "
                             "with which factor? " + shapes)
        assert_close(ex, f"J_b (C={C}, OC={OC})", J_b, numerical_jacobian(lambda b: y(bias=b), bias), atol=1e-7,
                     rtol=1e-6, known_mistakes={
                         "every entry is 1: y_o depends on bias[o] only, so J_b[o, p] is 1 for p = o and 0 else":
                             np.ones((OC, OC)),
                     }, hint="y_o = ... + bias[o]. " + shapes)
    passed(ex, "J_x, J_w and J_b match finite differences for a square and a non-square weight")


def _call_backward(ex, fn, dout, inp, weight):
    try:
        result = run_exercise(ex, fn, dout.copy(), inp.copy(), weight.copy())
    except ExerciseFailed as e:  # NumPy's "matmul: Input operand 1 has a mismatch in its core dimension ..."
        if not isinstance(e.__cause__, ValueError):
            raise
        raise ExerciseFailed(
            f"{e}\n  inp is {inp.shape} (B, T, C), weight {weight.shape} "
            f"(OC, C), dout {dout.shape} (B, T, OC). A shape mismatch inside a product means an operand needs a "
            f"transpose, or none: write each product's shapes down, e.g. (B*T, OC) @ (OC, C) -> (B*T, C).") from None
    if not isinstance(result, tuple) or len(result) != 3:
        raise ExerciseFailed(f"{ex}: return the triple (dinp, dweight, dbias), got {type(result).__name__}"
                             + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""))
    return result


def check_matmul_backward(fn) -> None:
    """Exercise 4.2: fn(dout, inp, weight) -> (dinp, dweight, dbias), float64, square and non-square weights."""
    ex = "Exercise 4.2"
    gen = rng()
    # First a square weight (OC == C): a product with the wrong transpose then has the right shape, so the
    # check can name it; then OC != C, where the shapes themselves must come out right.
    for B, T, C, OC in ((2, 3, 5, 5), (3, 5, 7, 11)):
        inp = gen.standard_normal((B, T, C))
        weight = gen.standard_normal((OC, C))
        dout = gen.standard_normal((B, T, OC))
        dinp, dweight, dbias = _call_backward(ex, fn, dout, inp, weight)
        want_dinp, want_dweight, want_dbias = matmul_backward(dout, inp, weight)
        d2, i2 = dout.reshape(B * T, OC), inp.reshape(B * T, C)
        mistakes_dinp = {"dinp used weight^T: dout @ weight.T; weight (OC, C) is already the right way round":
                         (d2 @ weight.T).reshape(B, T, C)} if C == OC else {}
        mistakes_dweight = {"dweight is transposed (inp^T @ dout gives (C, OC)); use dout^T @ inp": i2.T @ d2,
                            "dweight was averaged over the B*T positions instead of summed": d2.T @ i2 / (B * T)}
        assert_close(ex, f"dinp (C={C}, OC={OC})", dinp, want_dinp, atol=1e-9, rtol=1e-7,
                     known_mistakes=mistakes_dinp, hint=_DINP_HINT)
        assert_close(ex, f"dweight (C={C}, OC={OC})", dweight, want_dweight, atol=1e-9, rtol=1e-7,
                     known_mistakes=mistakes_dweight, hint=_DWEIGHT_HINT)
        assert_close(ex, f"dbias (C={C}, OC={OC})", dbias, want_dbias, atol=1e-9, rtol=1e-7, known_mistakes={
            "dbias was averaged over (b, t) instead of summed": dout.mean(axis=(0, 1)),
        }, hint=_DBIAS_HINT)
    passed(ex, "dinp, dweight and dbias match the reference for square and non-square weights")


# ---------------------------------------------------------------------------------------------------------
# Exercise 4.3: the tile loop of matmul_kernel2


def _blockwise_transposed(full: np.ndarray, tile: int, M: int, N: int) -> np.ndarray:
    """What a kernel computes when thread (ty, tx) accumulates with its two indices swapped: each tile x tile
    block of out holds the transpose of the true block (the padded product, zeros beyond M and N)."""
    Mp, Np = -(-M // tile) * tile, -(-N // tile) * tile
    pad = np.zeros((Mp, Np))
    pad[:M, :N] = full
    wrong = np.zeros((Mp, Np))
    for m0 in range(0, Mp, tile):
        for n0 in range(0, Np, tile):
            # thread (ty, tx) owns out[m0 + ty, n0 + tx] but adds sum_k A(m0 + tx, k) B(k, n0 + ty)
            wrong[m0:m0 + tile, n0:n0 + tile] = pad[m0:m0 + tile, n0:n0 + tile].T
    return wrong[:M, :N]


def check_matmul_kernel2(source: str) -> None:
    """Exercise 4.3: matmul_kernel2 in `source` against the reference, at awkward sizes, two tiles, three layouts."""
    ex = "Exercise 4.3"
    kernel = exercise_kernel(ex, source, "matmul_kernel2")
    gen = rng()
    # (M, N, K, trans_a, trans_b, bias, tile, what): sizes that are multiples of no tile, so edge tiles are partial.
    cases = [(37, 29, 45, False, True, True, 16, "the forward: inp (37, 45) @ weight (29, 45)^T + bias"),
             (37, 29, 45, False, True, True, 8, "the forward again, tile 8"),
             (37, 29, 45, False, False, False, 16, "dinp's layout: A (37, 45) @ B (45, 29)"),
             (23, 19, 35, True, False, False, 8, "dweight's layout: A^T (23, 35) @ B (35, 19), A stored (35, 23)")]
    for M, N, K, trans_a, trans_b, use_bias, tile, what in cases:
        a = gen.standard_normal((K, M) if trans_a else (M, K)).astype(np.float32)
        b = gen.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
        bias = gen.standard_normal(N).astype(np.float32) if use_bias else None
        A = (a.T if trans_a else a).astype(np.float64)          # the logical (M, K) and (K, N) operands
        Bm = (b.T if trans_b else b).astype(np.float64)
        bias64 = np.zeros(N) if bias is None else bias.astype(np.float64)
        full = A @ Bm
        want = full + bias64
        out = poisoned((M, N))
        gemm_cuda(device.to_device(a), device.to_device(b), None if bias is None else device.to_device(bias),
                  trans_a=trans_a, trans_b=trans_b, version=2, tile=tile, kernel=kernel, out=out)
        mistakes = {
            "out holds only the bias: the loop over k tiles added nothing to acc": np.broadcast_to(bias64, (M, N)),
            "each tile x tile block of out is transposed: the accumulation pairs the A tile's row and the B tile's "
            "column of the wrong element (ty and tx exchanged)":
                _blockwise_transposed(full, tile, M, N) + bias64,
        }
        if trans_a or trans_b:
            raw_a = a.reshape(-1)[:M * K].reshape(M, K).astype(np.float64)
            raw_b = b.reshape(-1)[:K * N].reshape(K, N).astype(np.float64)
            mistakes["the operands were read as plain row-major (A[m * K + k], B[k * N + n]): use the strides, "
                     "A[m * sam + k * sak] and B[k * sbk + n * sbn]"] = raw_a @ raw_b + bias64
        try:
            assert_close(ex, "out", out, want, atol=1e-4, rtol=1e-4, known_mistakes=mistakes,
                         hint="compare each index with the layout comments on As and Bs: which row of A and "
                              "which column of B does thread (ty, tx) need for its element out(m, n), and which "
                              "ones does it load for the others? An element outside A or B (the last k tile, the "
                              "edge blocks) must load as 0.")
        except ExerciseFailed as e:
            raise ExerciseFailed(f"{e}\n  the failing launch: {what}; M={M}, N={N}, K={K}, TILE={tile}, "
                                 f"grid {-(-N // tile)} x {-(-M // tile)} blocks") from None
    _check_tile_reuse(ex, kernel, gen)
    passed(ex, "4 products at awkward sizes (37 x 45 @ 45 x 29 and a transposed 23 x 35 @ 35 x 19), tiles 8 and 16; "
               "each thread loads 2 ceil(K/TILE) floats from global memory and reads the rest from its tiles")


def _check_tile_reuse(ex, kernel, gen) -> None:
    """The point of kernel 2: a block loads each element of its strips of A and B from global memory once, one
    element of each tile per thread and K step, and every thread reads the values it multiplies from shared memory."""
    M, N, K, tile = 37, 29, 45, 8
    a = device.to_device(gen.standard_normal((M, K)).astype(np.float32))
    b = device.to_device(gen.standard_normal((N, K)).astype(np.float32))
    bias = device.to_device(gen.standard_normal(N).astype(np.float32))
    t = trace_of(lambda: gemm_cuda(a, b, bias, trans_b=True, version=2, tile=tile, kernel=kernel,
                                   out=poisoned((M, N))))
    if t is None:
        return
    steps = -(-K // tile)
    budget = 2 * steps + 1                                   # one element of each tile per K step, and the bias
    loads, shared = t.per_thread("global", "load"), t.per_thread("shared", "load")
    reads = max(int(t.element_counts(name, per_block=True).max()) for name in ("A", "B"))
    if loads.max() <= budget and reads <= 1 and shared.min() >= K:
        return
    block, thread = t.coordinates(*np.unravel_index(int(np.argmax(loads)), loads.shape))
    raise ExerciseFailed(
        f"{ex}: the values are right, but the kernel does not reuse its tiles. With K = {K} and TILE = {tile}, each "
        f"thread of a tiled kernel loads {budget} floats from global memory (its element of the A tile and of the B "
        f"tile in each of the {steps} K steps, and the bias) and reads the 2 TILE = {2 * tile} values it multiplies "
        f"in a step from shared memory, so a block loads each element of A and B once. Yours: thread {thread} of "
        f"block {block} loaded {int(loads.max())} floats from global memory, the threads read shared memory "
        f"{int(shared.min())} to {int(shared.max())} times each, and a block loaded one element {'once' if reads == 1 else f'{reads} times'}. Likely cause: the "
        f"accumulation reads A and B (global memory) instead of As and Bs, or a thread loads more than its own "
        f"element of the tiles.\n  {TRACE_TIP}")
