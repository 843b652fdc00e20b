// adamw.cu: the AdamW optimizer step and the global gradient norm used to clip gradients before it.
//
//   g     = grad * grad_scale                   grad_scale: the clip factor (1 when not clipping)
//   m     = beta1 * m + (1 - beta1) * g         first moment (running mean of g)
//   v     = beta2 * v + (1 - beta2) * g * g     second moment (running mean of g^2)
//   m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)              bias corrections at step t
//   param = param - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * param)   decoupled weight decay
//
// Shapes: every array is a flat (N,) float32 view of one parameter tensor (or of all of them at once, as
// llm.c keeps every parameter in one contiguous buffer).
//
// adamw_kernel is one thread per parameter element: it reads param, grad, m, v and writes param, m, v in
//   place. Nothing is shared between elements, so it is a pure streaming kernel: 4 floats read and 3
//   written per element, and its speed is set by memory bandwidth.
// global_norm_squared_kernel adds sum(x^2) over a (N,) array into partial sums, one per block: a grid-stride
//   loop per thread over 16-byte float4s, four loads in flight at a time, a block reduction (warp shuffles,
//   then shared memory), and block b adds its total into partial[b]. partial must be zeroed before the first
//   launch; launching it on several arrays adds their squares into the same slots.
// global_sum_deterministic_kernel then adds the partial sums, in a fixed order, into out[0]. No atomicAdd:
//   atomics from many blocks land in whatever order the blocks finish, so the last bits of the sum would
//   change from run to run, and in bf16 training such bits grow into visibly different weights.
#include "common.cuh"

// ---------------------------------------------------------------------------------------------------------
// The update

extern "C" __global__ void adamw_kernel(float* params,       // (N,) in/out
                                        const float* grads,  // (N,)
                                        float* m,            // (N,) in/out, the first moment
                                        float* v,            // (N,) in/out, the second moment
                                        int N,
                                        float lr, float beta1, float beta2,
                                        float beta1_correction,  // 1 - beta1^t, computed once on the host
                                        float beta2_correction,  // 1 - beta2^t
                                        float eps, float weight_decay, float grad_scale) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;  // this thread's parameter element
    if (i < N) {  // the last block sticks out past the end
        float g = grads[i] * grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;  // the moments are stored WITHOUT bias correction; it is applied fresh at every step
        v[i] = vi;
        float m_hat = mi / beta1_correction;
        float v_hat = vi / beta2_correction;
        float p = params[i];
        params[i] = p - lr * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * p);
    }
}

// ---------------------------------------------------------------------------------------------------------
// The global norm (squared): sum of x^2 over all elements, one partial sum per block, then their total

extern "C" __global__ void global_norm_squared_kernel(float* partial,      // (gridDim.x,) added into
                                                      const float* data,   // (N,)
                                                      int N) {
    __shared__ float buf[32];  // one partial sum per warp (a block has at most 32 warps)
    // grid-stride loop: thread k of the grid takes float4 number k, k + G, k + 2G, ... with G = all threads,
    // four of them loaded before any is added (one 4-byte load at a time reached half the copy bandwidth:
    // too few bytes in flight). An array that does not start on a 16-byte boundary goes 4 bytes at a time.
    float sum = 0.0f;
    int G = gridDim.x * blockDim.x;
    int first = blockIdx.x * blockDim.x + threadIdx.x;
    int N4 = ((size_t)data % 16 == 0) ? N / 4 : 0;
    const float4* data4 = (const float4*)data;
    for (int i = first; i < N4; i += 4 * G) {
        float4 v[4];
        for (int j = 0; j < 4; j++) v[j] = i + j * G < N4 ? data4[i + j * G] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (int j = 0; j < 4; j++) sum += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
    }
    for (int i = 4 * N4 + first; i < N; i += G) {   // what is left after the float4s
        float x = data[i];
        sum += x * x;
    }
    // block reduction: each warp's total, then the warps' totals added by warp 0
    int lane = threadIdx.x % 32;
    int warp = threadIdx.x / 32;
    sum = warpReduceSum(sum);
    if (lane == 0) { buf[warp] = sum; }
    __syncthreads();
    if (warp == 0) {
        sum = (lane < blockDim.x / 32) ? buf[lane] : 0.0f;
        sum = warpReduceSum(sum);
        if (lane == 0) { partial[blockIdx.x] += sum; }  // this block's own slot: no other block writes it
    }
}

// out[0] = the sum of the n partial sums, by one warp (launch 32 threads): lane k adds partial[k],
// partial[k + 32], ..., then warpReduceSum adds the lanes. Every launch adds in the same order, so the same
// partial sums give the same bits.
extern "C" __global__ void global_sum_deterministic_kernel(float* out,            // (1,)
                                                           const float* partial,  // (n,)
                                                           int n) {
    float sum = 0.0f;
    for (int i = threadIdx.x; i < n; i += 32) sum += partial[i];
    sum = warpReduceSum(sum);
    if (threadIdx.x == 0) { out[0] = sum; }
}

// clip_factor_kernel (one thread): factor[0] = max_norm / norm where the global norm, sqrt(norm_squared[0]), is
// above max_norm > 0, else 1; NaN where the loss or the norm is not finite (the AdamW kernel then skips the step).
// The trainer launches it after the backward and hands factor to AdamW, so nothing waits for the GPU in between.
// In double, as the host computes it (Python's floats), then rounded once: the same bits either way.
extern "C" __global__ void clip_factor_kernel(float* factor, const float* norm_squared, const float* loss,
                                              double max_norm) {
    double norm = sqrt((double)norm_squared[0]);
    if (!(fabsf(loss[0]) <= FLT_MAX) || !(norm <= DBL_MAX)) factor[0] = NAN;
    else factor[0] = max_norm > 0.0 && norm > max_norm ? (float)(max_norm / norm) : 1.0f;
}

// =========================================================================================================
// bf16 (lesson 14): stored in bfloat16, computed in float32 (kernels/bf16.cuh has the conversions).
//
// adamw_bf16_kernel: the update on float32 master weights and moments, then a bf16 copy of each weight for
//   the forward and backward; with stochastic=1 the copy is rounded up or down at random with the
//   probability that makes its expected value exact (llm.c's stochastic rounding), else to nearest.
// =========================================================================================================
#include "bf16.cuh"

extern "C" __global__ void adamw_bf16_kernel(float* master, bf16* params, const float* grads, float* m, float* v,
                                             int N, float lr, float beta1, float beta2, float beta1_correction,
                                             float beta2_correction, float eps, float weight_decay,
                                             float grad_scale, const float* clip, int stochastic,
                                             unsigned int seed) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) return;
    float scale = grad_scale * clip[0];               // clip: (1,), the clip factor as the GPU computed it (1 if
    if (!(fabsf(scale) <= FLT_MAX)) return;           // none): not finite, the step is skipped, nothing changes
    float g = grads[i] * scale;
    float mi = beta1 * m[i] + (1.0f - beta1) * g;
    float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    float p = master[i];
    p -= lr * ((mi / beta1_correction) / (sqrtf(vi / beta2_correction) + eps) + weight_decay * p);
    master[i] = p;                                    // float32 master weight: small updates accumulate here
    params[i] = stochastic ? bf16_stochastic(p, seed, (unsigned int)i) : bf16_from_float(p);
}
