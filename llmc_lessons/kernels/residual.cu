// residual.cu: the residual connection, out = inp1 + inp2, elementwise over N floats.
//
// In GPT-2 each block adds its two branches back onto the residual stream:
//     residual2 = residual + attproj      (B, T, C)
//     residual3 = residual2 + fcproj      (B, T, C)
// The same kernel also adds the two gradients that meet where the stream forks in the backward pass.
//
// residual_forward_kernel is one thread per element: thread i reads inp1[i] and inp2[i] and writes out[i].
// It does almost no arithmetic (one add per 12 bytes moved), so its speed is set by memory bandwidth alone.
#include "common.cuh"

extern "C" __global__ void residual_forward_kernel(float* out,         // (N,) e.g. residual2 (B, T, C)
                                                   const float* inp1,  // (N,) e.g. the residual stream
                                                   const float* inp2,  // (N,) e.g. attproj, the branch's output
                                                   int N) {
    // global thread index: which element this thread owns
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < N) {  // the grid is rounded up to whole blocks; threads past the end do nothing
        out[i] = inp1[i] + inp2[i];
    }
}

// ---------------------------------------------------------------------------------------------------------
// bf16 (lesson 14; the LLaMA-style model's bf16 step, lesson 16): the same add on bf16 bits, 8 elements per
// thread through one 16-byte load of each input and one 16-byte store, added in float32 and rounded once to
// nearest. (GPT-2's bf16 step fuses this add into the layernorm after it; RMSNorm's step keeps it apart.)
#include "bf16.cuh"

extern "C" __global__ void residual_forward_bf16_kernel(bf16* out,         // (N,) bf16, N a multiple of 8
                                                        const bf16* inp1,  // (N,)
                                                        const bf16* inp2,  // (N,)
                                                        int N) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;   // this thread's 8 elements: 8i .. 8i+7
    if (i >= N / 8) return;
    float a[8], b[8];
    load8(a, inp1 + (size_t)i * 8);
    load8(b, inp2 + (size_t)i * 8);
    for (int k = 0; k < 8; k++) a[k] += b[k];
    store8(out + (size_t)i * 8, a);
}
