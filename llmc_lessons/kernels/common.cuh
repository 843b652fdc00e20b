// common.cuh: small helpers shared by the course's kernels (the same ideas as llm.c's common.h).
// Included with #include "common.cuh"; the package adds this folder to the include path on GPU and CPU.
#pragma once

// -infinity as a float (NVRTC has no INFINITY macro): the start of a running maximum.
#define NEG_INF __int_as_float(0xff800000)

// log2(e): exp(x) = exp2(x * LOG2E), the form the GPU's exponential instruction (ex2) takes.
#define LOG2E 1.4426950408889634f

// 2^x: on a GPU the one instruction ex2.approx (about 2 float32 units in the last place; __expf(x) is this
// instruction after a multiply by LOG2E), exp2f in the CPU emulator.
__device__ __forceinline__ float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#else
    return exp2f(x);
#endif
}

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

// The end of column sums kept per warp: each warp of the block has added into its own row of buf (warps, width)
// in shared memory; row blockIdx.x of partial gets their sum, the warps added in order (the same bits every run).
__device__ __forceinline__ void warp_sums_to_partial(float* partial, const float* buf, int width) {
    __syncthreads();
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        float sum = 0.0f;
        for (int j = 0; j < (int)blockDim.x / 32; j++) sum += buf[(size_t)j * width + c];
        partial[(size_t)blockIdx.x * width + c] = sum;
    }
}

// Maximum of `val` over the 32 lanes of a warp; every lane gets it.
__device__ __forceinline__ float warpReduceMax(float val) {
    for (int offset = 16; offset > 0; offset /= 2) {
        val = fmaxf(val, __shfl_xor_sync(0xffffffff, val, offset));
    }
    return val;
}
