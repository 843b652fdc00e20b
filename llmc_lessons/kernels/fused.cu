// fused.cu: kernel fusion (lesson 12). Two kernels that each read and write memory once can often be one
// kernel that does both jobs in a single pass, saving the round trip of the intermediate through memory.
//
// fused_residual_layernorm_forward_kernel: residual = inp1 + inp2, then out = layernorm(residual), as GPT-2
//   does at every block (the residual add followed by ln2, or by the next block's ln1). Apart, the residual
//   kernel reads 2 rows and writes 1, then layernorm reads that row again and writes 1: 5 row transfers.
//   Fused: read 2, write 2 (the residual is still needed by the backward): 4. One warp per row, as
//   layernorm_forward_kernel2; the row is read once from memory and the second pass hits the L1/L2 cache.
#include "common.cuh"

extern "C" __global__ void fused_residual_layernorm_forward_kernel(float* residual,     // (N, C)
                                                                   float* out,          // (N, C)
                                                                   float* mean,         // (N,)
                                                                   float* rstd,         // (N,)
                                                                   const float* inp1,   // (N, C)
                                                                   const float* inp2,   // (N, C)
                                                                   const float* weight, // (C,)
                                                                   const float* bias,   // (C,)
                                                                   int N, int C, float eps) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // one warp per row
    if (row >= N) return;                                          // the whole warp leaves together
    const float* a = inp1 + row * C;
    const float* b = inp2 + row * C;
    float* r = residual + row * C;
    // pass 1: the residual add, written out, and the row sum, lane by lane (lane, lane + 32, ...)
    float sum = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float v = a[c] + b[c];
        r[c] = v;
        sum += v;
    }
    float m = warpReduceSum(sum) / C;
    // pass 2: the variance from the centred values (this warp wrote r a moment ago: it reads its own writes)
    float var = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float d = r[c] - m;
        var += d * d;
    }
    float s = rsqrtf(warpReduceSum(var) / C + eps);
    // pass 3: normalise, scale and shift
    float* o = out + row * C;
    for (int c = lane; c < C; c += 32) {
        o[c] = (r[c] - m) * s * weight[c] + bias[c];
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}
