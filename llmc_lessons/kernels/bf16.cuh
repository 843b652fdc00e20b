// bf16.cuh: bfloat16 as plain 16-bit integers, with the conversions written out (lesson 14).
//
// A bf16 number is the top half of a float32: 1 sign bit, the same 8 exponent bits, 7 mantissa bits. The
// course stores bf16 arrays as `unsigned short` (NumPy uint16 on the host) and converts with the two
// functions below, so the same source runs on a GPU and in the CPU emulator bit for bit. (CUDA's own type,
// __nv_bfloat16 from <cuda_bf16.h>, does the same with hardware instructions; the emulator provides a
// software version of it too.) After the conversions: stochastic rounding, and the 8-value accesses that
// the kernels of the bf16 training step share.
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

// A weight gradient accumulated into: the bf16 step keeps its gradients in bf16, as llm.c does (half the
// bytes of float32 for the backward's writes, the gradient norm and AdamW). A float32 sum is added to the
// stored value and rounded once; a float32 gradient takes the sum as it is.
__device__ __forceinline__ void add_into(bf16* g, float s) { *g = bf16_from_float(bf16_to_float(*g) + s); }
__device__ __forceinline__ void add_into(float* g, float s) { *g += s; }

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

// A 32-bit hash of (seed, index): the random bits for stochastic rounding, the same on GPU and CPU.
__device__ __forceinline__ unsigned int hash32(unsigned int seed, unsigned int i) {
    unsigned int h = seed ^ (i * 0x9E3779B9u);
    h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16;
    return h;
}

// Round up with probability (dropped low bits) / 2^16: adding 16 random bits below the kept ones, then
// truncating, does exactly that.
__device__ __forceinline__ bf16 bf16_stochastic(float f, unsigned int seed, unsigned int i) {
    return (bf16)((__float_as_uint(f) + (hash32(seed, i) & 0xFFFFu)) >> 16);
}

// =========================================================================================================
// The bf16 training step (GPT2(precision="bf16"), as llm.c's train_gpt2.cu with floatX = bf16).
//
// Activations are bf16; the weight matrices are read as bf16 copies of their float32 masters; every weight
// gradient is bf16 (as llm.c keeps them: add_into adds a float32 sum and rounds once); layernorm parameters,
// statistics and the loss stay float32, and so do the biases but one: the qkv bias is read as its bf16 copy (as
// llm.c reads every parameter), because cuBLASLt adds it. The matrix products
// are cuBLAS's (bf16 in, float32 accumulation). The step's kernels (the last section of encoder.cu,
// layernorm.cu, attention.cu, gelu.cu and crossentropy.cu) compute in float32 and move bf16 EIGHT values at a
// time, one 16-byte access (two-byte loads leave a kernel short of bandwidth, as lesson 14's GELU showed), so
// C, T and Vp must be multiples of 8 and arrays 16-byte aligned. The helpers after this comment are theirs.
// The qkv product adds its bias in cuBLASLt's BIAS epilogue (cublas.py's gemm_bias: to the float32 sums, before
// their one rounding), since the step's attention, flash_attention.cu's version 2, copies qkv straight into
// shared memory. The other biases are added on the way inside the kernel that reads a product next: the fc bias
// in the GELU, the two projection biases in the residual adds. The bias gradients come the same way: the fc
// bias's out of the GELU backward, the two projection biases' out of the LayerNorm backward that writes their
// dout, the qkv bias's out of the flash attention backward (flash_attention.cu): no kernel reads a product a
// second time for its bias gradient.
// The head split, the softmax kernels and the merge are the attention that writes the T x T scores
// (attention_forward_bf16_cuda), which `python -m llmc_lessons.bench --attention` compares with.
// =========================================================================================================

// 8 bf16 values <-> 8 floats through one 16-byte access; p must be 16-byte aligned.
__device__ __forceinline__ void unpack8(float* f, int4 v) {
    unsigned int w[4] = {(unsigned int)v.x, (unsigned int)v.y, (unsigned int)v.z, (unsigned int)v.w};
    for (int i = 0; i < 4; i++) {
        f[2 * i] = bf16_lo(w[i]);
        f[2 * i + 1] = bf16_hi(w[i]);
    }
}

__device__ __forceinline__ void load8(float* f, const bf16* p) {
    unpack8(f, *(const int4*)p);
}

__device__ __forceinline__ void store8(bf16* p, const float* f) {
    *(int4*)p = make_int4((int)pack_bf16x2(f[0], f[1]), (int)pack_bf16x2(f[2], f[3]), (int)pack_bf16x2(f[4], f[5]),
                          (int)pack_bf16x2(f[6], f[7]));
}

// 8 floats of a float32 vector (a bias, a layernorm weight) through two 16-byte loads; p must be 16-byte
// aligned (the launchers check). Two load instructions instead of eight.
__device__ __forceinline__ void load8f(float* f, const float* p) {
    float4 a = *(const float4*)p, b = *(const float4*)(p + 4);
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}

// 8 floats into a float32 array through two 16-byte stores; p must be 16-byte aligned.
__device__ __forceinline__ void store8f(float* p, const float* f) {
    *(float4*)p = make_float4(f[0], f[1], f[2], f[3]);
    *(float4*)(p + 4) = make_float4(f[4], f[5], f[6], f[7]);
}

// The rows row0, row0 + W, ..., row0 + (ROWS - 1) W of two (N, C) bf16 arrays a and b into the warp's registers,
// packed: the lane's 16-byte pieces (lane + 32 i) * 8, i < CHUNKS (C a multiple of 8, at most CHUNKS * 256), every
// load issued before any is used. A row at or past N is zeros. (dout and inp in the normalisation backwards; the
// residual stream and the added branch in the fused residual + normalisation forwards.)
template <int ROWS, int CHUNKS>
__device__ __forceinline__ void load_rows8(int4 raw_a[ROWS][CHUNKS], int4 raw_b[ROWS][CHUNKS], const bf16* a,
                                           const bf16* b, int row0, int W, int N, int C) {
    int lane = threadIdx.x % 32;
    for (int r = 0; r < ROWS; r++) {
        int row = row0 + r * W;
        bool in = row < N;
        for (int i = 0; i < CHUNKS; i++) {
            int c = (lane + 32 * i) * 8;
            if (c < C) {
                raw_a[r][i] = in ? *(const int4*)(a + (size_t)row * C + c) : make_int4(0, 0, 0, 0);
                raw_b[r][i] = in ? *(const int4*)(b + (size_t)row * C + c) : make_int4(0, 0, 0, 0);
            }
        }
    }
}

__device__ __forceinline__ float round_bf16(float f) {  // the float32 value of f's nearest bf16
    return bf16_to_float(bf16_from_float(f));
}
