// bf16.cu: float32 -> bf16 for a whole array (lesson 14): the model's bf16 copy of its weights.
//
// The bf16 version of each layer's kernels is in that layer's file, after its float32 versions: the
// teaching versions of lesson 14 (gelu.cu, layernorm.cu, adamw.cu) and the kernels of the bf16 training step
// (encoder.cu, layernorm.cu, attention.cu, matmul.cu, gelu.cu, crossentropy.cu). bf16.cuh holds the
// conversions and what the bf16 kernels share.
#include "common.cuh"
#include "bf16.cuh"

// float32 -> bf16 for a whole array, to nearest or stochastically as adamw_bf16_kernel rounds (the model's bf16
// copy of its weights after they are set or loaded: the same seed gives the same copy the update made).
extern "C" __global__ void float_to_bf16_kernel(bf16* out, const float* inp, int N, int stochastic,
                                                unsigned int seed) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < N) {
        out[i] = stochastic ? bf16_stochastic(inp[i], seed, (unsigned int)i) : bf16_from_float(inp[i]);
    }
}
