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
