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
// rmsnorm_param_backward_kernel is one thread per channel c, adding dout * norm down its column in row order:
//   neighbouring threads read neighbouring channels (coalesced), no atomics, the same bits on every run.
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

extern "C" __global__ void rmsnorm_param_backward_kernel(float* dweight,       // (C,)
                                                         const float* dout,    // (N, C)
                                                         const float* inp,     // (N, C)
                                                         const float* rstd,    // (N,)
                                                         int N, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;    // one thread per channel
    if (c >= C) { return; }
    float sum = 0.0f;
    for (int row = 0; row < N; row++) {               // rows in order: deterministic
        sum += dout[row * C + c] * inp[row * C + c] * rstd[row];
    }
    dweight[c] = sum;
}
