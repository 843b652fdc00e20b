// rmsnorm.cu: RMSNorm over the channels of every (b, t) row, forward and backward (LLaMA's LayerNorm).
//
//   forward:  rstd = 1 / sqrt((1/C) sum_c x_c^2 + eps),   norm_c = x_c * rstd,   out_c = norm_c * weight_c
//   backward: dnorm_c = dout_c * weight_c
//             dinp_c  = rstd * (dnorm_c - norm_c * mean_c'(dnorm * norm))
//             dweight_c = sum over rows of dout_c * norm_c
//
// Shapes: the B*T rows are handled as N = B*T independent rows of C floats.
//   inp, out, dout, dinp (N, C); weight, dweight (C,); rstd (N,).
//
// rmsnorm_forward_kernel is one warp per row, as layernorm_forward_kernel2: lane l reads channels l, l+32, ...
//   (coalesced) and warpReduceSum adds the 32 partial sums of squares. One pass fewer than LayerNorm: no mean.
// rmsnorm_backward_kernel is one warp per row, computing dinp (written, not accumulated).
// rmsnorm_param_backward_kernel is one thread per channel c, adding dout * norm down its column: neighbouring
//   threads read neighbouring channels (coalesced). C threads alone (768 for GPT-2's size) would leave most of
//   a GPU idle, so the rows are split among the R block rows of a 2-D grid, each leaving its partial sums in a
//   row of (R, C); rmsnorm_param_reduce_kernel adds them in order into dweight. No atomics: the same bits on
//   every run.
#include "common.cuh"

// ---------------------------------------------------------------------------------------------------------
// Forward

extern "C" __global__ void rmsnorm_forward_kernel(float* out,           // (N, C)
                                                  float* rstd,          // (N,)
                                                  const float* inp,     // (N, C)
                                                  const float* weight,  // (C,)
                                                  int N, int C, float eps) {
    int lane = threadIdx.x % 32;                      // 0..31: this thread's place in its warp
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // one warp per row
    if (row >= N) { return; }                         // the whole warp leaves together: shuffles stay safe
    const float* x = inp + row * C;                   // seek to this row: inp[row, :]
    float* o = out + row * C;
    float sumsq = 0.0f;                               // this lane's share of sum_c x_c^2
    for (int c = lane; c < C; c += 32) { sumsq += x[c] * x[c]; }
    sumsq = warpReduceSum(sumsq);                     // every lane now holds the row's total
    float s = rsqrtf(sumsq / C + eps);                // 1 / root mean square
    for (int c = lane; c < C; c += 32) { o[c] = x[c] * s * weight[c]; }
    if (lane == 0) { rstd[row] = s; }                 // cached for the backward pass
}

// ---------------------------------------------------------------------------------------------------------
// Backward

extern "C" __global__ void rmsnorm_backward_kernel(float* dinp,          // (N, C)
                                                   const float* dout,    // (N, C)
                                                   const float* inp,     // (N, C)
                                                   const float* weight,  // (C,)
                                                   const float* rstd,    // (N,)
                                                   int N, int C) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // one warp per row
    if (row >= N) { return; }
    const float* x = inp + row * C;
    const float* dy = dout + row * C;
    float s = rstd[row];
    float dot = 0.0f;                                 // this lane's share of sum_c dnorm_c * norm_c
    for (int c = lane; c < C; c += 32) { dot += dy[c] * weight[c] * x[c] * s; }
    float dnorm_norm_mean = warpReduceSum(dot) / C;
    float* dx = dinp + row * C;
    for (int c = lane; c < C; c += 32) {
        float norm = x[c] * s;
        dx[c] = s * (dy[c] * weight[c] - norm * dnorm_norm_mean);
    }
}

extern "C" __global__ void rmsnorm_param_backward_kernel(float* partial,       // (gridDim.y, C)
                                                         const float* dout,    // (N, C)
                                                         const float* inp,     // (N, C)
                                                         const float* rstd,    // (N,)
                                                         int N, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;    // one thread per channel
    if (c >= C) { return; }
    float sum = 0.0f;
    for (int row = blockIdx.y; row < N; row += gridDim.y) {   // block row y: rows y, y + R, ... in order
        sum += dout[row * C + c] * inp[row * C + c] * rstd[row];
    }
    partial[blockIdx.y * C + c] = sum;
}

// dweight[c] += the R partial sums of channel c, added in the order 0, 1, ..., R - 1: deterministic.
extern "C" __global__ void rmsnorm_param_reduce_kernel(float* dweight,        // (C,)
                                                       const float* partial,  // (R, C)
                                                       int R, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) { return; }
    float sum = 0.0f;
    for (int r = 0; r < R; r++) { sum += partial[r * C + c]; }
    dweight[c] += sum;
}

// =========================================================================================================
// bf16: stored in bfloat16, computed in float32 (kernels/bf16.cuh has the conversions). The statistics
// (rstd), the weight and its gradient stay float32, as in the bf16 training step of lesson 14.
//
// rmsnorm_forward_bf16_kernel: rmsnorm_forward_kernel on bf16 rows, rounding once on the store.
// rmsnorm_backward_bf16_kernel: a warp per row; dinp (float32, the residual stream's gradient) += the input
//   gradient, and its new value is stored in bf16 too (for the matmul backward before it).
// rmsnorm_param_backward_bf16_kernel: the partial column sums of the float32 kernel, from bf16; then
//   rmsnorm_param_reduce_kernel adds them into dweight (float32).
// =========================================================================================================
#include "bf16.cuh"

extern "C" __global__ void rmsnorm_forward_bf16_kernel(bf16* out,            // (N, C)
                                                       float* rstd,          // (N,)
                                                       const bf16* inp,      // (N, C)
                                                       const float* weight,  // (C,)
                                                       int N, int C, float eps) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // one warp per row
    if (row >= N) { return; }
    const bf16* x = inp + row * C;
    float sumsq = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float v = bf16_to_float(x[c]);
        sumsq += v * v;
    }
    float s = rsqrtf(warpReduceSum(sumsq) / C + eps);
    for (int c = lane; c < C; c += 32) { out[row * C + c] = bf16_from_float(bf16_to_float(x[c]) * s * weight[c]); }
    if (lane == 0) { rstd[row] = s; }
}

extern "C" __global__ void rmsnorm_backward_bf16_kernel(float* dinp,          // (N, C) +=
                                                        bf16* dinp_bf16,      // (N, C) dinp's new value
                                                        const bf16* dout,     // (N, C)
                                                        const bf16* inp,      // (N, C)
                                                        const float* weight,  // (C,)
                                                        const float* rstd,    // (N,)
                                                        int N, int C) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // one warp per row
    if (row >= N) { return; }
    const bf16* x = inp + row * C;
    const bf16* dy = dout + row * C;
    float s = rstd[row];
    float dot = 0.0f;                                 // this lane's share of sum_c dnorm_c * norm_c
    for (int c = lane; c < C; c += 32) { dot += bf16_to_float(dy[c]) * weight[c] * bf16_to_float(x[c]) * s; }
    float dnorm_norm_mean = warpReduceSum(dot) / C;
    for (int c = lane; c < C; c += 32) {
        float norm = bf16_to_float(x[c]) * s;
        float d = dinp[row * C + c] + s * (bf16_to_float(dy[c]) * weight[c] - norm * dnorm_norm_mean);
        dinp[row * C + c] = d;
        dinp_bf16[row * C + c] = bf16_from_float(d);
    }
}

extern "C" __global__ void rmsnorm_param_backward_bf16_kernel(float* partial,      // (gridDim.y, C)
                                                              const bf16* dout,    // (N, C)
                                                              const bf16* inp,     // (N, C)
                                                              const float* rstd,   // (N,)
                                                              int N, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;    // one thread per channel, as rmsnorm_param_backward_kernel
    if (c >= C) { return; }
    float sum = 0.0f;
    for (int row = blockIdx.y; row < N; row += gridDim.y) {
        sum += bf16_to_float(dout[row * C + c]) * bf16_to_float(inp[row * C + c]) * rstd[row];
    }
    partial[blockIdx.y * C + c] = sum;
}
