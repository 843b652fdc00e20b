"""Lesson 02, the encoder: references, gradient check, every kernel, bad input, and the exercise checks."""
from __future__ import annotations

from pathlib import Path

import nbformat
import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.checks import encoder as checks
from llmc_lessons.checks import poisoned
from llmc_lessons.cuda import load_kernel
from llmc_lessons.device import to_device, to_host
from llmc_lessons.exercises import to_student
from llmc_lessons.gradcheck import gradcheck
from llmc_lessons.layers.encoder import (_token_buckets, encoder_backward, encoder_backward_cuda, encoder_forward,
                                         encoder_forward_cuda)
from llmc_lessons.precision import from_bf16, to_bf16

NOTEBOOK = Path(__file__).resolve().parents[1] / "solutions" / "02_embeddings.ipynb"


def _ids(gen, B, T, high):
    return gen.integers(0, high, size=(B, T)).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------
# NumPy reference


def test_forward_matches_loops():
    gen = np.random.default_rng(0)
    B, T, C, V, maxT = 2, 4, 5, 9, 6
    inp, wte, wpe = _ids(gen, B, T, V), gen.standard_normal((V, C)), gen.standard_normal((maxT, C))
    out = encoder_forward(inp, wte, wpe)
    for b in range(B):
        for t in range(T):
            np.testing.assert_array_equal(out[b, t], wte[inp[b, t]] + wpe[t])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_preserves_dtype(dtype):
    gen = np.random.default_rng(1)
    inp = _ids(gen, 2, 3, 5)
    out = encoder_forward(inp, gen.standard_normal((5, 4)).astype(dtype), gen.standard_normal((7, 4)).astype(dtype))
    dwte, dwpe = encoder_backward(out, inp, 5, 7)
    assert out.dtype == dwte.dtype == dwpe.dtype == dtype
    assert dwte.shape == (5, 4) and dwpe.shape == (7, 4)


def test_backward_adds_repeated_tokens_and_sums_over_batch():
    inp = np.array([[3, 1, 3], [3, 0, 1]], dtype=np.int32)
    dout = np.arange(2 * 3 * 2, dtype=np.float64).reshape(2, 3, 2)
    dwte, dwpe = encoder_backward(dout, inp, 5, 4)
    np.testing.assert_array_equal(dwte[3], dout[0, 0] + dout[0, 2] + dout[1, 0])   # token 3, three times
    np.testing.assert_array_equal(dwte[1], dout[0, 1] + dout[1, 2])
    np.testing.assert_array_equal(dwte[[2, 4]], 0)                                 # never used
    np.testing.assert_array_equal(dwpe[:3], dout.sum(axis=0))
    np.testing.assert_array_equal(dwpe[3], 0)                                      # position T.. unused


def test_backward_gradcheck_float64():
    gen = np.random.default_rng(2)
    B, T, C, V, maxT = 2, 5, 4, 6, 7
    inputs = dict(inp=_ids(gen, B, T, 3), wte=gen.standard_normal((V, C)), wpe=gen.standard_normal((maxT, C)))
    gradcheck(lambda inp, wte, wpe: encoder_forward(inp, wte, wpe),
              lambda dy, inp, wte, wpe: dict(zip(("wte", "wpe"), encoder_backward(dy, inp, V, maxT))),
              inputs, title="encoder").assert_ok()


def test_reference_rejects_bad_input():
    wte, wpe = np.ones((5, 3)), np.ones((4, 3))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 5\)"):
        encoder_forward(np.array([[0, 5]]), wte, wpe)
    with pytest.raises(ValueError, match=r"token ids must lie"):
        encoder_backward(np.ones((1, 2, 3)), np.array([[-1, 0]]), 5, 4)
    with pytest.raises(TypeError, match="integer token ids"):
        encoder_forward(np.array([[0.0, 1.0]]), wte, wpe)
    with pytest.raises(ValueError, match="longer than"):
        encoder_forward(np.zeros((1, 5), np.int32), wte, wpe)
    with pytest.raises(ValueError, match="same C"):
        encoder_forward(np.zeros((1, 2), np.int32), wte, np.ones((4, 2)))
    with pytest.raises(ValueError, match="dout must have shape"):
        encoder_backward(np.ones((1, 3, 3)), np.zeros((1, 2), np.int32), 5, 4)


# ---------------------------------------------------------------------------------------------------------
# Kernels, launched directly: outputs poisoned with NaN, and a NaN tail past the end that must stay NaN


@pytest.mark.parametrize("block_size", [32, 96, 256])
def test_forward_kernel1(block_size):
    gen = np.random.default_rng(block_size)
    B, T, C, V, maxT = 3, 7, 37, 29, 9                      # B*T*C = 777
    inp, wte, wpe = _ids(gen, B, T, V), gen.standard_normal((V, C)), gen.standard_normal((maxT, C))
    wte, wpe = wte.astype(np.float32), wpe.astype(np.float32)
    n = B * T * C
    buf = poisoned((n + block_size,))
    load_kernel("encoder.cu", "encoder_forward_kernel1")(
        (-(-n // block_size),), (block_size,),
        (buf[:n], to_device(inp), to_device(wte), to_device(wpe), np.int32(B), np.int32(T), np.int32(C)))
    np.testing.assert_array_equal(to_host(buf[:n]).reshape(B, T, C), encoder_forward(inp, wte, wpe))
    assert np.isnan(to_host(buf[n:])).all()


@pytest.mark.parametrize("block_size", [32, 64, 160])
def test_forward_kernel2_float4(block_size):
    gen = np.random.default_rng(10 + block_size)
    B, T, C, V, maxT = 3, 5, 44, 17, 6                      # 165 float4s
    inp = _ids(gen, B, T, V)
    wte = gen.standard_normal((V, C)).astype(np.float32)
    wpe = gen.standard_normal((maxT, C)).astype(np.float32)
    n4 = B * T * C // 4
    buf = poisoned((B * T * C + 4 * block_size,))
    load_kernel("encoder.cu", "encoder_forward_kernel2")(
        (-(-n4 // block_size),), (block_size,),
        (buf[:B * T * C], to_device(inp), to_device(wte), to_device(wpe), np.int32(B), np.int32(T), np.int32(C)))
    np.testing.assert_array_equal(to_host(buf[:B * T * C]).reshape(B, T, C), encoder_forward(inp, wte, wpe))
    assert np.isnan(to_host(buf[B * T * C:])).all()


def _backward_case(seed, B=3, T=7, C=37, V=20, maxT=9, distinct=6):
    gen = np.random.default_rng(seed)
    inp = _ids(gen, B, T, distinct)                          # few distinct ids: every token repeats
    dout = gen.standard_normal((B, T, C)).astype(np.float32)
    init_wte = gen.standard_normal((V, C)).astype(np.float32)  # the kernels accumulate (+=): start from noise
    init_wpe = gen.standard_normal((maxT, C)).astype(np.float32)
    want_wte, want_wpe = encoder_backward(dout.astype(np.float64), inp, V, maxT)
    return inp, dout, init_wte, init_wpe, init_wte + want_wte, init_wpe + want_wpe


@pytest.mark.parametrize("block_size", [32, 100, 256])
def test_backward_kernel1_atomic_accumulates(block_size):
    inp, dout, init_wte, init_wpe, want_wte, want_wpe = _backward_case(block_size)
    B, T, C = dout.shape
    dwte, dwpe = to_device(init_wte), to_device(init_wpe)
    load_kernel("encoder.cu", "encoder_backward_kernel1")(
        (-(-(B * T * C) // block_size),), (block_size,),
        (dwte, dwpe, to_device(dout), to_device(inp), np.int32(B), np.int32(T), np.int32(C)))
    np.testing.assert_allclose(to_host(dwte), want_wte, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(to_host(dwpe), want_wpe, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block_size", [32, 100, 256])
def test_backward_kernel2_deterministic_pair_accumulates(block_size):
    inp, dout, init_wte, init_wpe, want_wte, want_wpe = _backward_case(block_size + 1)
    B, T, C = dout.shape
    positions, bucket_start, bucket_token = _token_buckets(to_device(inp))
    nb = int(bucket_token.size)
    dwte, dwpe = to_device(init_wte), to_device(init_wpe)
    load_kernel("encoder.cu", "encoder_backward_wte_kernel2")(
        (-(-(nb * C) // block_size),), (block_size,),
        (dwte, to_device(dout), positions, bucket_start, bucket_token, np.int32(nb), np.int32(C)))
    load_kernel("encoder.cu", "encoder_backward_wpe_kernel2")(
        (-(-(T * C) // block_size),), (block_size,), (dwpe, to_device(dout), np.int32(B), np.int32(T), np.int32(C)))
    np.testing.assert_allclose(to_host(dwte), want_wte, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(to_host(dwpe), want_wpe, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("on_host", [False, True])   # host ids: what GPT2.forward makes them from
def test_token_buckets(on_host):
    inp = np.array([[5, 2, 5, 7], [2, 5, 1, 2]], dtype=np.int32)
    buckets = _token_buckets(inp if on_host else to_device(inp))
    assert all(isinstance(a, np.ndarray if on_host else device.xp.ndarray) for a in buckets)
    positions, start, token = (to_host(a) for a in buckets)
    assert positions.dtype == start.dtype == token.dtype == np.int32
    assert token.tolist() == [1, 2, 5, 7]
    assert start.tolist() == [0, 1, 4, 7, 8]
    assert positions.tolist() == [6, 1, 4, 7, 0, 2, 5, 3]   # ascending inside each bucket


def test_backward_with_buckets_made_ahead():
    inp, dout, _, _, _, _ = _backward_case(3, B=2, T=6, C=23, V=15, maxT=8)
    buckets = tuple(to_device(a) for a in _token_buckets(inp))
    got = encoder_backward_cuda(to_device(dout), to_device(inp), 15, 8, buckets=buckets)
    want = encoder_backward_cuda(to_device(dout), to_device(inp), 15, 8)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(to_host(a), to_host(b))
    start = [np.full((15, 23), 0.5, np.float32), np.full((8, 23), -1.0, np.float32)]
    into = [to_device(a.copy()) for a in start]
    back = encoder_backward_cuda(to_device(dout), to_device(inp), 15, 8, buckets=buckets, dwte=into[0], dwpe=into[1])
    assert back[0] is into[0] and back[1] is into[1]
    for a, b, s0 in zip(into, want, start):
        np.testing.assert_allclose(to_host(a), to_host(b) + s0, rtol=1e-6, atol=1e-6)   # added into, not overwritten
    with pytest.raises(ValueError, match="dwte must have shape"):
        encoder_backward_cuda(to_device(dout), to_device(inp), 15, 8, dwte=into[0][:-1].copy())
    with pytest.raises(ValueError, match="buckets do not fit"):
        encoder_backward_cuda(to_device(dout), to_device(inp), 15, 8, buckets=(buckets[0][:-1].copy(), *buckets[1:]))


@pytest.mark.parametrize("version,block_size", [(1, 32), (1, 128), (2, 64), (2, 256)])
def test_forward_launcher(version, block_size):
    gen = np.random.default_rng(version * 1000 + block_size)
    B, T, C, V, maxT = 2, 9, 28, 31, 12
    inp = _ids(gen, B, T, V)
    wte = gen.standard_normal((V, C)).astype(np.float32)
    wpe = gen.standard_normal((maxT, C)).astype(np.float32)
    out = encoder_forward_cuda(to_device(inp), to_device(wte), to_device(wpe), block_size=block_size, version=version)
    assert out.shape == (B, T, C) and out.dtype == np.float32
    np.testing.assert_array_equal(to_host(out), encoder_forward(inp, wte, wpe))


@pytest.mark.parametrize("deterministic,block_size", [(False, 64), (False, 1024), (True, 32), (True, 192)])
def test_backward_launcher(deterministic, block_size):
    inp, dout, _, _, _, _ = _backward_case(7 + block_size, B=2, T=6, C=23, V=15, maxT=8)
    want_wte, want_wpe = encoder_backward(dout.astype(np.float64), inp, 15, 8)
    dwte, dwpe = encoder_backward_cuda(to_device(dout), to_device(inp), 15, 8, deterministic=deterministic,
                                       block_size=block_size)
    assert dwte.shape == (15, 23) and dwpe.shape == (8, 23) and dwte.dtype == dwpe.dtype == np.float32
    np.testing.assert_allclose(to_host(dwte), want_wte, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(to_host(dwpe), want_wpe, rtol=1e-6, atol=1e-6)


def test_deterministic_backward_is_bitwise_repeatable():
    inp, dout, *_ = _backward_case(99, B=4, T=16, C=9, V=8, maxT=16, distinct=3)
    runs = [[to_host(a) for a in encoder_backward_cuda(to_device(dout), to_device(inp), 8, 16)] for _ in range(3)]
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert np.array_equal(a, b)


def test_launchers_reject_bad_input():
    inp = to_device(np.zeros((2, 3), np.int32))
    wte, wpe = to_device(np.ones((5, 8), np.float32)), to_device(np.ones((4, 8), np.float32))
    with pytest.raises(TypeError, match="dtype int32"):
        encoder_forward_cuda(to_device(np.zeros((2, 3), np.int64)), wte, wpe)
    with pytest.raises(TypeError, match="dtype float32"):
        encoder_forward_cuda(inp, to_device(np.ones((5, 8))), wpe)
    with pytest.raises(ValueError, match="shape"):
        encoder_forward_cuda(inp, wte, to_device(np.ones((4, 7), np.float32)))
    with pytest.raises(ValueError, match="C-contiguous"):
        encoder_forward_cuda(inp, to_device(np.ones((5, 16), np.float32))[:, ::2], wpe)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 5\)"):
        encoder_forward_cuda(to_device(np.full((2, 3), 5, np.int32)), wte, wpe)
    with pytest.raises(TypeError, match="int32"):   # check_ids=False skips only the range check
        encoder_forward_cuda(to_device(np.zeros((2, 3), np.int64)), wte, wpe, check_ids=False)
    with pytest.raises(ValueError, match="longer than"):
        encoder_forward_cuda(to_device(np.zeros((1, 5), np.int32)), wte, wpe)
    with pytest.raises(ValueError, match="C % 4 == 0"):
        encoder_forward_cuda(inp, to_device(np.ones((5, 6), np.float32)), to_device(np.ones((4, 6), np.float32)),
                             version=2)
    with pytest.raises(ValueError, match="aligned"):      # a float4 view that starts 4 bytes into a buffer
        big = to_device(np.ones(5 * 8 + 4, np.float32))
        encoder_forward_cuda(inp, big[1:41].reshape(5, 8), wpe, version=2)
    with pytest.raises(ValueError, match="version"):
        encoder_forward_cuda(inp, wte, wpe, version=3)
    with pytest.raises(ValueError, match="block_size"):
        encoder_forward_cuda(inp, wte, wpe, block_size=2048)
    with pytest.raises(TypeError, match="block_size"):
        encoder_forward_cuda(inp, wte, wpe, block_size=64.0)
    with pytest.raises(TypeError):
        encoder_forward_cuda([[0, 1]], wte, wpe)
    dout = to_device(np.ones((2, 3, 8), np.float32))
    with pytest.raises(ValueError, match="shape"):
        encoder_backward_cuda(to_device(np.ones((2, 4, 8), np.float32)), inp, 5, 4)
    with pytest.raises(ValueError, match="maxT"):
        encoder_backward_cuda(dout, inp, 5, 2)
    with pytest.raises(ValueError, match="V must be a positive int"):
        encoder_backward_cuda(dout, inp, 0, 4)
    with pytest.raises(TypeError, match="deterministic"):
        encoder_backward_cuda(dout, inp, 5, 4, deterministic="yes")


@pytest.mark.skipif(not device.on_gpu(), reason="only a GPU backend refuses NumPy arrays")
def test_launchers_reject_numpy_on_gpu():
    with pytest.raises(TypeError, match="CuPy"):
        encoder_forward_cuda(np.zeros((1, 2), np.int32), np.ones((3, 4), np.float32), np.ones((2, 4), np.float32))


# ---------------------------------------------------------------------------------------------------------
# bf16 gradients (lesson 14): the bf16 step keeps dwte and dwpe in bf16 (uint16 bits), as llm.c does


def _bf16_backward_bits(init_wte, init_wpe, dout, inp):
    """The bf16 kernels' bits: each element's float32 sum in the deterministic kernels' order (a token's positions
    ascending, b ascending for a position), added to its stored bf16 value and rounded once; the rest unchanged."""
    B, T, C = dout.shape
    ids, rows = inp.reshape(-1), dout.reshape(B * T, C)
    dwte, dwpe = init_wte.copy(), init_wpe.copy()
    for token in np.unique(ids):
        s = np.zeros(C, np.float32)
        for pos in np.flatnonzero(ids == token):
            s += rows[pos]
        dwte[token] = to_bf16(from_bf16(init_wte[token]) + s)
    s = np.zeros((T, C), np.float32)
    for b in range(B):
        s += dout[b]
    dwpe[:T] = to_bf16(from_bf16(init_wpe[:T]) + s)
    return dwte, dwpe


@pytest.mark.parametrize("B, T, C, V, maxT, distinct, block_size", [
    (3, 7, 37, 20, 9, 6, 32), (1, 1, 1, 3, 2, 1, 64), (4, 16, 100, 50, 20, 7, 256), (2, 9, 13, 11, 9, 11, 1024)])
def test_backward_into_bf16_gradients_adds_and_rounds_once(B, T, C, V, maxT, distinct, block_size):
    """Random bf16 dwte and dwpe added into: the bits of _bf16_backward_bits, which are the float32 kernels' results
    rounded to bf16 (the same sums in the same order), close to the float64 reference; rows no token or position
    reaches keep their bits."""
    inp, dout, init_wte, init_wpe, _, _ = _backward_case(B * 1000 + C, B, T, C, V, maxT, distinct)
    init_wte, init_wpe = to_bf16(init_wte), to_bf16(init_wpe)
    dwte, dwpe = to_device(init_wte.copy()), to_device(init_wpe.copy())    # a copy: to_device may not make one
    back = encoder_backward_cuda(to_device(dout), to_device(inp), V, maxT, block_size=block_size, dwte=dwte,
                                 dwpe=dwpe)
    assert back[0] is dwte and back[1] is dwpe
    got = [to_host(a) for a in back]
    for a, want in zip(got, _bf16_backward_bits(init_wte, init_wpe, dout, inp)):
        np.testing.assert_array_equal(a, want)
    as_float = encoder_backward_cuda(to_device(dout), to_device(inp), V, maxT, block_size=block_size,
                                     dwte=to_device(from_bf16(init_wte)), dwpe=to_device(from_bf16(init_wpe)))
    for a, f in zip(got, as_float):
        np.testing.assert_array_equal(a, to_bf16(to_host(f)))
    for a, init, d in zip(got, (init_wte, init_wpe), encoder_backward(dout.astype(np.float64), inp, V, maxT)):
        np.testing.assert_allclose(from_bf16(a), from_bf16(init) + d, rtol=2**-8, atol=1e-5)
    unused = np.setdiff1d(np.arange(V), inp)
    assert np.array_equal(got[0][unused], init_wte[unused]) and np.array_equal(got[1][T:], init_wpe[T:])


def test_backward_into_bf16_gradients_rejects_mixed_dtypes_and_atomics():
    inp, dout = to_device(np.zeros((2, 3), np.int32)), to_device(np.ones((2, 3, 8), np.float32))
    w16, p16 = to_device(np.zeros((5, 8), np.uint16)), to_device(np.zeros((4, 8), np.uint16))
    w32, p32 = to_device(np.zeros((5, 8), np.float32)), to_device(np.zeros((4, 8), np.float32))
    for given in (dict(dwte=w16, dwpe=p32), dict(dwte=w32, dwpe=p16), dict(dwte=w16), dict(dwpe=p16)):
        with pytest.raises(TypeError, match="dwte and dwpe must have the same dtype"):
            encoder_backward_cuda(dout, inp, 5, 4, **given)
    with pytest.raises(ValueError, match="need deterministic=True"):
        encoder_backward_cuda(dout, inp, 5, 4, deterministic=False, dwte=w16, dwpe=p16)
    with pytest.raises(TypeError, match="dwte must have one of the dtypes float32, uint16, got float64"):
        encoder_backward_cuda(dout, inp, 5, 4, dwte=to_device(np.zeros((5, 8))), dwpe=p32)
    assert not any(to_host(a).any() for a in (w16, p16, w32, p32))         # nothing was launched


# ---------------------------------------------------------------------------------------------------------
# Exercise 2.2: the NumPy backward


def _stub(dout, inp, V, maxT):
    raise NotImplementedError("Exercise 2.2: encoder_backward in NumPy")


def _wrong(kind):
    def fn(dout, inp, V, maxT):
        B, T, C = dout.shape
        dwte, dwpe = np.zeros((V, C)), np.zeros((maxT, C))
        if kind == "fancy_add":
            dwte[inp] += dout
        elif kind == "assign":
            dwte[inp] = dout
        else:
            np.add.at(dwte, inp, dout)
        if kind == "only_b0":
            dwpe[:T] = dout[0]
        elif kind == "mean":
            dwpe[:T] = dout.mean(axis=0)
        elif kind == "wrong_axis":
            return dwte, dout.sum(axis=1)                 # (B, C): summed over t instead of b
        elif kind == "no_padding_rows":
            return dwte, dout.sum(axis=0)                 # (T, C) instead of (maxT, C)
        elif kind == "shift":
            dwpe[1:T + 1] = dout.sum(axis=0)              # off by one position
        elif kind == "sign":
            dwpe[:T] = -dout.sum(axis=0)
        else:
            dwpe[:T] = dout.sum(axis=0)
        return dwte, dwpe
    return fn


def test_check_encoder_backward_passes_on_solution(capsys):
    checks.check_encoder_backward(encoder_backward)
    assert "Exercise 2.2: correct" in capsys.readouterr().out


def test_check_encoder_backward_fails_on_stub():
    with pytest.raises(AssertionError, match="Exercise 2.2 is not done yet"):
        checks.check_encoder_backward(_stub)


@pytest.mark.parametrize("kind,cause", [
    ("fancy_add", r"np\.add\.at"), ("assign", r"np\.add\.at"), ("only_b0", "only the first sequence"),
    ("mean", "mean over the batch"), ("wrong_axis", r"dwpe\): expected shape \(9, 7\)"),
    ("no_padding_rows", r"dwpe\): expected shape \(9, 7\).*rows t >= T stay zero"),
    ("shift", "shifted by 1 along axis 0"), ("sign", "sign error"),
])
def test_check_encoder_backward_catches_mistakes(kind, cause):
    with pytest.raises(AssertionError, match=f"(?s)Exercise 2.2.*{cause}"):
        checks.check_encoder_backward(_wrong(kind))


def test_check_encoder_backward_wants_a_pair():
    with pytest.raises(AssertionError, match=r"return the pair \(dwte, dwpe\)"):
        checks.check_encoder_backward(lambda dout, inp, V, maxT: encoder_backward(dout, inp, V, maxT)[0])


# ---------------------------------------------------------------------------------------------------------
# Exercise 2.3: the forward kernel, as written in the solution notebook and as the student sees it


def _exercise_source(student: bool) -> str:
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    if student:
        nb = to_student(nb, NOTEBOOK.name)
    cell = next(c for c in nb.cells if c.cell_type == "code" and "# Exercise 2.3:" in c.source)
    namespace = {}
    exec(cell.source, namespace)
    return namespace["encoder_forward_src"]


SOLUTION_LINE = "out[idx] = wte[ix * C + c] + wpe[t * C + c];"


def test_check_forward_kernel_passes_on_notebook_solution(capsys):
    checks.check_encoder_forward_kernel(_exercise_source(student=False))
    assert "Exercise 2.3: correct" in capsys.readouterr().out


def test_check_forward_kernel_fails_on_student_stub():
    src = _exercise_source(student=True)
    assert "TODO (Exercise 2.3)" in src and SOLUTION_LINE not in src
    with pytest.raises(AssertionError, match="Exercise 2.3 is not done yet"):
        checks.check_encoder_forward_kernel(src)
    # without the TODO marker, the poisoned output alone also fails the check, saying why
    with pytest.raises(AssertionError, match="(?s)Exercise 2.3.*never written"):
        checks.check_encoder_forward_kernel(src.replace("TODO (Exercise 2.3)", "nothing here"))


@pytest.mark.parametrize("old,new,cause", [
    (SOLUTION_LINE, "out[idx] = wte[ix * C + c];", "wpe was left out"),
    (SOLUTION_LINE, "out[idx] = wte[bt * C + c] + wpe[t * C + c];", "indexed by the position"),
    ("int t = bt % T;", "int t = bt / T;", r"bt / T \(that is b\)"),
    (SOLUTION_LINE, "out[idx] = wte[ix * C + c] - wpe[t * C + c];", "elements are wrong"),
    (SOLUTION_LINE, "if (c > 0) { out[idx] = wte[ix * C + c] + wpe[t * C + c]; }", "never written"),
])
def test_check_forward_kernel_catches_mistakes(old, new, cause):
    src = _exercise_source(student=False)
    assert old in src
    with pytest.raises(AssertionError, match=f"(?s)Exercise 2.3.*{cause}"):
        checks.check_encoder_forward_kernel(src.replace(old, new))


def test_check_forward_kernel_fails_on_a_value_correct_kernel_whose_accesses_do_not_coalesce():
    """Thread idx owns channel idx / (B*T) of row idx % (B*T): every element is written right, but neighbouring
    threads touch floats C apart."""
    src = _exercise_source(student=False)
    for old, new in (("int bt = idx / C;", "int bt = idx % (B * T);"), ("int c = idx % C;", "int c = idx / (B * T);"),
                     ("out[idx] =", "out[bt * C + c] =")):
        assert old in src
        src = src.replace(old, new)
    with pytest.raises(AssertionError, match=r"(?s)Exercise 2.3: the values are right, but the warps' accesses to out "
                                             r"are not coalesced: \d+ requests moved \d+ sectors.*the reference kernel "
                                             r"moves \d+.*c = idx % C.*print\(trace.last\)"):
        checks.check_encoder_forward_kernel(src)


def test_fuzz_the_argument_checks_of_the_encoder_launchers():
    """Random ids (dtype, shape, values, extremes included): either an error naming the problem, or the
    reference's answer; never a read outside wte."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    gen = np.random.default_rng(4)
    wte, wpe = gen.standard_normal((5, 8)).astype(np.float32), gen.standard_normal((4, 8)).astype(np.float32)
    value = st.one_of(st.integers(0, 4), st.integers(-2, 7), st.sampled_from([-2**31, 2**31 - 1]))

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(dtype=st.sampled_from([np.int32, np.int32, np.int64, np.int16, np.float32]),
           shape=st.sampled_from([(2, 3), (2, 3), (1, 6), (6,), (1, 1, 6)]),
           values=st.lists(value, min_size=6, max_size=6), backward=st.booleans())
    def run(dtype, shape, values, backward):
        ids = np.array(values, dtype=np.int64).astype(dtype).reshape(shape)
        valid = (dtype is np.int32 and len(shape) == 2 and shape[1] <= 4 and min(values) >= 0 and max(values) < 5)
        try:
            if backward:
                dout = np.ones(shape + (8,), np.float32) if len(shape) == 2 else np.ones((2, 3, 8), np.float32)
                dwte, _ = encoder_backward_cuda(to_device(dout), to_device(ids), 5, 4)
            else:
                out = encoder_forward_cuda(to_device(ids), to_device(wte), to_device(wpe))
        except (TypeError, ValueError) as e:
            assert not valid, f"valid ids refused: {e}"
            return
        assert valid, f"invalid ids accepted: dtype {np.dtype(dtype)}, shape {shape}, {values}"
        if backward:
            np.testing.assert_allclose(to_host(dwte), encoder_backward(dout, ids, 5, 4)[0], rtol=1e-6)
        else:
            np.testing.assert_allclose(to_host(out), encoder_forward(ids, wte, wpe), rtol=1e-6)
    run()
