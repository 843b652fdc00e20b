// swiglu.cu: SwiGLU, the gated nonlinearity of LLaMA's MLP, forward and backward.
//
//   inp (N, 2H) is the fused fc matmul's output, N = B*T rows: up = inp[:, :H], gate = inp[:, H:]
//   forward:  out = up * silu(gate),   silu(g) = g * s,   s = sigmoid(g) = 1 / (1 + exp(-g))
//   backward: dup = dout * silu(gate),   dgate = dout * up * s * (1 + gate * (1 - s))
//
// Shapes: inp, dinp (N, 2H); out, dout (N, H).
//
// Both kernels are one thread per output element: N * H threads. Thread k owns column j = k % H of row
// r = k / H: it reads up at inp[r, j] and gate at inp[r, H + j] (two coalesced streams) and, in the backward,
// writes both halves of dinp.
#include "common.cuh"

extern "C" __global__ void swiglu_forward_kernel(float* out,        // (N, H)
                                                 const float* inp,  // (N, 2H): up, then gate
                                                 int N, int H) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;    // one thread per output element
    if (k >= N * H) { return; }
    int r = k / H;
    int j = k % H;
    float up = inp[r * 2 * H + j];
    float gate = inp[r * 2 * H + H + j];
    out[k] = up * gate / (1.0f + expf(-gate));        // up * silu(gate)
}

extern "C" __global__ void swiglu_backward_kernel(float* dinp,        // (N, 2H): dup, then dgate
                                                  const float* dout,  // (N, H)
                                                  const float* inp,   // (N, 2H): up, then gate
                                                  int N, int H) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;    // one thread per output element
    if (k >= N * H) { return; }
    int r = k / H;
    int j = k % H;
    float up = inp[r * 2 * H + j];
    float gate = inp[r * 2 * H + H + j];
    float s = 1.0f / (1.0f + expf(-gate));            // sigmoid(gate)
    dinp[r * 2 * H + j] = dout[k] * gate * s;         // d out / d up = silu(gate)
    dinp[r * 2 * H + H + j] = dout[k] * up * s * (1.0f + gate * (1.0f - s));  // up * silu'(gate)
}

// =========================================================================================================
// bf16: stored in bfloat16, computed in float32, rounded once on the store (kernels/bf16.cuh has the
// conversions). The same mapping: a thread per output element.
// =========================================================================================================
#include "bf16.cuh"

extern "C" __global__ void swiglu_forward_bf16_kernel(bf16* out,        // (N, H)
                                                      const bf16* inp,  // (N, 2H): up, then gate
                                                      int N, int H) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= N * H) { return; }
    int r = k / H;
    int j = k % H;
    float up = bf16_to_float(inp[r * 2 * H + j]);
    float gate = bf16_to_float(inp[r * 2 * H + H + j]);
    out[k] = bf16_from_float(up * gate / (1.0f + expf(-gate)));
}

extern "C" __global__ void swiglu_backward_bf16_kernel(bf16* dinp,        // (N, 2H): dup, then dgate
                                                       const bf16* dout,  // (N, H)
                                                       const bf16* inp,   // (N, 2H): up, then gate
                                                       int N, int H) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= N * H) { return; }
    int r = k / H;
    int j = k % H;
    float up = bf16_to_float(inp[r * 2 * H + j]);
    float gate = bf16_to_float(inp[r * 2 * H + H + j]);
    float dy = bf16_to_float(dout[k]);
    float s = 1.0f / (1.0f + expf(-gate));
    dinp[r * 2 * H + j] = bf16_from_float(dy * gate * s);
    dinp[r * 2 * H + H + j] = bf16_from_float(dy * up * s * (1.0f + gate * (1.0f - s)));
}
