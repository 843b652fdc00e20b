// common.cuh: small helpers shared by the course's kernels (the same ideas as llm.c's common.h).
// Included with #include "common.cuh"; the package adds this folder to the include path on GPU and CPU.
#pragma once

// -infinity as a float (NVRTC has no INFINITY macro): the start of a running maximum.
#define NEG_INF __int_as_float(0xff800000)

// ceil(M / N) for positive integers: how many blocks of N threads cover M elements.
#define CEIL_DIV(M, N) (((M) + (N) - 1) / (N))

// Sum of `val` over the 32 lanes of a warp; every lane gets the total.
// Each step adds the value held by the lane `offset` away (xor butterfly: 16, 8, 4, 2, 1).
__device__ __forceinline__ float warpReduceSum(float val) {
    for (int offset = 16; offset > 0; offset /= 2) {
        val += __shfl_xor_sync(0xffffffff, val, offset);
    }
    return val;
}

// Maximum of `val` over the 32 lanes of a warp; every lane gets it.
__device__ __forceinline__ float warpReduceMax(float val) {
    for (int offset = 16; offset > 0; offset /= 2) {
        val = fmaxf(val, __shfl_xor_sync(0xffffffff, val, offset));
    }
    return val;
}
