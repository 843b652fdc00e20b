// cuda_bf16.h for the CPU emulator: a software __nv_bfloat16 with CUDA's conversions, so that kernels written
// with CUDA's own bf16 type run here. (The course's kernels use the portable llmc_lessons/kernels/bf16.cuh.)
// On a GPU, #include <cuda_bf16.h> finds CUDA's header; in the emulator it finds this one.
#pragma once
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
    unsigned short __x;  // the bits: the top half of a float32
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
// The arithmetic kernels use: in float32, rounded once to bf16 (what the GPU's bf16 instructions return).
static inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return __float2bfloat16(__bfloat162float(a) + __bfloat162float(b)); }
static inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) { return __float2bfloat16(__bfloat162float(a) - __bfloat162float(b)); }
static inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return __float2bfloat16(__bfloat162float(a) * __bfloat162float(b)); }
static inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
    return __float2bfloat16(__bfloat162float(a) * __bfloat162float(b) + __bfloat162float(c));
}
static inline __nv_bfloat16 operator+(__nv_bfloat16 a, __nv_bfloat16 b) { return __hadd(a, b); }
static inline __nv_bfloat16 operator-(__nv_bfloat16 a, __nv_bfloat16 b) { return __hsub(a, b); }
static inline __nv_bfloat16 operator*(__nv_bfloat16 a, __nv_bfloat16 b) { return __hmul(a, b); }
static inline bool operator<(__nv_bfloat16 a, __nv_bfloat16 b) { return __bfloat162float(a) < __bfloat162float(b); }
static inline bool operator>(__nv_bfloat16 a, __nv_bfloat16 b) { return __bfloat162float(a) > __bfloat162float(b); }
