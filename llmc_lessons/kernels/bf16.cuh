// bf16.cuh: bfloat16 as plain 16-bit integers, with the conversions written out (lesson 14).
//
// A bf16 number is the top half of a float32: 1 sign bit, the same 8 exponent bits, 7 mantissa bits. The
// course stores bf16 arrays as `unsigned short` (NumPy uint16 on the host) and converts with the two
// functions below, so the same source runs on a GPU and in the CPU emulator bit for bit. (CUDA's own type,
// __nv_bfloat16 from <cuda_bf16.h>, does the same with hardware instructions; the emulator provides a
// software version of it too.)
#pragma once

// The sm_80 instructions of the bf16 kernels (cvt to bf16, max.bf16x2 here; mma.sync on bf16 and cp.async in
// mma.cuh) where the GPU has them. On an older GPU (a T4 is sm_75), in the CPU emulator, or with -DLLMC_NO_SM80,
// the same kernels compile to plain CUDA with the same results.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(LLMC_NO_SM80)
#define LLMC_SM80 1
#endif

typedef unsigned short bf16;

// bf16 -> float32: put the 16 bits back on top, zeros below. Exact.
__device__ __forceinline__ float bf16_to_float(bf16 h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

// float32 -> bf16, rounding to nearest, ties to even: add 0x7FFF plus the lowest kept bit, then drop the low
// 16 bits. A NaN stays a NaN (0x7FFF); values too large for bf16 round to infinity, as on the GPU. On a GPU the
// conversion is one instruction (cvt.rn.bf16.f32) that gives these same bits; the integer version, 8
// instructions, is what the CPU emulator runs (and what made a bf16 store cost more than the arithmetic).
__device__ __forceinline__ bf16 bf16_from_float(float f) {
#if defined(LLMC_SM80)
    bf16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
#else
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (bf16)0x7FFF;
    unsigned int lsb = (u >> 16) & 1u;
    return (bf16)((u + 0x7FFFu + lsb) >> 16);
#endif
}

// Two floats -> one 32-bit word of two bf16 (lo in the lower half), each rounded as bf16_from_float does: on a
// GPU one instruction for the pair (cvt.rn.bf16x2.f32).
__device__ __forceinline__ unsigned int pack_bf16x2(float lo, float hi) {
#if defined(LLMC_SM80)
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));  // the first operand goes on top
    return r;
#else
    return (unsigned int)bf16_from_float(lo) | ((unsigned int)bf16_from_float(hi) << 16);
#endif
}

// The two bf16 values packed in one 32-bit word (the lower index in the lower half), as float32. Exact.
__device__ __forceinline__ float bf16_lo(unsigned int two) { return __uint_as_float(two << 16); }
__device__ __forceinline__ float bf16_hi(unsigned int two) { return __uint_as_float(two & 0xFFFF0000u); }

// The larger of each pair of bf16 values in two 32-bit words (a max is exact in any precision): on a GPU one
// instruction (max.bf16x2), in the emulator the same through float32.
__device__ __forceinline__ unsigned int max_bf16x2(unsigned int a, unsigned int b) {
#if defined(LLMC_SM80)
    unsigned int r;
    asm("max.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
#else
    return pack_bf16x2(fmaxf(bf16_lo(a), bf16_lo(b)), fmaxf(bf16_hi(a), bf16_hi(b)));
#endif
}
