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
//   launch; launching it on several arrays adds their squares into the same slots. global_norm_squared_bf16_kernel
//   is the same for bf16 gradients (the bf16 step keeps them in bf16, as llm.c): 8-byte loads of four values,
//   squared and added in float32 in the same order.
// global_sum_deterministic_kernel then adds the partial sums, in a fixed order, into out[0]. No atomicAdd:
//   atomics from many blocks land in whatever order the blocks finish, so the last bits of the sum would
//   change from run to run, and in bf16 training such bits grow into visibly different weights.
#include "common.cuh"
#include "bf16.cuh"  // bf16 as unsigned short and its conversions (lesson 14, the last section)

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

// Four neighbouring values as float32 from one load: 16 bytes of float32, or 8 of bf16 (exact); p aligned to it.
__device__ __forceinline__ float4 load4(const float* p) { return *(const float4*)p; }
__device__ __forceinline__ float4 load4(const bf16* p) {
    uint2 two = *(const uint2*)p;
    return make_float4(bf16_lo(two.x), bf16_hi(two.x), bf16_lo(two.y), bf16_hi(two.y));
}
__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(bf16 x) { return bf16_to_float(x); }

// The body of both kernels below, for float32 or bf16 data (T): the squares in float32, in the same order.
template <typename T>
__device__ void global_norm_squared(float* partial, const T* data, int N) {
    __shared__ float buf[32];  // one partial sum per warp (a block has at most 32 warps)
    // grid-stride loop: thread k of the grid takes group number k, k + G, k + 2G, ... of four values with
    // G = all threads, four groups loaded before any is added (one 4-byte load at a time reached half the copy
    // bandwidth: too few bytes in flight). An array that does not start on a boundary of its group's size (16
    // bytes of float32, 8 of bf16) goes one value at a time.
    float sum = 0.0f;
    int G = gridDim.x * blockDim.x;
    int first = blockIdx.x * blockDim.x + threadIdx.x;
    int N4 = ((size_t)data % (4 * sizeof(T)) == 0) ? N / 4 : 0;
    for (int i = first; i < N4; i += 4 * G) {
        float4 v[4];
        for (int j = 0; j < 4; j++)
            v[j] = i + j * G < N4 ? load4(data + 4 * (i + j * G)) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (int j = 0; j < 4; j++) sum += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
    }
    for (int i = 4 * N4 + first; i < N; i += G) {   // what is left after the groups of four
        float x = widen(data[i]);
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

extern "C" __global__ void global_norm_squared_kernel(float* partial,      // (gridDim.x,) added into
                                                      const float* data,   // (N,)
                                                      int N) {
    global_norm_squared(partial, data, N);
}

extern "C" __global__ void global_norm_squared_bf16_kernel(float* partial,     // (gridDim.x,) added into
                                                           const bf16* data,   // (N,) bf16 gradients
                                                           int N) {
    global_norm_squared(partial, data, N);
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

// =========================================================================================================
// bf16 (lesson 14): stored in bfloat16, computed in float32 (kernels/bf16.cuh has the conversions).
//
// adamw_bf16_kernel: the update on float32 master weights and moments, then a bf16 copy of each weight for
//   the forward and backward; with stochastic=1 the copy is rounded up or down at random with the
//   probability that makes its expected value exact (llm.c's stochastic rounding), else to nearest. It reads
//   bf16 gradients: the bf16 step keeps its weight gradients in bf16, as llm.c does.
// =========================================================================================================

// One element's update: the moments and the master weight in place, and its bf16 copy rounded with index i (the
// element's place in the run: the stochastic rounding's random bits depend on it, not on which thread runs it).
__device__ __forceinline__ bf16 adamw_bf16_element(float g, float& mi, float& vi, float& p, int i, float lr,
                                                   float beta1, float beta2, float beta1_correction,
                                                   float beta2_correction, float eps, float weight_decay,
                                                   int stochastic, unsigned int seed) {
    // Every multiply-add written as fmaf: with the compiler left to fuse products into multiply-adds, the
    // four-element and the one-element code came out one ulp apart on an H100.
    mi = fmaf(beta1, mi, (1.0f - beta1) * g);
    vi = fmaf(beta2, vi, (1.0f - beta2) * g * g);
    p = fmaf(-lr, fmaf(weight_decay, p, (mi / beta1_correction) / (sqrtf(vi / beta2_correction) + eps)), p);
    return stochastic ? bf16_stochastic(p, seed, (unsigned int)i) : bf16_from_float(p);
}

// head >= 0: element head is where master, m and v reach a 16-byte boundary and params and grads an 8-byte one;
// thread t updates the four elements head + 4t .. head + 4t + 3 with one 16-byte access to each float32 array and
// one 8-byte access to each bf16 one (the fewer, wider accesses keep more bytes in flight: one element a thread
// moved 91% of a copy's bandwidth), threads t < head also the element t before it, and the last thread the elements
// after the last whole four. head = -1 (the arrays do not line up): one element a thread.
extern "C" __global__ void adamw_bf16_kernel(float* master, bf16* params, const bf16* grads, float* m, float* v,
                                             int N, int head, float lr, float beta1, float beta2,
                                             float beta1_correction, float beta2_correction, float eps,
                                             float weight_decay, float grad_scale, int stochastic, unsigned int seed) {
    auto one = [&](int i) {                           // element i alone: four loads, the update, the stores
        float mi = m[i], vi = v[i], p = master[i];
        params[i] = adamw_bf16_element(bf16_to_float(grads[i]) * grad_scale, mi, vi, p, i, lr, beta1, beta2,
                                       beta1_correction, beta2_correction, eps, weight_decay, stochastic, seed);
        m[i] = mi;
        v[i] = vi;
        master[i] = p;                                // float32 master weight: small updates accumulate here
    };
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (head < 0) {                                   // one element a thread
        if (t < N) one(t);
        return;
    }
    int first = head + 4 * t;
    if (t < head && t < N) one(t);                    // an element before the first 16-byte boundary
    if (first + 4 <= N) {                             // four whole elements, 16 or 8 bytes of each array
        float4 g4 = load4(grads + first), m4 = *(float4*)(m + first), v4 = *(float4*)(v + first);
        float4 p4 = *(float4*)(master + first);
        float g[4] = {g4.x, g4.y, g4.z, g4.w}, mi[4] = {m4.x, m4.y, m4.z, m4.w}, vi[4] = {v4.x, v4.y, v4.z, v4.w};
        float p[4] = {p4.x, p4.y, p4.z, p4.w};
        unsigned int copy[4];
        for (int k = 0; k < 4; k++)
            copy[k] = adamw_bf16_element(g[k] * grad_scale, mi[k], vi[k], p[k], first + k, lr, beta1, beta2,
                                         beta1_correction, beta2_correction, eps, weight_decay, stochastic, seed);
        *(float4*)(m + first) = make_float4(mi[0], mi[1], mi[2], mi[3]);
        *(float4*)(v + first) = make_float4(vi[0], vi[1], vi[2], vi[3]);
        *(float4*)(master + first) = make_float4(p[0], p[1], p[2], p[3]);
        *(uint2*)(params + first) = make_uint2(copy[0] | (copy[1] << 16), copy[2] | (copy[3] << 16));
    } else {
        for (int i = first; i < N; i++) one(i);       // the elements after the last whole four
    }
}
