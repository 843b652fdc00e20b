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
