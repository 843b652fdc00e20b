"""The CUDA C++ that real kernel code uses, with the same call on both backends: bf16 types and their operators,
typedef'd parameter types, cache-hinted loads and stores, the host's float/math constants, cooperative groups,
template kernels (RawModule), the other atomics, vector types, static and template __shared__, null pointers,
and kernel files loaded from anywhere on disk.

Every kernel is checked against NumPy on fresh random inputs of awkward sizes at two launch configurations, with
outputs poisoned before the launch. They run on the backend LLMC_DEVICE picks (on a GPU, through NVRTC), except
the few marked as the emulator's own (what a failure looks like on the CPU).
"""
import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.cuda import KernelError, RawKernel, RawModule, load_kernel
from llmc_lessons.device import to_device, to_host
from llmc_lessons.precision import from_bf16, to_bf16

gen = np.random.default_rng(29)
cpu_only = pytest.mark.skipif(device.on_gpu(), reason="how the CPU emulator reports it")
CONFIGS = [(37, 32), (1000, 96)]   # (n, threads per block): a partial block, and a block size not a power of 2


def poisoned(shape, dtype=np.float32):
    if np.dtype(dtype).kind == "f" or np.dtype(dtype) == np.uint16:
        return to_device(np.full(shape, np.nan if np.dtype(dtype).kind == "f" else 0x7FC0, dtype))
    return to_device(np.full(shape, -1, np.int64).astype(dtype))   # all bits set


def blocks(n, threads):
    return (-(-n // threads),)


def bf16_values(n, lo=0.5, hi=4.0):
    """bf16 bits of random numbers in [lo, hi): sums and products of two of them are exact in float32."""
    return to_bf16(gen.uniform(lo, hi, n).astype(np.float32))


def rnd(x):
    """float32 -> nearest bf16 -> float32."""
    return from_bf16(to_bf16(np.asarray(x, np.float32)))


# ---------------------------------------------------------------------------------------------------------
# 1. __nv_bfloat16 and __nv_bfloat162

BF16_OPS = r'''
#include <cuda_bf16.h>
extern "C" __global__ void bf16_ops(__nv_bfloat16* out, float* f, const __nv_bfloat16* a,
                                    const __nv_bfloat16* b, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    __nv_bfloat16 x = a[i], y = b[i];
    float xf = x;                      // bf16 -> float, implicitly
    __nv_bfloat16 s = x + y;           // bf16 arithmetic, rounded once
    s += x * y;
    __nv_bfloat16 z = 2.0f * xf;       // float -> bf16, implicitly
    z -= y;
    out[4 * i + 0] = s;
    out[4 * i + 1] = (x < y) ? z : -y;
    out[4 * i + 2] = (x >= y && x != y) ? x : y;
    out[4 * i + 3] = x / y;
    f[i] = (float)s + xf;
}'''


@pytest.mark.parametrize("n, threads", CONFIGS)
def test_nv_bfloat16_conversions_and_operators(n, threads):
    a, b = bf16_values(n), bf16_values(n)
    out, f = poisoned(4 * n, np.uint16), poisoned(n)
    RawKernel(BF16_OPS, "bf16_ops")(blocks(n, threads), (threads,),
                                     (out, f, to_device(a), to_device(b), np.int32(n)))
    x, y = from_bf16(a), from_bf16(b)
    s = rnd(rnd(x + y) + rnd(x * y))
    fused = rnd(rnd(x + y) + x * y)    # nvcc may contract `s += x * y` into one fma.rn.bf16: one rounding
    z = rnd(rnd(2 * x) - y)
    got = from_bf16(to_host(out)).reshape(n, 4)
    assert np.all((got[:, 0] == s) | (got[:, 0] == fused)), "x + y, then += x * y, not rounded as bf16 arithmetic"
    s = got[:, 0]
    np.testing.assert_array_equal(got[:, 1], np.where(x < y, z, -y))
    np.testing.assert_array_equal(got[:, 2], np.maximum(x, y))
    np.testing.assert_allclose(got[:, 3], x / y, rtol=2 ** -7)       # one rounding of the quotient
    np.testing.assert_array_equal(to_host(f), s + x)


BF162_OPS = r'''
#include <cuda_bf16.h>
extern "C" __global__ void bf162_ops(__nv_bfloat162* out, float* f, __nv_bfloat162* sums, __nv_bfloat16* total,
                                     const __nv_bfloat162* a, const float* c, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    __nv_bfloat162 p = a[i];
    __nv_bfloat162 q = __floats2bfloat162_rn(c[2 * i], c[2 * i + 1]);
    __nv_bfloat162 r = p + q * __halves2bfloat162(p.y, p.x);
    out[i] = r;
    float2 rf = __bfloat1622float2(r);
    f[2 * i] = rf.x - __low2float(r);
    f[2 * i + 1] = rf.y + __high2float(p);
    atomicAdd(&sums[i % 3], __floats2bfloat162_rn(1.0f, 2.0f));   // small integers: exact in any order
    atomicAdd(total, __float2bfloat16(1.0f));
}'''


@pytest.mark.parametrize("n, threads", CONFIGS[:1] + [(200, 64)])
def test_nv_bfloat162_lanes_and_atomics(n, threads):
    a, c = bf16_values(2 * n), rnd(gen.uniform(0.5, 4.0, 2 * n))
    out, f = poisoned(2 * n, np.uint16), poisoned(2 * n)
    sums, total = to_device(np.zeros(6, np.uint16)), to_device(np.zeros(1, np.uint16))
    RawKernel(BF162_OPS, "bf162_ops")(blocks(n, threads), (threads,),
                                       (out, f, sums, total, to_device(a), to_device(c), np.int32(n)))
    p = from_bf16(a).reshape(n, 2)
    q = c.reshape(n, 2)
    two = rnd(p + rnd(q * p[:, ::-1]))
    fused = rnd(p + q * p[:, ::-1])    # nvcc may contract the multiply-add into one fma.rn.bf16x2: one rounding
    r = from_bf16(to_host(out)).reshape(n, 2)
    assert np.all((r == two) | (r == fused)), "p + q * swap(p) not rounded as bf16x2 arithmetic"
    np.testing.assert_array_equal(to_host(f).reshape(n, 2), np.stack([np.zeros(n), r[:, 1] + p[:, 1]], 1))
    count = np.bincount(np.arange(n) % 3, minlength=3).astype(np.float32)
    np.testing.assert_array_equal(from_bf16(to_host(sums)).reshape(3, 2), np.stack([count, 2 * count], 1))
    assert from_bf16(to_host(total))[0] == n


# ---------------------------------------------------------------------------------------------------------
# 2. Parameters of typedef'd types

FLOATX = r'''
#include <cuda_bf16.h>
#if defined(ENABLE_BF16)
typedef __nv_bfloat16 floatX;
#else
typedef float floatX;
#endif
using index_t = int;
extern "C" __global__ void scale_x(floatX* out, const floatX* __restrict__ inp, float s, index_t n) {
    index_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = (floatX)((float)inp[i] * s);
}'''


@pytest.mark.parametrize("bf16", [False, True])
def test_typedef_parameters_follow_the_options(bf16):
    n, threads = 301, 64
    opts = ("-DENABLE_BF16",) if bf16 else ()
    k = RawKernel(FLOATX, "scale_x", opts)
    x = gen.standard_normal(n).astype(np.float32)
    inp = to_bf16(x) if bf16 else x
    out = poisoned(n, inp.dtype)
    k(blocks(n, threads), (threads,), (out, to_device(inp), np.float32(3.0), np.int32(n)))
    if bf16:
        np.testing.assert_array_equal(to_host(out), to_bf16(from_bf16(inp) * np.float32(3.0)))
    else:
        np.testing.assert_array_equal(to_host(out), x * np.float32(3.0))
    wrong = np.float32 if bf16 else np.uint16
    with pytest.raises(TypeError, match=f"expected an array of {np.dtype(inp.dtype)}"):
        k(blocks(n, threads), (threads,), (to_device(np.zeros(n, wrong)), to_device(inp), np.float32(3),
                                           np.int32(n)))


def test_a_typedef_that_depends_on_an_undecidable_condition_is_named():
    src = FLOATX.replace("#if defined(ENABLE_BF16)", "#if __CUDA_ARCH__ >= 800")   # differs between GPU and CPU
    with pytest.raises(ValueError, match=r"typedef 'floatX' stands for one of __nv_bfloat16, float"):
        RawKernel(src, "scale_x")


# ---------------------------------------------------------------------------------------------------------
# 3. Cache-hinted loads and stores, 4. the host's constants

HINTS_AND_CONSTANTS = r'''
extern "C" __global__ void hinted(float4* out4, float* out, const float4* in4, const float* in, int n4, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n4) {
        float4 v = __ldcs(in4 + i);
        float4 w = __ldcg(in4 + i);
        __stcs(out4 + i, make_float4(v.x + w.x, v.y, v.z, __ldlu(&in4[i].w)));
    }
    if (i < n) {
        float m = -INFINITY;                        // a running maximum starts at -inf
        m = fmaxf(m, __ldcv(in + i));
        float big = m < FLT_MAX ? (float)M_PI : CUDART_INF_F;
        __stcg(out + 3 * i, m);
        __stwb(out + 3 * i + 1, big + FLT_MIN);
        __stwt(out + 3 * i + 2, isnan(NAN) && isinf(INFINITY) ? 1.0f : 0.0f);
    }
}'''


@pytest.mark.parametrize("n, threads", CONFIGS)
def test_cache_hints_and_constants(n, threads):
    x = gen.standard_normal(4 * n).astype(np.float32)
    out4, out = poisoned(4 * n), poisoned(3 * n)
    RawKernel(HINTS_AND_CONSTANTS, "hinted")(blocks(n, threads), (threads,),
                                             (out4, out, to_device(x), to_device(x[:n]), np.int32(n), np.int32(n)))
    v = x.reshape(n, 4)
    np.testing.assert_array_equal(to_host(out4).reshape(n, 4), np.stack([2 * v[:, 0], v[:, 1], v[:, 2], v[:, 3]], 1))
    got = to_host(out).reshape(n, 3)
    np.testing.assert_array_equal(got[:, 0], x[:n])
    np.testing.assert_array_equal(got[:, 1], np.float32(np.pi))
    np.testing.assert_array_equal(got[:, 2], 1.0)


# ---------------------------------------------------------------------------------------------------------
# 5. Cooperative groups

COOPERATIVE = r'''
#include <cooperative_groups.h>
#include <cooperative_groups/reduce.h>
namespace cg = cooperative_groups;

__device__ float larger(float a, float b) { return a > b ? a : b; }

// One tile of TILE threads per row of x (rows, cols): its sum, max, min, and the sum again by hand with shuffles.
template <int TILE>
__device__ void row_stats(float* out, const float* x, int rows, int cols) {
    cg::thread_block block = cg::this_thread_block();
    cg::thread_block_tile<TILE> tile = cg::tiled_partition<TILE>(block);
    int row = blockIdx.x * tile.meta_group_size() + tile.meta_group_rank();
    // No early return: on the CPU the tiles of one warp must reach each collective together.
    float s = 0.0f, hi = -INFINITY, lo = INFINITY;
    for (int c = tile.thread_rank(); row < rows && c < cols; c += tile.size()) {
        float v = x[row * cols + c];
        s += v; hi = fmaxf(hi, v); lo = fminf(lo, v);
    }
    float by_hand = s;
    for (int off = TILE / 2; off > 0; off /= 2) by_hand += tile.shfl_down(by_hand, off);
    by_hand = tile.shfl(by_hand, 0);
    float butterfly = s;
    for (int m = 1; m < TILE; m *= 2) butterfly += tile.shfl_xor(butterfly, m);
    float sum = cg::reduce(tile, s, cg::plus<float>());
    float mx = cg::reduce(tile, hi, larger);
    float mn = cg::reduce(tile, lo, cg::less<float>());
    float mx2 = cg::reduce(tile, hi, [](float a, float b) { return fmaxf(a, b); });
    float mx3 = cg::reduce(tile, hi, cg::greater<float>());
    tile.sync();
    if (row < rows && tile.thread_rank() == tile.num_threads() - 1) {
        out[6 * row + 0] = sum; out[6 * row + 1] = mx; out[6 * row + 2] = mn;
        out[6 * row + 3] = by_hand; out[6 * row + 4] = butterfly;
        out[6 * row + 5] = mx2 == mx3 ? (float)block.size() : -1.0f;
    }
}
extern "C" __global__ void rows32(float* out, const float* x, int rows, int cols) { row_stats<32>(out, x, rows, cols); }
extern "C" __global__ void rows8(float* out, const float* x, int rows, int cols) { row_stats<8>(out, x, rows, cols); }
extern "C" __global__ void rows2(float* out, const float* x, int rows, int cols) { row_stats<2>(out, x, rows, cols); }

// Per thread, for tiles of 16, 4 and 1: thread_rank, meta_group_rank, meta_group_size.
extern "C" __global__ void tile_ranks(int* out) {
    cg::thread_block block = cg::this_thread_block();
    cg::thread_block_tile<16> t16 = cg::tiled_partition<16>(block);
    cg::thread_block_tile<4> t4 = cg::tiled_partition<4>(block);
    cg::thread_block_tile<1> t1 = cg::tiled_partition<1>(block);
    int* o = out + 9 * (blockIdx.x * block.size() + block.thread_rank());
    o[0] = t16.thread_rank(); o[1] = t16.meta_group_rank(); o[2] = t16.meta_group_size();
    o[3] = t4.thread_rank(); o[4] = t4.meta_group_rank(); o[5] = t4.meta_group_size();
    o[6] = t1.thread_rank(); o[7] = t1.meta_group_rank(); o[8] = t1.meta_group_size();
}

// A block-wide sum: warps reduce, warp 0 adds the warp sums (block.sync() between).
extern "C" __global__ void block_sum(float* out, const float* x, int n) {
    cg::thread_block block = cg::this_thread_block();
    cg::thread_block_tile<32> warp = cg::tiled_partition<32>(block);
    __shared__ float partial[32];
    int i = blockIdx.x * block.num_threads() + block.thread_rank();
    float s = cg::reduce(warp, i < n ? x[i] : 0.0f, cg::plus<float>());
    if (warp.thread_rank() == 0) partial[warp.meta_group_rank()] = s;
    block.sync();
    if (warp.meta_group_rank() == 0) {
        float t = warp.thread_rank() < warp.meta_group_size() ? partial[warp.thread_rank()] : 0.0f;
        t = cg::reduce(warp, t, cg::plus<float>());
        if (warp.thread_rank() == 0) out[blockIdx.x] = t;
    }
}'''


@pytest.mark.parametrize("kernel, tile, threads", [("rows32", 32, 64), ("rows8", 8, 96), ("rows2", 2, 32)])
def test_cooperative_groups_tiles_and_reduce(kernel, tile, threads):
    rows, cols = 37, 45
    x = rnd(gen.standard_normal((rows, cols)))                   # sums of 45 bf16 values: close in any order
    out = poisoned(6 * rows)
    per_block = threads // tile
    RawKernel(COOPERATIVE, kernel)(blocks(rows, per_block), (threads,), (out, to_device(x), np.int32(rows),
                                                                        np.int32(cols)))
    got = to_host(out).reshape(rows, 6)
    for col in (0, 3, 4):
        np.testing.assert_allclose(got[:, col], x.sum(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[:, 1], x.max(1))
    np.testing.assert_array_equal(got[:, 2], x.min(1))
    np.testing.assert_array_equal(got[:, 5], threads)


def test_cooperative_groups_tile_ranks():
    threads, nb = 48, 3
    out = poisoned(9 * threads * nb, np.int32)
    RawKernel(COOPERATIVE, "tile_ranks")((nb,), (threads,), (out,))
    r = np.tile(np.arange(threads), nb)
    want = [r % 16, r // 16, np.full_like(r, 3), r % 4, r // 4, np.full_like(r, 12), 0 * r, r, np.full_like(r, 48)]
    np.testing.assert_array_equal(to_host(out).reshape(-1, 9), np.stack(want, 1))


@pytest.mark.parametrize("n, threads", [(1000, 96), (5000, 256)])
def test_cooperative_groups_block_sum(n, threads):
    x = gen.standard_normal(n).astype(np.float32)
    nb = blocks(n, threads)[0]
    out = poisoned(nb)
    RawKernel(COOPERATIVE, "block_sum")((nb,), (threads,), (out, to_device(x), np.int32(n)))
    want = np.add.reduceat(np.pad(x, (0, nb * threads - n)).astype(np.float64), np.arange(0, nb * threads, threads))
    np.testing.assert_allclose(to_host(out), want, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# 6. Template kernels by instantiation name (RawModule), and __shared__ in a template device function

TEMPLATES = r'''
template <typename T>
__device__ T block_total(T v) {          // one __shared__ array per instantiation
    __shared__ T part[32];
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffff, v, off);
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
    __syncthreads();
    T t = 0;
    for (int w = 0; w < blockDim.x / 32; w++) t += part[w];
    __syncthreads();
    return t;
}

template <typename T, int UNROLL>
__global__ void scale_sum(T* out, T* sums, const T* in, T s, int n) {
    int base = (blockIdx.x * blockDim.x + threadIdx.x) * UNROLL;
    T acc = 0;
    #pragma unroll
    for (int u = 0; u < UNROLL; u++) {
        if (base + u < n) { out[base + u] = in[base + u] * s; acc += in[base + u]; }
    }
    T t = block_total(acc);
    if (threadIdx.x == 0) sums[blockIdx.x] = t;
}

__global__ void not_extern_c(int* out) { out[threadIdx.x] = threadIdx.x; }'''


@pytest.mark.parametrize("name, dtype, unroll", [("scale_sum<float, 4>", np.float32, 4),
                                                 ("scale_sum<double, 1>", np.float64, 1)])
def test_template_kernels_by_name_expression(name, dtype, unroll):
    mod = RawModule(TEMPLATES, name_expressions=["scale_sum<float, 4>", "scale_sum<double, 1>", "not_extern_c"])
    k = mod.get_function(name)
    n, threads = 1001, 64
    nb = -(-n // (threads * unroll))
    x = gen.standard_normal(n).astype(dtype)
    out, sums = poisoned(n, dtype), poisoned(nb, dtype)
    k((nb,), (threads,), (out, sums, to_device(x), dtype(1.5), np.int32(n)))
    np.testing.assert_allclose(to_host(out), x * dtype(1.5), rtol=1e-6)
    want = np.add.reduceat(np.pad(x, (0, nb * threads * unroll - n)), np.arange(0, n, threads * unroll))
    np.testing.assert_allclose(to_host(sums), want, rtol=1e-5, atol=1e-5)
    other = np.float64 if dtype == np.float32 else np.float32
    with pytest.raises(TypeError, match=rf"argument 3 \(T s\) of kernel '{name}'.*{np.dtype(dtype).name}"):
        k((nb,), (threads,), (out, sums, to_device(x), other(1.5), np.int32(n)))
    ints = poisoned(32, np.int32)
    mod.get_function("not_extern_c")((1,), (32,), (ints,))
    np.testing.assert_array_equal(to_host(ints), np.arange(32))


def test_template_names_are_checked():
    with pytest.raises(ValueError, match="is a template: load it with RawModule"):
        RawKernel(TEMPLATES, "scale_sum")
    with pytest.raises(ValueError, match="not among this module's name_expressions"):
        RawModule(TEMPLATES, name_expressions=["scale_sum<float, 4>"]).get_function("scale_sum<float,4>")
    with pytest.raises(ValueError, match="not an extern \"C\" kernel"):
        RawModule(TEMPLATES).get_function("not_extern_c")
    with pytest.raises(ValueError, match="takes the template arguments <T, UNROLL>"):
        RawModule(TEMPLATES, name_expressions=["scale_sum<float>"])


# ---------------------------------------------------------------------------------------------------------
# 7. More atomics, min/max overloads, vector types, static __shared__, null pointers

MISC = r'''
extern "C" __global__ void atomics(unsigned* counters, int* bits, unsigned long long* wide, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    atomicInc(&counters[0], 9u);        // counts 0..9, then wraps to 0
    atomicDec(&counters[1], 6u);        // counts down from 6 to 0, then wraps to 6
    atomicOr(&bits[0], 1 << (i % 31));
    atomicAnd(&bits[1], ~(1 << (i % 31)));
    atomicXor(&bits[2], i);
    atomicXor(&wide[0], 1ull << (i % 64));
}

extern "C" __global__ void mixed_min_max(unsigned* out, const int* a, const unsigned* b, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        out[2 * i] = min(a[i], b[i]);           // (int, unsigned): compared as unsigned
        out[2 * i + 1] = max(b[i], a[i]);
    }
}

extern "C" __global__ void vectors(uint4* o4, uchar4* oc, short2* os, const uint4* a, const uchar4* c,
                                   const short2* s, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        uint4 v = a[i];
        o4[i] = make_uint4(v.w, v.z, v.y, v.x);
        uchar4 u = c[i];
        oc[i] = make_uchar4(u.x + 1, u.y, u.z, u.w);
        short2 t = s[i];
        os[i] = make_short2(t.y, -t.x);
    }
}

// A block sum through a static __shared__ array: each block has its own, however many blocks run at once.
extern "C" __global__ void static_shared_sum(float* out, const float* x, const float* bias, int n) {
    static __shared__ float buf[128];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    buf[threadIdx.x] = i < n ? x[i] + (bias != nullptr ? bias[i] : 0.0f) : 0.0f;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) buf[threadIdx.x] += buf[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = buf[0];
}'''


def test_more_atomics():
    n, threads = 1000, 96
    counters = to_device(np.array([0, 0], np.uint32))
    bits = to_device(np.array([0, -1, 0], np.int32))
    wide = to_device(np.zeros(1, np.uint64))
    RawKernel(MISC, "atomics")(blocks(n, threads), (threads,), (counters, bits, wide, np.int32(n)))
    assert to_host(counters).tolist() == [n % 10, -n % 7]
    want_or = int(np.bitwise_or.reduce(1 << (np.arange(n) % 31)))
    assert to_host(bits).tolist() == [want_or, ~want_or, int(np.bitwise_xor.reduce(np.arange(n)))]
    want_wide = np.bitwise_xor.reduce(np.uint64(1) << (np.arange(n, dtype=np.uint64) % np.uint64(64)))
    assert to_host(wide)[0] == want_wide


@pytest.mark.parametrize("n, threads", CONFIGS)
def test_min_max_of_int_and_unsigned(n, threads):
    a = gen.integers(-1000, 1000, n).astype(np.int32)
    b = gen.integers(0, 2000, n).astype(np.uint32)
    out = poisoned(2 * n, np.uint32)
    RawKernel(MISC, "mixed_min_max")(blocks(n, threads), (threads,), (out, to_device(a), to_device(b), np.int32(n)))
    au = a.astype(np.uint32)
    np.testing.assert_array_equal(to_host(out).reshape(n, 2), np.stack([np.minimum(au, b), np.maximum(au, b)], 1))


@pytest.mark.parametrize("n, threads", CONFIGS)
def test_vector_types(n, threads):
    a = gen.integers(0, 2**32, (n, 4), dtype=np.uint32)
    c = gen.integers(0, 255, (n, 4), dtype=np.uint8)
    s = gen.integers(-2**15 + 1, 2**15, (n, 2), dtype=np.int16)
    o4, oc, os_ = poisoned(4 * n, np.uint32), poisoned(4 * n, np.uint8), poisoned(2 * n, np.int16)
    RawKernel(MISC, "vectors")(blocks(n, threads), (threads,), (o4, oc, os_, to_device(a.ravel()),
                                                                 to_device(c.ravel()), to_device(s.ravel()),
                                                                 np.int32(n)))
    np.testing.assert_array_equal(to_host(o4).reshape(n, 4), a[:, ::-1])
    np.testing.assert_array_equal(to_host(oc).reshape(n, 4), np.concatenate([c[:, :1] + 1, c[:, 1:]], 1))
    np.testing.assert_array_equal(to_host(os_).reshape(n, 2), np.stack([s[:, 1], -s[:, 0]], 1))


@pytest.mark.parametrize("with_bias", [False, True])
def test_static_shared_is_per_block_and_null_pointers(with_bias, monkeypatch):
    monkeypatch.setenv("LLMC_EMU_THREADS", "8")   # many blocks at once (one buffer for all gave errors of ~60)
    n, threads = 400 * 128 - 77, 128
    nb = blocks(n, threads)[0]
    x = gen.standard_normal(n).astype(np.float32)
    bias = gen.standard_normal(n).astype(np.float32)
    out = poisoned(nb)
    RawKernel(MISC, "static_shared_sum")((nb,), (threads,), (out, to_device(x),
                                                            to_device(bias) if with_bias else None, np.int32(n)))
    y = (x + bias if with_bias else x).astype(np.float64)
    want = np.add.reduceat(np.pad(y, (0, nb * threads - n)), np.arange(0, nb * threads, threads))
    np.testing.assert_allclose(to_host(out), want, rtol=1e-5, atol=1e-4)


@cpu_only
def test_trap_and_assert_h_stop_the_launch_with_a_python_error():
    src = r'''
    #include <assert.h>
    extern "C" __global__ void checks(const int* flags) {
        if (flags[threadIdx.x] == 1) __trap();
        assert(flags[threadIdx.x] != 2);
    }'''
    k = RawKernel(src, "checks")
    k((1,), (32,), (np.zeros(32, np.int32),))
    with pytest.raises(KernelError, match=r"<RawKernel source>:4: .*thread \(3, 0, 0\): __trap\(\) was called"):
        k((1,), (32,), (np.where(np.arange(32) == 3, 1, 0).astype(np.int32),))
    with pytest.raises(KernelError, match=r"<RawKernel source>:5: .*assert\(flags\[threadIdx.x\] != 2\) failed"):
        k((1,), (32,), (np.full(32, 2, np.int32),))


@cpu_only
def test_a_bf16_and_a_float_in_one_operation_are_ambiguous_as_with_nvcc():
    src = '#include <cuda_bf16.h>\nextern "C" __global__ void k(__nv_bfloat16* o) { o[0] = o[0] * 2.0f; }'
    with pytest.raises(Exception, match="ambiguous"):
        RawKernel(src, "k").compile()


# ---------------------------------------------------------------------------------------------------------
# 8. A kernel file from anywhere on disk, with its includes

def test_load_kernel_from_a_path_with_include_dirs(tmp_path):
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc" / "scale.cuh").write_text(r'''#pragma once
#define SCALE 3.0f
// The first thread's value, for the whole block: a __shared__ variable in a header.
__device__ float block_first(float v) {
    __shared__ float first;
    if (threadIdx.x == 0) first = v;
    __syncthreads();
    float f = first;
    __syncthreads();
    return f;
}
''')
    (tmp_path / "local.cuh").write_text("#pragma once\ntypedef float floatX;\n")
    (tmp_path / "k.cu").write_text(r'''
#include "scale.cuh"
#include "local.cuh"
template <typename T>
__global__ void times_scale(T* out, const floatX* in, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = (T)(in[i] * SCALE);
}
extern "C" __global__ void plain(floatX* out, int n) {
    float first = block_first(blockIdx.x * 100.0f + threadIdx.x);
    if (threadIdx.x < n) out[blockIdx.x * n + threadIdx.x] = SCALE + first;
}
''')
    n = 77
    x = gen.standard_normal(n).astype(np.float32)
    out = poisoned(n, np.float64)
    k = load_kernel(str(tmp_path / "k.cu"), "times_scale<double>", include_dirs=(str(tmp_path / "inc"),))
    k((2,), (64,), (out, to_device(x), np.int32(n)))
    np.testing.assert_allclose(to_host(out), x * 3.0, rtol=1e-6)
    plain = load_kernel(str(tmp_path / "k.cu"), "plain", include_dirs=(str(tmp_path / "inc"),))
    out32 = poisoned(5 * n)
    plain((5,), (128,), (out32, np.int32(n)))
    np.testing.assert_array_equal(to_host(out32), np.repeat(3.0 + 100.0 * np.arange(5), n))
    with pytest.raises(FileNotFoundError, match="no kernel file"):
        load_kernel(str(tmp_path / "missing.cu"), "plain")


@cpu_only
def test_messages_point_into_the_included_header(tmp_path):
    (tmp_path / "bad.cuh").write_text("#pragma once\n__device__ float twice(float v) {\n"
                                      "    return 2 * v + undefined_name;\n}\n")
    (tmp_path / "k.cu").write_text('#include "bad.cuh"\n'
                                   'extern "C" __global__ void k(float* o) { o[0] = twice(o[0]); }\n')
    with pytest.raises(Exception, match=r"bad.cuh:3.*undefined_name"):
        load_kernel(str(tmp_path / "k.cu"), "k").compile()
    (tmp_path / "bad.cuh").write_text("#pragma once\n\n__device__ __constant__ float table[4];\n")
    (tmp_path / "k2.cu").write_text('#include "bad.cuh"\nextern "C" __global__ void k(float* o) { o[0] = 1; }\n')
    with pytest.raises(NotImplementedError, match=r"bad.cuh:3: '__constant__'"):
        load_kernel(str(tmp_path / "k2.cu"), "k").compile()


@cpu_only
def test_a_kernel_file_and_its_header_are_read_again(tmp_path):
    (tmp_path / "value.cuh").write_text("#define VALUE 1.0f\n")
    (tmp_path / "k.cu").write_text('#include "value.cuh"\nextern "C" __global__ void k(float* o) { o[0] = VALUE; }\n')
    out = np.zeros(1, np.float32)
    load_kernel(str(tmp_path / "k.cu"), "k")((1,), (1,), (out,))
    (tmp_path / "value.cuh").write_text("#define VALUE 2.0f\n")
    load_kernel(str(tmp_path / "k.cu"), "k")((1,), (1,), (out,))
    assert out[0] == 2.0


@cpu_only
def test_checked_mode_runs_template_kernels_and_null_pointers(monkeypatch):
    monkeypatch.setenv("LLMC_CHECK", "1")
    k = RawModule(TEMPLATES, name_expressions=["scale_sum<float, 4>"]).get_function("scale_sum<float, 4>")
    n = 300
    x = gen.standard_normal(n).astype(np.float32)
    out, sums = poisoned(n), poisoned(2)
    k((2,), (64,), (out, sums, x, np.float32(2), np.int32(n)))
    np.testing.assert_allclose(out, 2 * x, rtol=1e-6)     # results come back from the checked child process
    bias_out = poisoned(5 * 128)
    RawKernel(MISC, "static_shared_sum")((5,), (128,), (bias_out, x, None, np.int32(n)))
    np.testing.assert_allclose(bias_out[:2], [x[:128].sum(), x[128:256].sum()], rtol=1e-5, atol=1e-5)
