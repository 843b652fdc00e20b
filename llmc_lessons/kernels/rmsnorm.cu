// rmsnorm.cu: RMSNorm over the channels of every (b, t) row, forward and backward (LLaMA's LayerNorm).
//
//   forward:  rstd = 1 / sqrt((1/C) sum_c x_c^2 + eps),   norm_c = x_c * rstd,   out_c = norm_c * weight_c
//   backward: dnorm_c = dout_c * weight_c
//             dinp_c  = rstd * (dnorm_c - norm_c * mean_c'(dnorm * norm))
//             dweight_c = sum over rows of dout_c * norm_c
//
// Shapes: the B*T rows are handled as N = B*T independent rows of C floats.
//   inp, out, dout, dinp (N, C); weight, dweight (C,); rstd (N,).
//
// rmsnorm_forward_kernel is one warp per row, as layernorm_forward_kernel2: lane l reads channels l, l+32, ...
//   (coalesced) and warpReduceSum adds the 32 partial sums of squares. One pass fewer than LayerNorm: no mean.
// rmsnorm_backward_kernel is one warp per row, computing dinp (written, not accumulated).
// rmsnorm_param_backward_kernel is one thread per channel c, adding dout * norm down its column: neighbouring
//   threads read neighbouring channels (coalesced). C threads alone (768 for GPT-2's size) would leave most of
//   a GPU idle, so the rows are split among the R block rows of a 2-D grid, each leaving its partial sums in a
//   row of (R, C); rmsnorm_param_reduce_kernel adds them in order into dweight. No atomics: the same bits on
//   every run.
// rmsnorm_backward_kernel2 does both in one pass, a row per warp held in registers (C <= 1024, C % 4 == 0), as
//   layernorm_backward_kernel2 (lesson 12) does: the launcher's default where it fits.
#include "common.cuh"

// ---------------------------------------------------------------------------------------------------------
// Forward

extern "C" __global__ void rmsnorm_forward_kernel(float* out,           // (N, C)
                                                  float* rstd,          // (N,)
                                                  const float* inp,     // (N, C)
                                                  const float* weight,  // (C,)
                                                  int N, int C, float eps) {
    int lane = threadIdx.x % 32;                      // 0..31: this thread's place in its warp
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // one warp per row
    if (row >= N) { return; }                         // the whole warp leaves together: shuffles stay safe
    const float* x = inp + row * C;                   // seek to this row: inp[row, :]
    float* o = out + row * C;
    float sumsq = 0.0f;                               // this lane's share of sum_c x_c^2
    for (int c = lane; c < C; c += 32) { sumsq += x[c] * x[c]; }
    sumsq = warpReduceSum(sumsq);                     // every lane now holds the row's total
    float s = rsqrtf(sumsq / C + eps);                // 1 / root mean square
    for (int c = lane; c < C; c += 32) { o[c] = x[c] * s * weight[c]; }
    if (lane == 0) { rstd[row] = s; }                 // cached for the backward pass
}

// ---------------------------------------------------------------------------------------------------------
// Backward

extern "C" __global__ void rmsnorm_backward_kernel(float* dinp,          // (N, C)
                                                   const float* dout,    // (N, C)
                                                   const float* inp,     // (N, C)
                                                   const float* weight,  // (C,)
                                                   const float* rstd,    // (N,)
                                                   int N, int C) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // one warp per row
    if (row >= N) { return; }
    const float* x = inp + row * C;
    const float* dy = dout + row * C;
    float s = rstd[row];
    float dot = 0.0f;                                 // this lane's share of sum_c dnorm_c * norm_c
    for (int c = lane; c < C; c += 32) { dot += dy[c] * weight[c] * x[c] * s; }
    float dnorm_norm_mean = warpReduceSum(dot) / C;
    float* dx = dinp + row * C;
    for (int c = lane; c < C; c += 32) {
        float norm = x[c] * s;
        dx[c] = s * (dy[c] * weight[c] - norm * dnorm_norm_mean);
    }
}

extern "C" __global__ void rmsnorm_param_backward_kernel(float* partial,       // (gridDim.y, C)
                                                         const float* dout,    // (N, C)
                                                         const float* inp,     // (N, C)
                                                         const float* rstd,    // (N,)
                                                         int N, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;    // one thread per channel
    if (c >= C) { return; }
    float sum = 0.0f;
    for (int row = blockIdx.y; row < N; row += gridDim.y) {   // block row y: rows y, y + R, ... in order
        sum += dout[row * C + c] * inp[row * C + c] * rstd[row];
    }
    partial[blockIdx.y * C + c] = sum;
}

// dweight[c] += the R partial sums of channel c, added in the order 0, 1, ..., R - 1: deterministic.
extern "C" __global__ void rmsnorm_param_reduce_kernel(float* dweight,        // (C,)
                                                       const float* partial,  // (R, C)
                                                       int R, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) { return; }
    float sum = 0.0f;
    for (int r = 0; r < R; r++) { sum += partial[r * C + c]; }
    dweight[c] += sum;
}

// rmsnorm_backward_kernel2: dinp and the partial dweight sums in one pass over dout and inp. One warp per row,
// looping over rows (row = warp, warp + W, ...); the lane's share of dout and inp is loaded as float4s into
// registers, all at once (C <= 4 * 32 * RMS_BWD_CHUNKS = 1024 and C % 4 == 0), so a row costs one wait for
// memory and each input is read once. dinp is WRITTEN. Each warp sums its rows' dout * norm in registers; at
// the end the block's warps add theirs in order through shared memory into row blockIdx.x of (gridDim.x, C)
// partial sums, which column_sum_add_kernel (layernorm.cu) adds in order: deterministic.
#define RMS_BWD_CHUNKS 8

extern "C" __global__ void rmsnorm_backward_kernel2(float* dinp,          // (N, C) written
                                                    float* partial,       // (gridDim.x, C)
                                                    const float* dout,    // (N, C)
                                                    const float* inp,     // (N, C)
                                                    const float* weight,  // (C,)
                                                    const float* rstd,    // (N,)
                                                    int N, int C) {
    extern __shared__ float buf[];              // (warps per block, C): one warp's sums per row of buf
    int lane = threadIdx.x % 32, w = threadIdx.x / 32, warps = blockDim.x / 32;
    int W = gridDim.x * warps;
    float4 dw[RMS_BWD_CHUNKS];
    for (int i = 0; i < RMS_BWD_CHUNKS; i++) dw[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int row = blockIdx.x * warps + w; row < N; row += W) {
        const float4* dy = (const float4*)(dout + (size_t)row * C);
        const float4* x = (const float4*)(inp + (size_t)row * C);
        float s = rstd[row];
        float4 d[RMS_BWD_CHUNKS], n[RMS_BWD_CHUNKS];
        for (int i = 0; i < RMS_BWD_CHUNKS; i++) {   // every load of the row first
            int c4 = lane + 32 * i;
            if (c4 * 4 < C) {
                d[i] = dy[c4];
                n[i] = x[c4];
            }
        }
        float dot = 0.0f;                       // this lane's share of sum_c dnorm_c * norm_c
        for (int i = 0; i < RMS_BWD_CHUNKS; i++) {
            int c4 = lane + 32 * i;
            if (c4 * 4 >= C) break;
            float4 wt = ((const float4*)weight)[c4];
            n[i] = make_float4(n[i].x * s, n[i].y * s, n[i].z * s, n[i].w * s);   // norm
            dot += wt.x * d[i].x * n[i].x + wt.y * d[i].y * n[i].y + wt.z * d[i].z * n[i].z + wt.w * d[i].w * n[i].w;
            dw[i].x += d[i].x * n[i].x; dw[i].y += d[i].y * n[i].y;
            dw[i].z += d[i].z * n[i].z; dw[i].w += d[i].w * n[i].w;
        }
        float dnorm_norm_mean = warpReduceSum(dot) / C;
        float4* dx = (float4*)(dinp + (size_t)row * C);
        for (int i = 0; i < RMS_BWD_CHUNKS; i++) {
            int c4 = lane + 32 * i;
            if (c4 * 4 >= C) break;
            float4 wt = ((const float4*)weight)[c4];
            dx[c4] = make_float4(s * (wt.x * d[i].x - n[i].x * dnorm_norm_mean),
                                 s * (wt.y * d[i].y - n[i].y * dnorm_norm_mean),
                                 s * (wt.z * d[i].z - n[i].z * dnorm_norm_mean),
                                 s * (wt.w * d[i].w - n[i].w * dnorm_norm_mean));
        }
    }
    for (int i = 0; i < RMS_BWD_CHUNKS; i++) {
        int c4 = lane + 32 * i;
        if (c4 * 4 >= C) break;
        ((float4*)(buf + w * C))[c4] = dw[i];
    }
    warp_sums_to_partial(partial, buf, C);
}

// =========================================================================================================
// bf16: stored in bfloat16, computed in float32 (kernels/bf16.cuh has the conversions). The statistics
// (rstd) and the weight stay float32 and the weight's gradient is bf16, as in the bf16 training step of lesson 14.
//
// rmsnorm_forward_bf16_kernel: rmsnorm_forward_kernel on bf16 rows, rounding once on the store.
// residual_rmsnorm_forward_bf16_kernel: residual = inp1 + inp2, then its RMSNorm, in one pass (as
//   residual_layernorm_forward_bf16_kernel of layernorm.cu, without the biases).
// rmsnorm_backward_bf16_kernel: dinp and dweight in one pass, as layernorm_backward_bf16_kernel (layernorm.cu,
//   whose comment tells how it was tuned), with one reduction and one column sum fewer.
// =========================================================================================================
#include "bf16.cuh"

extern "C" __global__ void rmsnorm_forward_bf16_kernel(bf16* out,            // (N, C)
                                                       float* rstd,          // (N,)
                                                       const bf16* inp,      // (N, C)
                                                       const float* weight,  // (C,)
                                                       int N, int C, float eps) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // one warp per row
    if (row >= N) { return; }
    const bf16* x = inp + row * C;
    float sumsq = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float v = bf16_to_float(x[c]);
        sumsq += v * v;
    }
    float s = rsqrtf(warpReduceSum(sumsq) / C + eps);
    for (int c = lane; c < C; c += 32) { out[row * C + c] = bf16_from_float(bf16_to_float(x[c]) * s * weight[c]); }
    if (lane == 0) { rstd[row] = s; }
}

// residual = inp1 + inp2 (added in float32, rounded once to bf16), then out = rmsnorm(residual): the residual
// connection fused with the RMSNorm that reads its result. One warp per row, the lane's 8-value chunks
// (lane + 32 i) * 8 of both inputs loaded at once through 16-byte loads (C a multiple of 8, at most
// CHUNKS * 256) and kept in registers: the sum of squares and the output come from them, no second trip to
// memory. The statistics are of the bf16-rounded residual that is stored.
template <int CHUNKS>
__device__ __forceinline__ void residual_rmsnorm_forward_bf16_rows(bf16* residual,       // (N, C)
                                                                   bf16* out,            // (N, C)
                                                                   float* rstd,          // (N,)
                                                                   const bf16* inp1,     // (N, C)
                                                                   const bf16* inp2,     // (N, C)
                                                                   const float* weight,  // (C,)
                                                                   int N, int C, float eps) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;                       // the whole warp leaves together
    size_t base = (size_t)row * C;
    int4 raw1[1][CHUNKS], raw2[1][CHUNKS];
    load_rows8<1, CHUNKS>(raw1, raw2, inp1, inp2, row, 0, N, C);   // every load of the row first, then the arithmetic
    float r[CHUNKS][8];
    float sumsq = 0.0f;
    for (int i = 0; i < CHUNKS; i++) {
        int c = (lane + 32 * i) * 8;
        if (c < C) {
            float b[8];
            unpack8(r[i], raw1[0][i]);
            unpack8(b, raw2[0][i]);
            for (int k = 0; k < 8; k++) {
                r[i][k] = round_bf16(r[i][k] + b[k]);
                sumsq += r[i][k] * r[i][k];
            }
            store8(residual + base + c, r[i]);
        }
    }
    float s = rsqrtf(warpReduceSum(sumsq) / C + eps);
    for (int i = 0; i < CHUNKS; i++) {
        int c = (lane + 32 * i) * 8;
        if (c < C) {
            float wt[8];
            load8f(wt, weight + c);
            for (int k = 0; k < 8; k++) r[i][k] = r[i][k] * s * wt[k];
            store8(out + base + c, r[i]);
        }
    }
    if (lane == 0) rstd[row] = s;
}

// The two instances the launcher picks from: C <= 1024, and C <= 2048.
extern "C" __global__ void residual_rmsnorm_forward_bf16_kernel(bf16* residual, bf16* out, float* rstd,
                                                                const bf16* inp1, const bf16* inp2,
                                                                const float* weight, int N, int C, float eps) {
    residual_rmsnorm_forward_bf16_rows<4>(residual, out, rstd, inp1, inp2, weight, N, C, eps);
}
extern "C" __global__ void residual_rmsnorm_forward_bf16_kernel_c2048(bf16* residual, bf16* out, float* rstd,
                                                                      const bf16* inp1, const bf16* inp2,
                                                                      const float* weight, int N, int C,
                                                                      float eps) {
    residual_rmsnorm_forward_bf16_rows<8>(residual, out, rstd, inp1, inp2, weight, N, C, eps);
}

// The RMSNorm backward on bf16 dout and inp, a warp per row, each warp taking ROWS rows at a time (rows r,
// r + W, with W the grid's warps; then r + 2W, ...), the lane's 8-value chunks (lane + 32 i) * 8 of each row
// loaded at once into registers through 16-byte loads (C a multiple of 8, at most CHUNKS * 256). dinp is the
// float32 gradient of the residual stream and is ACCUMULATED into; dinp_bf16 gets its new value in bf16 for
// the matmul backward before it. dweight's column sums: lane `lane` adds its rows' dout * norm into its own
// slots of its warp's row of buf (shared memory): no other thread touches them, no atomics. At the end the
// block's warps add theirs in order into row blockIdx.x of partial, and column_sum_add_bf16_kernel (layernorm.cu)
// adds those rows in order: the same bits on every run of the same launch.
template <int CHUNKS, int ROWS>
__device__ __forceinline__ void rmsnorm_backward_bf16_rows(float* buf,            // shared: (warps, C)
                                                           float* dinp,           // (N, C) accumulated into
                                                           bf16* dinp_bf16,       // (N, C)
                                                           float* partial,        // (gridDim.x, C)
                                                           const bf16* dout,      // (N, C)
                                                           const bf16* inp,       // (N, C)
                                                           const float* weight,   // (C,)
                                                           const float* rstd,     // (N,)
                                                           int N, int C) {
    int lane = threadIdx.x % 32, w = threadIdx.x / 32, warps = blockDim.x / 32;
    int W = gridDim.x * warps;
    float* dw = buf + (size_t)w * C;
    for (int i = 0; i < CHUNKS; i++) {
        int c = (lane + 32 * i) * 8;
        if (c < C) {
            for (int k = 0; k < 8; k++) dw[c + k] = 0.0f;
        }
    }
    for (int row0 = blockIdx.x * warps + w; row0 < N; row0 += ROWS * W) {
        int4 raw_dout[ROWS][CHUNKS], raw_inp[ROWS][CHUNKS];   // the rows stay in registers, packed
        float s[ROWS], dnorm_norm_mean[ROWS];
        load_rows8<ROWS, CHUNKS>(raw_dout, raw_inp, dout, inp, row0, W, N, C);
        for (int r = 0; r < ROWS; r++) {   // a row past N is zeros (s = 0): it adds 0 to every sum
            int row = row0 + r * W;
            s[r] = row < N ? rstd[row] : 0.0f;
            dnorm_norm_mean[r] = 0.0f;
        }
        for (int i = 0; i < CHUNKS; i++) {
            int c = (lane + 32 * i) * 8;
            if (c < C) {
                float wt[8], sw[8];
                load8f(wt, weight + c);
                load8f(sw, dw + c);
                for (int r = 0; r < ROWS; r++) {
                    float d[8], x[8];
                    unpack8(d, raw_dout[r][i]);
                    unpack8(x, raw_inp[r][i]);
                    for (int k = 0; k < 8; k++) {
                        float norm = x[k] * s[r];
                        dnorm_norm_mean[r] += wt[k] * d[k] * norm;
                        sw[k] += d[k] * norm;
                    }
                }
                store8f(dw + c, sw);
            }
        }
        for (int r = 0; r < ROWS; r++) dnorm_norm_mean[r] = warpReduceSum(dnorm_norm_mean[r]) / C;
        for (int i = 0; i < CHUNKS; i++) {
            int c = (lane + 32 * i) * 8;
            if (c < C) {
                float wt[8];
                load8f(wt, weight + c);
                for (int r = 0; r < ROWS; r++) {
                    int row = row0 + r * W;
                    if (row >= N) break;
                    size_t at = (size_t)row * C + c;
                    float d[8], x[8], g[8];
                    unpack8(d, raw_dout[r][i]);
                    unpack8(x, raw_inp[r][i]);
                    load8f(g, dinp + at);
                    for (int k = 0; k < 8; k++) g[k] += s[r] * (wt[k] * d[k] - x[k] * s[r] * dnorm_norm_mean[r]);
                    store8f(dinp + at, g);
                    store8(dinp_bf16 + at, g);
                }
            }
        }
    }
    warp_sums_to_partial(partial, buf, C);
}

// The two instances the launcher picks from, as layernorm_backward_bf16_kernel's: C <= 1024 two rows at a
// time, and C <= 2048 one row at a time.
extern "C" __global__ void rmsnorm_backward_bf16_kernel(float* dinp, bf16* dinp_bf16, float* partial,
                                                        const bf16* dout, const bf16* inp, const float* weight,
                                                        const float* rstd, int N, int C) {
    extern __shared__ float buf[];            // (warps per block, C): each warp's dweight sums
    rmsnorm_backward_bf16_rows<4, 2>(buf, dinp, dinp_bf16, partial, dout, inp, weight, rstd, N, C);
}
extern "C" __global__ void rmsnorm_backward_bf16_kernel_c2048(float* dinp, bf16* dinp_bf16, float* partial,
                                                              const bf16* dout, const bf16* inp,
                                                              const float* weight, const float* rstd, int N,
                                                              int C) {
    extern __shared__ float buf[];
    rmsnorm_backward_bf16_rows<8, 1>(buf, dinp, dinp_bf16, partial, dout, inp, weight, rstd, N, C);
}
