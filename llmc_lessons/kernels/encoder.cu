// encoder.cu: GPT-2's input embedding, forward and backward.
//
//   forward:  out[b,t,:] = wte[inp[b,t], :] + wpe[t, :]        token embedding + position embedding
//   backward: dwte[v,:] += sum of dout[b,t,:] over every (b,t) with inp[b,t] == v   (a scatter-add)
//             dwpe[t,:] += sum over b of dout[b,t,:]
//
// Shapes: inp (B, T) int32 token ids, wte (V, C), wpe (maxT, C), out and dout (B, T, C), T <= maxT.
//
// encoder_forward_kernel1 is one thread per output element (B*T*C threads).
// encoder_forward_kernel2 is one thread per 4 neighbouring channels, moved as one float4 (needs C % 4 == 0
//   and 16-byte aligned arrays): a quarter of the threads and of the load/store instructions.
// encoder_backward_kernel1 is one thread per (b,t,c), adding its dout element into dwte and dwpe with
//   atomicAdd. Correct, but the order in which the atomics land changes from run to run, and float addition
//   is not associative, so the last bits of dwte/dwpe can change between two identical runs.
// encoder_backward_wte_kernel2 and encoder_backward_wpe_kernel2 are the deterministic pair: every output
//   element is owned by exactly one thread, which adds its terms in a fixed order (no atomics at all).
//   For dwte the launcher first groups the B*T positions by token id ("buckets", positions ascending inside
//   each bucket); one thread per (bucket, c) then walks its bucket. For dwpe one thread per (t, c) walks b.
//
// Every backward kernel ACCUMULATES (+=) into its gradient, as llm.c's do: a parameter used in several places
// (wte is also GPT-2's output layer) collects the gradient of each use in the same buffer.
#include "common.cuh"

// ---------------------------------------------------------------------------------------------------------
// Forward

extern "C" __global__ void encoder_forward_kernel1(float* out,          // (B, T, C) output
                                                   const int* inp,      // (B, T) token ids
                                                   const float* wte,    // (V, C) token embeddings
                                                   const float* wpe,    // (maxT, C) position embeddings
                                                   int B, int T, int C) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;  // this thread's element of out, counted flat
    if (idx < B * T * C) {
        int bt = idx / C;          // which (b, t) row of out: bt = b * T + t
        int t = bt % T;            // the position inside the sequence
        int c = idx % C;           // the channel
        int ix = inp[bt];          // the token id at (b, t)
        out[idx] = wte[ix * C + c] + wpe[t * C + c];
    }
}

extern "C" __global__ void encoder_forward_kernel2(float4* out,          // (B, T, C/4) output, 4 channels per float4
                                                   const int* inp,       // (B, T) token ids
                                                   const float4* wte,    // (V, C/4)
                                                   const float4* wpe,    // (maxT, C/4)
                                                   int B, int T, int C) {
    int C4 = C / 4;                                   // float4s per row (the launcher checks C % 4 == 0)
    int idx = blockIdx.x * blockDim.x + threadIdx.x;  // this thread's float4 of out, counted flat
    if (idx < B * T * C4) {
        int bt = idx / C4;
        int t = bt % T;
        int c4 = idx % C4;
        int ix = inp[bt];
        float4 a = wte[ix * C4 + c4];                 // one 16-byte load instead of four 4-byte loads
        float4 p = wpe[t * C4 + c4];
        out[idx] = make_float4(a.x + p.x, a.y + p.y, a.z + p.z, a.w + p.w);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Backward with atomics (not deterministic)

extern "C" __global__ void encoder_backward_kernel1(float* dwte,         // (V, C) accumulated into
                                                    float* dwpe,         // (maxT, C) accumulated into
                                                    const float* dout,   // (B, T, C)
                                                    const int* inp,      // (B, T)
                                                    int B, int T, int C) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;  // one thread per element of dout
    if (idx < B * T * C) {
        int bt = idx / C;
        int t = bt % T;
        int c = idx % C;
        int ix = inp[bt];
        float d = dout[idx];
        // Several threads may add to the same address (the same token twice; every b for dwpe):
        // atomicAdd makes each read-add-write indivisible, so no addition is lost, in whatever order.
        atomicAdd(&dwte[ix * C + c], d);
        atomicAdd(&dwpe[t * C + c], d);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Deterministic backward: one owner thread per output element, a fixed order of additions

extern "C" __global__ void encoder_backward_wte_kernel2(float* dwte,              // (V, C) accumulated into
                                                        const float* dout,        // (B, T, C)
                                                        const int* positions,     // (B*T,) flat positions b*T+t,
                                                                                  //   grouped by token, ascending
                                                        const int* bucket_start,  // (n_buckets + 1,) bucket k is
                                                                                  //   positions[start[k]:start[k+1]]
                                                        const int* bucket_token,  // (n_buckets,) its token id
                                                        int n_buckets, int C) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;  // one thread per (bucket, channel)
    if (idx < n_buckets * C) {
        int k = idx / C;   // the bucket: one distinct token id
        int c = idx % C;   // the channel; neighbouring threads read neighbouring floats of each dout row
        float sum = 0.0f;
        for (int i = bucket_start[k]; i < bucket_start[k + 1]; i++) {  // always the same order
            sum += dout[positions[i] * C + c];
        }
        dwte[bucket_token[k] * C + c] += sum;  // no other thread touches this element: no atomic needed
    }
}

extern "C" __global__ void encoder_backward_wpe_kernel2(float* dwpe,          // (maxT, C) accumulated into
                                                        const float* dout,    // (B, T, C)
                                                        int B, int T, int C) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;  // one thread per (t, c) with t < T
    if (idx < T * C) {
        int t = idx / C;
        int c = idx % C;
        float sum = 0.0f;
        for (int b = 0; b < B; b++) {                 // b = 0, 1, ..., B-1: always the same order
            sum += dout[(b * T + t) * C + c];
        }
        dwpe[idx] += sum;                             // dwpe[t, c]: row t starts at t*C, so its flat index is idx
    }
}

// =========================================================================================================
// The bf16 training step (GPT2(precision="bf16")): kernels/bf16.cuh says what its kernels share.
// =========================================================================================================
#include "bf16.cuh"

// encoded[b, t, :] = wte[inp[b, t], :] + wpe[t, :]; one thread per 8 channels.
extern "C" __global__ void encoder_forward_bf16_kernel(bf16* out,         // (B, T, C)
                                                       const int* inp,    // (B, T) token ids
                                                       const bf16* wte,   // (Vp, C)
                                                       const bf16* wpe,   // (maxT, C)
                                                       int B, int T, int C) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int C8 = C / 8;
    if (i >= B * T * C8) return;
    int bt = i / C8, c = (i % C8) * 8, t = bt % T;
    float a[8], p[8];
    load8(a, wte + (size_t)inp[bt] * C + c);
    load8(p, wpe + (size_t)t * C + c);
    for (int k = 0; k < 8; k++) a[k] += p[k];
    store8(out + (size_t)bt * C + c, a);
}

// The deterministic backward for bf16 gradients (the bf16 step keeps its weight gradients in bf16, as llm.c): the
// order of encoder_backward_wte_kernel2 and encoder_backward_wpe_kernel2, dout still float32 (the residual stream's
// gradient); each owner thread adds its float32 sum to the stored bf16 value and rounds once (add_into).
extern "C" __global__ void encoder_backward_wte_bf16_kernel(bf16* dwte,               // (V, C) accumulated into
                                                            const float* dout,        // (B, T, C)
                                                            const int* positions,     // (B*T,) as in kernel2
                                                            const int* bucket_start,  // (n_buckets + 1,)
                                                            const int* bucket_token,  // (n_buckets,)
                                                            int n_buckets, int C) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;  // one thread per (bucket, channel)
    if (idx < n_buckets * C) {
        int k = idx / C, c = idx % C;
        float sum = 0.0f;
        for (int i = bucket_start[k]; i < bucket_start[k + 1]; i++) sum += dout[(size_t)positions[i] * C + c];
        add_into(dwte + (size_t)bucket_token[k] * C + c, sum);
    }
}

extern "C" __global__ void encoder_backward_wpe_bf16_kernel(bf16* dwpe,          // (maxT, C) accumulated into
                                                            const float* dout,   // (B, T, C)
                                                            int B, int T, int C) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;  // one thread per (t, c) with t < T: dwpe's element idx
    if (idx < T * C) {
        int t = idx / C, c = idx % C;
        float sum = 0.0f;
        for (int b = 0; b < B; b++) sum += dout[((size_t)b * T + t) * C + c];
        add_into(dwpe + idx, sum);
    }
}
