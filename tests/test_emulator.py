"""The CPU emulator: every supported construct, every error path, the cache and argument checking.

These run on the CPU backend only (on a GPU the same RawKernel goes to CuPy; tools/gpu_check.sh covers that).
"""
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.cuda import CompileError, KernelError, RawKernel

pytestmark = pytest.mark.skipif(device.on_gpu(), reason="emulator tests run on the CPU backend")

rng = np.random.default_rng(0)


def nan(n, dtype=np.float32):
    return np.full(n, np.nan if np.dtype(dtype).kind == "f" else -1, dtype=dtype)


def run(src, name, grid, block, args, shared_mem=0):
    RawKernel(src, name)(grid, block, args, shared_mem=shared_mem)


# ---------------------------------------------------------------------------------------------------------
# Constructs

def test_indices_2d_3d():
    src = r'''
    extern "C" __global__ void ids(int* out) {
        int bx = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
        int tx = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
        int i = bx * (blockDim.x * blockDim.y * blockDim.z) + tx;
        out[i] = i * 10 + (warpSize == 32);
    }'''
    grid, block = (3, 2, 2), (5, 3, 2)
    n = 12 * 30
    out = nan(n, np.int32)
    run(src, "ids", grid, block, (out,))
    assert np.array_equal(out, np.arange(n) * 10 + 1)


def test_shared_static_dynamic_and_syncthreads():
    src = r'''
    extern "C" __global__ void reverse(float* out, const float* inp, int n) {
        __shared__ float tile[64], extra;
        extern __shared__ float dyn[];
        int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
        tile[t] = i < n ? inp[i] : 0.0f;
        dyn[t] = 2.0f * tile[t];
        if (t == 0) extra = 1.0f;
        __syncthreads();
        int j = blockIdx.x * blockDim.x + (blockDim.x - 1 - t);
        if (j < n) out[j] = 0.5f * dyn[t] + extra - 1.0f;   // = tile[t], read through both kinds of shared
    }'''
    n = 100
    inp = rng.standard_normal(n).astype(np.float32)
    out = nan(n)
    run(src, "reverse", (2,), (64,), (out, inp, np.int32(n)), shared_mem=64 * 4)
    ref = np.zeros(n, np.float32)
    for b in range(2):
        for t in range(64):
            i, j = b * 64 + t, b * 64 + 63 - t
            if j < n:
                ref[j] = inp[i] if i < n else 0.0
    assert np.allclose(out, ref, rtol=1e-6, atol=1e-6) and not np.isnan(out).any()


def test_shared_memory_is_poisoned_per_block():
    src = r'''
    extern "C" __global__ void leftover(float* out) {
        __shared__ float s[32];
        if (blockIdx.x == 0) s[threadIdx.x] = 1.0f;   // block 1 must not see block 0's values
        __syncthreads();
        out[blockIdx.x * 32 + threadIdx.x] = s[threadIdx.x];
    }'''
    out = np.zeros(64, np.float32)
    run(src, "leftover", (2,), (32,), (out,))
    assert np.all(out[:32] == 1) and np.all(np.isnan(out[32:]))


@pytest.mark.parametrize("width", [32, 16, 8])
def test_shuffles_match_cuda_semantics(width):
    src = r'''
    extern "C" __global__ void shfl(int* out, int width) {
        int lane = threadIdx.x % 32, base = threadIdx.x * 4;
        out[base + 0] = __shfl_sync(0xffffffff, lane * 10, 3, width);
        out[base + 1] = __shfl_up_sync(0xffffffff, lane * 10, 2, width);
        out[base + 2] = __shfl_down_sync(0xffffffff, lane * 10, 5, width);
        out[base + 3] = __shfl_xor_sync(0xffffffff, lane * 10, 4, width);
    }'''
    out = nan(64 * 4, np.int32)
    run(src, "shfl", (1,), (64,), (out, np.int32(width)))
    out = out.reshape(64, 4)
    for t in range(64):
        lane = t % 32
        seg = lane - lane % width
        assert out[t, 0] == (seg + 3 % width) * 10
        assert out[t, 1] == (lane - 2 if lane % width >= 2 else lane) * 10
        assert out[t, 2] == (lane + 5 if lane % width + 5 < width else lane) * 10
        assert out[t, 3] == (lane ^ 4 if (lane ^ 4) // width == lane // width else lane) * 10


def test_warp_reduction_and_votes():
    src = r'''
    #include "common.cuh"
    extern "C" __global__ void votes(float* sums, unsigned* ballots, int* anys, int* alls, const float* x) {
        int i = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x % 32, w = i / 32;
        float s = warpReduceSum(x[i]);
        float m = warpReduceMax(x[i]);
        unsigned b = __ballot_sync(0xffffffff, x[i] > 0.0f);
        int a = __any_sync(0xffffffff, x[i] > 2.5f), l = __all_sync(0xffffffff, x[i] > -100.0f);
        __syncwarp();
        if (lane == 0) { sums[2 * w] = s; sums[2 * w + 1] = m; ballots[w] = b; anys[w] = a; alls[w] = l; }
    }'''
    x = rng.standard_normal(128).astype(np.float32)
    sums, ballots, anys, alls = nan(8), np.zeros(4, np.uint32), nan(4, np.int32), nan(4, np.int32)
    run(src, "votes", (2,), (64,), (sums, ballots, anys, alls, x))
    xw = x.reshape(4, 32)
    assert np.allclose(sums[0::2], xw.sum(1), atol=1e-5) and np.array_equal(sums[1::2], xw.max(1))
    assert list(ballots) == [sum(1 << l for l in range(32) if r[l] > 0) for r in xw]
    assert list(anys) == [int((r > 2.5).any()) for r in xw] and list(alls) == [1, 1, 1, 1]


def test_atomics_across_blocks_on_many_cores():
    src = r'''
    extern "C" __global__ void atom(float* fsum, int* isum, unsigned* umax, int* imin, int* cas, float* exch,
                                    int* olds, int n) {
        int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i >= n) return;
        atomicAdd(fsum, 1.0f);
        olds[i] = atomicAdd(isum, 1);
        atomicMax(umax, (unsigned)i);
        atomicMin(imin, -i);
        atomicCAS(cas, 0, i + 1);
        atomicExch(exch, 5.0f);
    }'''
    n = 1000
    fsum, isum = np.zeros(1, np.float32), np.zeros(1, np.int32)
    umax, imin, cas, exch = np.zeros(1, np.uint32), np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.float32)
    olds = nan(n, np.int32)
    run(src, "atom", (8,), (128,), (fsum, isum, umax, imin, cas, exch, olds, np.int32(n)))
    assert fsum[0] == n and isum[0] == n and umax[0] == n - 1 and imin[0] == -(n - 1)
    assert 1 <= cas[0] <= n and exch[0] == 5.0
    assert sorted(olds) == list(range(n))  # each atomicAdd returned a distinct old value


def test_math_vectors_ldg_and_int_min_max():
    src = r'''
    extern "C" __global__ void maths(float4* out, const float4* inp, int n4) {
        int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i >= n4) return;
        float4 v = __ldg(&inp[i]);
        float a = fabsf(v.x) + 0.5f;
        out[i] = make_float4(expf(v.x) + __expf(0.0f) - 1.0f, logf(a) + sqrtf(a) * rsqrtf(a) - 1.0f,
                             tanhf(v.z) + __fdividef(v.w, 2.0f) - v.w / 2.0f, fmaxf(v.w, 0.0f) + (float)min(3, max(i, 1)) * 0.0f
                             + powf(a, 2.0f) - a * a + erff(0.0f));
    }'''
    n = 37 * 4
    inp = rng.standard_normal(n).astype(np.float32)
    out = nan(n)
    run(src, "maths", (2,), (32,), (out, inp, np.int32(n // 4)))
    v = inp.reshape(-1, 4)
    ref = np.stack([np.exp(v[:, 0]), np.log(np.abs(v[:, 0]) + 0.5), np.tanh(v[:, 2]), np.maximum(v[:, 3], 0)], 1)
    assert np.allclose(out.reshape(-1, 4), ref, rtol=1e-5, atol=1e-5)


def test_printf_is_returned_to_python(capsys):
    src = r'''extern "C" __global__ void hello(int n) { if (threadIdx.x < n) printf("thread %d of %d\n", threadIdx.x, n); }'''
    run(src, "hello", (1,), (32,), (np.int32(2),))
    assert capsys.readouterr().out.splitlines() == ["thread 0 of 2", "thread 1 of 2"]


def test_include_of_course_headers_and_load_kernel_folder():
    src = '#include "common.cuh"\nextern "C" __global__ void k(int* out) { out[0] = CEIL_DIV(10, 4); }'
    out = nan(1, np.int32)
    run(src, "k", 1, 1, (out,))
    assert out[0] == 3


# ---------------------------------------------------------------------------------------------------------
# Errors: each names what is wrong

def test_exited_threads_do_not_hold_a_barrier_back():
    src = r'''
    extern "C" __global__ void early(float* out, int n) {
        if (threadIdx.x >= n) return;   // as on NVIDIA hardware, exited threads no longer count at a barrier
        __syncthreads();
        out[threadIdx.x] = 1.0f;
    }'''
    out = nan(32)
    run(src, "early", (1,), (32,), (out, np.int32(20)))
    assert np.all(out[:20] == 1) and np.isnan(out[20:]).all()


def test_deadlock_names_the_barrier_and_the_collective():
    src = r'''
    extern "C" __global__ void stuck(float* out) {
        if (threadIdx.x == 0) __syncthreads();
        else out[threadIdx.x] = __shfl_sync(0xffffffff, 1.0f, 0);
    }'''
    with pytest.raises(KernelError, match=r"deadlock in kernel 'stuck'[\s\S]*1 threads wait in __syncthreads at "
                                          r"<RawKernel source>:3[\s\S]*31 threads wait in a warp shuffle"):
        run(src, "stuck", (1,), (32,), (nan(32),))


def test_partial_warp_with_full_mask_is_an_error():
    src = 'extern "C" __global__ void k(float* o) { o[threadIdx.x] = __shfl_down_sync(0xffffffff, 1.0f, 1); }'
    with pytest.raises(KernelError, match="names lanes that do not exist.*block has 40 threads"):
        run(src, "k", (1,), (40,), (nan(40),))


def test_divergent_collectives_are_an_error():
    src = r'''
    extern "C" __global__ void k(unsigned* o) {
        if (threadIdx.x < 16) o[threadIdx.x] = __ballot_sync(0xffffffff, 1);
        else __syncwarp();
    }'''
    with pytest.raises(KernelError, match="lanes of warp 0 disagree"):
        run(src, "k", (1,), (32,), (np.zeros(32, np.uint32),))


def test_failed_assert_names_block_and_thread():
    src = 'extern "C" __global__ void k(int n) { assert(blockIdx.y < 1 || threadIdx.x < n); }'
    with pytest.raises(KernelError, match=r"<RawKernel source>:1: kernel 'k', block \(0, 1, 0\), thread \(5, 0, 0\): "
                                          r"assert\(blockIdx.y < 1 \|\| threadIdx.x < n\) failed"):
        run(src, "k", (1, 2), (8,), (np.int32(5),))


def test_compile_error_points_at_the_source_line():
    src = 'extern "C" __global__ void k(float* o) {\n  o[0] = 1.0f\n}'
    with pytest.raises(CompileError, match=r"<RawKernel source>:2"):
        RawKernel(src, "k").compile()


def test_unsupported_constructs_are_named():
    for code, what in [("__constant__ float c[4];\n", "'__constant__': __constant__"),
                       ("", "'asm\\(': inline PTX"), ("", "'__half': the half-precision")]:
        body = {"'asm\\(': inline PTX": 'asm("nop;");', "'__half': the half-precision": "__half h;"}.get(what, "")
        src = code + 'extern "C" __global__ void k(float* o) { ' + body + ' o[0] = 1; }'
        with pytest.raises(NotImplementedError, match=what):
            RawKernel(src, "k").compile()


def test_shared_memory_limit():
    src = r'''extern "C" __global__ void big(float* o) { __shared__ float s[16000]; s[0] = 1; o[0] = s[0]; }'''
    with pytest.raises(KernelError, match="shared memory overflow: 64000 bytes"):
        run(src, "big", 1, 1, (nan(1),))
    k = RawKernel('extern "C" __global__ void d(float* o) { extern __shared__ float s[]; s[0] = 2; o[0] = s[0]; }', "d")
    with pytest.raises(ValueError, match="max_dynamic_shared_size_bytes"):
        k(1, 1, (nan(1),), shared_mem=60000)
    k.max_dynamic_shared_size_bytes = 60000
    o = nan(1)
    k(1, 1, (o,), shared_mem=60000)
    assert o[0] == 2


SAXPY = r'''
extern "C" __global__ void saxpy(float* out, const float* x, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a * x[i];
}'''


@pytest.mark.parametrize("args, err, msg", [
    (lambda o, x: (o, x, np.float32(2)), TypeError, "takes 4 arguments"),
    (lambda o, x: (o, x, 2.0, np.int32(5)), TypeError, r"got a Python float; pass np.float32\(2.0\)"),
    (lambda o, x: (o, x, np.float32(2), 5), TypeError, r"got a Python int; pass np.int32\(5\)"),
    (lambda o, x: (o, x, np.float32(2), np.int64(5)), TypeError, "expected np.int32, got int64"),
    (lambda o, x: (o, x.astype(np.float64), np.float32(2), np.int32(5)), TypeError, "array of float32, got float64"),
    (lambda o, x: (o, np.ones((5, 2), np.float32)[:, 0], np.float32(2), np.int32(5)), ValueError, "not C-contiguous"),
    (lambda o, x: (o, [1.0] * 5, np.float32(2), np.int32(5)), TypeError, "expected an array, got list"),
    (lambda o, x: [o, x, np.float32(2), np.int32(5)], TypeError, "args must be a tuple"),
])
def test_argument_checks(args, err, msg):
    o, x = nan(5), np.ones(5, np.float32)
    with pytest.raises(err, match=msg):
        RawKernel(SAXPY, "saxpy")((1,), (32,), args(o, x))


def test_launch_configuration_checks():
    k = RawKernel(SAXPY, "saxpy")
    a = (nan(5), np.ones(5, np.float32), np.float32(2), np.int32(5))
    with pytest.raises(ValueError, match="at most 1024 threads"):
        k((1,), (64, 32), a)
    with pytest.raises(TypeError, match="grid must be an int or a tuple"):
        k((1.5,), (32,), a)
    with pytest.raises(ValueError, match=r"block\[0\] = 0"):
        k((1,), (0,), a)


def test_float4_alignment_and_names():
    src = 'extern "C" __global__ void v(float4* o) { o[threadIdx.x] = make_float4(1, 2, 3, 4); }'
    buf = np.zeros(9, np.float32)
    with pytest.raises(ValueError, match="16-byte aligned"):
        RawKernel(src, "v")((1,), (2,), (buf[1:],))
    with pytest.raises(ValueError, match=r"no __global__ function named 'w'.*kernels found: v"):
        RawKernel(src, "w")
    with pytest.raises(ValueError, match='must be declared extern "C"'):
        RawKernel('__global__ void cpp(float* o) {}', "cpp")


# ---------------------------------------------------------------------------------------------------------
# Cache and checked mode

def test_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_CACHE", str(tmp_path))
    src = SAXPY.replace("a * x[i]", "a * x[i] + 0.0f")  # a source no other test compiled
    code = (f"import sys, time, numpy as np; sys.path.insert(0, {os.getcwd()!r})\n"
            "from llmc_lessons.cuda import RawKernel\n"
            f"t = time.perf_counter(); RawKernel({src!r}, 'saxpy').compile(); print(time.perf_counter() - t)\n")
    env = dict(os.environ, LLMC_DEVICE="cpu")
    cold = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    warm = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    libs = list((tmp_path / "emulator").glob("kernel-*.so"))
    assert len(libs) == 1, libs
    assert warm < 0.2 and warm < cold / 3, (cold, warm)


def test_checked_mode_reports_out_of_bounds(monkeypatch):
    monkeypatch.setenv("LLMC_CHECK", "1")
    src = r'''
    extern "C" __global__ void nobounds(float* out, const float* x, int n) {
        int i = blockIdx.x * blockDim.x + threadIdx.x;
        out[i] = x[i];
    }'''
    x, out = np.ones(50, np.float32), nan(50)
    with pytest.raises(KernelError, match=r"kernel 'nobounds': heap-buffer-overflow: a read of 4 bytes in nobounds "
                                          r"at <RawKernel source>:4"):
        RawKernel(src, "nobounds")((1,), (64,), (out, x, np.int32(50)))
    fixed = src.replace("out[i] = x[i];", "if (i < n) out[i] = x[i];")
    RawKernel(fixed, "nobounds")((1,), (64,), (out, x, np.int32(50)))
    assert np.all(out == 1)  # results come back from the checked child process


def test_many_threads_and_blocks_are_fast_enough():
    src = r'''
    extern "C" __global__ void bars(float* out, int iters) {
        float v = 0.0f;
        for (int i = 0; i < iters; i++) { v += 1.0f; __syncthreads(); }
        out[blockIdx.x * blockDim.x + threadIdx.x] = v;
    }'''
    out = nan(4 * 1024)
    k = RawKernel(src, "bars")
    k((1,), (32,), (out, np.int32(1)))
    t = time.perf_counter()
    k((4,), (1024,), (out, np.int32(100)))
    assert np.all(out == 100)
    assert time.perf_counter() - t < 5.0  # 819,200 fiber switches: about 10 ns each when the fast switch is in use
