// llmc_cuda.h: the CUDA C subset that the CPU emulator understands (see docs/emulator.md).
//
// Every kernel source is compiled by the host C++ compiler with this header included first. Kernels become
// plain C++ functions; each CUDA thread runs them as a cooperative fiber, so __syncthreads and the warp
// collectives below really wait for the other threads. The runtime behind the llmc_rt_* calls lives in
// runtime.cpp (one shared library, loaded once).
#pragma once
#include <cmath>
#include <math.h>  // expf, logf, tanhf, ... in the global namespace, as CUDA has them
#include <cstddef>
#include <cstdint>
#include <cstring>

// ---------------------------------------------------------------------------------------------------------
// The state of one emulated CUDA thread, shared with runtime.cpp.
struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct llmc_thread {
    uint3 threadIdx, blockIdx, blockDim, gridDim;
    unsigned int lane, warp;  // lane = linear thread index % 32, warp = linear thread index / 32
};
extern "C" {
extern __thread llmc_thread *llmc_rt_self;
void llmc_rt_syncthreads(const char *file, int line);
void llmc_rt_syncwarp(unsigned mask, const char *file, int line);
unsigned long long llmc_rt_shfl(unsigned mask, unsigned long long value, int src_lane, int kind,
                                const char *file, int line);
unsigned llmc_rt_vote(unsigned mask, int predicate, const char *file, int line);
void *llmc_rt_shared(int slot, size_t size, size_t align, const char *file, int line);
void *llmc_rt_dynamic_shared(void);
[[noreturn]] void llmc_rt_fail(const char *file, int line, const char *fmt, ...);
int llmc_rt_printf(const char *fmt, ...);
void llmc_rt_yield(void);
}

// ---------------------------------------------------------------------------------------------------------
// Qualifiers and built-in variables.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define threadIdx (llmc_rt_self->threadIdx)
#define blockIdx (llmc_rt_self->blockIdx)
#define blockDim (llmc_rt_self->blockDim)
#define gridDim (llmc_rt_self->gridDim)
static constexpr int warpSize = 32;

// __shared__ declarations are rewritten by the emulator's loader into calls of llmc_rt_shared (one copy
// per block, poisoned with 0xFF bytes = NaN floats before the block starts); see emulator.py.
#define LLMC_SHARED(T, name, dims, slot) \
    T(&name) dims = *reinterpret_cast<T(*) dims>(llmc_rt_shared(slot, sizeof(T dims), alignof(T), __FILE__, __LINE__))
#define LLMC_EXTERN_SHARED(T, name) T *name = reinterpret_cast<T *>(llmc_rt_dynamic_shared())

// ---------------------------------------------------------------------------------------------------------
// Barriers and warp collectives.
#define __syncthreads() llmc_rt_syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) llmc_rt_syncwarp(llmc_mask_or_all(__VA_ARGS__), __FILE__, __LINE__)
static inline unsigned llmc_mask_or_all() { return 0xffffffffu; }
static inline unsigned llmc_mask_or_all(unsigned m) { return m; }
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// Pointers to volatile memory: the loader rewrites `volatile T*` into llmc_volatile<T>, whose every access
// first lets the other threads of the block take a step. So the lanes of a warp that exchange values through
// volatile shared memory without __syncwarp (the classic warp-synchronous reduction) step in lockstep, as they
// do on a GPU, and a thread spinning on a volatile flag lets the thread that sets it run.
template <typename T>
struct llmc_volatile_ref {
    volatile T *p;
    operator T() const { llmc_rt_yield(); return *p; }
    llmc_volatile_ref &operator=(T v) { llmc_rt_yield(); *p = v; return *this; }
    llmc_volatile_ref &operator=(const llmc_volatile_ref &o) { return *this = T(o); }
    llmc_volatile_ref &operator+=(T v) { return *this = T(*this) + v; }
    llmc_volatile_ref &operator-=(T v) { return *this = T(*this) - v; }
    llmc_volatile_ref &operator*=(T v) { return *this = T(*this) * v; }
};
template <typename T>
struct llmc_volatile {
    volatile T *p;
    llmc_volatile(volatile T *q = nullptr) : p(q) {}
    llmc_volatile_ref<T> operator[](long long i) const { return {p + i}; }
    llmc_volatile_ref<T> operator*() const { return {p}; }
    llmc_volatile operator+(long long i) const { return p + i; }
    llmc_volatile operator-(long long i) const { return p - i; }
    operator volatile T *() const { return p; }
};

enum { LLMC_SHFL_IDX, LLMC_SHFL_UP, LLMC_SHFL_DOWN, LLMC_SHFL_XOR };

template <typename T>
static inline T llmc_shfl(unsigned mask, T var, int src, int kind, const char *file, int line) {
    static_assert(sizeof(T) <= 8, "warp shuffles move values of at most 8 bytes");
    unsigned long long bits = 0;
    std::memcpy(&bits, &var, sizeof(T));
    bits = llmc_rt_shfl(mask, bits, src, kind, file, line);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}
// The source lane of each shuffle, within segments of `width` lanes, as the CUDA programming guide defines.
static inline int llmc_lane() { return (int)llmc_rt_self->lane; }
static inline int llmc_src_idx(int src, int width) { return (llmc_lane() & ~(width - 1)) + (src & (width - 1)); }
static inline int llmc_src_up(unsigned d, int width) {
    int l = llmc_lane();
    return (l & (width - 1)) >= (int)d ? l - (int)d : l;
}
static inline int llmc_src_down(unsigned d, int width) {
    int l = llmc_lane();
    return (l & (width - 1)) + (int)d < width ? l + (int)d : l;
}
static inline int llmc_src_xor(int m, int width) {
    int l = llmc_lane(), s = l ^ m;
    return (s & ~(width - 1)) == (l & ~(width - 1)) ? s : l;
}
#define __shfl_sync(mask, var, src, ...) \
    llmc_shfl(mask, var, llmc_src_idx(src, llmc_width(__VA_ARGS__)), LLMC_SHFL_IDX, __FILE__, __LINE__)
#define __shfl_up_sync(mask, var, delta, ...) \
    llmc_shfl(mask, var, llmc_src_up(delta, llmc_width(__VA_ARGS__)), LLMC_SHFL_UP, __FILE__, __LINE__)
#define __shfl_down_sync(mask, var, delta, ...) \
    llmc_shfl(mask, var, llmc_src_down(delta, llmc_width(__VA_ARGS__)), LLMC_SHFL_DOWN, __FILE__, __LINE__)
#define __shfl_xor_sync(mask, var, laneMask, ...) \
    llmc_shfl(mask, var, llmc_src_xor(laneMask, llmc_width(__VA_ARGS__)), LLMC_SHFL_XOR, __FILE__, __LINE__)
static inline int llmc_width() { return 32; }
static inline int llmc_width(int w) { return w; }
#define __ballot_sync(mask, pred) llmc_rt_vote(mask, (pred) ? 1 : 0, __FILE__, __LINE__)
#define __any_sync(mask, pred) (llmc_rt_vote(mask, (pred) ? 1 : 0, __FILE__, __LINE__) != 0u)
#define __all_sync(mask, pred) (llmc_rt_vote(mask, (pred) ? 0 : 1, __FILE__, __LINE__) == 0u)

// ---------------------------------------------------------------------------------------------------------
// Atomics: real atomic instructions, since blocks run on several CPU cores at once. Each returns the old value.
template <typename T>
static inline T llmc_atomic_float_op(T *addr, T val, int op) {
    T old, want;
    __atomic_load(addr, &old, __ATOMIC_RELAXED);
    do {
        want = op == 0 ? old + val : (op == 1 ? (old > val ? old : val) : (old < val ? old : val));
    } while (!__atomic_compare_exchange(addr, &old, &want, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    return old;
}
static inline float atomicAdd(float *a, float v) { return llmc_atomic_float_op(a, v, 0); }
static inline double atomicAdd(double *a, double v) { return llmc_atomic_float_op(a, v, 0); }
static inline int atomicAdd(int *a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicAdd(unsigned *a, unsigned v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
static inline unsigned long long atomicAdd(unsigned long long *a, unsigned long long v) {
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);
}
static inline int atomicSub(int *a, int v) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicSub(unsigned *a, unsigned v) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }
static inline int atomicMax(int *a, int v) { return llmc_atomic_float_op(a, v, 1); }
static inline unsigned atomicMax(unsigned *a, unsigned v) { return llmc_atomic_float_op(a, v, 1); }
static inline int atomicMin(int *a, int v) { return llmc_atomic_float_op(a, v, 2); }
static inline unsigned atomicMin(unsigned *a, unsigned v) { return llmc_atomic_float_op(a, v, 2); }
template <typename T>
static inline T llmc_cas(T *a, T compare, T val) {
    __atomic_compare_exchange_n(a, &compare, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return compare;  // holds the old value whether or not the exchange happened
}
static inline int atomicCAS(int *a, int c, int v) { return llmc_cas(a, c, v); }
static inline unsigned atomicCAS(unsigned *a, unsigned c, unsigned v) { return llmc_cas(a, c, v); }
static inline unsigned long long atomicCAS(unsigned long long *a, unsigned long long c, unsigned long long v) {
    return llmc_cas(a, c, v);
}
static inline int atomicExch(int *a, int v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicExch(unsigned *a, unsigned v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }
static inline float atomicExch(float *a, float v) {
    float old;
    __atomic_exchange(a, &v, &old, __ATOMIC_SEQ_CST);
    return old;
}

// ---------------------------------------------------------------------------------------------------------
// Vector types, loads, math.
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
static inline int2 make_int2(int x, int y) { return int2{x, y}; }
static inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
template <typename T>
static inline T __ldg(const T *p) { return *p; }

static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
static inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
// glibc declares its own __expf & co., so the CUDA intrinsics are macros here.
#define __expf(x) expf(x)
#define __logf(x) logf(x)
#define __powf(x, y) powf(x, y)
#define __sinf(x) sinf(x)
#define __cosf(x) cosf(x)
#define __tanhf(x) tanhf(x)
static inline float __fdividef(float x, float y) { return x / y; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
static inline int __float2int_rn(float x) { return (int)std::nearbyint(x); }
static inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
static inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
static inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
static inline float __uint_as_float(unsigned i) { float x; std::memcpy(&x, &i, 4); return x; }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
// CUDA's global min/max overloads.
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return std::fmin(a, b); }
static inline float max(float a, float b) { return std::fmax(a, b); }
static inline double min(double a, double b) { return std::fmin(a, b); }
static inline double max(double a, double b) { return std::fmax(a, b); }

// ---------------------------------------------------------------------------------------------------------
// printf goes to a buffer that Python prints after the launch (so it shows in a notebook cell); a failed
// assert stops the launch with a Python error naming the file, line, block and thread.
#define printf(...) llmc_rt_printf(__VA_ARGS__)
#undef assert
#define assert(cond) ((cond) ? (void)0 : llmc_rt_fail(__FILE__, __LINE__, "assert(%s) failed", #cond))
