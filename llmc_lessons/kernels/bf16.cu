// bf16.cu: kernels that store activations and weights in bfloat16 but compute in float32 (lesson 14).
//
// gelu_forward_bf16_kernel: one thread per element; load bf16, compute in float32, round once on the store.
// gelu_forward_bf16_kernel2: the same, 8 values per thread through 128-bit (int4) loads and stores.
// layernorm_forward_bf16_kernel: one warp per row (as layernorm_forward_kernel2); bf16 input and output, the
//   mean and the variance accumulated and kept in float32 (a bf16 sum of 768 terms would lose 2-3 digits).
// adamw_bf16_kernel: the update on float32 master weights and moments, then a bf16 copy of each weight for
//   the forward and backward; with stochastic=1 the copy is rounded up or down at random with the
//   probability that makes its expected value exact (llm.c's stochastic rounding), else to nearest.
#include "common.cuh"
#include "bf16.cuh"

__device__ __forceinline__ float gelu_f32(float x) {  // the tanh GELU of lesson 06, in float32
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

extern "C" __global__ void gelu_forward_bf16_kernel(bf16* out, const bf16* inp, int N) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < N) {
        out[i] = bf16_from_float(gelu_f32(bf16_to_float(inp[i])));
    }
}

// The same with 128-bit accesses: each thread loads 8 bf16 values as one int4 (16 bytes), as lesson 12's
// float4 GELU does. Two-byte loads leave a bf16 kernel limited by load instructions, not by bandwidth.
__device__ __forceinline__ unsigned int gelu_bf16_pair(unsigned int two) {  // two bf16 in one 32-bit word
    float lo = gelu_f32(bf16_to_float((bf16)(two & 0xFFFFu)));
    float hi = gelu_f32(bf16_to_float((bf16)(two >> 16)));
    return (unsigned int)bf16_from_float(lo) | ((unsigned int)bf16_from_float(hi) << 16);
}

extern "C" __global__ void gelu_forward_bf16_kernel2(int4* out, const int4* inp, int N8) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;   // one thread per 8 values
    if (i < N8) {
        int4 v = inp[i];
        int4 r;
        r.x = (int)gelu_bf16_pair((unsigned int)v.x);
        r.y = (int)gelu_bf16_pair((unsigned int)v.y);
        r.z = (int)gelu_bf16_pair((unsigned int)v.z);
        r.w = (int)gelu_bf16_pair((unsigned int)v.w);
        out[i] = r;
    }
}

extern "C" __global__ void layernorm_forward_bf16_kernel(bf16* out,           // (N, C)
                                                         float* mean,         // (N,)
                                                         float* rstd,         // (N,)
                                                         const bf16* inp,     // (N, C)
                                                         const float* weight, // (C,)
                                                         const float* bias,   // (C,)
                                                         int N, int C) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    const bf16* x = inp + row * C;
    float sum = 0.0f;
    for (int c = lane; c < C; c += 32) sum += bf16_to_float(x[c]);
    float m = warpReduceSum(sum) / C;
    float var = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float d = bf16_to_float(x[c]) - m;
        var += d * d;
    }
    float s = rsqrtf(warpReduceSum(var) / C + 1e-5f);
    for (int c = lane; c < C; c += 32) {
        out[row * C + c] = bf16_from_float((bf16_to_float(x[c]) - m) * s * weight[c] + bias[c]);
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}

// A 32-bit hash of (seed, index): the random bits for stochastic rounding, the same on GPU and CPU.
__device__ __forceinline__ unsigned int hash32(unsigned int seed, unsigned int i) {
    unsigned int h = seed ^ (i * 0x9E3779B9u);
    h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16;
    return h;
}

extern "C" __global__ void adamw_bf16_kernel(float* master, bf16* params, const float* grads, float* m, float* v,
                                             int N, float lr, float beta1, float beta2, float beta1_correction,
                                             float beta2_correction, float eps, float weight_decay,
                                             int stochastic, unsigned int seed) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) return;
    float g = grads[i];
    float mi = beta1 * m[i] + (1.0f - beta1) * g;
    float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    float p = master[i];
    p -= lr * ((mi / beta1_correction) / (sqrtf(vi / beta2_correction) + eps) + weight_decay * p);
    master[i] = p;                                    // float32 master weight: small updates accumulate here
    if (stochastic) {
        // round up with probability (dropped low bits) / 2^16: adding 16 random bits below the kept ones, then
        // truncating, does exactly that
        unsigned int u = __float_as_uint(p);
        params[i] = (bf16)((u + (hash32(seed, (unsigned int)i) & 0xFFFFu)) >> 16);
    } else {
        params[i] = bf16_from_float(p);
    }
}
