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

// =========================================================================================================
// bf16 (lesson 14): stored in bfloat16, computed in float32 (kernels/bf16.cuh has the conversions).
//
// gelu_forward_bf16_kernel: one thread per element; load bf16, compute in float32, round once on the store.
// gelu_forward_bf16_kernel2: the same, 8 values per thread through 128-bit (int4) loads and stores.
// =========================================================================================================
#include "bf16.cuh"

// The tanh GELU of lesson 06, in float32, written through the identity (1 + tanh(u)) / 2 = 1 / (1 + exp(-2u)):
// gelu(x) = x * sigmoid(2u) with u = sqrt(2/pi) (x + 0.044715 x^3). The same function with one fast exponential
// (__expf) and one fast division (__fdividef) instead of tanhf, whose 20-odd instructions made the bf16 GELU
// wait on arithmetic, not memory (lesson 14). Both are accurate to a few float32 units in the last place, far
// below the bf16 rounding of the result. For x -> -inf the exponential overflows to inf and the sigmoid is 0.
__device__ __forceinline__ float gelu_sigmoid(float x) {  // sigmoid(2u) = (1 + tanh(u)) / 2
    float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return __fdividef(1.0f, 1.0f + __expf(-2.0f * u));
}

__device__ __forceinline__ float gelu_f32(float x) {
    return x * gelu_sigmoid(x);
}

extern "C" __global__ void gelu_forward_bf16_kernel(bf16* out, const bf16* inp, int N) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < N) {
        out[i] = bf16_from_float(gelu_f32(bf16_to_float(inp[i])));
    }
}

// The same with 128-bit accesses: each thread loads 8 bf16 values as one int4 (16 bytes), as lesson 12's
// float4 GELU does. Two-byte loads leave a bf16 kernel limited by load instructions, not by bandwidth.
__device__ __forceinline__ unsigned int gelu_bf16_pair(unsigned int two) {  // two bf16 in one 32-bit word
    return pack_bf16x2(gelu_f32(bf16_lo(two)), gelu_f32(bf16_hi(two)));
}

extern "C" __global__ void gelu_forward_bf16_kernel2(int4* out, const int4* inp, int N8) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;   // one thread per 8 values
    if (i < N8) {
        int4 v = inp[i];
        int4 r;
        r.x = (int)gelu_bf16_pair((unsigned int)v.x);
        r.y = (int)gelu_bf16_pair((unsigned int)v.y);
        r.z = (int)gelu_bf16_pair((unsigned int)v.z);
        r.w = (int)gelu_bf16_pair((unsigned int)v.w);
        out[i] = r;
    }
}

// =========================================================================================================
// The bf16 training step (GPT2(precision="bf16")): kernels/bf16.cuh says what its kernels share.
// =========================================================================================================

// d gelu / dx (lesson 06) in the sigmoid form: with s = sigmoid(2u), d/dx [x s] = s + 2 x s (1 - s) du/dx,
// du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2). (0.5 (1 - tanh^2) = 2 s (1 - s).)
__device__ __forceinline__ float gelu_grad_f32(float x) {
    float s = gelu_sigmoid(x);
    return s + 2.0f * x * s * (1.0f - s) * 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * x * x);
}

// out = gelu(inp + bias): the fc layer's bias added on the way into the GELU. One thread per 8 values.
extern "C" __global__ void gelu_bias_forward_bf16_kernel(bf16* out,          // (N, OC)
                                                         const bf16* inp,    // (N, OC) the product, no bias
                                                         const float* bias,  // (OC,)
                                                         int N, int OC) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * (OC / 8)) return;
    int c = (i % (OC / 8)) * 8;
    float x[8], b[8];
    load8(x, inp + (size_t)i * 8);
    load8f(b, bias + c);
    for (int k = 0; k < 8; k++) x[k] = gelu_f32(x[k] + b[k]);
    store8(out + (size_t)i * 8, x);
}

// The last of `blocks` blocks to call this returns true; *counter counts the arrivals and is reset by that
// block for the next launch. Each block calls it after writing its row of partial sums: the fence makes the
// row visible to the block that will add the rows (the "last block" reduction of CUDA's threadFenceReduction
// sample). One launch instead of two, and still deterministic: one block adds the rows, in a fixed order.
__device__ bool last_block(unsigned int* counter, unsigned int blocks) {
    __shared__ unsigned int arrived;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        arrived = atomicAdd(counter, 1u);
        if (arrived == blocks - 1) *counter = 0u;
    }
    __syncthreads();
    return arrived == blocks - 1;
}

// The end of a column sum over the rows of an (N, OC) array, in blocks of (X, Y) threads and a grid of
// (ceil(OC / 8X), R) blocks, thread x of a block owning the 8 columns c = (blockIdx.x * X + x) * 8 ..:
// acc holds the thread's sums over its rows. The Y threads of a column add their sums in order through
// shared memory (buf, Y * 8X floats), partial[blockIdx.y] gets the block's sums, and the last block of the
// column group adds the group's R rows of partials into dbias (a bf16 gradient: add_into rounds once), its
// threads splitting the rows again.
// Deterministic: every sum is taken in a fixed order.
__device__ void column_group_sum_finish(float* buf, const float* acc, bf16* dbias, float* partial,
                                        unsigned int* counters, int OC) {
    int X = blockDim.x, Y = blockDim.y, W = 8 * X;   // W: the group's width in columns
    int c0 = blockIdx.x * W;
    for (int k = 0; k < 8; k++) buf[threadIdx.y * W + threadIdx.x * 8 + k] = acc[k];
    __syncthreads();
    int tid = threadIdx.y * X + threadIdx.x;
    for (int j = tid; j < W; j += X * Y) {      // one thread per column adds the Y sums in order
        if (c0 + j < OC) {
            float s = 0.0f;
            for (int y = 0; y < Y; y++) s += buf[y * W + j];
            partial[(size_t)blockIdx.y * OC + c0 + j] = s;
        }
    }
    if (!last_block(counters + blockIdx.x, gridDim.y)) return;
    __threadfence();                            // read the rows the other blocks wrote, not a stale copy
    int threads = X * Y, slices = threads >= W ? threads / W : 1;   // thread (j, slice): column j of the group,
    int slice = tid / W;                                               // partial rows slice, slice + slices, ...
    __syncthreads();                            // buf is free again
    for (int j = tid % W; j < W; j += threads) {
        if (slice >= slices) break;
        float s = 0.0f;
        if (c0 + j < OC) {
            for (int r = slice; r < (int)gridDim.y; r += 4 * slices) {
                float p[4];                     // four rows in flight, then added in order
                for (int q = 0; q < 4; q++) {
                    int rr = r + q * slices;
                    p[q] = rr < (int)gridDim.y ? partial[(size_t)rr * OC + c0 + j] : 0.0f;
                }
                for (int q = 0; q < 4; q++) s += p[q];
            }
        }
        buf[slice * W + j] = s;
    }
    __syncthreads();
    for (int j = tid; j < W; j += threads) {
        if (c0 + j < OC) {
            float total = 0.0f;
            for (int q = 0; q < slices; q++) total += buf[q * W + j];
            add_into(dbias + c0 + j, total);
        }
    }
}

// dinp = dout * gelu'(inp + bias), and dbias (OC,) += the column sums of dinp as stored (bf16): the GELU's
// backward fused with the bias gradient of the fc layer before it, which reads exactly these values.
// Block (X, Y), grid (ceil(OC / 8X), R): thread x owns 8 neighbouring columns (X threads side by side cover a
// group of 8X columns, 16X bytes of a row), the Y * R threads of a group split the rows, each taking four rows
// at a time (eight 16-byte loads in flight); then column_group_sum_finish. dinp may be dout (in place): each
// value is read and then written by the same thread.
extern "C" __global__ void gelu_bias_backward_bf16_kernel(bf16* dinp,              // (N, OC)
                                                          bf16* dbias,             // (OC,) accumulated into
                                                          float* partial,          // (R, OC), R = gridDim.y
                                                          unsigned int* counters,  // (gridDim.x,) zeros
                                                          const bf16* dout,        // (N, OC)
                                                          const bf16* inp,         // (N, OC) the product, no bias
                                                          const float* bias,       // (OC,)
                                                          int N, int OC) {
    extern __shared__ float buf[];              // (Y, 8X)
    int c = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (c < OC) {
        float b[8];
        load8f(b, bias + c);
        int stride = gridDim.y * blockDim.y;
        for (int row = blockIdx.y * blockDim.y + threadIdx.y; row < N; row += 4 * stride) {
            int4 vd[4], vx[4];
            for (int j = 0; j < 4; j++) {
                size_t at = (size_t)(row + j * stride) * OC + c;
                bool in = row + j * stride < N;
                vd[j] = in ? *(const int4*)(dout + at) : make_int4(0, 0, 0, 0);
                vx[j] = in ? *(const int4*)(inp + at) : make_int4(0, 0, 0, 0);
            }
            for (int j = 0; j < 4; j++) {
                if (row + j * stride >= N) break;
                float d[8], x[8];
                unpack8(d, vd[j]);
                unpack8(x, vx[j]);
                for (int k = 0; k < 8; k++) {
                    d[k] = round_bf16(d[k] * gelu_grad_f32(x[k] + b[k]));   // the value stored
                    acc[k] += d[k];
                }
                store8(dinp + (size_t)(row + j * stride) * OC + c, d);
            }
        }
    }
    column_group_sum_finish(buf, acc, dbias, partial, counters, OC);
}
