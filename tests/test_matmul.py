"""Lesson 04, matmul: references, gradient check, every kernel at every layout, bad input, TF32 switch, and the
exercise checks against wrong answers."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.checks import matmul as checks
from llmc_lessons.checks import poisoned
from llmc_lessons.cuda import kernel_source
from llmc_lessons.device import to_device, to_host, xp
from llmc_lessons.gradcheck import gradcheck
from llmc_lessons.layers.matmul import (gemm_cuda, matmul_backward, matmul_backward_bias_cuda, matmul_backward_cuda,
                                        matmul_forward, matmul_forward_cuda)
from llmc_lessons.precision import set_tf32, tf32, tf32_enabled

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "solutions" / "04_matmul.ipynb"


def _loops_forward(inp, weight, bias):
    """The forward with plain Python loops, written independently of the vectorised reference."""
    B, T, C = inp.shape
    OC = weight.shape[0]
    out = np.zeros((B, T, OC))
    for b in range(B):
        for t in range(T):
            for o in range(OC):
                out[b, t, o] = (0.0 if bias is None else bias[o]) + sum(inp[b, t, c] * weight[o, c] for c in range(C))
    return out


# ---------------------------------------------------------------------------------------------------------
# NumPy reference


@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_matches_loops(with_bias):
    g = np.random.default_rng(0)
    inp, weight, bias = g.standard_normal((2, 3, 5)), g.standard_normal((7, 5)), g.standard_normal(7)
    out = matmul_forward(inp, weight, bias if with_bias else None)
    np.testing.assert_allclose(out, _loops_forward(inp, weight, bias if with_bias else None), atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_preserves_dtype(dtype):
    g = np.random.default_rng(1)
    inp = g.standard_normal((2, 3, 5)).astype(dtype)
    weight = g.standard_normal((4, 5)).astype(dtype)
    bias = g.standard_normal(4).astype(dtype)
    assert matmul_forward(inp, weight, bias).dtype == dtype
    dout = g.standard_normal((2, 3, 4)).astype(dtype)
    assert all(a.dtype == dtype for a in matmul_backward(dout, inp, weight))


def test_backward_matches_loops():
    g = np.random.default_rng(2)
    B, T, C, OC = 2, 3, 4, 5
    inp, weight, dout = g.standard_normal((B, T, C)), g.standard_normal((OC, C)), g.standard_normal((B, T, OC))
    dinp, dweight, dbias = matmul_backward(dout, inp, weight)
    want_dinp = np.zeros((B, T, C))
    want_dweight = np.zeros((OC, C))
    for b in range(B):
        for t in range(T):
            for o in range(OC):
                for c in range(C):
                    want_dinp[b, t, c] += dout[b, t, o] * weight[o, c]
                    want_dweight[o, c] += dout[b, t, o] * inp[b, t, c]
    np.testing.assert_allclose(dinp, want_dinp, atol=1e-12)
    np.testing.assert_allclose(dweight, want_dweight, atol=1e-12)
    np.testing.assert_allclose(dbias, dout.sum(axis=(0, 1)), atol=1e-12)


def test_gradcheck_float64():
    g = np.random.default_rng(3)
    inputs = {"inp": g.standard_normal((2, 3, 5)), "weight": g.standard_normal((7, 5)), "bias": g.standard_normal(7)}

    def backward(dout, inp, weight, bias):
        dinp, dweight, dbias = matmul_backward(dout, inp, weight)
        return {"inp": dinp, "weight": dweight, "bias": dbias}

    report = gradcheck(matmul_forward, backward, inputs, title="matmul").assert_ok()
    assert len(report.rows) == 3 and max(r.rel for r in report.rows) < 1e-8


def test_reference_rejects_bad_shapes():
    with pytest.raises(ValueError, match="weight must have shape"):
        matmul_forward(np.zeros((2, 3, 5)), np.zeros((4, 6)))
    with pytest.raises(ValueError, match="bias must have shape"):
        matmul_forward(np.zeros((2, 3, 5)), np.zeros((4, 5)), np.zeros(5))
    with pytest.raises(ValueError, match=r"inp must have shape \(B, T, C\)"):
        matmul_forward(np.zeros((6, 5)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="dout must have shape"):
        matmul_backward(np.zeros((2, 3, 5)), np.zeros((2, 3, 5)), np.zeros((4, 5)))


# ---------------------------------------------------------------------------------------------------------
# Kernels: every version, every layout of the layer's three products, poisoned outputs, awkward sizes

CONFIGS = [(1, 8), (1, 16), (1, 32), (2, 8), (2, 16), (2, 32), (3, 16), ("cublas", 16)]
# (M, N, K, trans_a, trans_b, bias): the forward (weight read transposed, with bias), dinp's and dweight's layouts
LAYOUTS = [(37, 29, 45, False, True, True), (37, 29, 45, False, False, False), (23, 19, 35, True, False, False)]


@pytest.mark.parametrize("version,tile", CONFIGS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gemm_kernels_match_reference(version, tile, layout):
    M, N, K, trans_a, trans_b, use_bias = layout
    g = np.random.default_rng(4)
    a = g.standard_normal((K, M) if trans_a else (M, K)).astype(np.float32)
    b = g.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
    bias = g.standard_normal(N).astype(np.float32) if use_bias else None
    want = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    if use_bias:
        want += bias
    out = poisoned((M, N))
    got = gemm_cuda(to_device(a), to_device(b), None if bias is None else to_device(bias), trans_a=trans_a,
                    trans_b=trans_b, version=version, tile=tile, out=out)
    assert got is out
    np.testing.assert_allclose(to_host(out), want, atol=1e-4, rtol=1e-4)


def test_kernel3_spans_several_blocks_and_partial_k_tiles():
    # kernel3's block covers 128 x 128 outputs and K steps of 16: cross both edges in every direction.
    g = np.random.default_rng(5)
    M, N, K = 131, 133, 37
    for trans_a, trans_b in ((False, True), (True, False)):
        a = g.standard_normal((K, M) if trans_a else (M, K)).astype(np.float32)
        b = g.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
        bias = g.standard_normal(N).astype(np.float32)
        want = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64) + bias
        out = poisoned((M, N))
        gemm_cuda(to_device(a), to_device(b), to_device(bias), trans_a=trans_a, trans_b=trans_b, version=3, out=out)
        np.testing.assert_allclose(to_host(out), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("version,tile", CONFIGS)
def test_layer_launchers_match_reference(version, tile):
    g = np.random.default_rng(6)
    B, T, C, OC = 3, 7, 13, 21
    inp = g.standard_normal((B, T, C)).astype(np.float32)
    weight = g.standard_normal((OC, C)).astype(np.float32)
    bias = g.standard_normal(OC).astype(np.float32)
    dout = g.standard_normal((B, T, OC)).astype(np.float32)
    f64 = [x.astype(np.float64) for x in (inp, weight, bias, dout)]
    for use_bias in (True, False):
        out = matmul_forward_cuda(to_device(inp), to_device(weight), to_device(bias) if use_bias else None,
                                  version=version, tile=tile)
        assert out.shape == (B, T, OC) and out.dtype == np.float32
        np.testing.assert_allclose(to_host(out), matmul_forward(f64[0], f64[1], f64[2] if use_bias else None),
                                   atol=1e-4, rtol=1e-4)
    got = matmul_backward_cuda(to_device(dout), to_device(inp), to_device(weight), version=version, tile=tile)
    for name, x, want in zip(("dinp", "dweight", "dbias"), got, matmul_backward(f64[3], f64[0], f64[1])):
        assert x.shape == want.shape and x.dtype == np.float32, name
        np.testing.assert_allclose(to_host(x), want, atol=1e-4, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("block_rows", [1, 4, 32])
@pytest.mark.parametrize("B,T,OC", [(3, 13, 45), (1, 1, 7), (2, 50, 64)])
def test_bias_kernel(block_rows, B, T, OC):
    dout = np.random.default_rng(7).standard_normal((B, T, OC)).astype(np.float32)
    out = poisoned((OC,))
    matmul_backward_bias_cuda(to_device(dout), block_rows=block_rows, out=out)
    np.testing.assert_allclose(to_host(out), dout.astype(np.float64).sum(axis=(0, 1)), atol=1e-4, rtol=1e-5)


def test_bias_kernel_is_deterministic():
    dout = to_device(np.random.default_rng(8).standard_normal((4, 33, 70)).astype(np.float32))
    first = to_host(matmul_backward_bias_cuda(dout))
    assert all(np.array_equal(first, to_host(matmul_backward_bias_cuda(dout))) for _ in range(3))


def test_empty_and_k_zero():
    z = to_device(np.zeros((0, 5), dtype=np.float32))
    w = to_device(np.ones((4, 5), dtype=np.float32))
    for v in (1, 2, 3, "cublas"):
        assert gemm_cuda(z, w, trans_b=True, version=v).shape == (0, 4)
    a = to_device(np.zeros((3, 0), dtype=np.float32))
    b = to_device(np.zeros((0, 4), dtype=np.float32))
    bias = to_device(np.arange(4, dtype=np.float32))
    for v in (1, 2, 3, "cublas"):
        np.testing.assert_array_equal(to_host(gemm_cuda(a, b, bias, version=v)), np.tile(np.arange(4.0), (3, 1)))


# ---------------------------------------------------------------------------------------------------------
# Bad input


def _dev(*shape, dtype=np.float32):
    return to_device(np.zeros(shape, dtype=dtype))


def test_launchers_reject_bad_input():
    inp, w, bias = _dev(2, 3, 5), _dev(4, 5), _dev(4)
    with pytest.raises(TypeError, match="dtype float32"):
        matmul_forward_cuda(_dev(2, 3, 5, dtype=np.float64), w)
    with pytest.raises(ValueError, match=r"weight must have shape \(\*, 5\)"):
        matmul_forward_cuda(inp, _dev(4, 6))
    with pytest.raises(ValueError, match=r"bias must have shape \(4\)"):
        matmul_forward_cuda(inp, w, _dev(5))
    with pytest.raises(ValueError, match=r"inp must have shape \(\*, \*, \*\)"):
        matmul_forward_cuda(_dev(6, 5), w)
    with pytest.raises(ValueError, match="C-contiguous"):
        matmul_forward_cuda(inp, to_device(np.zeros((5, 4), dtype=np.float32)).T)
    with pytest.raises(TypeError, match="must be"):
        matmul_forward_cuda([[[0.0] * 5] * 3] * 2, w)
    with pytest.raises(ValueError, match="version must be one of"):
        matmul_forward_cuda(inp, w, version=4)
    with pytest.raises(ValueError, match="version must be one of"):
        matmul_forward_cuda(inp, w, version="cuBLAS")
    with pytest.raises(ValueError, match="tile must be one of"):
        matmul_forward_cuda(inp, w, version=2, tile=12)
    with pytest.raises(ValueError, match=r"dout must have shape \(2, 3, 4\)"):
        matmul_backward_cuda(_dev(2, 3, 5), inp, w)
    with pytest.raises(ValueError, match="version must be one of"):
        matmul_backward_cuda(_dev(2, 3, 4), inp, w, version=0)
    with pytest.raises(ValueError, match="block_rows must be a power of two"):
        matmul_backward_bias_cuda(_dev(2, 3, 4), block_rows=3)
    with pytest.raises(ValueError, match="inner dimensions differ"):
        gemm_cuda(_dev(3, 5), _dev(4, 5))
    with pytest.raises(TypeError, match="trans_a must be True or False"):
        gemm_cuda(_dev(3, 5), _dev(5, 4), trans_a=1)
    with pytest.raises(ValueError, match=r"out must have shape \(3, 4\)"):
        gemm_cuda(_dev(3, 5), _dev(5, 4), out=_dev(4, 3))


@pytest.mark.skipif(not device.on_gpu(), reason="needs a GPU: on the CPU every array is a NumPy array")
def test_numpy_array_on_gpu_is_refused():
    with pytest.raises(TypeError, match="to_device"):
        matmul_forward_cuda(np.zeros((2, 3, 5), dtype=np.float32), _dev(4, 5))


# ---------------------------------------------------------------------------------------------------------
# TF32 switch


def test_tf32_switch_is_a_no_op_on_cpu():
    if device.on_gpu():
        pytest.skip("CPU behaviour")
    assert tf32_enabled() is False
    with tf32(True):
        assert tf32_enabled() is False     # no tensor cores on a CPU: NumPy stays float32
    with pytest.raises(TypeError, match="True or False"):
        set_tf32("yes")


@pytest.mark.skipif(not device.on_gpu(), reason="needs a GPU with CuPy")
def test_tf32_switch_changes_cublas_precision_at_run_time():
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    if props["major"] < 8:
        pytest.skip("TF32 needs compute capability 8.0 or later")
    g = xp.random.default_rng(0)
    a = g.standard_normal((512, 1024), dtype=xp.float32)
    b = g.standard_normal((1024, 256), dtype=xp.float32)
    exact = a.astype(xp.float64) @ b.astype(xp.float64)

    def rel_err():
        return float(xp.abs(gemm_cuda(a, b, version="cublas") - exact).max() / xp.abs(exact).max())

    before = tf32_enabled()
    with tf32(False):
        assert not tf32_enabled()
        fp32 = rel_err()
        with tf32(True):
            assert tf32_enabled()
            tf = rel_err()
        assert not tf32_enabled()
    assert tf32_enabled() == before
    assert fp32 < 1e-5 and tf > 1e-4, (fp32, tf)   # TF32 keeps a 10-bit mantissa: ~1e-3 relative error


# ---------------------------------------------------------------------------------------------------------
# Exercise checks: pass on the solution, fail (naming the exercise) on the stub and on plausible wrong answers


def test_check_backward_passes_on_reference(capsys):
    checks.check_matmul_backward(matmul_backward)
    assert "Exercise 4.2: correct" in capsys.readouterr().out


def _stub(*args):
    raise NotImplementedError("Exercise 4.2: write matmul_backward")


def _wrong(kind):
    def fn(dout, inp, weight):
        B, T, C = inp.shape
        OC = weight.shape[0]
        d2, i2 = dout.reshape(-1, OC), inp.reshape(-1, C)
        dinp = (d2 @ weight).reshape(B, T, C)
        dweight = d2.T @ i2
        dbias = d2.sum(axis=0)
        if kind == "dweight transposed":
            dweight = i2.T @ d2
        elif kind == "dinp with weight^T":
            dinp = (d2 @ weight.T).reshape(B, T, C)
        elif kind == "dbias over the last axis":
            dbias = dout.sum(axis=-1)
        elif kind == "dbias over axis 0 only":
            dbias = dout.sum(axis=0)
        elif kind == "dbias missing":
            dbias = None
        elif kind == "dbias zeros":
            dbias = np.zeros(OC)
        elif kind == "dbias mean":
            dbias = d2.mean(axis=0)
        elif kind == "sign error":
            dinp = -dinp
        elif kind == "dweight off-by-one slice":
            dweight = np.einsum("bto,btc->oc", dout, inp)[:, :-1]   # an off-by-one slice
        return dinp, dweight, dbias
    return fn


@pytest.mark.parametrize("kind,message", [
    ("stub", "not done yet"),
    ("dweight transposed", "dweight is transposed"),
    ("dinp with weight^T", "dinp used weight\\^T"),
    ("dbias over the last axis", "expected shape"),
    ("dbias over axis 0 only", "expected shape"),
    ("dbias missing", "got None"),
    ("dbias zeros", "every element is zero"),
    ("dbias mean", "averaged"),
    ("sign error", "sign error"),
    ("dweight off-by-one slice", "expected shape"),
])
def test_check_backward_catches_mistakes(kind, message):
    fn = _stub if kind == "stub" else _wrong(kind)
    with pytest.raises(AssertionError, match=message) as e:
        checks.check_matmul_backward(fn)
    assert "Exercise 4.2" in str(e.value)


def _kernel2_from_cu() -> str:
    """matmul_kernel2's definition as it stands in kernels/matmul.cu."""
    src = kernel_source("matmul.cu")
    start = src.index('extern "C" __global__ void matmul_kernel2')
    depth, i = 0, src.index("{", start)
    while True:
        depth += {"{": 1, "}": -1}.get(src[i], 0)
        if depth == 0:
            return src[start:i + 1] + "\n"
        i += 1


def _notebook_kernel2(student: bool = False) -> str:
    """The CUDA source of the Exercise 4.3 cell: of the solution notebook, or of its student version."""
    import nbformat
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    if student:
        from llmc_lessons.exercises import to_student
        nb = to_student(nb, NOTEBOOK.name)
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.source.startswith("# Exercise 4.3"):
            return re.search(r'r"""(.*?)"""', cell.source, re.S).group(1)
    raise AssertionError("no Exercise 4.3 cell in the solution notebook")


def _strip_markers(src: str) -> str:
    return "\n".join(line for line in src.splitlines() if "BEGIN SOLUTION" not in line and "END SOLUTION" not in line)


@pytest.mark.skipif(not NOTEBOOK.exists(), reason="the solution notebook is not written yet")
def test_notebook_kernel2_is_the_package_kernel():
    assert _strip_markers(_notebook_kernel2()).split() == _kernel2_from_cu().split()


def test_check_kernel2_passes_on_the_package_kernel(capsys):
    checks.check_matmul_kernel2(_kernel2_from_cu())
    assert "Exercise 4.3: correct" in capsys.readouterr().out


LOAD_A = "As[ty * TILE + tx] = (m < M && k < K) ? A[m * sam + k * sak] : 0.0f;"
LOAD_B = "Bs[ty * (TILE + 1) + tx] = (n0 + ty < N && k < K) ? B[k * sbk + (n0 + ty) * sbn] : 0.0f;"
ACC = "acc += As[ty * TILE + kk] * Bs[tx * (TILE + 1) + kk];"
WRONG_KERNELS = {
    "sign error": [(ACC, ACC.replace("+=", "-="))],
    "off-by-one in the k loop": [("kk < TILE; kk++", "kk < TILE - 1; kk++")],
    "accumulation with swapped indices": [(ACC, "acc += As[tx * TILE + kk] * Bs[ty * (TILE + 1) + kk];")],
    "no zero fill past the edge": [(LOAD_A, "if (m < M && k < K) As[ty * TILE + tx] = A[m * sam + k * sak];"),
                                   (LOAD_B, "if (n0 + ty < N && k < K) Bs[ty * (TILE + 1) + tx] = "
                                            "B[k * sbk + (n0 + ty) * sbn];")],
    "strides ignored": [(LOAD_A, "As[ty * TILE + tx] = (m < M && k < K) ? A[m * K + k] : 0.0f;"),
                        (LOAD_B, "Bs[ty * (TILE + 1) + tx] = (n0 + ty < N && k < K) ? B[k * N + (n0 + ty)] : 0.0f;")],
    "B tile loaded along the wrong axis": [(LOAD_B, "Bs[tx * (TILE + 1) + ty] = (n0 + ty < N && k < K) ? "
                                                    "B[k * sbk + (n0 + ty) * sbn] : 0.0f;")],
    "bias added inside the k loop": [(ACC, ACC + " if (use_bias && kk == 0) acc += bias[n < N ? n : 0];")],
}


@pytest.mark.parametrize("kind", sorted(WRONG_KERNELS))
def test_check_kernel2_catches_mistakes(kind):
    src = _kernel2_from_cu()
    for old, new in WRONG_KERNELS[kind]:
        assert old in src, f"the test's pattern is out of date with matmul.cu: {old}"
        src = src.replace(old, new)
    with pytest.raises(AssertionError, match="Exercise 4.3") as e:
        checks.check_matmul_kernel2(src)
    if kind == "strides ignored":
        assert "strides" in str(e.value)
    if kind == "accumulation with swapped indices":
        assert "transposed" in str(e.value)


# Value-correct kernels that miss the point of tiling: the check counts their accesses (llmc_lessons.cuda.trace).
NAIVE_ACC = ("acc += ((m < M && k0 + kk < K) ? A[m * sam + (k0 + kk) * sak] : 0.0f) * "
             "((n < N && k0 + kk < K) ? B[(k0 + kk) * sbk + n * sbn] : 0.0f);")
ONE_THREAD_LOADS = ("if (tx == 0) for (int c = 0; c < TILE; c++) { int kc = k0 + c; "
                    "As[ty * TILE + c] = (m < M && kc < K) ? A[m * sam + kc * sak] : 0.0f; "
                    "Bs[ty * (TILE + 1) + c] = (n0 + ty < N && kc < K) ? B[kc * sbk + (n0 + ty) * sbn] : 0.0f; }")
STRUCTURALLY_WRONG = {
    "the products read global memory, the tiles are never used": ([(ACC, NAIVE_ACC)], r"read shared memory 0 to 0 times"),
    "one thread of each row loads the whole row of the tiles": ([(LOAD_A, ONE_THREAD_LOADS), (LOAD_B, "")],
                                                                r"loaded 91 floats from global memory"),
}


@pytest.mark.parametrize("kind", sorted(STRUCTURALLY_WRONG))
def test_check_kernel2_counts_the_accesses_of_value_correct_kernels(kind):
    src = _kernel2_from_cu()
    edits, numbers = STRUCTURALLY_WRONG[kind]
    for old, new in edits:
        assert old in src
        src = src.replace(old, new)
    with pytest.raises(AssertionError, match=f"(?s)Exercise 4.3: the values are right, but the kernel does not reuse "
                                             f"its tiles.*loads 13 floats.*{numbers}.*print\\(trace.last\\)"):
        checks.check_matmul_kernel2(src)


@pytest.mark.skipif(not NOTEBOOK.exists(), reason="the solution notebook is not written yet")
def test_check_kernel2_catches_the_stub():
    stub = _notebook_kernel2(student=True)    # what the exercise generator gives students
    assert "TODO (Exercise 4.3)" in stub and "acc +=" not in stub
    with pytest.raises(AssertionError, match="Exercise 4.3 is not done yet"):
        checks.check_matmul_kernel2(stub)
    # Even without the TODO marker (a student deleted it), the unwritten tile loop is caught by the comparison.
    with pytest.raises(AssertionError, match="only the bias"):
        checks.check_matmul_kernel2(stub.replace("TODO (Exercise 4.3)", "nothing here"))


def test_check_kernel2_reports_compile_errors():
    with pytest.raises(AssertionError, match="Exercise 4.3: the kernel did not compile"):
        checks.check_matmul_kernel2(_kernel2_from_cu().replace("acc +=", "acc +== "))


def test_backward_without_bias_skips_dbias():
    gen = np.random.default_rng(7)
    inp, weight = gen.standard_normal((2, 3, 5)).astype(np.float32), gen.standard_normal((4, 5)).astype(np.float32)
    dout = gen.standard_normal((2, 3, 4)).astype(np.float32)
    dinp, dweight, dbias = matmul_backward_cuda(to_device(dout), to_device(inp), to_device(weight), has_bias=False)
    want = matmul_backward(dout.astype(np.float64), inp.astype(np.float64), weight.astype(np.float64))
    assert dbias is None
    np.testing.assert_allclose(to_host(dinp), want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_host(dweight), want[1], rtol=1e-5, atol=1e-5)
