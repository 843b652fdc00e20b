"""Lesson 09, AdamW: the reference (against torch.optim.AdamW when torch is installed), global norm and
clipping, both kernels, bad input, and the exercise checks."""
from __future__ import annotations

import math

import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.checks import adamw as checks
from llmc_lessons.cuda import kernel_source, load_kernel
from llmc_lessons.device import to_device, to_host
from llmc_lessons.layers.adamw import (_vector_head, adamw_update, adamw_update_bf16_cuda, adamw_update_cuda,
                                       clip_grad_norm, global_norm, global_norm_cuda, global_norm_squared_cuda)
from llmc_lessons.precision import from_bf16, stochastic_to_bf16, to_bf16


def _state(seed, shape=(7, 13), dtype=np.float64):
    gen = np.random.default_rng(seed)
    return gen.standard_normal(shape).astype(dtype), [gen.standard_normal(shape).astype(dtype) for _ in range(5)]


# ---------------------------------------------------------------------------------------------------------
# NumPy reference


def test_first_step_moves_each_element_by_lr_against_the_gradient_sign():
    # at t = 1 the bias-corrected m_hat = g and v_hat = g^2, so the step is lr * g / (|g| + eps) ~ lr * sign(g)
    param, grads = _state(0)
    g = grads[0]
    new, m, v = adamw_update(param, g, np.zeros_like(g), np.zeros_like(g), 1, 0.01)
    np.testing.assert_allclose(param - new, 0.01 * np.sign(g), rtol=1e-6)
    np.testing.assert_allclose(m, 0.1 * g, rtol=1e-12)
    np.testing.assert_allclose(v, 0.05 * g * g, rtol=1e-12)


def test_matches_scalar_formula_and_leaves_inputs_alone():
    param, grads = _state(1)
    m, v = grads[1] * 0.1, np.abs(grads[2]) * 0.01
    before = [a.copy() for a in (param, grads[0], m, v)]
    new, m2, v2 = adamw_update(param, grads[0], m, v, 4, 0.03, 0.8, 0.9, 1e-3, 0.1)
    for a, b in zip(before, (param, grads[0], m, v)):
        assert np.array_equal(a, b)
    i = (3, 5)
    p0, g0, m0, v0 = param[i], grads[0][i], m[i], v[i]
    mm = 0.8 * m0 + 0.2 * g0
    vv = 0.9 * v0 + 0.1 * g0 * g0
    want = p0 - 0.03 * ((mm / (1 - 0.8 ** 4)) / (math.sqrt(vv / (1 - 0.9 ** 4)) + 1e-3) + 0.1 * p0)
    assert new[i] == pytest.approx(want, rel=1e-13)
    assert m2[i] == pytest.approx(mm, rel=1e-13) and v2[i] == pytest.approx(vv, rel=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_preserves_dtype(dtype):
    param, grads = _state(2, dtype=dtype)
    out = adamw_update(param, grads[0], grads[1], np.abs(grads[2]), 2, 1e-3, weight_decay=0.1)
    assert all(a.dtype == dtype for a in out)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_reference_matches_torch_adamw_over_several_steps(weight_decay, dtype):
    torch = pytest.importorskip("torch")
    param, grads = _state(3, dtype=dtype)
    tp = torch.nn.Parameter(torch.tensor(param))
    opt = torch.optim.AdamW([tp], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    p, m, v = param, np.zeros_like(param), np.zeros_like(param)
    for t, g in enumerate(grads, start=1):
        tp.grad = torch.tensor(g)
        opt.step()
        p, m, v = adamw_update(p, g, m, v, t, 1e-2, weight_decay=weight_decay)
    tol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=tol, atol=tol)
    state = opt.state[tp]
    np.testing.assert_allclose(m, state["exp_avg"].numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(v, state["exp_avg_sq"].numpy(), rtol=tol, atol=tol)


def test_global_norm_and_clip_factor():
    _, grads = _state(4)
    want = float(np.linalg.norm(np.concatenate([g.ravel() for g in grads])))
    assert global_norm(grads) == pytest.approx(want, rel=1e-13)
    assert global_norm(grads[0]) == pytest.approx(float(np.linalg.norm(grads[0])), rel=1e-13)
    assert clip_grad_norm(grads, 1e6) == 1.0
    scale = clip_grad_norm(grads, 1.0)
    assert scale == pytest.approx(1.0 / want)
    assert global_norm([g * scale for g in grads]) == pytest.approx(1.0, rel=1e-12)
    for bad in (0.0, -1.0, "1"):
        with pytest.raises(ValueError):
            clip_grad_norm(grads, bad)


@pytest.mark.parametrize("bad, err", [
    (dict(t=0), ValueError), (dict(t=1.0), ValueError), (dict(lr=-1.0), ValueError),
    (dict(beta1=1.0), ValueError), (dict(beta2=-0.1), ValueError), (dict(m=np.zeros((3,))), ValueError),
])
def test_reference_rejects_bad_input(bad, err):
    param, grads = _state(5)
    args = dict(param=param, grad=grads[0], m=np.zeros_like(param), v=np.zeros_like(param), t=1, lr=0.1)
    args.update(bad)
    with pytest.raises(err):
        adamw_update(**args)


# ---------------------------------------------------------------------------------------------------------
# Kernels


@pytest.mark.parametrize("N, block_size", [(1000, 128), (1000, 96), (77, 512), (1, 32)])
def test_adamw_kernel_matches_reference_over_steps(N, block_size):
    param, grads = _state(6 + N, shape=(N,), dtype=np.float32)
    P, M, V = to_device(param), device.xp.zeros(N, dtype=np.float32), device.xp.zeros(N, dtype=np.float32)
    p, m, v = param.astype(np.float64), np.zeros(N), np.zeros(N)
    for t, g in enumerate(grads, start=1):
        adamw_update_cuda(P, to_device(g), M, V, t, 1e-2, weight_decay=0.1, grad_scale=0.5, block_size=block_size)
        p, m, v = adamw_update(p, g.astype(np.float64) * 0.5, m, v, t, 1e-2, weight_decay=0.1)
    np.testing.assert_allclose(to_host(P), p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_host(M), m, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(to_host(V), v, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_kernel_matches_torch(weight_decay):
    torch = pytest.importorskip("torch")
    param, grads = _state(7, shape=(5, 61), dtype=np.float32)
    tp = torch.nn.Parameter(torch.tensor(param))
    opt = torch.optim.AdamW([tp], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    P, M, V = to_device(param), device.xp.zeros_like(to_device(param)), device.xp.zeros_like(to_device(param))
    for t, g in enumerate(grads, start=1):
        tp.grad = torch.tensor(g)
        opt.step()
        adamw_update_cuda(P, to_device(g), M, V, t, 3e-3, weight_decay=weight_decay, block_size=64)
    np.testing.assert_allclose(to_host(P), tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_adamw_kernel_does_not_touch_memory_past_N():
    N, bs = 300, 128
    param, grads = _state(8, shape=(N + bs,), dtype=np.float32)
    g = grads[0].copy()
    g[N:] = np.nan                                        # a thread past N would spread NaN into the tail
    P, M, V = to_device(param), device.xp.ones(N + bs, dtype=np.float32), device.xp.ones(N + bs, dtype=np.float32)
    G = to_device(g)
    load_kernel("adamw.cu", "adamw_kernel")(
        (-(-N // bs),), (bs,), (P[:N], G[:N], M[:N], V[:N], np.int32(N), np.float32(0.01), np.float32(0.9),
                                np.float32(0.95), np.float32(0.1), np.float32(0.05), np.float32(1e-8),
                                np.float32(0.0), np.float32(1.0)))
    assert np.array_equal(to_host(P)[N:], param[N:])
    assert np.all(to_host(M)[N:] == 1) and np.all(to_host(V)[N:] == 1)
    assert np.isfinite(to_host(P)[:N]).all()


@pytest.mark.parametrize("block_size, max_blocks", [(32, 1), (64, 3), (512, 1024)])
def test_global_norm_kernel_matches_reference(block_size, max_blocks):
    _, grads = _state(9, shape=(1237,), dtype=np.float32)
    arrays = [to_device(g) for g in grads] + [to_device(np.ones((3, 5), np.float32))]
    want = global_norm([to_host(a) for a in arrays])
    assert global_norm_cuda(arrays, block_size=block_size, max_blocks=max_blocks) == pytest.approx(want, rel=1e-5)
    assert global_norm_cuda(arrays[0], block_size=block_size) == pytest.approx(global_norm(grads[0]), rel=1e-5)


@pytest.mark.parametrize("offset,n", [(0, 4003), (1, 4003), (3, 17), (0, 3)])
def test_global_norm_float4_path_and_its_tail(offset, n):
    """16-byte loads where the array starts on a 16-byte boundary, 4-byte loads where it does not (a view at
    an odd offset) and for the last N % 4 values: the same sum either way."""
    g = (np.random.default_rng(n + offset).standard_normal(n + offset) * 3).astype(np.float32)
    view = to_device(g)[offset:]
    assert (device.address(view) % 16 == 0) == (offset == 0)
    for block_size, max_blocks in ((64, 3), (256, 1024)):
        assert global_norm_cuda(view, block_size=block_size, max_blocks=max_blocks) == \
            pytest.approx(global_norm(g[offset:]), rel=1e-5)


def test_global_norm_kernel_adds_into_its_blocks_slots_and_the_launcher_zeroes_them():
    # the raw kernel adds each block's sum into that block's slot, whatever is there; the launcher starts at 0
    g = to_device(np.full(1000, 2.0, np.float32))
    partial = to_device(np.array([5.0, 7.0, -1.0], np.float32))
    load_kernel("adamw.cu", "global_norm_squared_kernel")((2,), (64,), (partial, g, np.int32(1000)))
    got = to_host(partial)
    assert got[2] == -1.0, "a slot past the grid was written"
    # 250 float4s of 4 * 2.0^2 = 16 over 128 threads: block 0 takes float4s 0-63 and 128-191, block 1 the rest
    assert got[0] - 5.0 == 128 * 16.0 and got[1] - 7.0 == 122 * 16.0
    assert global_norm_cuda(g) == pytest.approx(math.sqrt(4000.0))


@pytest.mark.parametrize("n", [1, 31, 33, 1000, 1025])
def test_global_sum_adds_every_partial_sum_once(n):
    partial = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    out = to_device(np.array([np.nan], np.float32))
    load_kernel("adamw.cu", "global_sum_deterministic_kernel")((1,), (32,), (out, to_device(partial), np.int32(n)))
    assert float(to_host(out)[0]) == pytest.approx(float(partial.astype(np.float64).sum()), rel=1e-5, abs=1e-5)


def test_global_norm_gives_the_same_bits_every_time():
    # Atomics from 1024 blocks would land in a different order at each call; a fixed-order sum does not.
    # (20 calls on a GPU, where an atomicAdd accumulator fails this; on the slow CPU emulator, two.)
    g = to_device((np.random.default_rng(5).standard_normal(1_000_003) * 3).astype(np.float32))
    first = to_host(global_norm_squared_cuda(g))
    for _ in range(20 if device.on_gpu() else 1):
        assert np.array_equal(to_host(global_norm_squared_cuda(g)), first)


def _ok():
    param, grads = _state(10, shape=(50,), dtype=np.float32)
    return dict(param=to_device(param), grad=to_device(grads[0]), m=device.xp.zeros(50, dtype=np.float32),
                v=device.xp.zeros(50, dtype=np.float32), t=1, lr=0.01)


@pytest.mark.parametrize("bad, err", [
    (dict(param=lambda a: a.astype(np.float64)), TypeError),
    (dict(grad=lambda a: a[:49]), ValueError),
    (dict(m=lambda a: device.xp.zeros(100, dtype=np.float32)[::2]), ValueError),
    (dict(v=lambda a: to_host(a).tolist()), TypeError),
    (dict(t=lambda a: 0), ValueError), (dict(lr=lambda a: -0.1), ValueError),
    (dict(grad_scale=lambda a: -1.0), ValueError), (dict(block_size=lambda a: 0), ValueError),
    (dict(block_size=lambda a: 2048), ValueError),
])
def test_adamw_launcher_rejects_bad_input(bad, err):
    args = _ok()
    for k, f in bad.items():
        args[k] = f(args.get(k))
    with pytest.raises(err):
        adamw_update_cuda(**args)


def test_global_norm_launcher_rejects_bad_input():
    with pytest.raises(TypeError):
        global_norm_cuda([device.xp.ones(4, dtype=np.float64)])
    with pytest.raises(ValueError):
        global_norm_cuda(device.xp.ones(4, dtype=np.float32), block_size=48)
    with pytest.raises(ValueError):
        global_norm_cuda(device.xp.ones(4, dtype=np.float32), max_blocks=0)


# ---------------------------------------------------------------------------------------------------------
# bf16 (lesson 14): the bf16 step keeps its weight gradients in bf16 (uint16 bits), as llm.c does


def _fmaf(a, b, c):
    """float32 fmaf in NumPy: a * b is exact in float64 (24-bit mantissas); the sum is rounded to float64, then to
    float32, which can differ from fmaf's single rounding only where the float64 sum lands on a float32 tie."""
    f64 = np.float64
    return (np.asarray(a, f64) * np.asarray(b, f64) + np.asarray(c, f64)).astype(np.float32)


def _adamw_bf16_bits(master, grads, m, v, t, lr, beta1, beta2, eps, weight_decay, grad_scale, stochastic, seed):
    """adamw_bf16_kernel's arithmetic operation for operation in float32 (adamw_bf16_element's fmaf sequence), from
    bf16 grads: the bits it must give for master, m, v and the bf16 copy."""
    f = np.float32
    g = from_bf16(grads) * f(grad_scale)
    mi = _fmaf(f(beta1), m, (f(1) - f(beta1)) * g)
    vi = _fmaf(f(beta2), v, (f(1) - f(beta2)) * g * g)
    step = (mi / f(1 - beta1 ** t)) / (np.sqrt(vi / f(1 - beta2 ** t)) + f(eps))
    p = _fmaf(-f(lr), _fmaf(f(weight_decay), master, step), master)
    return p, mi, vi, (stochastic_to_bf16(p, seed) if stochastic else to_bf16(p))


@pytest.mark.parametrize("offset, grads_shift, vector, block_size, stochastic", [
    (0, 0, True, 32, True), (3, 0, True, 96, False),
    (2, 4, True, 512, True),      # grads 8 bytes further along than the rest: still 8-byte aligned, four at a time
    (1, 1, False, 64, True),      # grads 2 bytes further along: one element a thread
])
@pytest.mark.parametrize("n", [1, 7, 1023, 4097])
def test_adamw_bf16_kernel_with_bf16_grads_gives_the_bits_of_its_float32_arithmetic(n, offset, grads_shift, vector,
                                                                                      block_size, stochastic):
    """Both paths of adamw_bf16_kernel (four elements a thread from 8-byte loads of the bf16 grads, and one) give
    the bits of _adamw_bf16_bits, which is AdamW on from_bf16(grads); the views start `offset` elements into their
    buffers (grads `grads_shift` more), the bf16 copy is poisoned with NaN, and nothing around the views changes."""
    gen = np.random.default_rng(n * 10 + offset)
    master = gen.standard_normal(n).astype(np.float32)
    grads = to_bf16(gen.standard_normal(n) * np.exp(gen.uniform(-4, 1, n)))
    m = (0.1 * gen.standard_normal(n)).astype(np.float32)
    v = gen.uniform(0, 0.05, n).astype(np.float32)
    hyper = dict(t=3, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_scale=0.7,
                 stochastic=stochastic, seed=17)

    def view(a, k):                         # a inside a poisoned buffer: k elements before it, 5 after
        pad = np.full(k + 5, np.nan if a.dtype == np.float32 else 0x7FC0, a.dtype)
        buf = to_device(np.concatenate([pad[:k], a, pad[k:]]))
        return buf, buf[k:k + n]
    (bm, dm), (bmm, dmm), (bvv, dvv) = view(master, offset), view(m, offset), view(v, offset)
    (bp, dp), (bg, dg) = view(np.full(n, 0x7FC0, np.uint16), offset), view(grads, offset + grads_shift)
    assert (_vector_head(dm, dp, dg, dmm, dvv, n) >= 0) == vector      # the path this case is meant to take
    adamw_update_bf16_cuda(dm, dp, dg, dmm, dvv, block_size=block_size, **hyper)
    want = _adamw_bf16_bits(master, grads, m, v, **hyper)
    for name, got, w in zip(("master", "m", "v", "params"), (dm, dmm, dvv, dp), want):
        np.testing.assert_array_equal(to_host(got), w, err_msg=name)
    ref = adamw_update(master.astype(np.float64), from_bf16(grads) * 0.7, m, v, 3, 1e-2, 0.9, 0.95, 1e-8, 0.1)
    for got, w in zip((dm, dmm, dvv), ref):                             # and that arithmetic is AdamW's
        np.testing.assert_allclose(to_host(got), w, rtol=1e-5, atol=1e-7)
    for buf, k in ((bm, offset), (bmm, offset), (bvv, offset)):
        assert np.isnan(np.delete(to_host(buf), np.s_[k:k + n])).all()
    for buf, k in ((bp, offset), (bg, offset + grads_shift)):
        assert (np.delete(to_host(buf), np.s_[k:k + n]) == 0x7FC0).all()


def test_vector_head_wants_16_byte_float32_arrays_and_8_byte_bf16_ones():
    """head: the elements before master, m and v (float32) start a 16-byte piece and params and grads (bf16) an
    8-byte one; grads that are 2, 4 or 6 bytes off that (1 to 3 bf16 elements) make it -1."""
    n = 40
    m32 = [device.xp.zeros(n + 16, np.float32) for _ in range(3)]
    b16 = [device.xp.zeros(n + 16, np.uint16) for _ in range(2)]
    assert all(device.address(a) % 16 == 0 for a in m32 + b16)
    for k in range(4):
        for shift in range(8):
            master, m, v = (a[k:k + n] for a in m32)
            params, grads = b16[0][k:k + n], b16[1][k + shift:k + shift + n]
            want = (-k) % 4 if shift % 4 == 0 else -1
            assert _vector_head(master, params, grads, m, v, n) == want, (k, shift)
    assert _vector_head(m32[0][1:2], b16[0][1:2], b16[1][1:2], m32[1][1:2], m32[2][1:2], 1) == 1   # at most n


def test_adamw_bf16_launcher_wants_bf16_grads():
    n = 12
    master, m, v = (device.xp.zeros(n, np.float32) for _ in range(3))
    params = device.xp.zeros(n, np.uint16)
    for grads in (device.xp.ones(n, np.float32), device.xp.ones(n, np.float64)):
        with pytest.raises(TypeError, match=r"grads must hold bf16 bits \(dtype uint16\), got"):
            adamw_update_bf16_cuda(master, params, grads, m, v, 1, 1e-3)
    with pytest.raises(TypeError, match="grads must have dtype uint16, got int16"):
        adamw_update_bf16_cuda(master, params, device.xp.ones(n, np.int16), m, v, 1, 1e-3)
    with pytest.raises(ValueError, match="grads must have shape"):
        adamw_update_bf16_cuda(master, params, device.xp.ones(n + 1, np.uint16), m, v, 1, 1e-3)
    with pytest.raises(TypeError, match="grads must be"):
        adamw_update_bf16_cuda(master, params, [0] * n, m, v, 1, 1e-3)
    assert not to_host(master).any() and not to_host(params).any()       # nothing was launched


@pytest.mark.parametrize("offset", [0, 1, 2, 4])
@pytest.mark.parametrize("n", [1, 7, 1023, 4097])
def test_global_norm_of_bf16_gives_the_float32_kernels_bits_on_the_same_values(n, offset, poisoned_allocations):
    """global_norm_squared_bf16_kernel adds the squares in the float32 kernel's order: groups of four, from one
    8-byte load where a bf16 array starts on an 8-byte boundary, which is exactly where the float32 array of the
    same values starts on a 16-byte one; one value at a time otherwise. So the same bits, close to float64."""
    gen = np.random.default_rng(n + offset)
    h = to_bf16(gen.standard_normal(n + offset) * np.exp(gen.uniform(-3, 3, n + offset)))
    g16, g32 = to_device(h)[offset:], to_device(from_bf16(h))[offset:]
    assert (device.address(g16) % 8 == 0) == (device.address(g32) % 16 == 0) == (offset % 4 == 0)
    want = float(np.sum(np.square(from_bf16(h[offset:]).astype(np.float64))))
    for block_size, max_blocks in ((32, 1), (64, 3), (512, 1024)):
        got = to_host(global_norm_squared_cuda(g16, block_size, max_blocks))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, to_host(global_norm_squared_cuda(g32, block_size, max_blocks)))
        assert float(got[0]) == pytest.approx(want, rel=1e-5)


def test_global_norm_adds_bf16_and_float32_arrays_into_one_sum():
    gen = np.random.default_rng(11)
    a16, b32 = to_bf16(gen.standard_normal(1237) * 2), gen.standard_normal(333).astype(np.float32)
    got = global_norm_squared_cuda([to_device(a16), to_device(b32)], block_size=64, max_blocks=3)
    same = global_norm_squared_cuda([to_device(from_bf16(a16)), to_device(b32)], block_size=64, max_blocks=3)
    np.testing.assert_array_equal(to_host(got), to_host(same))
    assert global_norm_cuda([to_device(a16), to_device(b32)]) == pytest.approx(global_norm([from_bf16(a16), b32]),
                                                                                rel=1e-5)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int16])
def test_global_norm_takes_float32_or_bf16_only(dtype):
    with pytest.raises(TypeError, match=r"grads\[1\] must have one of the dtypes float32, uint16"):
        global_norm_cuda([device.xp.ones(4, np.uint16), device.xp.ones(4, dtype)])


# ---------------------------------------------------------------------------------------------------------
# Exercise checks


def test_check_9_1_passes_on_the_reference():
    checks.check_adamw_update(adamw_update)


def _wrong(**flags):
    def fn(param, grad, m, v, t, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0):
        return checks._variant(param, grad, m, v, t, lr, beta1, beta2, eps, weight_decay, **flags)
    return fn


def _stub(param, grad, m, v, t, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0):
    raise NotImplementedError("Exercise 9.1: write adamw_update")


def _swapped(param, grad, m, v, t, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0):
    return adamw_update(param, grad, m, v, t, lr, beta2, beta1, eps, weight_decay)


def _in_place(param, grad, m, v, t, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0):
    new = adamw_update(param, grad, m, v, t, lr, beta1, beta2, eps, weight_decay)
    m[...] = new[1]
    return new


def _no_defaults(param, grad, m, v, t, lr, beta1, beta2, eps, weight_decay):
    return adamw_update(param, grad, m, v, t, lr, beta1, beta2, eps, weight_decay)


def _wrong_default(param, grad, m, v, t, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    return adamw_update(param, grad, m, v, t, lr, beta1, beta2, eps, weight_decay)


WRONG_9_1 = {
    "not done yet": _stub,
    "bias correction is missing": _wrong(bias_correction=False),
    "added to the gradient": _wrong(l2=True),
    "eps is inside the square root": _wrong(eps_inside=True),
    "swapped": _swapped,
    "were stored as m and v": _wrong(store_corrected=True),
    "already-updated parameter": _wrong(wd_after=True),
    "changed its input arrays": _in_place,
    "default hyperparameters failed": _no_defaults,
    "the defaults are": _wrong_default,
    "return the tuple": lambda *a, **k: adamw_update(*a, **k)[0],
}


@pytest.mark.parametrize("why", list(WRONG_9_1))
def test_check_9_1_fails_on_wrong_answers_and_names_the_mistake(why):
    with pytest.raises(AssertionError) as info:
        checks.check_adamw_update(WRONG_9_1[why])
    msg = str(info.value)
    assert "Exercise 9.1" in msg
    assert why in msg, msg


ADAMW_SRC = kernel_source("adamw.cu")
BODY_START = "    if (i < N) {  // the last block sticks out past the end"
UPDATE = "params[i] = p - lr * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * p);"


def test_the_kernel_body_is_where_the_tests_expect_it():
    assert BODY_START in ADAMW_SRC and UPDATE in ADAMW_SRC


def test_check_9_2_passes_on_the_course_kernel():
    checks.check_adamw_kernel(ADAMW_SRC)


def test_check_9_2_passes_on_the_course_kernel_with_its_todo_comment_left_in():
    checks.check_adamw_kernel(ADAMW_SRC.replace(BODY_START, "    // TODO (Exercise 9.2): the update\n" + BODY_START))


def _body_removed(src):
    start = src.index(BODY_START)
    end = src.index("// -----", start)
    return src[:start] + "}\n\n" + src[end:]


WRONG_9_2 = {
    "wrote nothing": _body_removed(ADAMW_SRC),
    "past its end": ADAMW_SRC.replace(BODY_START, "    {"),
    "bias correction is missing": ADAMW_SRC.replace("mi / beta1_correction", "mi").replace("vi / beta2_correction",
                                                                                          "vi"),
    "eps is inside the square root": ADAMW_SRC.replace("sqrtf(v_hat) + eps", "sqrtf(v_hat + eps)"),
    "grad_scale": ADAMW_SRC.replace("grads[i] * grad_scale", "grads[i]"),
    "swapped": ADAMW_SRC.replace("beta1 * m[i] + (1.0f - beta1)", "beta2 * m[i] + (1.0f - beta2)")
                        .replace("beta2 * v[i] + (1.0f - beta2)", "beta1 * v[i] + (1.0f - beta1)"),
    "never written": ADAMW_SRC.replace("        v[i] = vi;\n", ""),
    "added to the gradient": ADAMW_SRC.replace("float g = grads[i] * grad_scale;",
                                               "float g = grads[i] * grad_scale + weight_decay * params[i];")
                                      .replace("+ weight_decay * p)", ")"),
}


@pytest.mark.parametrize("why", list(WRONG_9_2))
def test_check_9_2_fails_on_wrong_kernels(why):
    src = WRONG_9_2[why]
    assert src != ADAMW_SRC
    with pytest.raises(AssertionError) as info:
        checks.check_adamw_kernel(src)
    msg = str(info.value)
    assert "Exercise 9.2" in msg
    assert why in msg, msg
