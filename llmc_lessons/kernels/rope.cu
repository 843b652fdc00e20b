// rope.cu: rotary position embeddings on q or k, forward and backward (LLaMA's positions).
//
//   pair i of the head vector at position t, (x0, x1) = (x[2i], x[2i+1]), turned by angle(t, i):
//   forward:  out[2i] = x0 cos - x1 sin,      out[2i+1] = x0 sin + x1 cos
//   backward: the inverse rotation (by -angle): dinp[2i] = d0 cos + d1 sin,   dinp[2i+1] = -d0 sin + d1 cos
//
// Shapes: inp, out, dout, dinp (B, T, NH, hs); freqs_cis (T, hs/2, 2), [cos, sin] of angle(t, i) for each
// position t and pair i (precompute_freqs_cis in layers/rope.py).
//
// Both kernels are one thread per pair: B * T * NH * hs/2 threads. Thread p owns pair i = p % (hs/2) of head
// (p / (hs/2)) % NH at position t = (p / (NH * hs/2)) % T. Neighbouring threads touch neighbouring pairs
// (coalesced). A thread reads its pair before it writes it, so out may be inp (in place).
// rope_qkv_kernel does the same in place on q and k inside the qkv matmul's output (B, T, NH + 2 NKV, hs).
#include "common.cuh"

extern "C" __global__ void rope_forward_kernel(float* out,              // (B, T, NH, hs)
                                               const float* inp,        // (B, T, NH, hs)
                                               const float* freqs_cis,  // (T, hs/2, 2)
                                               int B, int T, int NH, int hs) {
    int half = hs / 2;
    int p = blockIdx.x * blockDim.x + threadIdx.x;    // one thread per pair
    if (p >= B * T * NH * half) { return; }
    int i = p % half;                                 // which pair of the head
    int t = (p / (NH * half)) % T;                    // which position
    float cos_a = freqs_cis[(t * half + i) * 2];
    float sin_a = freqs_cis[(t * half + i) * 2 + 1];
    float x0 = inp[2 * p];                            // pair p is floats 2p and 2p + 1 of the whole array
    float x1 = inp[2 * p + 1];
    out[2 * p] = x0 * cos_a - x1 * sin_a;
    out[2 * p + 1] = x0 * sin_a + x1 * cos_a;
}

extern "C" __global__ void rope_backward_kernel(float* dinp,             // (B, T, NH, hs)
                                                const float* dout,       // (B, T, NH, hs)
                                                const float* freqs_cis,  // (T, hs/2, 2)
                                                int B, int T, int NH, int hs) {
    int half = hs / 2;
    int p = blockIdx.x * blockDim.x + threadIdx.x;    // one thread per pair
    if (p >= B * T * NH * half) { return; }
    int i = p % half;
    int t = (p / (NH * half)) % T;
    float cos_a = freqs_cis[(t * half + i) * 2];
    float sin_a = freqs_cis[(t * half + i) * 2 + 1];
    float d0 = dout[2 * p];
    float d1 = dout[2 * p + 1];
    dinp[2 * p] = d0 * cos_a + d1 * sin_a;            // the transpose of the rotation: sin changes sign
    dinp[2 * p + 1] = -d0 * sin_a + d1 * cos_a;
}

// ---------------------------------------------------------------------------------------------------------
// In place on the qkv matmul's output (the model's use): qkv (B, T, heads, hs), where each row holds the NH
// query heads, then the NKV key heads, then the NKV value heads (heads = NH + 2 NKV). rope_qkv_kernel turns
// the first `rotated` = NH + NKV heads of each row (q and k; v is left alone), by +angle (direction +1, the
// forward) or -angle (direction -1, the backward, on dqkv). A thread per rotated pair, as above: no copies
// of q and k out of qkv and back.

extern "C" __global__ void rope_qkv_kernel(float* qkv,               // (B, T, heads, hs), in place
                                           const float* freqs_cis,   // (T, hs/2, 2)
                                           int B, int T, int rotated, int heads, int hs,
                                           float direction) {        // +1: forward; -1: backward (inverse)
    int half = hs / 2;
    int p = blockIdx.x * blockDim.x + threadIdx.x;    // one thread per rotated pair
    if (p >= B * T * rotated * half) { return; }
    int i = p % half;                                 // pair within the head
    int h = (p / half) % rotated;                     // head among the rotated ones
    int bt = p / (half * rotated);                    // row b * T + t
    int t = bt % T;
    float cos_a = freqs_cis[(t * half + i) * 2];
    float sin_a = direction * freqs_cis[(t * half + i) * 2 + 1];
    float* x = qkv + (bt * heads + h) * hs + 2 * i;   // seek to the pair: row bt, head h, channels 2i, 2i+1
    float x0 = x[0];
    float x1 = x[1];
    x[0] = x0 * cos_a - x1 * sin_a;
    x[1] = x0 * sin_a + x1 * cos_a;
}

// =========================================================================================================
// bf16: q and k stored in bfloat16, the angles' table in float32, the rotation in float32, rounded once on
// the store (kernels/bf16.cuh has the conversions). The same mapping: a thread per pair, in place allowed.
// =========================================================================================================
#include "bf16.cuh"

extern "C" __global__ void rope_bf16_kernel(bf16* out,                // (B, T, NH, hs)
                                            const bf16* inp,          // (B, T, NH, hs)
                                            const float* freqs_cis,   // (T, hs/2, 2)
                                            int B, int T, int NH, int hs,
                                            float direction) {        // +1: forward; -1: backward (inverse)
    int half = hs / 2;
    int p = blockIdx.x * blockDim.x + threadIdx.x;    // one thread per pair
    if (p >= B * T * NH * half) { return; }
    int i = p % half;
    int t = (p / (NH * half)) % T;
    float cos_a = freqs_cis[(t * half + i) * 2];
    float sin_a = direction * freqs_cis[(t * half + i) * 2 + 1];
    float x0 = bf16_to_float(inp[2 * p]);
    float x1 = bf16_to_float(inp[2 * p + 1]);
    out[2 * p] = bf16_from_float(x0 * cos_a - x1 * sin_a);
    out[2 * p + 1] = bf16_from_float(x0 * sin_a + x1 * cos_a);
}

extern "C" __global__ void rope_qkv_bf16_kernel(bf16* qkv,                // (B, T, heads, hs), in place
                                                const float* freqs_cis,   // (T, hs/2, 2)
                                                int B, int T, int rotated, int heads, int hs, float direction) {
    int half = hs / 2;
    int p = blockIdx.x * blockDim.x + threadIdx.x;    // one thread per rotated pair, as rope_qkv_kernel
    if (p >= B * T * rotated * half) { return; }
    int i = p % half;
    int h = (p / half) % rotated;
    int bt = p / (half * rotated);
    int t = bt % T;
    float cos_a = freqs_cis[(t * half + i) * 2];
    float sin_a = direction * freqs_cis[(t * half + i) * 2 + 1];
    bf16* x = qkv + (bt * heads + h) * hs + 2 * i;
    float x0 = bf16_to_float(x[0]);
    float x1 = bf16_to_float(x[1]);
    x[0] = bf16_from_float(x0 * cos_a - x1 * sin_a);
    x[1] = bf16_from_float(x0 * sin_a + x1 * cos_a);
}
