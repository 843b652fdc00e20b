// llmc_cuda.h: the CUDA C subset that the CPU emulator understands (see docs/emulator.md).
//
// Every kernel source is compiled by the host C++ compiler with this header included first. Kernels become
// plain C++ functions; each CUDA thread runs them as a cooperative fiber, so __syncthreads and the warp
// collectives below really wait for the other threads. The runtime behind the llmc_rt_* calls lives in
// runtime.cpp (one shared library, loaded once).
#pragma once
#include <cfloat>
#include <climits>
#include <cmath>
#include <math.h>  // expf, logf, tanhf, ... in the global namespace, as CUDA has them
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

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
void *llmc_rt_shared_checked(int slot, size_t size, size_t align, const char *file, int line, const char *name,
                             size_t elem, unsigned rank, unsigned e1, unsigned e2);
void *llmc_rt_dynamic_shared_checked(const char *name, size_t elem);
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

// __shared__ declarations are rewritten by the emulator's loader (source.py) into calls of llmc_rt_shared (one
// copy per block, poisoned with 0xFF bytes = NaN floats before the block starts). Each declaration gets its slot
// number the first time it runs, held in a static local: a template function has one per instantiation, so
// each instantiation has its own variable, as on a GPU.
static inline int llmc_new_shared_slot() {
    static int next = 0;
    return __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
}
#if defined(__SANITIZE_ADDRESS__)
// Checked mode: the runtime also learns each array's name and shape, to name it in race and bounds reports.
#define LLMC_SHARED(T, name, dims) \
    static const int llmc_slot_##name = llmc_new_shared_slot(); \
    T(&name) dims = *reinterpret_cast<T(*) dims>(llmc_rt_shared_checked( \
        llmc_slot_##name, sizeof(T dims), alignof(T), __FILE__, __LINE__, #name, sizeof(T), \
        std::rank<T dims>::value, std::extent<T dims, 1>::value, std::extent<T dims, 2>::value))
#define LLMC_EXTERN_SHARED(T, name) \
    T *name = reinterpret_cast<T *>(llmc_rt_dynamic_shared_checked(#name, sizeof(T)))
#else
#define LLMC_SHARED(T, name, dims) \
    static const int llmc_slot_##name = llmc_new_shared_slot(); \
    T(&name) dims = *reinterpret_cast<T(*) dims>( \
        llmc_rt_shared(llmc_slot_##name, sizeof(T dims), alignof(T), __FILE__, __LINE__))
#define LLMC_EXTERN_SHARED(T, name) T *name = reinterpret_cast<T *>(llmc_rt_dynamic_shared())
#endif

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

// atomicInc/atomicDec wrap around at `limit`, as on a GPU: Inc stores old >= limit ? 0 : old + 1, Dec stores
// (old == 0 || old > limit) ? limit : old - 1.
template <typename T, typename F>
static inline T llmc_atomic_update(T *a, F f) {
    T old = __atomic_load_n(a, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(a, &old, f(old), true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {}
    return old;
}
static inline unsigned atomicInc(unsigned *a, unsigned limit) {
    return llmc_atomic_update(a, [limit](unsigned old) { return old >= limit ? 0u : old + 1u; });
}
static inline unsigned atomicDec(unsigned *a, unsigned limit) {
    return llmc_atomic_update(a, [limit](unsigned old) { return (old == 0u || old > limit) ? limit : old - 1u; });
}
#define LLMC_ATOMIC_BITS(T) \
    static inline T atomicAnd(T *a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); } \
    static inline T atomicOr(T *a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); } \
    static inline T atomicXor(T *a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); }
LLMC_ATOMIC_BITS(int)
LLMC_ATOMIC_BITS(unsigned)
LLMC_ATOMIC_BITS(unsigned long long)
#undef LLMC_ATOMIC_BITS
static inline long long atomicMax(long long *a, long long v) { return llmc_atomic_float_op(a, v, 1); }
static inline unsigned long long atomicMax(unsigned long long *a, unsigned long long v) { return llmc_atomic_float_op(a, v, 1); }
static inline long long atomicMin(long long *a, long long v) { return llmc_atomic_float_op(a, v, 2); }
static inline unsigned long long atomicMin(unsigned long long *a, unsigned long long v) { return llmc_atomic_float_op(a, v, 2); }
static inline unsigned long long atomicExch(unsigned long long *a, unsigned long long v) {
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);
}

// ---------------------------------------------------------------------------------------------------------
// Vector types (with CUDA's alignments), loads, math.
#define LLMC_VEC2(name, T, align) \
    struct alignas(align) name { T x, y; }; \
    static inline name make_##name(T x, T y) { return name{x, y}; }
#define LLMC_VEC3(name, T) \
    struct name { T x, y, z; }; \
    static inline name make_##name(T x, T y, T z) { return name{x, y, z}; }
#define LLMC_VEC4(name, T, align) \
    struct alignas(align) name { T x, y, z, w; }; \
    static inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }
LLMC_VEC2(float2, float, 8) LLMC_VEC3(float3, float) LLMC_VEC4(float4, float, 16)
LLMC_VEC2(double2, double, 16)
LLMC_VEC2(int2, int, 8) LLMC_VEC3(int3, int) LLMC_VEC4(int4, int, 16)
LLMC_VEC2(uint2, unsigned, 8) LLMC_VEC4(uint4, unsigned, 16)
LLMC_VEC2(short2, short, 4) LLMC_VEC4(short4, short, 8)
LLMC_VEC2(ushort2, unsigned short, 4) LLMC_VEC4(ushort4, unsigned short, 8)
LLMC_VEC2(char2, signed char, 2) LLMC_VEC4(char4, signed char, 4)
LLMC_VEC2(uchar2, unsigned char, 2) LLMC_VEC4(uchar4, unsigned char, 4)
LLMC_VEC2(longlong2, long long, 16) LLMC_VEC2(ulonglong2, unsigned long long, 16)
#undef LLMC_VEC2
#undef LLMC_VEC3
#undef LLMC_VEC4
static inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }
template <typename T>
static inline T __ldg(const T *p) { return *p; }
// Cache-hinted loads and stores: on a GPU they choose how the caches keep the line; on a CPU, plain accesses.
template <typename T> static inline T __ldca(const T *p) { return *p; }
template <typename T> static inline T __ldcg(const T *p) { return *p; }
template <typename T> static inline T __ldcs(const T *p) { return *p; }
template <typename T> static inline T __ldlu(const T *p) { return *p; }
template <typename T> static inline T __ldcv(const T *p) { return *p; }
template <typename T> static inline void __stwb(T *p, T v) { *p = v; }
template <typename T> static inline void __stcg(T *p, T v) { *p = v; }
template <typename T> static inline void __stcs(T *p, T v) { *p = v; }
template <typename T> static inline void __stwt(T *p, T v) { *p = v; }

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
static inline unsigned min(int a, unsigned b) { return min((unsigned)a, b); }
static inline unsigned max(int a, unsigned b) { return max((unsigned)a, b); }
static inline unsigned min(unsigned a, int b) { return min(a, (unsigned)b); }
static inline unsigned max(unsigned a, int b) { return max(a, (unsigned)b); }
static inline long min(long a, long b) { return a < b ? a : b; }
static inline long max(long a, long b) { return a > b ? a : b; }
static inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
static inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
static inline unsigned long min(long a, unsigned long b) { return min((unsigned long)a, b); }
static inline unsigned long max(long a, unsigned long b) { return max((unsigned long)a, b); }
static inline unsigned long min(unsigned long a, long b) { return min(a, (unsigned long)b); }
static inline unsigned long max(unsigned long a, long b) { return max(a, (unsigned long)b); }
static inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
static inline unsigned long long min(long long a, unsigned long long b) { return min((unsigned long long)a, b); }
static inline unsigned long long max(long long a, unsigned long long b) { return max((unsigned long long)a, b); }
static inline unsigned long long min(unsigned long long a, long long b) { return min(a, (unsigned long long)b); }
static inline unsigned long long max(unsigned long long a, long long b) { return max(a, (unsigned long long)b); }
static inline float min(float a, float b) { return std::fmin(a, b); }
static inline float max(float a, float b) { return std::fmax(a, b); }
static inline double min(double a, double b) { return std::fmin(a, b); }
static inline double max(double a, double b) { return std::fmax(a, b); }
static inline double min(float a, double b) { return std::fmin((double)a, b); }
static inline double max(float a, double b) { return std::fmax((double)a, b); }
static inline double min(double a, float b) { return std::fmin(a, (double)b); }
static inline double max(double a, float b) { return std::fmax(a, (double)b); }
static inline long long __double_as_longlong(double x) { long long i; std::memcpy(&i, &x, 8); return i; }
static inline double __longlong_as_double(long long i) { double x; std::memcpy(&x, &i, 8); return x; }

// ---------------------------------------------------------------------------------------------------------
// printf goes to a buffer that Python prints after the launch (so it shows in a notebook cell); a failed
// assert stops the launch with a Python error naming the file, line, block and thread.
#define printf(...) llmc_rt_printf(__VA_ARGS__)
// (cuda/assert.h makes `#include <assert.h>` and <cassert> keep this assert.) __trap() stops the launch the same way.
#define LLMC_ASSERT(text, cond) ((cond) ? (void)0 : llmc_rt_fail(__FILE__, __LINE__, "assert(%s) failed", text))
#undef assert
#define assert(cond) LLMC_ASSERT(#cond, cond)
#define __trap() llmc_rt_fail(__FILE__, __LINE__, "__trap() was called")

#include "llmc_constants.h"
