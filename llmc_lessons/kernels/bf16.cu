// bf16.cu: kernels that store activations and weights in bfloat16 but compute in float32 (lesson 14).
//
// gelu_forward_bf16_kernel: one thread per element; load bf16, compute in float32, round once on the store.
// gelu_forward_bf16_kernel2: the same, 8 values per thread through 128-bit (int4) loads and stores.
// layernorm_forward_bf16_kernel: one warp per row (as layernorm_forward_kernel2); bf16 input and output, the
//   mean and the variance accumulated and kept in float32 (a bf16 sum of 768 terms would lose 2-3 digits).
// adamw_bf16_kernel: the update on float32 master weights and moments, then a bf16 copy of each weight for
//   the forward and backward; with stochastic=1 the copy is rounded up or down at random with the
//   probability that makes its expected value exact (llm.c's stochastic rounding), else to nearest.
//
// The rest of the file is the bf16 training step of GPT2(precision="bf16"): see the section header below.
#include "common.cuh"
#include "bf16.cuh"

__device__ __forceinline__ float gelu_f32(float x) {  // the tanh GELU of lesson 06, in float32
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
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
    float lo = gelu_f32(bf16_lo(two));
    float hi = gelu_f32(bf16_hi(two));
    return (unsigned int)bf16_from_float(lo) | ((unsigned int)bf16_from_float(hi) << 16);
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

extern "C" __global__ void layernorm_forward_bf16_kernel(bf16* out,           // (N, C)
                                                         float* mean,         // (N,)
                                                         float* rstd,         // (N,)
                                                         const bf16* inp,     // (N, C)
                                                         const float* weight, // (C,)
                                                         const float* bias,   // (C,)
                                                         int N, int C) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    const bf16* x = inp + row * C;
    float sum = 0.0f;
    for (int c = lane; c < C; c += 32) sum += bf16_to_float(x[c]);
    float m = warpReduceSum(sum) / C;
    float var = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float d = bf16_to_float(x[c]) - m;
        var += d * d;
    }
    float s = rsqrtf(warpReduceSum(var) / C + 1e-5f);
    for (int c = lane; c < C; c += 32) {
        out[row * C + c] = bf16_from_float((bf16_to_float(x[c]) - m) * s * weight[c] + bias[c]);
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}

// A 32-bit hash of (seed, index): the random bits for stochastic rounding, the same on GPU and CPU.
__device__ __forceinline__ unsigned int hash32(unsigned int seed, unsigned int i) {
    unsigned int h = seed ^ (i * 0x9E3779B9u);
    h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16;
    return h;
}

// Round up with probability (dropped low bits) / 2^16: adding 16 random bits below the kept ones, then
// truncating, does exactly that.
__device__ __forceinline__ bf16 bf16_stochastic(float f, unsigned int seed, unsigned int i) {
    return (bf16)((__float_as_uint(f) + (hash32(seed, i) & 0xFFFFu)) >> 16);
}

extern "C" __global__ void adamw_bf16_kernel(float* master, bf16* params, const float* grads, float* m, float* v,
                                             int N, float lr, float beta1, float beta2, float beta1_correction,
                                             float beta2_correction, float eps, float weight_decay,
                                             float grad_scale, int stochastic, unsigned int seed) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) return;
    float g = grads[i] * grad_scale;                  // grad_scale: the clip factor of the global norm
    float mi = beta1 * m[i] + (1.0f - beta1) * g;
    float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    float p = master[i];
    p -= lr * ((mi / beta1_correction) / (sqrtf(vi / beta2_correction) + eps) + weight_decay * p);
    master[i] = p;                                    // float32 master weight: small updates accumulate here
    params[i] = stochastic ? bf16_stochastic(p, seed, (unsigned int)i) : bf16_from_float(p);
}

// float32 -> bf16 for a whole array, to nearest or stochastically as adamw_bf16_kernel rounds (the model's bf16
// copy of its weights after they are set or loaded: the same seed gives the same copy the update made).
extern "C" __global__ void float_to_bf16_kernel(bf16* out, const float* inp, int N, int stochastic,
                                                unsigned int seed) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < N) {
        out[i] = stochastic ? bf16_stochastic(inp[i], seed, (unsigned int)i) : bf16_from_float(inp[i]);
    }
}

// =========================================================================================================
// The bf16 training step (GPT2(precision="bf16"), as llm.c's train_gpt2.cu with floatX = bf16).
//
// Activations are bf16; the weight matrices are read as bf16 copies of their float32 masters; layernorm
// parameters, biases, statistics, the loss and every weight gradient stay float32. The matrix products are
// cuBLAS's (bf16 in, float32 accumulation). Every kernel below computes in float32 and moves bf16 EIGHT
// values at a time, one 16-byte access (two-byte loads leave a kernel short of bandwidth, as lesson 14's
// GELU showed), so C, T and Vp must be multiples of 8 and arrays 16-byte aligned.
// Biases are added on the way inside the kernel that reads a product next (cuBLAS gives no bias): the fc
// bias in the GELU, the two projection biases in the residual adds. The qkv bias has a pass of its own
// (add_bias_bf16_kernel): the step's attention is flash_attention.cu's version 2, which copies qkv straight
// into shared memory. The head split, the softmax kernels and the merge are the attention that writes the
// T x T scores (attention_forward_bf16_cuda), which `python -m llmc_lessons.bench --attention` compares with.
// =========================================================================================================

// 8 bf16 values <-> 8 floats through one 16-byte access; p must be 16-byte aligned.
__device__ __forceinline__ void unpack8(float* f, int4 v) {
    unsigned int w[4] = {(unsigned int)v.x, (unsigned int)v.y, (unsigned int)v.z, (unsigned int)v.w};
    for (int i = 0; i < 4; i++) {
        f[2 * i] = bf16_lo(w[i]);
        f[2 * i + 1] = bf16_hi(w[i]);
    }
}

__device__ __forceinline__ void load8(float* f, const bf16* p) {
    unpack8(f, *(const int4*)p);
}

__device__ __forceinline__ void store8(bf16* p, const float* f) {
    int w[4];
    for (int i = 0; i < 4; i++) {
        w[i] = (int)((unsigned int)bf16_from_float(f[2 * i]) | ((unsigned int)bf16_from_float(f[2 * i + 1]) << 16));
    }
    *(int4*)p = make_int4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ float round_bf16(float f) {  // the float32 value of f's nearest bf16
    return bf16_to_float(bf16_from_float(f));
}

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

// residual = inp1 + (inp2 + bias2), then out = layernorm(residual): the residual connection after a
// projection (whose bias is bias2) fused with the layernorm that reads its result. One warp per row; the
// statistics are of the bf16-rounded residual that is stored, and kept in float32. The row is re-read from
// the cache for the variance and the output (keeping it in registers instead measured slower on the H100:
// fewer warps fit).
extern "C" __global__ void residual_layernorm_forward_bf16_kernel(bf16* residual,       // (N, C)
                                                                  bf16* out,            // (N, C)
                                                                  float* mean,          // (N,)
                                                                  float* rstd,          // (N,)
                                                                  const bf16* inp1,     // (N, C)
                                                                  const bf16* inp2,     // (N, C)
                                                                  const float* bias2,   // (C,)
                                                                  const float* weight,  // (C,)
                                                                  const float* bias,    // (C,)
                                                                  int N, int C) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;                       // the whole warp leaves together
    size_t base = (size_t)row * C;
    float sum = 0.0f;
    for (int c = lane * 8; c < C; c += 32 * 8) {
        float a[8], b[8];
        load8(a, inp1 + base + c);
        load8(b, inp2 + base + c);
        for (int k = 0; k < 8; k++) {
            a[k] = round_bf16(a[k] + (b[k] + bias2[c + k]));
            sum += a[k];
        }
        store8(residual + base + c, a);
    }
    float m = warpReduceSum(sum) / C;
    float var = 0.0f;
    for (int c = lane * 8; c < C; c += 32 * 8) {   // each lane re-reads only the chunks it wrote
        float a[8];
        load8(a, residual + base + c);
        for (int k = 0; k < 8; k++) var += (a[k] - m) * (a[k] - m);
    }
    float s = rsqrtf(warpReduceSum(var) / C + 1e-5f);
    for (int c = lane * 8; c < C; c += 32 * 8) {
        float a[8];
        load8(a, residual + base + c);
        for (int k = 0; k < 8; k++) a[k] = (a[k] - m) * s * weight[c + k] + bias[c + k];
        store8(out + base + c, a);
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}

// The heads of attention as separate matrices: inp (B, T, n, NH, hs), as qkv (n = 3) or atty's gradient
// (n = 1), plus bias (n*C,) -> out (n, B, NH, T, hs), so out[0], out[1], out[2] are q, k, v. One thread per
// 8 outputs, in output order (16-byte writes side by side).
extern "C" __global__ void split_heads_bf16_kernel(bf16* out,          // (n, B, NH, T, hs)
                                                   const bf16* inp,    // (B, T, n * NH * hs)
                                                   const float* bias,  // (n * NH * hs,)
                                                   int n, int B, int T, int NH, int hs) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int hs8 = hs / 8;
    if (i >= n * B * NH * T * hs8) return;
    int d = (i % hs8) * 8;
    int rest = i / hs8;
    int t = rest % T; rest /= T;
    int h = rest % NH; rest /= NH;
    int b = rest % B;
    int m = rest / B;
    int C = NH * hs;
    int col = m * C + h * hs + d;                   // column of inp's row (b, t), and of bias
    float a[8];
    load8(a, inp + ((size_t)b * T + t) * n * C + col);
    for (int k = 0; k < 8; k++) a[k] += bias[col + k];
    store8(out + (size_t)i * 8, a);
}

// The inverse move: inp (n, B, NH, T, hs) -> out (B, T, n * NH * hs). Attention's output y (n = 1) back to
// (B, T, C); dq, dk, dv (n = 3) into one dqkv laid out like qkv.
extern "C" __global__ void merge_heads_bf16_kernel(bf16* out,         // (B, T, n * NH * hs)
                                                   const bf16* inp,   // (n, B, NH, T, hs)
                                                   int n, int B, int T, int NH, int hs) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int C = NH * hs, nC8 = n * C / 8;
    if (i >= B * T * nC8) return;
    int col = (i % nC8) * 8, bt = i / nC8;
    int b = bt / T, t = bt % T;
    int m = col / C, h = (col % C) / hs, d = col % hs;
    float a[8];
    load8(a, inp + ((((size_t)m * B + b) * NH + h) * T + t) * hs + d);
    store8(out + (size_t)i * 8, a);
}

// att = softmax(scale * preatt) over the causal part of each row (columns 0..t), zeros after it. One warp
// per row of the (N, T, T) scores; online max and sum in one pass, then the outputs. att may be preatt
// (in place): a lane writes only the 8-value chunks it read itself.
extern "C" __global__ void softmax_forward_bf16_kernel(bf16* att,           // (N, T, T)
                                                       const bf16* preatt,  // (N, T, T) q @ k^T, unscaled
                                                       float scale, int N, int T) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N * T) return;
    int t = row % T;
    size_t base = (size_t)row * T;
    int chunks = t / 8 + 1;                     // chunks holding columns 0..t; the last one is masked
    float maxval = NEG_INF, sum = 0.0f;
    for (int ch = lane; ch < chunks; ch += 32) {
        float x[8];
        load8(x, preatt + base + ch * 8);
        float chunk_max = NEG_INF;
        for (int k = 0; k < 8; k++) {
            x[k] = ch * 8 + k <= t ? x[k] * scale : NEG_INF;   // the future counts as exp(-inf) = 0
            chunk_max = fmaxf(chunk_max, x[k]);
        }
        float new_max = fmaxf(maxval, chunk_max);  // finite: every chunk holds column ch * 8 <= t
        sum *= __expf(maxval - new_max);           // rescale what was summed so far (once per chunk)
        for (int k = 0; k < 8; k++) sum += __expf(x[k] - new_max);   // (the fast exp: the output is bf16)
        maxval = new_max;
    }
    float row_max = warpReduceMax(maxval);
    float row_sum = warpReduceSum(maxval == NEG_INF ? 0.0f : sum * __expf(maxval - row_max));
    float inv = 1.0f / row_sum;
    for (int ch = lane; ch < T / 8; ch += 32) {
        float x[8];
        if (ch < chunks) load8(x, preatt + base + ch * 8);
        for (int k = 0; k < 8; k++) x[k] = (ch * 8 + k <= t) ? __expf(x[k] * scale - row_max) * inv : 0.0f;
        store8(att + base + ch * 8, x);
    }
}

// dpreatt = scale * att * (datt - sum_j att_j datt_j) on the causal part of each row, zeros after it (the
// softmax's Jacobian-vector product, lesson 05). One warp per row; dpreatt may be datt (in place).
extern "C" __global__ void softmax_backward_bf16_kernel(bf16* dpreatt,       // (N, T, T)
                                                        const bf16* datt,    // (N, T, T)
                                                        const bf16* att,     // (N, T, T)
                                                        float scale, int N, int T) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N * T) return;
    int t = row % T;
    size_t base = (size_t)row * T;
    int chunks = t / 8 + 1;
    float dot = 0.0f;
    for (int ch = lane; ch < chunks; ch += 32) {
        float a[8], d[8];
        load8(a, att + base + ch * 8);
        load8(d, datt + base + ch * 8);
        for (int k = 0; k < 8 && ch * 8 + k <= t; k++) dot += a[k] * d[k];
    }
    dot = warpReduceSum(dot);
    for (int ch = lane; ch < T / 8; ch += 32) {
        float a[8], d[8];
        if (ch < chunks) {
            load8(a, att + base + ch * 8);
            load8(d, datt + base + ch * 8);
        }
        for (int k = 0; k < 8; k++) a[k] = (ch * 8 + k <= t) ? scale * a[k] * (d[k] - dot) : 0.0f;
        store8(dpreatt + base + ch * 8, a);
    }
}

__device__ __forceinline__ float gelu_grad_f32(float x) {  // d gelu / dx, lesson 06
    float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    float th = tanhf(u);
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * x * x);
}

// out = inp + bias: the qkv layer's bias, added in place before the flash attention kernels read qkv (they
// copy it straight into shared memory). One thread per 8 values; out may be inp.
extern "C" __global__ void add_bias_bf16_kernel(bf16* out,          // (N, OC)
                                                const bf16* inp,    // (N, OC) the product, no bias
                                                const float* bias,  // (OC,)
                                                int N, int OC) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * (OC / 8)) return;
    int c = (i % (OC / 8)) * 8;
    float x[8];
    load8(x, inp + (size_t)i * 8);
    for (int k = 0; k < 8; k++) x[k] += bias[c + k];
    store8(out + (size_t)i * 8, x);
}

// out = gelu(inp + bias): the fc layer's bias added on the way into the GELU. One thread per 8 values.
extern "C" __global__ void gelu_bias_forward_bf16_kernel(bf16* out,          // (N, OC)
                                                         const bf16* inp,    // (N, OC) the product, no bias
                                                         const float* bias,  // (OC,)
                                                         int N, int OC) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * (OC / 8)) return;
    int c = (i % (OC / 8)) * 8;
    float x[8];
    load8(x, inp + (size_t)i * 8);
    for (int k = 0; k < 8; k++) x[k] = gelu_f32(x[k] + bias[c + k]);
    store8(out + (size_t)i * 8, x);
}

// dinp = dout * gelu'(inp + bias); dinp may be dout (in place).
extern "C" __global__ void gelu_bias_backward_bf16_kernel(bf16* dinp,         // (N, OC)
                                                          const bf16* dout,   // (N, OC)
                                                          const bf16* inp,    // (N, OC) the product, no bias
                                                          const float* bias,  // (OC,)
                                                          int N, int OC) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * (OC / 8)) return;
    int c = (i % (OC / 8)) * 8;
    float x[8], d[8];
    load8(x, inp + (size_t)i * 8);
    load8(d, dout + (size_t)i * 8);
    for (int k = 0; k < 8; k++) d[k] *= gelu_grad_f32(x[k] + bias[c + k]);
    store8(dinp + (size_t)i * 8, d);
}

// The last of `blocks` blocks to call this returns true; *counter counts the arrivals and is reset by that
// block for the next launch. Each block calls it after writing its row of partial sums: the fence makes the
// row visible to the block that will add the rows (the "last block" reduction of CUDA's threadFenceReduction
// sample). One launch instead of two, and still deterministic: one block adds the rows, in order.
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

// out[c] += sum over r of partial[r][c], rows in order, for columns c0 <= c < c1, by the threads of a block.
__device__ void add_partial_rows(float* out, const float* partial, int R, int C, int c0, int c1) {
    __threadfence();                          // read the rows the other blocks wrote, not a stale copy
    int nthreads = blockDim.x * blockDim.y;
    for (int c = c0 + threadIdx.y * blockDim.x + threadIdx.x; c < c1; c += nthreads) {
        float s = 0.0f;
        for (int r = 0; r < R; r++) s += partial[(size_t)r * C + c];
        out[c] += s;
    }
}

// dbias (OC,) += the column sums of dout (N, OC), deterministically. Block (32, Y), grid (ceil(OC / 256), R):
// thread x owns 8 neighbouring columns, the Y * R threads of a column split the rows, the Y threads of a
// block add their sums in order through shared memory and partial[r] gets each block row's sums; the last
// block of a column group adds its R rows into dbias.
extern "C" __global__ void matmul_backward_bias_bf16_kernel(float* dbias,       // (OC,) accumulated into
                                                            float* partial,     // (R, OC), R = gridDim.y
                                                            unsigned int* counters,  // (gridDim.x,) zeros
                                                            const bf16* dout,   // (N, OC)
                                                            int N, int OC) {
    extern __shared__ float buf[];              // (Y, 256)
    int c = (blockIdx.x * 32 + threadIdx.x) * 8;
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (c < OC) {
        int stride = gridDim.y * blockDim.y;
        int row = blockIdx.y * blockDim.y + threadIdx.y;
        for (; row + 3 * stride < N; row += 4 * stride) {   // four independent loads in flight, then add
            int4 v[4];
            for (int j = 0; j < 4; j++) v[j] = *(const int4*)(dout + (size_t)(row + j * stride) * OC + c);
            for (int j = 0; j < 4; j++) {
                float d[8];
                unpack8(d, v[j]);
                for (int k = 0; k < 8; k++) acc[k] += d[k];
            }
        }
        for (; row < N; row += stride) {
            float d[8];
            load8(d, dout + (size_t)row * OC + c);
            for (int k = 0; k < 8; k++) acc[k] += d[k];
        }
    }
    for (int k = 0; k < 8; k++) buf[threadIdx.y * 256 + threadIdx.x * 8 + k] = acc[k];
    __syncthreads();
    if (threadIdx.y == 0 && c < OC) {
        for (int k = 0; k < 8; k++) {
            float s = 0.0f;
            for (int y = 0; y < blockDim.y; y++) s += buf[y * 256 + threadIdx.x * 8 + k];
            partial[(size_t)blockIdx.y * OC + c + k] = s;
        }
    }
    if (last_block(counters + blockIdx.x, gridDim.y)) {
        int c0 = blockIdx.x * 256;
        add_partial_rows(dbias, partial, gridDim.y, OC, c0, min(OC, c0 + 256));
    }
}

// out[c] += sum over r of partial[r, c], always in the same order. Block (32, Y): 32 neighbouring columns,
// the Y rows of threads split the R partial rows, then thread row 0 adds their Y sums in order.
extern "C" __global__ void column_sum_add_kernel(float* out,             // (C,) accumulated into
                                                 const float* partial,   // (R, C)
                                                 int R, int C) {
    extern __shared__ float buf[];              // (Y, 32)
    int c = blockIdx.x * 32 + threadIdx.x;
    float acc = 0.0f;
    if (c < C) {
        for (int r = threadIdx.y; r < R; r += blockDim.y) acc += partial[(size_t)r * C + c];
    }
    buf[threadIdx.y * 32 + threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float s = 0.0f;
        for (int y = 0; y < blockDim.y; y++) s += buf[y * 32 + threadIdx.x];
        out[c] += s;
    }
}

#define ROW_CHUNKS 4   // 8-value chunks per lane when a warp keeps a row in registers: C <= 4 * 32 * 8 = 1024

// The layernorm backward of lesson 03 on bf16 dout and inp: one warp per row, looping over rows
// (row = warp, warp + W, ...). dinp is the float32 gradient of the residual stream and is ACCUMULATED into
// (the two readers of a residual add up); dinp_bf16 gets its new value in bf16 for the next matmul's
// backward. A row's dout, inp and old dinp are all loaded at once into registers, so each row costs one wait
// for memory. Each warp sums its rows' dweight and dbias terms in registers; at the end the warps of a block
// add theirs in order through shared memory into row blockIdx.x of the partial arrays, and
// column_sum_add_kernel adds those rows in order: the result is deterministic. (A last-block reduction, as
// the bias gradient's, measured slower here: one block adding 264 rows of 2C columns took 60 us a call.)
extern "C" __global__ void layernorm_backward_bf16_kernel(float* dinp,             // (N, C) accumulated into
                                                         bf16* dinp_bf16,         // (N, C)
                                                         float* partial_dweight,  // (gridDim.x, C)
                                                         float* partial_dbias,    // (gridDim.x, C)
                                                         const bf16* dout,        // (N, C)
                                                         const bf16* inp,         // (N, C)
                                                         const float* weight,     // (C,)
                                                         const float* mean,       // (N,)
                                                         const float* rstd,       // (N,)
                                                         int N, int C) {
    extern __shared__ float buf[];            // (warps per block, C): one warp's partial sums at a time
    int lane = threadIdx.x % 32, w = threadIdx.x / 32, warps = blockDim.x / 32;
    int warp = blockIdx.x * warps + w;
    int W = gridDim.x * warps;
    float dw[ROW_CHUNKS * 8], db[ROW_CHUNKS * 8];
    for (int k = 0; k < ROW_CHUNKS * 8; k++) dw[k] = db[k] = 0.0f;
    for (int row = warp; row < N; row += W) {
        size_t base = (size_t)row * C;
        float m = mean[row], s = rstd[row];
        int4 raw_dout[ROW_CHUNKS], raw_inp[ROW_CHUNKS];   // the row stays in registers, packed
        float4 old[ROW_CHUNKS][2];                           // and the gradient it adds to
        for (int i = 0; i < ROW_CHUNKS; i++) {
            int c = (lane + 32 * i) * 8;
            if (c < C) {
                raw_dout[i] = *(const int4*)(dout + base + c);
                raw_inp[i] = *(const int4*)(inp + base + c);
                old[i][0] = *(const float4*)(dinp + base + c);
                old[i][1] = *(const float4*)(dinp + base + c + 4);
            }
        }
        float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
        for (int i = 0; i < ROW_CHUNKS; i++) {
            int c = (lane + 32 * i) * 8;
            if (c >= C) break;
            float d[8], x[8];
            unpack8(d, raw_dout[i]);
            unpack8(x, raw_inp[i]);
            for (int k = 0; k < 8; k++) {
                float norm = (x[k] - m) * s;
                float dnorm = weight[c + k] * d[k];
                dnorm_mean += dnorm;
                dnorm_norm_mean += dnorm * norm;
                db[i * 8 + k] += d[k];
                dw[i * 8 + k] += norm * d[k];
            }
        }
        dnorm_mean = warpReduceSum(dnorm_mean) / C;
        dnorm_norm_mean = warpReduceSum(dnorm_norm_mean) / C;
        for (int i = 0; i < ROW_CHUNKS; i++) {
            int c = (lane + 32 * i) * 8;
            if (c >= C) break;
            float d[8], x[8];
            unpack8(d, raw_dout[i]);
            unpack8(x, raw_inp[i]);
            float g[8] = {old[i][0].x, old[i][0].y, old[i][0].z, old[i][0].w,
                          old[i][1].x, old[i][1].y, old[i][1].z, old[i][1].w};
            for (int k = 0; k < 8; k++) {
                float norm = (x[k] - m) * s;
                g[k] += s * (weight[c + k] * d[k] - dnorm_mean - norm * dnorm_norm_mean);
            }
            *(float4*)(dinp + base + c) = make_float4(g[0], g[1], g[2], g[3]);
            *(float4*)(dinp + base + c + 4) = make_float4(g[4], g[5], g[6], g[7]);
            store8(dinp_bf16 + base + c, g);
        }
    }
    // the block's warps add their sums in order: dweight, then dbias, through the same shared buffer
    for (int pass = 0; pass < 2; pass++) {
        float* mine = pass == 0 ? dw : db;
        for (int i = 0; i < ROW_CHUNKS; i++) {
            int c = (lane + 32 * i) * 8;
            if (c >= C) break;
            for (int k = 0; k < 8; k++) buf[w * C + c + k] = mine[i * 8 + k];
        }
        __syncthreads();
        float* out = pass == 0 ? partial_dweight : partial_dbias;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            float sum = 0.0f;
            for (int j = 0; j < warps; j++) sum += buf[j * C + c];
            out[(size_t)blockIdx.x * C + c] = sum;
        }
        __syncthreads();
    }
}

// The classifier's softmax, loss and gradient in one kernel (lesson 08's fused classifier) on bf16 logits:
// one block per row (b, t). Pass 1: online max and sum over the V real columns, 8 at a time, combined over
// the block. Pass 2: logits are overwritten with dlogits = dloss * (softmax - onehot(target)), 0 in the
// padded columns V..Vp-1. losses[row] = -log softmax[target] in float32.
extern "C" __global__ void fused_classifier_bf16_kernel(bf16* logits,        // (N, Vp) in: logits, out: dlogits
                                                        float* losses,       // (N,)
                                                        const int* targets,  // (N,)
                                                        float dloss, int N, int V, int Vp) {
    __shared__ float warp_max[32];
    __shared__ float warp_sum[32];
    int row = blockIdx.x;
    size_t base = (size_t)row * Vp;
    int target = targets[row];
    float target_logit = bf16_to_float(logits[base + target]);   // read before pass 2 overwrites it
    float maxval = NEG_INF, sum = 0.0f;
    for (int ch = threadIdx.x; ch * 8 < V; ch += blockDim.x) {
        float x[8];
        load8(x, logits + base + ch * 8);
        for (int k = 0; k < 8 && ch * 8 + k < V; k++) {
            if (x[k] > maxval) {
                sum *= expf(maxval - x[k]);
                maxval = x[k];
            }
            sum += expf(x[k] - maxval);
        }
    }
    int lane = threadIdx.x % 32, w = threadIdx.x / 32, warps = blockDim.x / 32;
    float wmax = warpReduceMax(maxval);
    float wsum = warpReduceSum(maxval == NEG_INF ? 0.0f : sum * expf(maxval - wmax));
    if (lane == 0) {
        warp_max[w] = wmax;
        warp_sum[w] = wsum;
    }
    __syncthreads();
    float row_max = NEG_INF;
    for (int i = 0; i < warps; i++) row_max = fmaxf(row_max, warp_max[i]);
    float row_sum = 0.0f;
    for (int i = 0; i < warps; i++) {
        if (warp_max[i] != NEG_INF) row_sum += warp_sum[i] * expf(warp_max[i] - row_max);
    }
    if (threadIdx.x == 0) losses[row] = logf(row_sum) + row_max - target_logit;
    float inv = 1.0f / row_sum;
    for (int ch = threadIdx.x; ch * 8 < Vp; ch += blockDim.x) {
        float x[8];
        load8(x, logits + base + ch * 8);
        for (int k = 0; k < 8; k++) {
            int j = ch * 8 + k;
            x[k] = j < V ? dloss * (expf(x[k] - row_max) * inv - (j == target ? 1.0f : 0.0f)) : 0.0f;
        }
        store8(logits + base + ch * 8, x);
    }
}
