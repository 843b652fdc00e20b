// cuda_bf16.h for the CPU emulator: a software __nv_bfloat16 and __nv_bfloat162 with the conversions and
// operators of CUDA 12's header, so that kernels written with CUDA's own bf16 types run here. (The course's
// kernels use the portable llmc_lessons/kernels/bf16.cuh.) On a GPU, #include <cuda_bf16.h> finds CUDA's
// header; in the emulator it finds this one.
//
// As in CUDA, a __nv_bfloat16 converts implicitly to and from float, double and the integer types, and the
// operators take two bf16 operands (computed in float32, rounded once to bf16, as the GPU's bf16
// instructions do). So, as with nvcc, mixing a bf16 and a float in one operation (`b * 2.0f`, `f += b`) is
// ambiguous: convert one side first (`(float)b * 2.0f`).
#pragma once
#include <cstdint>
#include <cstring>

struct __nv_bfloat16;
static inline __nv_bfloat16 __float2bfloat16(float f);
static inline float __bfloat162float(__nv_bfloat16 h);

struct alignas(2) __nv_bfloat16 {
    unsigned short __x;  // the bits: the top half of a float32
    __nv_bfloat16() = default;
    inline __nv_bfloat16(float f);
    inline __nv_bfloat16(double f);
    inline __nv_bfloat16(short v);
    inline __nv_bfloat16(unsigned short v);
    inline __nv_bfloat16(int v);
    inline __nv_bfloat16(unsigned int v);
    inline __nv_bfloat16(long v);
    inline __nv_bfloat16(unsigned long v);
    inline __nv_bfloat16(long long v);
    inline __nv_bfloat16(unsigned long long v);
    inline operator float() const;
    // CUDA converts to the integer types toward zero, and to bool as "not +-0".
    operator bool() const { return (__x & 0x7FFFu) != 0; }
    operator signed char() const { return (signed char)(float)*this; }
    operator unsigned char() const { return (unsigned char)(float)*this; }
    operator char() const { return (char)(float)*this; }
    operator short() const { return (short)(float)*this; }
    operator unsigned short() const { return (unsigned short)(float)*this; }
    operator int() const { return (int)(float)*this; }
    operator unsigned int() const { return (unsigned int)(float)*this; }
    operator long() const { return (long)(float)*this; }
    operator unsigned long() const { return (unsigned long)(float)*this; }
    operator long long() const { return (long long)(float)*this; }
    operator unsigned long long() const { return (unsigned long long)(float)*this; }
};
typedef __nv_bfloat16 nv_bfloat16;

// float32 -> bf16, to nearest with ties to even; NaN -> 0x7FFF (CUDA's canonical NaN); overflow -> inf.
static inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    __nv_bfloat16 r;
    r.__x = (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FFF : (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return r;
}
static inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
// float32 -> bf16 toward zero: drop the low 16 bits.
static inline __nv_bfloat16 __float2bfloat16_rz(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    __nv_bfloat16 r;
    r.__x = (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FFF : (unsigned short)(u >> 16);
    return r;
}
static inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = (uint32_t)h.__x << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline __nv_bfloat16 __double2bfloat16(double d) { return __float2bfloat16((float)d); }
static inline __nv_bfloat16 __int2bfloat16_rn(int i) { return __float2bfloat16((float)i); }
static inline int __bfloat162int_rz(__nv_bfloat16 h) { return (int)__bfloat162float(h); }
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
static inline short __bfloat16_as_short(__nv_bfloat16 h) { return (short)h.__x; }
static inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 r; r.__x = u; return r; }
static inline __nv_bfloat16 __short_as_bfloat16(short s) { return __ushort_as_bfloat16((unsigned short)s); }

inline __nv_bfloat16::__nv_bfloat16(float f) : __x(__float2bfloat16(f).__x) {}
inline __nv_bfloat16::__nv_bfloat16(double f) : __x(__float2bfloat16((float)f).__x) {}
inline __nv_bfloat16::__nv_bfloat16(short v) : __x(__float2bfloat16((float)v).__x) {}
inline __nv_bfloat16::__nv_bfloat16(unsigned short v) : __x(__float2bfloat16((float)v).__x) {}
inline __nv_bfloat16::__nv_bfloat16(int v) : __x(__float2bfloat16((float)v).__x) {}
inline __nv_bfloat16::__nv_bfloat16(unsigned int v) : __x(__float2bfloat16((float)v).__x) {}
inline __nv_bfloat16::__nv_bfloat16(long v) : __x(__float2bfloat16((float)v).__x) {}
inline __nv_bfloat16::__nv_bfloat16(unsigned long v) : __x(__float2bfloat16((float)v).__x) {}
inline __nv_bfloat16::__nv_bfloat16(long long v) : __x(__float2bfloat16((float)v).__x) {}
inline __nv_bfloat16::__nv_bfloat16(unsigned long long v) : __x(__float2bfloat16((float)v).__x) {}
inline __nv_bfloat16::operator float() const { return __bfloat162float(*this); }

// Arithmetic: in float32, rounded once to bf16 (what the GPU's bf16 instructions return).
#define LLMC_BF16_F(h) __bfloat162float(h)
static inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return __float2bfloat16(LLMC_BF16_F(a) + LLMC_BF16_F(b)); }
static inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) { return __float2bfloat16(LLMC_BF16_F(a) - LLMC_BF16_F(b)); }
static inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return __float2bfloat16(LLMC_BF16_F(a) * LLMC_BF16_F(b)); }
static inline __nv_bfloat16 __hdiv(__nv_bfloat16 a, __nv_bfloat16 b) { return __float2bfloat16(LLMC_BF16_F(a) / LLMC_BF16_F(b)); }
static inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
    return __float2bfloat16(LLMC_BF16_F(a) * LLMC_BF16_F(b) + LLMC_BF16_F(c));
}
static inline __nv_bfloat16 __hneg(__nv_bfloat16 a) { return __ushort_as_bfloat16(a.__x ^ 0x8000u); }
static inline __nv_bfloat16 __habs(__nv_bfloat16 a) { return __ushort_as_bfloat16(a.__x & 0x7FFFu); }
static inline __nv_bfloat16 __hmax(__nv_bfloat16 a, __nv_bfloat16 b) { return LLMC_BF16_F(a) < LLMC_BF16_F(b) ? b : a; }
static inline __nv_bfloat16 __hmin(__nv_bfloat16 a, __nv_bfloat16 b) { return LLMC_BF16_F(b) < LLMC_BF16_F(a) ? b : a; }
static inline __nv_bfloat16 operator+(const __nv_bfloat16 &a, const __nv_bfloat16 &b) { return __hadd(a, b); }
static inline __nv_bfloat16 operator-(const __nv_bfloat16 &a, const __nv_bfloat16 &b) { return __hsub(a, b); }
static inline __nv_bfloat16 operator*(const __nv_bfloat16 &a, const __nv_bfloat16 &b) { return __hmul(a, b); }
static inline __nv_bfloat16 operator/(const __nv_bfloat16 &a, const __nv_bfloat16 &b) { return __hdiv(a, b); }
static inline __nv_bfloat16 &operator+=(__nv_bfloat16 &a, const __nv_bfloat16 &b) { return a = __hadd(a, b); }
static inline __nv_bfloat16 &operator-=(__nv_bfloat16 &a, const __nv_bfloat16 &b) { return a = __hsub(a, b); }
static inline __nv_bfloat16 &operator*=(__nv_bfloat16 &a, const __nv_bfloat16 &b) { return a = __hmul(a, b); }
static inline __nv_bfloat16 &operator/=(__nv_bfloat16 &a, const __nv_bfloat16 &b) { return a = __hdiv(a, b); }
static inline __nv_bfloat16 operator+(const __nv_bfloat16 &a) { return a; }
static inline __nv_bfloat16 operator-(const __nv_bfloat16 &a) { return __hneg(a); }
static inline __nv_bfloat16 &operator++(__nv_bfloat16 &a) { return a = __hadd(a, __float2bfloat16(1.0f)); }
static inline __nv_bfloat16 &operator--(__nv_bfloat16 &a) { return a = __hsub(a, __float2bfloat16(1.0f)); }
static inline __nv_bfloat16 operator++(__nv_bfloat16 &a, int) { __nv_bfloat16 old = a; ++a; return old; }
static inline __nv_bfloat16 operator--(__nv_bfloat16 &a, int) { __nv_bfloat16 old = a; --a; return old; }
static inline bool operator==(const __nv_bfloat16 &a, const __nv_bfloat16 &b) { return LLMC_BF16_F(a) == LLMC_BF16_F(b); }
static inline bool operator!=(const __nv_bfloat16 &a, const __nv_bfloat16 &b) { return LLMC_BF16_F(a) != LLMC_BF16_F(b); }
static inline bool operator<(const __nv_bfloat16 &a, const __nv_bfloat16 &b) { return LLMC_BF16_F(a) < LLMC_BF16_F(b); }
static inline bool operator>(const __nv_bfloat16 &a, const __nv_bfloat16 &b) { return LLMC_BF16_F(a) > LLMC_BF16_F(b); }
static inline bool operator<=(const __nv_bfloat16 &a, const __nv_bfloat16 &b) { return LLMC_BF16_F(a) <= LLMC_BF16_F(b); }
static inline bool operator>=(const __nv_bfloat16 &a, const __nv_bfloat16 &b) { return LLMC_BF16_F(a) >= LLMC_BF16_F(b); }

// ---------------------------------------------------------------------------------------------------------
// __nv_bfloat162: two bf16 in one 32-bit word (.x in the lower half), operated on lane by lane.
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
    __nv_bfloat162() = default;
    __nv_bfloat162(const __nv_bfloat16 &a, const __nv_bfloat16 &b) : x(a), y(b) {}
};
typedef __nv_bfloat162 nv_bfloat162;

static inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 lo, __nv_bfloat16 hi) { return __nv_bfloat162(lo, hi); }
static inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return __nv_bfloat162(a, a); }
static inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    return __nv_bfloat162(__float2bfloat16(lo), __float2bfloat16(hi));
}
static inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __floats2bfloat162_rn(a, a); }
static inline float2 __bfloat1622float2(__nv_bfloat162 a) { return float2{LLMC_BF16_F(a.x), LLMC_BF16_F(a.y)}; }
static inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
static inline float __low2float(__nv_bfloat162 a) { return LLMC_BF16_F(a.x); }
static inline float __high2float(__nv_bfloat162 a) { return LLMC_BF16_F(a.y); }
static inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 a) { return a.x; }
static inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 a) { return a.y; }
static inline __nv_bfloat162 __lows2bfloat162(__nv_bfloat162 a, __nv_bfloat162 b) { return __nv_bfloat162(a.x, b.x); }
static inline __nv_bfloat162 __highs2bfloat162(__nv_bfloat162 a, __nv_bfloat162 b) { return __nv_bfloat162(a.y, b.y); }
static inline __nv_bfloat162 __hadd2(__nv_bfloat162 a, __nv_bfloat162 b) { return {__hadd(a.x, b.x), __hadd(a.y, b.y)}; }
static inline __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b) { return {__hsub(a.x, b.x), __hsub(a.y, b.y)}; }
static inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) { return {__hmul(a.x, b.x), __hmul(a.y, b.y)}; }
static inline __nv_bfloat162 __h2div(__nv_bfloat162 a, __nv_bfloat162 b) { return {__hdiv(a.x, b.x), __hdiv(a.y, b.y)}; }
static inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
    return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)};
}
static inline __nv_bfloat162 __hmax2(__nv_bfloat162 a, __nv_bfloat162 b) { return {__hmax(a.x, b.x), __hmax(a.y, b.y)}; }
static inline __nv_bfloat162 __hmin2(__nv_bfloat162 a, __nv_bfloat162 b) { return {__hmin(a.x, b.x), __hmin(a.y, b.y)}; }
static inline __nv_bfloat162 operator+(const __nv_bfloat162 &a, const __nv_bfloat162 &b) { return __hadd2(a, b); }
static inline __nv_bfloat162 operator-(const __nv_bfloat162 &a, const __nv_bfloat162 &b) { return __hsub2(a, b); }
static inline __nv_bfloat162 operator*(const __nv_bfloat162 &a, const __nv_bfloat162 &b) { return __hmul2(a, b); }
static inline __nv_bfloat162 operator/(const __nv_bfloat162 &a, const __nv_bfloat162 &b) { return __h2div(a, b); }
static inline __nv_bfloat162 &operator+=(__nv_bfloat162 &a, const __nv_bfloat162 &b) { return a = __hadd2(a, b); }
static inline __nv_bfloat162 &operator-=(__nv_bfloat162 &a, const __nv_bfloat162 &b) { return a = __hsub2(a, b); }
static inline __nv_bfloat162 &operator*=(__nv_bfloat162 &a, const __nv_bfloat162 &b) { return a = __hmul2(a, b); }
static inline __nv_bfloat162 operator-(const __nv_bfloat162 &a) { return {__hneg(a.x), __hneg(a.y)}; }
static inline bool operator==(const __nv_bfloat162 &a, const __nv_bfloat162 &b) { return a.x == b.x && a.y == b.y; }
static inline bool operator!=(const __nv_bfloat162 &a, const __nv_bfloat162 &b) { return !(a == b); }

// Atomic adds (each returns the old value): a compare-and-swap loop on the 16- or 32-bit word.
static inline __nv_bfloat16 atomicAdd(__nv_bfloat16 *addr, __nv_bfloat16 val) {
    unsigned short *p = &addr->__x, old = __atomic_load_n(p, __ATOMIC_RELAXED), want;
    do {
        want = __hadd(__ushort_as_bfloat16(old), val).__x;
    } while (!__atomic_compare_exchange_n(p, &old, want, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    return __ushort_as_bfloat16(old);
}
static inline __nv_bfloat162 atomicAdd(__nv_bfloat162 *addr, __nv_bfloat162 val) {
    uint32_t *p = reinterpret_cast<uint32_t *>(addr), old = __atomic_load_n(p, __ATOMIC_RELAXED), want;
    __nv_bfloat162 o;
    do {
        std::memcpy(&o, &old, 4);
        __nv_bfloat162 n = __hadd2(o, val);
        std::memcpy(&want, &n, 4);
    } while (!__atomic_compare_exchange_n(p, &old, want, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    std::memcpy(&o, &old, 4);
    return o;
}
#undef LLMC_BF16_F
