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
