// crossentropy.cu: the classifier at the top of GPT-2: softmax over the vocabulary, the cross-entropy loss,
// and its gradient with respect to the logits.
//
//   probs_v   = exp(logits_v - max) / sum_u exp(logits_u - max)      for v < V (max, sum over u < V)
//   loss      = -log probs[target]                                   one loss per row
//   dlogits_v = (probs_v - [v == target]) * dloss                    for v < V; 0 for the padding v >= V
//
// Shapes: N = B*T rows. logits, probs, dlogits (N, Vp); targets (N,) int; losses, dlosses (N,).
// Vp is the padded vocabulary (50304 for GPT-2, a multiple of 128); only the first V (50257) columns are
// real tokens. Padded columns never enter the max, the sum or the loss, and get probs 0 and dlogits 0.
//
// softmax_forward_kernel is one block per row: the threads stride over the row (thread i takes columns
//   i, i + blockDim.x, ...) and the row max and row sum are block-wide reductions (warp shuffles, then one
//   value per warp through shared memory). Three sweeps over the row: max, sum, write.
// crossentropy_forward_kernel is one thread per row: it reads the single probability at the target column.
// crossentropy_softmax_backward_kernel is one block per row: dlogits = (probs - onehot) * dlosses.
// fused_classifier_kernel is llm.c's fused classifier: one block per row computes the loss AND the gradient
//   straight from the logits, and writes dlogits IN PLACE over the logits. The probs are never stored, and
//   the max and sum come from one sweep (the "online softmax": a running max with a rescaled running sum).
// fused_classifier_kernel2 is the same with float4 accesses and one rescale per 4 values (the launcher's
//   default where Vp % 4 == 0).
//
// All kernels need blockDim.x to be a multiple of 32 (whole warps) except crossentropy_forward_kernel.
#include "common.cuh"

// A very negative finite float: the identity of max. (Not -INFINITY, so that exp(m1 - m2) never meets
// inf - inf = NaN when a thread saw no columns at all.)
#define NEG_BIG (-3.0e38f)

// ---------------------------------------------------------------------------------------------------------
// Block-wide reductions. Every thread of the block calls them and every thread gets the result.
// buf is a __shared__ float[32] of the calling kernel: one slot per warp (a block has at most 32 warps).

__device__ float blockReduceMax(float val, float* buf) {
    int lane = threadIdx.x % 32;
    int warp = threadIdx.x / 32;
    int num_warps = blockDim.x / 32;
    val = warpReduceMax(val);                      // 1. the max of this warp, in all its lanes
    __syncthreads();                               // buf may still be read by an earlier reduction
    if (lane == 0) { buf[warp] = val; }            // 2. one value per warp into shared memory
    __syncthreads();
    val = (lane < num_warps) ? buf[lane] : NEG_BIG;
    return warpReduceMax(val);                     // 3. every warp reduces the per-warp maxima
}

__device__ float blockReduceSum(float val, float* buf) {
    int lane = threadIdx.x % 32;
    int warp = threadIdx.x / 32;
    int num_warps = blockDim.x / 32;
    val = warpReduceSum(val);
    __syncthreads();
    if (lane == 0) { buf[warp] = val; }
    __syncthreads();
    val = (lane < num_warps) ? buf[lane] : 0.0f;
    return warpReduceSum(val);
}

// ---------------------------------------------------------------------------------------------------------
// Forward: softmax, then the loss

extern "C" __global__ void softmax_forward_kernel(float* probs,         // (N, Vp) output
                                                  const float* logits,  // (N, Vp)
                                                  int N, int V, int Vp) {
    __shared__ float buf[32];
    int row = blockIdx.x;                               // one block per row; the grid has exactly N blocks
    const float* x = logits + (long long)row * Vp;         // seek to logits[row, :]
    float* p = probs + (long long)row * Vp;

    // the row max over the real columns 0..V-1: each thread takes every blockDim.x-th column
    float thread_max = NEG_BIG;
    for (int i = threadIdx.x; i < V; i += blockDim.x) { thread_max = fmaxf(thread_max, x[i]); }
    float row_max = blockReduceMax(thread_max, buf);

    // the row sum of exp(x - max), again over the real columns only
    float thread_sum = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) { thread_sum += expf(x[i] - row_max); }
    float row_sum = blockReduceSum(thread_sum, buf);

    // write every column, padding included (0 there), so no column of probs is left unwritten
    float inv_sum = 1.0f / row_sum;
    for (int i = threadIdx.x; i < Vp; i += blockDim.x) {
        p[i] = (i < V) ? expf(x[i] - row_max) * inv_sum : 0.0f;
    }
}

extern "C" __global__ void crossentropy_forward_kernel(float* losses,       // (N,) output
                                                       const float* probs,  // (N, Vp)
                                                       const int* targets,  // (N,) token ids in 0..V-1
                                                       int N, int Vp) {
    int row = blockIdx.x * blockDim.x + threadIdx.x;    // one thread per row
    if (row < N) {
        int ix = targets[row];
        losses[row] = -logf(probs[(long long)row * Vp + ix]);  // probs[row, target]
    }
}

// ---------------------------------------------------------------------------------------------------------
// Backward (unfused): from the stored probs

extern "C" __global__ void crossentropy_softmax_backward_kernel(float* dlogits,        // (N, Vp) output
                                                                const float* dlosses,  // (N,)
                                                                const float* probs,    // (N, Vp)
                                                                const int* targets,    // (N,)
                                                                int N, int V, int Vp) {
    int row = blockIdx.x;                               // one block per row
    const float* p = probs + (long long)row * Vp;
    float* d = dlogits + (long long)row * Vp;
    float dloss = dlosses[row];
    int ix = targets[row];
    for (int i = threadIdx.x; i < Vp; i += blockDim.x) {
        float indicator = (i == ix) ? 1.0f : 0.0f;      // the one-hot of the target
        d[i] = (i < V) ? (p[i] - indicator) * dloss : 0.0f;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Fused: loss and dlogits in one kernel, dlogits written over the logits

// Combine every thread's online-softmax pair (m = a running max, s = the sum of exp(x - m)) over the block:
// first the lanes of each warp, pair by pair, rescaling the sum to the larger max (s * exp(m_old - m_new)),
// then the warps' pairs through shared memory. Every thread gets the row's max and sum.
__device__ void blockCombineOnline(float& m, float& s, float* buf_max, float* buf_sum) {
    int lane = threadIdx.x % 32;
    int warp = threadIdx.x / 32;
    int num_warps = blockDim.x / 32;
    for (int offset = 16; offset > 0; offset /= 2) {
        float m_other = __shfl_xor_sync(0xffffffff, m, offset);
        float s_other = __shfl_xor_sync(0xffffffff, s, offset);
        float m_new = fmaxf(m, m_other);
        s = s * expf(m - m_new) + s_other * expf(m_other - m_new);
        m = m_new;
    }
    if (lane == 0) { buf_max[warp] = m; buf_sum[warp] = s; }
    __syncthreads();
    m = (lane < num_warps) ? buf_max[lane] : NEG_BIG;
    s = (lane < num_warps) ? buf_sum[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) {
        float m_other = __shfl_xor_sync(0xffffffff, m, offset);
        float s_other = __shfl_xor_sync(0xffffffff, s, offset);
        float m_new = fmaxf(m, m_other);
        s = s * expf(m - m_new) + s_other * expf(m_other - m_new);
        m = m_new;
    }
}

extern "C" __global__ void fused_classifier_kernel(float* logits,        // (N, Vp) in: logits, out: dlogits
                                                   float* losses,        // (N,) output
                                                   const int* targets,   // (N,)
                                                   float dloss,          // d L / d loss, the same for all rows
                                                   int N, int V, int Vp) {
    __shared__ float buf_max[32];
    __shared__ float buf_sum[32];
    int row = blockIdx.x;
    float* x = logits + (long long)row * Vp;
    int ix = targets[row];
    // Read the target logit NOW, before any thread starts overwriting the row with gradients below.
    // (The __syncthreads inside the reduction keep every write after every read of x_target.)
    float x_target = x[ix];

    // 1. Online softmax: one sweep keeps a running max m and the sum s of exp(x - m) seen so far. When a
    //    bigger value arrives the old sum is rescaled: s * exp(m_old - m_new).
    float m = NEG_BIG;
    float s = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float xi = x[i];
        float m_new = fmaxf(m, xi);
        s = s * expf(m - m_new) + expf(xi - m_new);
        m = m_new;
    }
    // 2. and 3. Combine the (m, s) pairs of the block: every thread gets the row max m and the row sum s.
    blockCombineOnline(m, s, buf_max, buf_sum);

    // 4. The loss: -log(exp(x_target - m) / s) = m + log(s) - x_target.
    if (threadIdx.x == 0) { losses[row] = m + logf(s) - x_target; }

    // 5. The gradient, written in place: each thread overwrites exactly the columns it reads.
    float inv_sum = 1.0f / s;
    for (int i = threadIdx.x; i < Vp; i += blockDim.x) {
        float prob = expf(x[i] - m) * inv_sum;
        float indicator = (i == ix) ? 1.0f : 0.0f;
        x[i] = (i < V) ? (prob - indicator) * dloss : 0.0f;
    }
}

// fused_classifier_kernel2: the same with float4 accesses (Vp % 4 == 0), and in the first sweep each thread
// takes the max of its 4 values first, so the running sum is rescaled once per 4 values, not once per value:
// about one exp per logit and sweep instead of two.
extern "C" __global__ void fused_classifier_kernel2(float* logits,        // (N, Vp) in: logits, out: dlogits
                                                    float* losses,        // (N,) output
                                                    const int* targets,   // (N,)
                                                    float dloss, int N, int V, int Vp) {
    __shared__ float buf_max[32];
    __shared__ float buf_sum[32];
    int row = blockIdx.x;
    float* x = logits + (long long)row * Vp;
    float4* x4 = (float4*)x;
    int ix = targets[row];
    float x_target = x[ix];                            // read before any thread overwrites the row
    float m = NEG_BIG;
    float s = 0.0f;
    for (int i = threadIdx.x; i * 4 < V; i += blockDim.x) {
        float4 v = x4[i];
        float a[4] = {v.x, v.y, v.z, v.w};
        float chunk_max = NEG_BIG;
        for (int k = 0; k < 4; k++) {
            if (i * 4 + k < V) chunk_max = fmaxf(chunk_max, a[k]);
        }
        float m_new = fmaxf(m, chunk_max);
        s *= expf(m - m_new);
        for (int k = 0; k < 4; k++) {
            if (i * 4 + k < V) s += expf(a[k] - m_new);
        }
        m = m_new;
    }
    blockCombineOnline(m, s, buf_max, buf_sum);
    if (threadIdx.x == 0) { losses[row] = m + logf(s) - x_target; }
    float inv_sum = 1.0f / s;
    for (int i = threadIdx.x; i * 4 < Vp; i += blockDim.x) {
        float4 v = x4[i];
        float a[4] = {v.x, v.y, v.z, v.w};
        for (int k = 0; k < 4; k++) {
            int j = i * 4 + k;
            a[k] = (j < V) ? (expf(a[k] - m) * inv_sum - (j == ix ? 1.0f : 0.0f)) * dloss : 0.0f;
        }
        x4[i] = make_float4(a[0], a[1], a[2], a[3]);
    }
}

// =========================================================================================================
// The bf16 training step (GPT2(precision="bf16")): kernels/bf16.cuh says what its kernels share.
// =========================================================================================================
#include "bf16.cuh"

// The largest of 8 bf16 values: three bf16-pair maxima (max_bf16x2), then the larger half.
__device__ __forceinline__ float max8(int4 v) {
    unsigned int m = max_bf16x2(max_bf16x2((unsigned int)v.x, (unsigned int)v.y),
                                max_bf16x2((unsigned int)v.z, (unsigned int)v.w));
    return fmaxf(bf16_lo(m), bf16_hi(m));
}

// The classifier's softmax, loss and gradient in one kernel (lesson 08's fused classifier) on bf16 logits:
// one block per row (b, t), the row kept in shared memory (Vp * 2 bytes: 100 KB at GPT-2's vocabulary, two
// blocks per multiprocessor), so that it is read from memory once and written once. Three passes:
//   1. memory -> shared memory, and the row's max m (four 16-byte loads in flight per thread). The columns
//      V..Vp-1 are padding: a partial last chunk is stored with -inf there (exp(-inf) = 0), whole padding
//      chunks are not read.
//   2. shared memory: s = sum_j exp(x_j - m), as exp2(x_j log2(e) - m log2(e)) (one FFMA and one ex2).
//   3. shared memory -> memory: logits are overwritten with dlogits = dloss * (softmax - onehot(target)),
//      0 in the padding; losses[row] = -log softmax[target] = log s + m - x_target, in float32.
// Every thread does the same few instructions per value: no per-value test of the padding or the target
// (the one chunk holding the target is fixed afterwards by its thread). The version before (an online max and
// sum in one pass, both tests on every value: about 17 operations per value against 10, counted from the
// source) waited on its instructions, not on memory: 1.05 ms a call in the H200's profile of the step
// (76% of a same-size copy), this one 0.90 ms (89%).
extern "C" __global__ void fused_classifier_bf16_kernel(bf16* logits,        // (N, Vp) in: logits, out: dlogits
                                                        float* losses,       // (N,)
                                                        const int* targets,  // (N,)
                                                        float dloss, int N, int V, int Vp) {
    extern __shared__ int4 row_chunks[];       // (Vp / 8,) the row, 8 bf16 values per int4
    __shared__ float warp_max[32];
    __shared__ float warp_sum[32];
    int row = blockIdx.x;
    size_t base = (size_t)row * Vp;
    int target = targets[row];
    const int4* src = (const int4*)(logits + base);
    int bd = blockDim.x, full = V / 8, real_chunks = (V + 7) / 8;
    int lane = threadIdx.x % 32, w = threadIdx.x / 32, warps = blockDim.x / 32;
    float maxval = NEG_INF;
    int ch = threadIdx.x;
    for (; ch + 3 * bd < full; ch += 4 * bd) {
        int4 v[4];
        for (int j = 0; j < 4; j++) v[j] = src[ch + j * bd];
        for (int j = 0; j < 4; j++) {
            row_chunks[ch + j * bd] = v[j];
            maxval = fmaxf(maxval, max8(v[j]));
        }
    }
    for (; ch < full; ch += bd) {
        int4 v = src[ch];
        row_chunks[ch] = v;
        maxval = fmaxf(maxval, max8(v));
    }
    if (full < real_chunks && threadIdx.x == (full % bd)) {   // the chunk V lies in: padding -> -inf
        float x[8];
        unpack8(x, src[full]);
        for (int k = V % 8; k < 8; k++) x[k] = NEG_INF;
        for (int k = 0; k < V % 8; k++) maxval = fmaxf(maxval, x[k]);
        store8((bf16*)(row_chunks + full), x);
    }
    float wmax = warpReduceMax(maxval);
    if (lane == 0) warp_max[w] = wmax;
    __syncthreads();                           // also: the whole row is in shared memory
    float row_max = NEG_INF;
    for (int i = 0; i < warps; i++) row_max = fmaxf(row_max, warp_max[i]);
    const float m2 = row_max * LOG2E;        // the max in base 2
    float sum = 0.0f;
    for (ch = threadIdx.x; ch < real_chunks; ch += bd) {
        float x[8];
        unpack8(x, row_chunks[ch]);
        for (int k = 0; k < 8; k++) sum += fast_exp2(fmaf(x[k], LOG2E, -m2));
    }
    float wsum = warpReduceSum(sum);
    if (lane == 0) warp_sum[w] = wsum;
    __syncthreads();
    float row_sum = 0.0f;
    for (int i = 0; i < warps; i++) row_sum += warp_sum[i];   // in order: deterministic
    float target_logit = (unsigned)target < (unsigned)V ? bf16_to_float(((const bf16*)row_chunks)[target]) : __int_as_float(0x7fc00000);   // NaN: a bad target
    if (threadIdx.x == 0) losses[row] = logf(row_sum) + row_max - target_logit;
    float scale = dloss / row_sum;
    for (ch = threadIdx.x; ch < Vp / 8; ch += bd) {
        float x[8];
        if (ch < real_chunks) {
            unpack8(x, row_chunks[ch]);
            for (int k = 0; k < 8; k++) x[k] = fast_exp2(fmaf(x[k], LOG2E, -m2)) * scale;
            if (ch == target / 8) {
                for (int k = 0; k < 8; k++) if (k == target % 8) x[k] -= dloss;
            }
        } else {
            for (int k = 0; k < 8; k++) x[k] = 0.0f;
        }
        store8(logits + base + ch * 8, x);
    }
}
