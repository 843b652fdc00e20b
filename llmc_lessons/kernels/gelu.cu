// gelu.cu: GELU, the nonlinearity inside GPT-2's MLP, in the tanh approximation GPT-2 was trained with:
//
//     gelu(x) = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
//
// It acts on every element on its own, so the kernels are "one thread per element" maps over a flat array
// of N floats (in GPT-2 the input is the fc output, (B, T, 4C), so N = B * T * 4C).
//
// gelu_forward_kernel1 is one thread per element: thread i reads inp[i] and writes out[i].
// gelu_forward_kernel2 is one thread per FOUR elements: it loads and stores float4 (16 bytes at once),
//                      so each memory instruction moves four times as much. Needs N % 4 == 0.
// gelu_backward_kernel is one thread per element: dinp[i] = gelu'(inp[i]) * dout[i].
//
// Build note: compile these WITHOUT fast-math flags (-use_fast_math). With them, nvcc may replace tanhf by a
// hardware approximation; lesson 06 shows how an approximate tanh harms the backward more than the forward.
#include "common.cuh"

#define GELU_SCALING_FACTOR 0.7978845608028654f  // sqrt(2 / pi)
#define GELU_CUBE_COEF 0.044715f

// ---------------------------------------------------------------------------------------------------------
// forward

extern "C" __global__ void gelu_forward_kernel1(float* out,        // (N,) gelu(inp), e.g. fch_gelu (B, T, 4C)
                                                const float* inp,  // (N,) e.g. fch (B, T, 4C)
                                                int N) {
    // global thread index: block number times threads per block, plus this thread's place in its block
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < N) {  // the last block may stick out past the end of the array
        float x = inp[i];
        float cube = GELU_CUBE_COEF * x * x * x;
        out[i] = 0.5f * x * (1.0f + tanhf(GELU_SCALING_FACTOR * (x + cube)));
    }
}

extern "C" __global__ void gelu_forward_kernel2(float4* out,        // (N/4,) the same memory as (N,) floats
                                                const float4* inp,  // (N/4,)
                                                int N4) {           // N / 4: how many float4s
    int i = blockIdx.x * blockDim.x + threadIdx.x;  // this thread owns floats 4i .. 4i+3
    if (i < N4) {
        float4 x = inp[i];  // one 16-byte load instead of four 4-byte loads
        float4 y;
        y.x = 0.5f * x.x * (1.0f + tanhf(GELU_SCALING_FACTOR * (x.x + GELU_CUBE_COEF * x.x * x.x * x.x)));
        y.y = 0.5f * x.y * (1.0f + tanhf(GELU_SCALING_FACTOR * (x.y + GELU_CUBE_COEF * x.y * x.y * x.y)));
        y.z = 0.5f * x.z * (1.0f + tanhf(GELU_SCALING_FACTOR * (x.z + GELU_CUBE_COEF * x.z * x.z * x.z)));
        y.w = 0.5f * x.w * (1.0f + tanhf(GELU_SCALING_FACTOR * (x.w + GELU_CUBE_COEF * x.w * x.w * x.w)));
        out[i] = y;  // one 16-byte store
    }
}

// ---------------------------------------------------------------------------------------------------------
// backward

extern "C" __global__ void gelu_backward_kernel(float* dinp,        // (N,) dL/dinp, e.g. dfch (B, T, 4C)
                                                const float* inp,   // (N,) the forward's input, fch
                                                const float* dout,  // (N,) dL/dout, dfch_gelu
                                                int N) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < N) {
        float x = inp[i];
        float u = GELU_SCALING_FACTOR * (x + GELU_CUBE_COEF * x * x * x);  // the tanh argument
        float th = tanhf(u);
        float sech2 = 1.0f - th * th;                                       // sech^2(u) = 1 - tanh^2(u)
        float du_dx = GELU_SCALING_FACTOR * (1.0f + 3.0f * GELU_CUBE_COEF * x * x);
        float local_grad = 0.5f * (1.0f + th) + 0.5f * x * sech2 * du_dx;   // d gelu / dx (product rule)
        dinp[i] = local_grad * dout[i];  // chain rule; the course's backward kernels write fresh outputs
    }
}
