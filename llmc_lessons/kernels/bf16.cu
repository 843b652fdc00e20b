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
// into shared memory. The bias gradients come the same way: the fc bias's out of the GELU backward, the two
// projection biases' out of the LayerNorm backward that writes their dout, the qkv bias's out of the flash
// attention backward (flash_attention.cu): no kernel reads a product a second time for its bias gradient.
// The head split, the softmax kernels and the merge are the attention that writes the T x T scores
// (attention_forward_bf16_cuda), which `python -m llmc_lessons.bench --attention` compares with.
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
    *(int4*)p = make_int4((int)pack_bf16x2(f[0], f[1]), (int)pack_bf16x2(f[2], f[3]), (int)pack_bf16x2(f[4], f[5]),
                          (int)pack_bf16x2(f[6], f[7]));
}

// 8 floats of a float32 vector (a bias, a layernorm weight) through two 16-byte loads; p must be 16-byte
// aligned (the launchers check). Two load instructions instead of eight.
__device__ __forceinline__ void load8f(float* f, const float* p) {
    float4 a = *(const float4*)p, b = *(const float4*)(p + 4);
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
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

#define ROW_CHUNKS 4   // 8-value chunks per lane when a warp keeps a row in registers: C <= 4 * 32 * 8 = 1024

// The layernorm of one row that a warp holds in registers, lane `lane` the 8-value chunks (lane + 32 i) * 8
// (those below C): the mean and the variance from the registers (two passes over them, no trip to memory),
// then out = (x - mean) * rstd * weight + bias stored 16 bytes at a time. The statistics stay float32.
__device__ __forceinline__ void layernorm_row_bf16(float r[ROW_CHUNKS][8], bf16* out, float* mean, float* rstd,
                                                   const float* weight, const float* bias, int row, int C,
                                                   int lane) {
    float sum = 0.0f;
    for (int i = 0; i < ROW_CHUNKS; i++) {
        if ((lane + 32 * i) * 8 < C) {
            for (int k = 0; k < 8; k++) sum += r[i][k];
        }
    }
    float m = warpReduceSum(sum) / C;
    float var = 0.0f;
    for (int i = 0; i < ROW_CHUNKS; i++) {
        if ((lane + 32 * i) * 8 < C) {
            for (int k = 0; k < 8; k++) var += (r[i][k] - m) * (r[i][k] - m);
        }
    }
    float s = rsqrtf(warpReduceSum(var) / C + 1e-5f);
    size_t base = (size_t)row * C;
    for (int i = 0; i < ROW_CHUNKS; i++) {
        int c = (lane + 32 * i) * 8;
        if (c < C) {
            float w[8], b[8];
            load8f(w, weight + c);
            load8f(b, bias + c);
            for (int k = 0; k < 8; k++) r[i][k] = (r[i][k] - m) * s * w[k] + b[k];
            store8(out + base + c, r[i]);
        }
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}

// The layernorm forward of the step's first layer (the later ones are fused with a residual add, below): one
// warp per row, the row read once into registers through 16-byte loads. layernorm_forward_bf16_kernel above
// is the same function with two-byte loads, a value at a time (any C); this one needs C a multiple of 8 and
// at most 1024.
extern "C" __global__ void layernorm_forward_bf16_kernel2(bf16* out,           // (N, C)
                                                          float* mean,         // (N,)
                                                          float* rstd,         // (N,)
                                                          const bf16* inp,     // (N, C)
                                                          const float* weight, // (C,)
                                                          const float* bias,   // (C,)
                                                          int N, int C) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    int4 raw[ROW_CHUNKS];
    for (int i = 0; i < ROW_CHUNKS; i++) {      // every load of the row first, then the arithmetic
        int c = (lane + 32 * i) * 8;
        if (c < C) raw[i] = *(const int4*)(inp + (size_t)row * C + c);
    }
    float r[ROW_CHUNKS][8];
    for (int i = 0; i < ROW_CHUNKS; i++) {
        if ((lane + 32 * i) * 8 < C) unpack8(r[i], raw[i]);
    }
    layernorm_row_bf16(r, out, mean, rstd, weight, bias, row, C, lane);
}

// residual = inp1 + (inp2 + bias2), then out = layernorm(residual): the residual connection after a
// projection (whose bias is bias2) fused with the layernorm that reads its result. One warp per row, the row
// read once into registers, all its loads in flight together; the statistics are of the bf16-rounded
// residual that is stored. (A first version re-read the row from the cache for the variance and the output:
// three dependent trips to memory per row, 50 us a call in the H200's profile of the step; this one 28 us.)
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
    int4 raw1[ROW_CHUNKS], raw2[ROW_CHUNKS];
    for (int i = 0; i < ROW_CHUNKS; i++) {      // every load of the row first, then the arithmetic
        int c = (lane + 32 * i) * 8;
        if (c < C) {
            raw1[i] = *(const int4*)(inp1 + base + c);
            raw2[i] = *(const int4*)(inp2 + base + c);
        }
    }
    float r[ROW_CHUNKS][8];
    for (int i = 0; i < ROW_CHUNKS; i++) {
        int c = (lane + 32 * i) * 8;
        if (c < C) {
            float b[8], pb[8];
            unpack8(r[i], raw1[i]);
            unpack8(b, raw2[i]);
            load8f(pb, bias2 + c);
            for (int k = 0; k < 8; k++) r[i][k] = round_bf16(r[i][k] + (b[k] + pb[k]));
            store8(residual + base + c, r[i]);
        }
    }
    layernorm_row_bf16(r, out, mean, rstd, weight, bias, row, C, lane);
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

// d gelu / dx (lesson 06) in the sigmoid form: with s = sigmoid(2u), d/dx [x s] = s + 2 x s (1 - s) du/dx,
// du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2). (0.5 (1 - tanh^2) = 2 s (1 - s).)
__device__ __forceinline__ float gelu_grad_f32(float x) {
    float s = gelu_sigmoid(x);
    return s + 2.0f * x * s * (1.0f - s) * 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * x * x);
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
    float x[8], b[8];
    load8(x, inp + (size_t)i * 8);
    load8f(b, bias + c);
    for (int k = 0; k < 8; k++) x[k] += b[k];
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
// column group adds the group's R rows of partials into dbias, its threads splitting the rows again.
// Deterministic: every sum is taken in a fixed order.
__device__ void column_group_sum_finish(float* buf, const float* acc, float* dbias, float* partial,
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
            dbias[c0 + j] += total;
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
                                                          float* dbias,            // (OC,) accumulated into
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

// The column sums of partial (R, 3C), always in the same order, added into three vectors: columns 0..C-1 into
// out1, C..2C-1 into out2, 2C..3C-1 into out3 (the layernorm backward's dweight, dbias and the bias gradient
// of the projection before it, in one launch). Block (X, Y): X neighbouring columns, the Y rows of threads
// split the R partial rows, then thread row 0 adds their Y sums in order. Each thread loads four of its rows
// before adding them (in row order): the launch is short, and its time is mostly its start and the chain of
// loads each thread waits for.
extern "C" __global__ void column_sum_add_kernel(float* out1,            // (C,) accumulated into
                                                 float* out2,            // (C,) accumulated into
                                                 float* out3,            // (C,) accumulated into
                                                 const float* partial,   // (R, 3C)
                                                 int R, int C) {
    extern __shared__ float buf[];              // (Y, X)
    int X = blockDim.x, Y = blockDim.y;
    int c = blockIdx.x * X + threadIdx.x;
    float acc = 0.0f;
    if (c < 3 * C) {
        int r = threadIdx.y;
        for (; r + 3 * Y < R; r += 4 * Y) {
            float v[4];
            for (int j = 0; j < 4; j++) v[j] = partial[(size_t)(r + j * Y) * 3 * C + c];
            for (int j = 0; j < 4; j++) acc += v[j];
        }
        for (; r < R; r += Y) acc += partial[(size_t)r * 3 * C + c];
    }
    buf[threadIdx.y * X + threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < 3 * C) {
        float s = 0.0f;
        for (int y = 0; y < Y; y++) s += buf[y * X + threadIdx.x];
        float* out = c < C ? out1 : (c < 2 * C ? out2 : out3);
        out[c % C] += s;
    }
}

// The layernorm backward of lesson 03 on bf16 dout and inp, a warp per row, each warp taking LN_ROWS rows at
// a time (rows r, r + W, with W the grid's warps; then r + 2W, ...). dinp is the float32 gradient of the
// residual stream and is ACCUMULATED into (the two readers of a residual add up); dinp_bf16 gets its new
// value in bf16 for the next matmul's backward. The rows' dout and inp are loaded at once into registers
// (all their loads in flight together), their old dinp once the two reductions are done. dresidual_bias
// (C,) += the column sums of dinp_bf16: the bias gradient of the projection whose output was added into this
// residual stream (it reads exactly dinp_bf16), in the same pass.
// The three column sums: lane `lane` handles the same columns (lane + 32 i) * 8 .. + 7 of every row, so it
// adds its rows' terms into its own slots of its warp's sums in shared memory: no other thread touches them, no
// atomics. At the end the warps of a block add theirs in order into row blockIdx.x of partial, and
// column_sum_add_kernel adds those rows in order: the result is deterministic.
// Why two rows at a time (H200, GPT-2's shapes, the kernel alone): one row at a time fitted 24 warps on a
// multiprocessor (79 registers; 24 rows in flight), 63-64 us; two rows take 128 registers, so 16 warps fit,
// but 32 rows are in flight and each shared-memory update serves two rows: 57 us. (Keeping the sums in
// registers instead took 162 registers a thread: one block of 8 warps fitted, 63 us with two sums.)
#define LN_ROWS 2
extern "C" __global__ void layernorm_backward_bf16_kernel(float* dinp,             // (N, C) accumulated into
                                                         bf16* dinp_bf16,         // (N, C)
                                                         float* partial,          // (gridDim.x, 3C)
                                                         const bf16* dout,        // (N, C)
                                                         const bf16* inp,         // (N, C)
                                                         const float* weight,     // (C,)
                                                         const float* mean,       // (N,)
                                                         const float* rstd,       // (N,)
                                                         int N, int C) {
    extern __shared__ float buf[];            // (warps per block, 3C): each warp's dweight, dbias, dres sums
    int lane = threadIdx.x % 32, w = threadIdx.x / 32, warps = blockDim.x / 32;
    int W = gridDim.x * warps;
    float* dw = buf + (size_t)w * 3 * C;
    float* db = dw + C;
    float* dr = db + C;
    for (int i = 0; i < ROW_CHUNKS; i++) {
        int c = (lane + 32 * i) * 8;
        if (c < C) {
            for (int k = 0; k < 8; k++) dw[c + k] = db[c + k] = dr[c + k] = 0.0f;
        }
    }
    for (int row0 = blockIdx.x * warps + w; row0 < N; row0 += LN_ROWS * W) {
        int4 raw_dout[LN_ROWS][ROW_CHUNKS], raw_inp[LN_ROWS][ROW_CHUNKS];   // the rows stay in registers, packed
        float m[LN_ROWS], s[LN_ROWS], dnorm_mean[LN_ROWS], dnorm_norm_mean[LN_ROWS];
        for (int r = 0; r < LN_ROWS; r++) {   // a row past N is zeros (m = s = 0): it adds 0 to every sum
            int row = row0 + r * W;
            bool in = row < N;
            m[r] = in ? mean[row] : 0.0f;
            s[r] = in ? rstd[row] : 0.0f;
            dnorm_mean[r] = dnorm_norm_mean[r] = 0.0f;
            for (int i = 0; i < ROW_CHUNKS; i++) {
                int c = (lane + 32 * i) * 8;
                if (c < C) {
                    raw_dout[r][i] = in ? *(const int4*)(dout + (size_t)row * C + c) : make_int4(0, 0, 0, 0);
                    raw_inp[r][i] = in ? *(const int4*)(inp + (size_t)row * C + c) : make_int4(0, 0, 0, 0);
                }
            }
        }
        for (int i = 0; i < ROW_CHUNKS; i++) {
            int c = (lane + 32 * i) * 8;
            if (c < C) {
                float wt[8], sw[8], sb[8];
                load8f(wt, weight + c);
                load8f(sw, dw + c);
                load8f(sb, db + c);
                for (int r = 0; r < LN_ROWS; r++) {
                    float d[8], x[8];
                    unpack8(d, raw_dout[r][i]);
                    unpack8(x, raw_inp[r][i]);
                    for (int k = 0; k < 8; k++) {
                        float norm = (x[k] - m[r]) * s[r];
                        float dnorm = wt[k] * d[k];
                        dnorm_mean[r] += dnorm;
                        dnorm_norm_mean[r] += dnorm * norm;
                        sb[k] += d[k];
                        sw[k] += norm * d[k];
                    }
                }
                *(float4*)(dw + c) = make_float4(sw[0], sw[1], sw[2], sw[3]);
                *(float4*)(dw + c + 4) = make_float4(sw[4], sw[5], sw[6], sw[7]);
                *(float4*)(db + c) = make_float4(sb[0], sb[1], sb[2], sb[3]);
                *(float4*)(db + c + 4) = make_float4(sb[4], sb[5], sb[6], sb[7]);
            }
        }
        for (int r = 0; r < LN_ROWS; r++) {
            dnorm_mean[r] = warpReduceSum(dnorm_mean[r]) / C;
            dnorm_norm_mean[r] = warpReduceSum(dnorm_norm_mean[r]) / C;
        }
        for (int i = 0; i < ROW_CHUNKS; i++) {
            int c = (lane + 32 * i) * 8;
            if (c < C) {
                float wt[8], sr[8];
                load8f(wt, weight + c);
                load8f(sr, dr + c);
                for (int r = 0; r < LN_ROWS; r++) {
                    int row = row0 + r * W;
                    if (row >= N) break;
                    size_t at = (size_t)row * C + c;
                    float d[8], x[8], g[8];
                    unpack8(d, raw_dout[r][i]);
                    unpack8(x, raw_inp[r][i]);
                    load8f(g, dinp + at);
                    for (int k = 0; k < 8; k++) {
                        float norm = (x[k] - m[r]) * s[r];
                        g[k] += s[r] * (wt[k] * d[k] - dnorm_mean[r] - norm * dnorm_norm_mean[r]);
                        sr[k] += round_bf16(g[k]);     // the value dinp_bf16 gets
                    }
                    *(float4*)(dinp + at) = make_float4(g[0], g[1], g[2], g[3]);
                    *(float4*)(dinp + at + 4) = make_float4(g[4], g[5], g[6], g[7]);
                    store8(dinp_bf16 + at, g);
                }
                *(float4*)(dr + c) = make_float4(sr[0], sr[1], sr[2], sr[3]);
                *(float4*)(dr + c + 4) = make_float4(sr[4], sr[5], sr[6], sr[7]);
            }
        }
    }
    __syncthreads();                          // the block's warps add their sums in order
    for (int c = threadIdx.x; c < 3 * C; c += blockDim.x) {
        float sum = 0.0f;
        for (int j = 0; j < warps; j++) sum += buf[(size_t)j * 3 * C + c];
        partial[(size_t)blockIdx.x * 3 * C + c] = sum;
    }
}

// The largest of 8 bf16 values: three bf16-pair maxima (max_bf16x2), then the larger half.
__device__ __forceinline__ float max8(int4 v) {
    unsigned int m = max_bf16x2(max_bf16x2((unsigned int)v.x, (unsigned int)v.y),
                                max_bf16x2((unsigned int)v.z, (unsigned int)v.w));
    return fmaxf(bf16_lo(m), bf16_hi(m));
}

// The classifier's softmax, loss and gradient in one kernel (lesson 08's fused classifier) on bf16 logits:
// one block per row (b, t), the row kept in shared memory (Vp * 2 bytes: 100 KB at GPT-2's vocabulary, two
// blocks per multiprocessor), so that it is read from memory once and written once. Three passes:
//   1. memory -> shared memory, and the row's max m (four 16-byte loads in flight per thread). The columns
//      V..Vp-1 are padding: a partial last chunk is stored with -inf there (exp(-inf) = 0), whole padding
//      chunks are not read.
//   2. shared memory: s = sum_j exp(x_j - m), as exp2(x_j log2(e) - m log2(e)) (one FFMA and one ex2).
//   3. shared memory -> memory: logits are overwritten with dlogits = dloss * (softmax - onehot(target)),
//      0 in the padding; losses[row] = -log softmax[target] = log s + m - x_target, in float32.
// Every thread does the same few instructions per value: no per-value test of the padding or the target
// (the one chunk holding the target is fixed afterwards by its thread). The version before (an online max and
// sum in one pass, both tests on every value: about 17 operations per value against 10, counted from the
// source) waited on its instructions, not on memory: 1.05 ms a call in the H200's profile of the step
// (76% of a same-size copy), this one 0.90 ms (89%).
extern "C" __global__ void fused_classifier_bf16_kernel(bf16* logits,        // (N, Vp) in: logits, out: dlogits
                                                        float* losses,       // (N,)
                                                        const int* targets,  // (N,)
                                                        float dloss, int N, int V, int Vp) {
    extern __shared__ int4 row_chunks[];       // (Vp / 8,) the row, 8 bf16 values per int4
    __shared__ float warp_max[32];
    __shared__ float warp_sum[32];
    int row = blockIdx.x;
    size_t base = (size_t)row * Vp;
    int target = targets[row];
    const int4* src = (const int4*)(logits + base);
    int bd = blockDim.x, full = V / 8, real_chunks = (V + 7) / 8;
    int lane = threadIdx.x % 32, w = threadIdx.x / 32, warps = blockDim.x / 32;
    float maxval = NEG_INF;
    int ch = threadIdx.x;
    for (; ch + 3 * bd < full; ch += 4 * bd) {
        int4 v[4];
        for (int j = 0; j < 4; j++) v[j] = src[ch + j * bd];
        for (int j = 0; j < 4; j++) {
            row_chunks[ch + j * bd] = v[j];
            maxval = fmaxf(maxval, max8(v[j]));
        }
    }
    for (; ch < full; ch += bd) {
        int4 v = src[ch];
        row_chunks[ch] = v;
        maxval = fmaxf(maxval, max8(v));
    }
    if (full < real_chunks && threadIdx.x == (full % bd)) {   // the chunk V lies in: padding -> -inf
        float x[8];
        unpack8(x, src[full]);
        for (int k = V % 8; k < 8; k++) x[k] = NEG_INF;
        for (int k = 0; k < V % 8; k++) maxval = fmaxf(maxval, x[k]);
        store8((bf16*)(row_chunks + full), x);
    }
    float wmax = warpReduceMax(maxval);
    if (lane == 0) warp_max[w] = wmax;
    __syncthreads();                           // also: the whole row is in shared memory
    float row_max = NEG_INF;
    for (int i = 0; i < warps; i++) row_max = fmaxf(row_max, warp_max[i]);
    const float m2 = row_max * LOG2E;        // the max in base 2
    float sum = 0.0f;
    for (ch = threadIdx.x; ch < real_chunks; ch += bd) {
        float x[8];
        unpack8(x, row_chunks[ch]);
        for (int k = 0; k < 8; k++) sum += fast_exp2(fmaf(x[k], LOG2E, -m2));
    }
    float wsum = warpReduceSum(sum);
    if (lane == 0) warp_sum[w] = wsum;
    __syncthreads();
    float row_sum = 0.0f;
    for (int i = 0; i < warps; i++) row_sum += warp_sum[i];   // in order: deterministic
    float target_logit = (unsigned)target < (unsigned)V ? bf16_to_float(((const bf16*)row_chunks)[target]) : __int_as_float(0x7fc00000);   // NaN: a bad target
    if (threadIdx.x == 0) losses[row] = logf(row_sum) + row_max - target_logit;
    float scale = dloss / row_sum;
    for (ch = threadIdx.x; ch < Vp / 8; ch += bd) {
        float x[8];
        if (ch < real_chunks) {
            unpack8(x, row_chunks[ch]);
            for (int k = 0; k < 8; k++) x[k] = fast_exp2(fmaf(x[k], LOG2E, -m2)) * scale;
            if (ch == target / 8) {
                for (int k = 0; k < 8; k++) if (k == target % 8) x[k] -= dloss;
            }
        } else {
            for (int k = 0; k < 8; k++) x[k] = 0.0f;
        }
        store8(logits + base + ch * 8, x);
    }
}
