// layernorm.cu: LayerNorm over the channels of every (b, t) row, forward and backward.
//
//   forward:  mean = (1/C) sum_c x_c,   rstd = 1 / sqrt((1/C) sum_c (x_c - mean)^2 + eps)
//             norm_c = (x_c - mean) * rstd,   out_c = norm_c * weight_c + bias_c
//   backward: dnorm_c = dout_c * weight_c
//             dinp_c  = rstd * (dnorm_c - mean_c'(dnorm) - norm_c * mean_c'(dnorm * norm))
//             dweight_c = sum over rows of dout_c * norm_c,   dbias_c = sum over rows of dout_c
//
// Shapes: the B*T rows are handled as N = B*T independent rows of C floats.
//   inp, out, dout, dinp (N, C); weight, bias, dweight, dbias (C,); mean, rstd (N,).
//
// layernorm_forward_kernel1 is one thread per row: N threads, each looping over its own row. Neighbouring
//   threads read floats C apart (uncoalesced), and N = 8192 threads barely fill a modern GPU.
// layernorm_forward_kernel2 is one warp (32 threads) per row: lane l reads channels l, l+32, l+64, ... so the
//   32 lanes of a load read 32 neighbouring floats (one 128-byte transaction), and the partial sums are
//   combined with warp shuffles (warpReduceSum). 32 * N threads.
// layernorm_forward_kernel3 is kernel2 with each lane's share of the row held in registers (C <= 1024), so
//   the row is read from memory once.
// layernorm_backward_kernel is one warp per row, computing dinp (accumulated into, +=).
// layernorm_param_backward_kernel computes dweight and dbias (accumulated into): a block owns 32 channels,
//   its warps take every G-th row (G = warps per block) and the partial sums are added in shared memory in a
//   fixed order. No atomics: the result is the same bits on every run. With a 2-D grid, block row y takes
//   only rows y*G + g, stepping G * gridDim.y, and adds into row y of (gridDim.y, C) partial sums, which
//   layernorm_param_reduce_kernel then adds in the order 0, 1, ...: more blocks, still deterministic.
// layernorm_backward_kernel2 does all three in one pass, a row per warp held in registers (C <= 1024,
//   C % 4 == 0): the launcher's default where it fits.
//
// After them, each in a section of its own: the forward fused with the residual add before it (lesson 12),
// and the bf16 versions (lesson 14, then the kernels of the bf16 training step).
#include "common.cuh"

// ---------------------------------------------------------------------------------------------------------
// Forward

extern "C" __global__ void layernorm_forward_kernel1(float* out,           // (N, C)
                                                     float* mean,          // (N,)
                                                     float* rstd,          // (N,)
                                                     const float* inp,     // (N, C)
                                                     const float* weight,  // (C,)
                                                     const float* bias,    // (C,)
                                                     int N, int C, float eps) {
    int row = blockIdx.x * blockDim.x + threadIdx.x;  // one thread per row
    if (row < N) {
        const float* x = inp + row * C;               // seek to this row: inp[row, :]
        float m = 0.0f;
        for (int c = 0; c < C; c++) { m += x[c]; }
        m = m / C;
        float v = 0.0f;                               // variance, from the centred values (more accurate
        for (int c = 0; c < C; c++) {                 // than E[x^2] - E[x]^2 in float32)
            float d = x[c] - m;
            v += d * d;
        }
        v = v / C;
        float s = 1.0f / sqrtf(v + eps);
        float* o = out + row * C;
        for (int c = 0; c < C; c++) {
            o[c] = (x[c] - m) * s * weight[c] + bias[c];
        }
        mean[row] = m;                                // cached for the backward pass
        rstd[row] = s;
    }
}

extern "C" __global__ void layernorm_forward_kernel2(float* out,           // (N, C)
                                                     float* mean,          // (N,)
                                                     float* rstd,          // (N,)
                                                     const float* inp,     // (N, C)
                                                     const float* weight,  // (C,)
                                                     const float* bias,    // (C,)
                                                     int N, int C, float eps) {
    int lane = threadIdx.x % 32;                      // 0..31: this thread's place in its warp
    int warp = threadIdx.x / 32;                      // which warp of the block
    int row = blockIdx.x * (blockDim.x / 32) + warp;  // one warp per row
    if (row >= N) { return; }                         // the whole warp leaves together: shuffles stay safe
    const float* x = inp + row * C;

    float sum = 0.0f;                                 // this lane's share of sum_c x_c
    for (int c = lane; c < C; c += 32) { sum += x[c]; }
    sum = warpReduceSum(sum);                         // now every lane holds the row's total
    float m = sum / C;

    float sumsq = 0.0f;                               // this lane's share of sum_c (x_c - m)^2
    for (int c = lane; c < C; c += 32) {
        float d = x[c] - m;
        sumsq += d * d;
    }
    sumsq = warpReduceSum(sumsq);
    float s = rsqrtf(sumsq / C + eps);

    float* o = out + row * C;
    for (int c = lane; c < C; c += 32) {              // the writes are coalesced too
        o[c] = (x[c] - m) * s * weight[c] + bias[c];
    }
    if (lane == 0) {                                  // one lane writes the row's statistics
        mean[row] = m;
        rstd[row] = s;
    }
}

// layernorm_forward_kernel3: kernel2 with the row held in registers. Kernel2 reads each row three times
// (sum, variance, output); the later reads often come from the cache, but not always. Here each lane loads
// its C / 32 values once (C <= 32 * LN3_MAX = 1024) and the three passes run on registers: one read and one
// write of the row, the fewest bytes possible.
#define LN3_MAX 32
extern "C" __global__ void layernorm_forward_kernel3(float* out,           // (N, C)
                                                     float* mean,          // (N,)
                                                     float* rstd,          // (N,)
                                                     const float* inp,     // (N, C)
                                                     const float* weight,  // (C,)
                                                     const float* bias,    // (C,)
                                                     int N, int C, float eps) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // one warp per row
    if (row >= N) { return; }
    const float* x = inp + row * C;
    float v[LN3_MAX];                                 // this lane's values: x[lane], x[lane + 32], ...
    float sum = 0.0f;
    for (int k = 0; k < LN3_MAX; k++) {
        int c = lane + 32 * k;
        v[k] = c < C ? x[c] : 0.0f;
        sum += v[k];
    }
    float m = warpReduceSum(sum) / C;
    float sumsq = 0.0f;
    for (int k = 0; k < LN3_MAX; k++) {
        float d = lane + 32 * k < C ? v[k] - m : 0.0f;
        sumsq += d * d;
    }
    float s = rsqrtf(warpReduceSum(sumsq) / C + eps);
    float* o = out + row * C;
    for (int k = 0; k < LN3_MAX; k++) {
        int c = lane + 32 * k;
        if (c < C) { o[c] = (v[k] - m) * s * weight[c] + bias[c]; }
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Backward

extern "C" __global__ void layernorm_backward_kernel(float* dinp,          // (N, C) accumulated into
                                                     const float* dout,    // (N, C)
                                                     const float* inp,     // (N, C)
                                                     const float* weight,  // (C,)
                                                     const float* mean,    // (N,) from the forward pass
                                                     const float* rstd,    // (N,) from the forward pass
                                                     int N, int C) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // one warp per row
    if (row >= N) { return; }
    const float* x = inp + row * C;
    const float* dy = dout + row * C;
    float m = mean[row];
    float s = rstd[row];

    // the two row means the formula needs: mean(dnorm) and mean(dnorm * norm)
    float dnorm_mean = 0.0f;
    float dnorm_norm_mean = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float norm = (x[c] - m) * s;                  // recomputed: cheaper than storing it in the forward
        float dnorm = weight[c] * dy[c];
        dnorm_mean += dnorm;
        dnorm_norm_mean += dnorm * norm;
    }
    dnorm_mean = warpReduceSum(dnorm_mean) / C;
    dnorm_norm_mean = warpReduceSum(dnorm_norm_mean) / C;

    float* dx = dinp + row * C;
    for (int c = lane; c < C; c += 32) {
        float norm = (x[c] - m) * s;
        float dnorm = weight[c] * dy[c];
        dx[c] += s * (dnorm - dnorm_mean - norm * dnorm_norm_mean);
    }
}

extern "C" __global__ void layernorm_param_backward_kernel(float* dweight,       // (C,) accumulated into
                                                           float* dbias,         // (C,) or (gridDim.y, C)
                                                           const float* dout,    // (N, C)
                                                           const float* inp,     // (N, C)
                                                           const float* mean,    // (N,)
                                                           const float* rstd,    // (N,)
                                                           int N, int C) {
    __shared__ float partial_dweight[1024];           // one slot per thread (blockDim.x <= 1024)
    __shared__ float partial_dbias[1024];
    int lane = threadIdx.x % 32;
    int group = threadIdx.x / 32;                     // this warp's row group: rows group, group + G, ...
    int G = blockDim.x / 32;                          // row groups (warps) per block
    int c = blockIdx.x * 32 + lane;                   // this block owns channels blockIdx.x*32 .. +31
    int first = blockIdx.y * G + group;               // with a 2-D grid, block row y starts at row y*G + group
    int step = G * gridDim.y;                         // ... and the gridDim.y block rows interleave

    float dw = 0.0f;
    float db = 0.0f;
    if (c < C) {
        for (int r = first; r < N; r += step) {       // a warp reads 32 neighbouring floats of row r
            float d = dout[r * C + c];
            float norm = (inp[r * C + c] - mean[r]) * rstd[r];
            dw += d * norm;
            db += d;
        }
    }
    partial_dweight[threadIdx.x] = dw;
    partial_dbias[threadIdx.x] = db;
    __syncthreads();                                  // every group's partial sum is in shared memory

    if (group == 0 && c < C) {                        // warp 0 adds the G partials in the order 0, 1, ..., G-1
        float tw = 0.0f;
        float tb = 0.0f;
        for (int g = 0; g < G; g++) {
            tw += partial_dweight[g * 32 + lane];
            tb += partial_dbias[g * 32 + lane];
        }
        dweight[blockIdx.y * C + c] += tw;            // row y of the partial sums (row 0 = the result for a 1-D grid)
        dbias[blockIdx.y * C + c] += tb;
    }
}

extern "C" __global__ void layernorm_param_reduce_kernel(float* dweight,               // (C,) accumulated into
                                                         float* dbias,                 // (C,) accumulated into
                                                         const float* partial_dweight, // (R, C)
                                                         const float* partial_dbias,   // (R, C)
                                                         int R, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;    // one thread per channel; neighbours read neighbours
    if (c < C) {
        float tw = 0.0f;
        float tb = 0.0f;
        for (int r = 0; r < R; r++) {                 // a fixed order: deterministic
            tw += partial_dweight[r * C + c];
            tb += partial_dbias[r * C + c];
        }
        dweight[c] += tw;
        dbias[c] += tb;
    }
}

// layernorm_backward_kernel2: dinp, dweight and dbias in one pass over dout and inp (lesson 12's fusion).
// One warp per row, looping over rows (row = warp, warp + W, ...); the lane's share of dout and inp is loaded
// as float4s into registers, all at once (C <= 4 * 32 * LN_BWD_CHUNKS = 1024 and C % 4 == 0), so a row costs
// one wait for memory and dout and inp are read once. dinp is WRITTEN (not accumulated). Each warp sums its
// rows' dweight and dbias terms in registers; at the end the block's warps add theirs in order through shared
// memory into row blockIdx.x of (gridDim.x, C) partial sums, which layernorm_param_reduce_kernel adds in
// order: deterministic, like kernel 1 + the param kernels, with 12 bytes moved per element instead of 28.
#define LN_BWD_CHUNKS 8

extern "C" __global__ void layernorm_backward_kernel2(float* dinp,             // (N, C) written
                                                      float* partial_dweight,  // (gridDim.x, C)
                                                      float* partial_dbias,    // (gridDim.x, C)
                                                      const float* dout,       // (N, C)
                                                      const float* inp,        // (N, C)
                                                      const float* weight,     // (C,)
                                                      const float* mean,       // (N,)
                                                      const float* rstd,       // (N,)
                                                      int N, int C) {
    extern __shared__ float buf[];              // (warps per block, C): one warp's sums per row of buf
    int lane = threadIdx.x % 32, w = threadIdx.x / 32, warps = blockDim.x / 32;
    int W = gridDim.x * warps;
    float4 dw[LN_BWD_CHUNKS], db[LN_BWD_CHUNKS];
    for (int i = 0; i < LN_BWD_CHUNKS; i++) dw[i] = db[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int row = blockIdx.x * warps + w; row < N; row += W) {
        const float4* dy = (const float4*)(dout + (size_t)row * C);
        const float4* x = (const float4*)(inp + (size_t)row * C);
        float m = mean[row], s = rstd[row];
        float4 d[LN_BWD_CHUNKS], n[LN_BWD_CHUNKS];
        for (int i = 0; i < LN_BWD_CHUNKS; i++) {   // every load of the row first
            int c4 = lane + 32 * i;
            if (c4 * 4 < C) {
                d[i] = dy[c4];
                n[i] = x[c4];
            }
        }
        float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
        for (int i = 0; i < LN_BWD_CHUNKS; i++) {
            int c4 = lane + 32 * i;
            if (c4 * 4 >= C) break;
            float4 wt = ((const float4*)weight)[c4];
            n[i] = make_float4((n[i].x - m) * s, (n[i].y - m) * s, (n[i].z - m) * s, (n[i].w - m) * s);  // norm
            dnorm_mean += wt.x * d[i].x + wt.y * d[i].y + wt.z * d[i].z + wt.w * d[i].w;
            dnorm_norm_mean += wt.x * d[i].x * n[i].x + wt.y * d[i].y * n[i].y + wt.z * d[i].z * n[i].z
                               + wt.w * d[i].w * n[i].w;
            db[i].x += d[i].x; db[i].y += d[i].y; db[i].z += d[i].z; db[i].w += d[i].w;
            dw[i].x += d[i].x * n[i].x; dw[i].y += d[i].y * n[i].y;
            dw[i].z += d[i].z * n[i].z; dw[i].w += d[i].w * n[i].w;
        }
        dnorm_mean = warpReduceSum(dnorm_mean) / C;
        dnorm_norm_mean = warpReduceSum(dnorm_norm_mean) / C;
        float4* dx = (float4*)(dinp + (size_t)row * C);
        for (int i = 0; i < LN_BWD_CHUNKS; i++) {
            int c4 = lane + 32 * i;
            if (c4 * 4 >= C) break;
            float4 wt = ((const float4*)weight)[c4];
            dx[c4] = make_float4(s * (wt.x * d[i].x - dnorm_mean - n[i].x * dnorm_norm_mean),
                                 s * (wt.y * d[i].y - dnorm_mean - n[i].y * dnorm_norm_mean),
                                 s * (wt.z * d[i].z - dnorm_mean - n[i].z * dnorm_norm_mean),
                                 s * (wt.w * d[i].w - dnorm_mean - n[i].w * dnorm_norm_mean));
        }
    }
    for (int pass = 0; pass < 2; pass++) {      // dweight, then dbias, through the same shared buffer
        float4* mine = pass == 0 ? dw : db;
        for (int i = 0; i < LN_BWD_CHUNKS; i++) {
            int c4 = lane + 32 * i;
            if (c4 * 4 >= C) break;
            ((float4*)(buf + w * C))[c4] = mine[i];
        }
        __syncthreads();
        float* out = pass == 0 ? partial_dweight : partial_dbias;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            float sum = 0.0f;
            for (int j = 0; j < warps; j++) sum += buf[j * C + c];   // the warps in order
            out[(size_t)blockIdx.x * C + c] = sum;
        }
        __syncthreads();
    }
}

// ---------------------------------------------------------------------------------------------------------
// Kernel fusion (lesson 12). Two kernels that each read and write memory once can often be one
// kernel that does both jobs in a single pass, saving the round trip of the intermediate through memory.
//
// fused_residual_layernorm_forward_kernel: residual = inp1 + inp2, then out = layernorm(residual), as GPT-2
//   does at every block (the residual add followed by ln2, or by the next block's ln1). Apart, the residual
//   kernel reads 2 rows and writes 1, then layernorm reads that row again and writes 1: 5 row transfers.
//   Fused: read 2, write 2 (the residual is still needed by the backward): 4. One warp per row, as
//   layernorm_forward_kernel2; the row is read once from memory and the second pass hits the L1/L2 cache.

extern "C" __global__ void fused_residual_layernorm_forward_kernel(float* residual,     // (N, C)
                                                                   float* out,          // (N, C)
                                                                   float* mean,         // (N,)
                                                                   float* rstd,         // (N,)
                                                                   const float* inp1,   // (N, C)
                                                                   const float* inp2,   // (N, C)
                                                                   const float* weight, // (C,)
                                                                   const float* bias,   // (C,)
                                                                   int N, int C, float eps) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // one warp per row
    if (row >= N) return;                                          // the whole warp leaves together
    const float* a = inp1 + row * C;
    const float* b = inp2 + row * C;
    float* r = residual + row * C;
    // pass 1: the residual add, written out, and the row sum, lane by lane (lane, lane + 32, ...)
    float sum = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float v = a[c] + b[c];
        r[c] = v;
        sum += v;
    }
    float m = warpReduceSum(sum) / C;
    // pass 2: the variance from the centred values (this warp wrote r a moment ago: it reads its own writes)
    float var = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float d = r[c] - m;
        var += d * d;
    }
    float s = rsqrtf(warpReduceSum(var) / C + eps);
    // pass 3: normalise, scale and shift
    float* o = out + row * C;
    for (int c = lane; c < C; c += 32) {
        o[c] = (r[c] - m) * s * weight[c] + bias[c];
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}

// =========================================================================================================
// bf16 (lesson 14): stored in bfloat16, computed in float32 (kernels/bf16.cuh has the conversions).
//
// layernorm_forward_bf16_kernel: one warp per row (as layernorm_forward_kernel2); bf16 input and output, the
//   mean and the variance accumulated and kept in float32 (a bf16 sum of 768 terms would lose 2-3 digits).
// =========================================================================================================
#include "bf16.cuh"

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

// =========================================================================================================
// The bf16 training step (GPT2(precision="bf16")): kernels/bf16.cuh says what its kernels share.
// =========================================================================================================

// A warp keeps a row in registers: CHUNKS 8-value chunks per lane, so C <= CHUNKS * 32 * 8. Each kernel comes
// in two instances: CHUNKS = 4 for C <= 1024 (GPT-2 124M and 350M, the fast path) and, with the suffix _c2048,
// CHUNKS = 8 for C <= 2048 (774M: 1280, 1.5B: 1600); a loop over a fixed CHUNKS unrolls, so the chunks stay
// in registers.

// The layernorm of one row that a warp holds in registers, lane `lane` the 8-value chunks (lane + 32 i) * 8
// (those below C): the mean and the variance from the registers (two passes over them, no trip to memory),
// then out = (x - mean) * rstd * weight + bias stored 16 bytes at a time. The statistics stay float32.
template <int CHUNKS>
__device__ __forceinline__ void layernorm_row_bf16(float r[CHUNKS][8], bf16* out, float* mean, float* rstd,
                                                   const float* weight, const float* bias, int row, int C,
                                                   int lane) {
    float sum = 0.0f;
    for (int i = 0; i < CHUNKS; i++) {
        if ((lane + 32 * i) * 8 < C) {
            for (int k = 0; k < 8; k++) sum += r[i][k];
        }
    }
    float m = warpReduceSum(sum) / C;
    float var = 0.0f;
    for (int i = 0; i < CHUNKS; i++) {
        if ((lane + 32 * i) * 8 < C) {
            for (int k = 0; k < 8; k++) var += (r[i][k] - m) * (r[i][k] - m);
        }
    }
    float s = rsqrtf(warpReduceSum(var) / C + 1e-5f);
    size_t base = (size_t)row * C;
    for (int i = 0; i < CHUNKS; i++) {
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
// at most CHUNKS * 256.
template <int CHUNKS>
__device__ __forceinline__ void layernorm_forward_bf16_rows(bf16* out,           // (N, C)
                                                            float* mean,         // (N,)
                                                            float* rstd,         // (N,)
                                                            const bf16* inp,     // (N, C)
                                                            const float* weight, // (C,)
                                                            const float* bias,   // (C,)
                                                            int N, int C) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    int4 raw[CHUNKS];
    for (int i = 0; i < CHUNKS; i++) {          // every load of the row first, then the arithmetic
        int c = (lane + 32 * i) * 8;
        if (c < C) raw[i] = *(const int4*)(inp + (size_t)row * C + c);
    }
    float r[CHUNKS][8];
    for (int i = 0; i < CHUNKS; i++) {
        if ((lane + 32 * i) * 8 < C) unpack8(r[i], raw[i]);
    }
    layernorm_row_bf16<CHUNKS>(r, out, mean, rstd, weight, bias, row, C, lane);
}

// The two instances the launcher picks from: C <= 1024, and C <= 2048.
extern "C" __global__ void layernorm_forward_bf16_kernel2(bf16* out, float* mean, float* rstd, const bf16* inp,
                                                          const float* weight, const float* bias, int N, int C) {
    layernorm_forward_bf16_rows<4>(out, mean, rstd, inp, weight, bias, N, C);
}
extern "C" __global__ void layernorm_forward_bf16_kernel2_c2048(bf16* out, float* mean, float* rstd,
                                                                const bf16* inp, const float* weight,
                                                                const float* bias, int N, int C) {
    layernorm_forward_bf16_rows<8>(out, mean, rstd, inp, weight, bias, N, C);
}

// residual = inp1 + (inp2 + bias2), then out = layernorm(residual): the residual connection after a
// projection (whose bias is bias2) fused with the layernorm that reads its result. One warp per row, the row
// read once into registers, all its loads in flight together; the statistics are of the bf16-rounded
// residual that is stored. (A first version re-read the row from the cache for the variance and the output:
// three dependent trips to memory per row, 50 us a call in the H200's profile of the step; this one 28 us.)
template <int CHUNKS>
__device__ __forceinline__ void residual_layernorm_forward_bf16_rows(bf16* residual,       // (N, C)
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
    int4 raw1[1][CHUNKS], raw2[1][CHUNKS];
    load_rows8<1, CHUNKS>(raw1, raw2, inp1, inp2, row, 0, N, C);   // every load of the row first, then the arithmetic
    float r[CHUNKS][8];
    for (int i = 0; i < CHUNKS; i++) {
        int c = (lane + 32 * i) * 8;
        if (c < C) {
            float b[8], pb[8];
            unpack8(r[i], raw1[0][i]);
            unpack8(b, raw2[0][i]);
            load8f(pb, bias2 + c);
            for (int k = 0; k < 8; k++) r[i][k] = round_bf16(r[i][k] + (b[k] + pb[k]));
            store8(residual + base + c, r[i]);
        }
    }
    layernorm_row_bf16<CHUNKS>(r, out, mean, rstd, weight, bias, row, C, lane);
}

extern "C" __global__ void residual_layernorm_forward_bf16_kernel(bf16* residual, bf16* out, float* mean,
                                                                  float* rstd, const bf16* inp1, const bf16* inp2,
                                                                  const float* bias2, const float* weight,
                                                                  const float* bias, int N, int C) {
    residual_layernorm_forward_bf16_rows<4>(residual, out, mean, rstd, inp1, inp2, bias2, weight, bias, N, C);
}
extern "C" __global__ void residual_layernorm_forward_bf16_kernel_c2048(bf16* residual, bf16* out, float* mean,
                                                                        float* rstd, const bf16* inp1,
                                                                        const bf16* inp2, const float* bias2,
                                                                        const float* weight, const float* bias,
                                                                        int N, int C) {
    residual_layernorm_forward_bf16_rows<8>(residual, out, mean, rstd, inp1, inp2, bias2, weight, bias, N, C);
}

// The column sums of partial (R, K C), always in the same order, added into K <= 3 vectors: columns 0..C-1
// into out1, C..2C-1 into out2, 2C..3C-1 into out3 (the layernorm backward's dweight, dbias and the bias
// gradient of the projection before it, in one launch; K = 1 for the RMSNorm backward's dweight). Block
// (X, Y): X neighbouring columns, the Y rows of threads split the R partial rows, then thread row 0 adds their
// Y sums in order. Each thread loads four of its rows before adding them (in row order): the launch is short,
// and its time is mostly its start and the chain of loads each thread waits for. The vectors are float32
// gradients (column_sum_add_kernel) or the bf16 step's bf16 gradients (column_sum_add_bf16_kernel).
template <typename G>
__device__ void column_sum_add(G* out1, G* out2, G* out3, const float* partial, int R, int C, int K) {
    extern __shared__ float buf[];              // (Y, X)
    int X = blockDim.x, Y = blockDim.y;
    int c = blockIdx.x * X + threadIdx.x;
    float acc = 0.0f;
    if (c < K * C) {
        int r = threadIdx.y;
        for (; r + 3 * Y < R; r += 4 * Y) {
            float v[4];
            for (int j = 0; j < 4; j++) v[j] = partial[(size_t)(r + j * Y) * K * C + c];
            for (int j = 0; j < 4; j++) acc += v[j];
        }
        for (; r < R; r += Y) acc += partial[(size_t)r * K * C + c];
    }
    buf[threadIdx.y * X + threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < K * C) {
        float s = 0.0f;
        for (int y = 0; y < Y; y++) s += buf[y * X + threadIdx.x];
        G* out = c < C ? out1 : (c < 2 * C ? out2 : out3);
        add_into(out + c % C, s);
    }
}

extern "C" __global__ void column_sum_add_kernel(float* out1,            // (C,) accumulated into
                                                 float* out2,            // (C,) accumulated into
                                                 float* out3,            // (C,) accumulated into
                                                 const float* partial,   // (R, K C)
                                                 int R, int C, int K) {
    column_sum_add(out1, out2, out3, partial, R, C, K);
}

extern "C" __global__ void column_sum_add_bf16_kernel(bf16* out1, bf16* out2, bf16* out3, const float* partial,
                                                      int R, int C, int K) {
    column_sum_add(out1, out2, out3, partial, R, C, K);
}

// The layernorm backward of lesson 03 on bf16 dout and inp, a warp per row, each warp taking ROWS rows at
// a time (rows r, r + W, with W the grid's warps; then r + 2W, ...). dinp is the float32 gradient of the
// residual stream and is ACCUMULATED into (the two readers of a residual add up); dinp_bf16 gets its new
// value in bf16 for the next matmul's backward. The rows' dout and inp are loaded at once into registers
// (all their loads in flight together), their old dinp once the two reductions are done (with them, in the
// one-row instance: PREFETCH below). dresidual_bias
// (C,) += the column sums of dinp_bf16: the bias gradient of the projection whose output was added into this
// residual stream (it reads exactly dinp_bf16), in the same pass.
// The three column sums: lane `lane` handles the same columns (lane + 32 i) * 8 .. + 7 of every row, so it
// adds its rows' terms into its own slots of its warp's sums in shared memory: no other thread touches them, no
// atomics. At the end the warps of a block add theirs in order into row blockIdx.x of partial, and
// column_sum_add_bf16_kernel adds those rows in order: the result is deterministic.
// Why two rows at a time (H200, GPT-2's shapes, the kernel alone): one row at a time fitted 24 warps on a
// multiprocessor (79 registers; 24 rows in flight), 63-64 us; two rows take 128 registers, so 16 warps fit,
// but 32 rows are in flight and each shared-memory update serves two rows: 57 us. (Keeping the sums in
// registers instead took 162 registers a thread: one block of 8 warps fitted, 63 us with two sums.)
// The kernels below instantiate ROWS = 2 with CHUNKS = 4 (C <= 1024), ROWS = 1 with CHUNKS = 8: two rows of
// 8 chunks would hold 128 registers of packed values alone.
// PREFETCH: the row's old dinp is loaded with its dout and inp, before the two reductions, so a row waits for memory
// once instead of twice (64 more registers a thread at CHUNKS = 8). The one-row instance does it: its shared sums
// (at C = 1600, 75 KiB a block of 4 warps) and its grid of 256 blocks leave about 8 warps a multiprocessor, too few
// rows in flight to hide a second wait.
template <int CHUNKS, int ROWS, bool PREFETCH>
__device__ __forceinline__ void layernorm_backward_bf16_rows(float* buf,              // shared: (warps, 3C)
                                                             float* dinp,             // (N, C) accumulated into
                                                             bf16* dinp_bf16,         // (N, C)
                                                             float* partial,          // (gridDim.x, 3C)
                                                             const bf16* dout,        // (N, C)
                                                             const bf16* inp,         // (N, C)
                                                             const float* weight,     // (C,)
                                                             const float* mean,       // (N,)
                                                             const float* rstd,       // (N,)
                                                             int N, int C) {
    int lane = threadIdx.x % 32, w = threadIdx.x / 32, warps = blockDim.x / 32;
    int W = gridDim.x * warps;
    float* dw = buf + (size_t)w * 3 * C;
    float* db = dw + C;
    float* dr = db + C;
    for (int i = 0; i < CHUNKS; i++) {
        int c = (lane + 32 * i) * 8;
        if (c < C) {
            for (int k = 0; k < 8; k++) dw[c + k] = db[c + k] = dr[c + k] = 0.0f;
        }
    }
    for (int row0 = blockIdx.x * warps + w; row0 < N; row0 += ROWS * W) {
        int4 raw_dout[ROWS][CHUNKS], raw_inp[ROWS][CHUNKS];   // the rows stay in registers, packed
        float old[ROWS][PREFETCH ? CHUNKS : 1][8];           // PREFETCH: the rows' dinp, as loaded
        float m[ROWS], s[ROWS], dnorm_mean[ROWS], dnorm_norm_mean[ROWS];
        load_rows8<ROWS, CHUNKS>(raw_dout, raw_inp, dout, inp, row0, W, N, C);
        if constexpr (PREFETCH) {
            for (int r = 0; r < ROWS; r++) {
                int row = row0 + r * W;
                for (int i = 0; i < CHUNKS; i++) {
                    int c = (lane + 32 * i) * 8;
                    if (row < N && c < C) load8f(old[r][i], dinp + (size_t)row * C + c);
                }
            }
        }
        for (int r = 0; r < ROWS; r++) {   // a row past N is zeros (m = s = 0): it adds 0 to every sum
            int row = row0 + r * W;
            m[r] = row < N ? mean[row] : 0.0f;
            s[r] = row < N ? rstd[row] : 0.0f;
            dnorm_mean[r] = dnorm_norm_mean[r] = 0.0f;
        }
        for (int i = 0; i < CHUNKS; i++) {
            int c = (lane + 32 * i) * 8;
            if (c < C) {
                float wt[8], sw[8], sb[8];
                load8f(wt, weight + c);
                load8f(sw, dw + c);
                load8f(sb, db + c);
                for (int r = 0; r < ROWS; r++) {
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
                store8f(dw + c, sw);
                store8f(db + c, sb);
            }
        }
        for (int r = 0; r < ROWS; r++) {
            dnorm_mean[r] = warpReduceSum(dnorm_mean[r]) / C;
            dnorm_norm_mean[r] = warpReduceSum(dnorm_norm_mean[r]) / C;
        }
        for (int i = 0; i < CHUNKS; i++) {
            int c = (lane + 32 * i) * 8;
            if (c < C) {
                float wt[8], sr[8];
                load8f(wt, weight + c);
                load8f(sr, dr + c);
                for (int r = 0; r < ROWS; r++) {
                    int row = row0 + r * W;
                    if (row >= N) break;
                    size_t at = (size_t)row * C + c;
                    float d[8], x[8], g[8];
                    unpack8(d, raw_dout[r][i]);
                    unpack8(x, raw_inp[r][i]);
                    if constexpr (PREFETCH) {
                        for (int k = 0; k < 8; k++) g[k] = old[r][i][k];
                    } else {
                        load8f(g, dinp + at);
                    }
                    for (int k = 0; k < 8; k++) {
                        float norm = (x[k] - m[r]) * s[r];
                        g[k] += s[r] * (wt[k] * d[k] - dnorm_mean[r] - norm * dnorm_norm_mean[r]);
                        sr[k] += round_bf16(g[k]);     // the value dinp_bf16 gets
                    }
                    store8f(dinp + at, g);
                    store8(dinp_bf16 + at, g);
                }
                store8f(dr + c, sr);
            }
        }
    }
    warp_sums_to_partial(partial, buf, 3 * C);
}

// The two instances the launcher picks from: C <= 1024 two rows at a time, and C <= 2048 one row at a time.
extern "C" __global__ void layernorm_backward_bf16_kernel(float* dinp, bf16* dinp_bf16, float* partial,
                                                         const bf16* dout, const bf16* inp, const float* weight,
                                                         const float* mean, const float* rstd, int N, int C) {
    extern __shared__ float buf[];            // (warps per block, 3C): each warp's dweight, dbias, dres sums
    layernorm_backward_bf16_rows<4, 2, false>(buf, dinp, dinp_bf16, partial, dout, inp, weight, mean, rstd, N, C);
}
extern "C" __global__ void layernorm_backward_bf16_kernel_c2048(float* dinp, bf16* dinp_bf16, float* partial,
                                                               const bf16* dout, const bf16* inp,
                                                               const float* weight, const float* mean,
                                                               const float* rstd, int N, int C) {
    extern __shared__ float buf[];
    layernorm_backward_bf16_rows<8, 1, true>(buf, dinp, dinp_bf16, partial, dout, inp, weight, mean, rstd, N, C);
}
