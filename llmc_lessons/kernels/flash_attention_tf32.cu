// flash_attention_tf32.cu: version 3 of flash attention (lesson 13), TF32 on the tensor cores, for the fp32 model.
//
// Version 2 (flash_attention.cu) runs the algorithm on bf16 data. The fp32 model trains with "float32 + TF32
// matmuls": its products round their inputs to TF32 (10 mantissa bits) and add in float32. This version keeps
// that contract for attention: float32 in and out, each product through mma.sync m16n8k8 on TF32 (mma.cuh),
// inputs rounded to TF32 (cvt.rna) as the fragments are formed, float32 accumulators, softmax in float32.
// The structure is version 2's: 4 warps of 16 rows, each warp's rows kept as A fragments in registers, tiles
// of the other side staged by cp.async into two buffers, the online softmax in base 2, the causal mask on the
// tiles that cross the diagonal only, the last query tiles first, a deterministic two-kernel backward.
//
// What TF32 changes:
//  * k = 8 per instruction (bf16: 16), one value per register, and no ldmatrix (it moves 16-bit values):
//    fragments come from shared memory with plain loads. Tiles are stored HS + 4 floats apart, so the 32 lanes
//    of each load below hit 32 different banks.
//  * The accumulator of q k^T (lane (g, t) holds keys 2t, 2t+1 of rows g, g+8) is not laid out as the A operand
//    of p v (lane (g, t) holds columns t, t+4). So p v numbers its 8 keys differently: A's column t is key 2t and
//    column t+4 is key 2t+1, and B's rows t, t+4 are value rows 2t, 2t+1. p stays in its lane; the same for
//    ds k, p^T do and ds^T q.
//
// Grouped-query attention in place: qkv (B, T, (NH + 2 NKV) HS) holds the NH query heads, then NKV key heads,
// then NKV value heads (GPT-2's (B, T, 3C) when NKV = NH); query head h reads key/value head h / (NH / NKV):
// kv_head(h) of mma.cuh, with GROUP = NH / NKV compiled in as in version 2.
// out (B, T, NH HS); lse (B, NH, T) is L = m + log(l) per row; dqkv has qkv's layout.
//
// flash_attention_forward_tf32_kernel:       out, lse. A block: 64 query rows of one (b, h); key tiles of 32.
// flash_attention_backward_dq_tf32_kernel:   dq, and D_i = dout_i . out_i (float32), written for the next kernel.
// flash_attention_backward_dkdv_tf32_kernel: dk, dv. A block: 64 key rows of one kv head; it walks the query
//   tiles of each query head of its group in turn, so the group's sum runs in a fixed order (no atomics).
// HS is compiled in (-DHS, a multiple of 8, at most 64). Shared memory: 4 tiles of 32 rows, 34 KiB at HS = 64.
#include "common.cuh"
#include "mma.cuh"

#ifndef HS
#define HS 64
#endif
#define FA_ROWS 64                  // rows a block owns (4 warps x 16)
#define FA_THREADS 128
#define KT 32                       // rows per staged tile of the other side
#define S_LD (HS + 4)               // row stride in floats: 4 * an odd number, so rows g = 0..7 start in banks
                                    //   4g' (all different) and the lanes t = 0..3 of a row fill the 3 after
#define TILE (KT * S_LD)            // floats per staged tile

// One warp, one instruction (the tests' check of the layouts): D (16 x 8) = A (16 x 8) @ B (8 x 8) + C from
// row-major float32 matrices, each rounded to TF32 as the lane gathers its fragments. regs (32, 4) holds what
// each lane's accumulator registers held.
extern "C" __global__ void mma_tf32_1688_kernel(float* D, float* regs, const float* A, const float* B, const float* C) {
    int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    unsigned int a[4] = {tf32_bits(A[g * 8 + t]), tf32_bits(A[(g + 8) * 8 + t]), tf32_bits(A[g * 8 + t + 4]),
                         tf32_bits(A[(g + 8) * 8 + t + 4])};
    unsigned int b[2] = {tf32_bits(B[t * 8 + g]), tf32_bits(B[(t + 4) * 8 + g])};
    float d[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
    mma_tf32_1688(d, a, b);
    for (int i = 0; i < 4; i++) regs[lane * 4 + i] = d[i];
    D[g * 8 + 2 * t] = d[0];
    D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2];
    D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// Start copying rows row0 .. row0+n-1 of one head into shared memory, S_LD floats apart: src is row 0 of the
// head, ld floats between rows; rows at or past T become zeros. Consecutive threads copy consecutive 16 bytes.
// The 8 lanes of a 16-byte phase write 8 different 4-bank groups when they stay in one row (HS a multiple of 32,
// as GPT-2's 64); a phase that crosses a row's end is 2-way conflicted.
// Where the block's threads split n rows evenly (HS a power of two, n a multiple of ROWS_PER_PASS), each thread copies the same 16 bytes of every
// ROWS_PER_PASS-th row: its addresses are worked out once, and a tile wholly before T needs no bound check (as
// flash_attention.cu's stage_rows).
#define PIECES (HS / 4)                     // 16-byte pieces in a row
#define ROWS_PER_PASS (FA_THREADS / PIECES) // rows the block's threads copy at once
__device__ __forceinline__ void stage_rows(float* tile, const float* src, int row0, int n, int T, int ld) {
    if (FA_THREADS % PIECES || n % ROWS_PER_PASS) {
        for (int c = threadIdx.x; c < n * PIECES; c += FA_THREADS) {
            int r = c / PIECES, d0 = (c % PIECES) * 4, row = row0 + r;
            cp_async16(tile + r * S_LD + d0, src + (long long)min(row, T - 1) * ld + d0, row < T);
        }
        return;
    }
    int r = threadIdx.x / PIECES, d0 = (threadIdx.x % PIECES) * 4;  // my first row and my piece's column
    float* dst = tile + r * S_LD + d0;
    if (row0 + n <= T) {
        const float* from = src + (long long)(row0 + r) * ld + d0;
        for (int i = 0; i < n / ROWS_PER_PASS; i++)
            cp_async16(dst + i * ROWS_PER_PASS * S_LD, from + (long long)i * ROWS_PER_PASS * ld, true);
    } else {
        for (int i = 0; i < n / ROWS_PER_PASS; i++) {
            int row = row0 + r + i * ROWS_PER_PASS;
            cp_async16(dst + i * ROWS_PER_PASS * S_LD, src + (long long)min(row, T - 1) * ld + d0, row < T);
        }
    }
}

// The warp's A fragments of 16 rows of a staged tile (`rows` at the first), in TF32: frag[kk] covers columns
// 8kk .. 8kk+7. Lane (g, t) reads rows g, g+8 at columns t, t+4: banks 4g' + t, all 32 different.
__device__ __forceinline__ void load_a_frags(unsigned int frag[HS / 8][4], const float* rows) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    for (int kk = 0; kk < HS / 8; kk++) {
        frag[kk][0] = tf32_bits(rows[g * S_LD + 8 * kk + t]);
        frag[kk][1] = tf32_bits(rows[(g + 8) * S_LD + 8 * kk + t]);
        frag[kk][2] = tf32_bits(rows[g * S_LD + 8 * kk + t + 4]);
        frag[kk][3] = tf32_bits(rows[(g + 8) * S_LD + 8 * kk + t + 4]);
    }
}

// acc[n] (16 x 8 each, N of them) = A (16 x HS) @ tile^T over N*8 rows of a tile from `rows`: B[k][n] is
// rows[n][k] (q k^T, do v^T, k q^T, v do^T). Lane (g, t) reads row 8n + g at columns t, t+4: as load_a_frags.
template <int N>
__device__ __forceinline__ void mma_rows(float acc[N][4], const unsigned int a[HS / 8][4], const float* rows) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    for (int n = 0; n < N; n++) {
        for (int i = 0; i < 4; i++) acc[n][i] = 0.0f;
        for (int kk = 0; kk < HS / 8; kk++) {
            unsigned int b[2] = {tf32_bits(rows[(8 * n + g) * S_LD + 8 * kk + t]),
                                 tf32_bits(rows[(8 * n + g) * S_LD + 8 * kk + t + 4])};
            mma_tf32_1688(acc[n], a[kk], b);
        }
    }
}

// acc (16 x HS) += P (16 x 8K, held as K accumulators of 16 x 8) @ rows 0 .. 8K-1 of a tile (p v, ds k,
// p^T do, ds^T q). The k axis of step kk is numbered so that P stays where the accumulator left it: A's column
// t is key 8kk + 2t (the lane's p[kk][0] and p[kk][2]), column t+4 is key 8kk + 2t + 1 (p[kk][1], p[kk][3]);
// B's rows t and t+4 are the tile's rows 8kk + 2t and 8kk + 2t + 1. Lane (g, t) reads column 8n + g of rows
// 2t, 2t+1: banks 8t' + g (S_LD is 4 times odd), all 32 different.
template <int K>
__device__ __forceinline__ void mma_cols(float acc[HS / 8][4], const float p[K][4], const float* tile) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    for (int kk = 0; kk < K; kk++) {
        unsigned int a[4] = {tf32_bits(p[kk][0]), tf32_bits(p[kk][2]), tf32_bits(p[kk][1]), tf32_bits(p[kk][3])};
        const float* r0 = tile + (8 * kk + 2 * t) * S_LD;
        for (int n = 0; n < HS / 8; n++) {
            unsigned int b[2] = {tf32_bits(r0[8 * n + g]), tf32_bits(r0[S_LD + 8 * n + g])};
            mma_tf32_1688(acc[n], a, b);
        }
    }
}

// Write the warp's 16 x HS accumulator as rows row0 .. row0+15 of dst (ld floats apart), row g times scale0 and
// row g+8 times scale1; rows at or past T are skipped.
__device__ __forceinline__ void store_rows(float* dst, const float acc[HS / 8][4], float scale0, float scale1,
                                           int row0, int T, int ld) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    for (int n = 0; n < HS / 8; n++) {
        if (row0 + g < T)
            *reinterpret_cast<float2*>(dst + (long long)(row0 + g) * ld + 8 * n + 2 * t) =
                make_float2(acc[n][0] * scale0, acc[n][1] * scale0);
        if (row0 + g + 8 < T)
            *reinterpret_cast<float2*>(dst + (long long)(row0 + g + 8) * ld + 8 * n + 2 * t) =
                make_float2(acc[n][2] * scale1, acc[n][3] * scale1);
    }
}

extern "C" __global__ void __launch_bounds__(FA_THREADS)
flash_attention_forward_tf32_kernel(float* out,          // (B, T, NH HS)
                                    float* lse,          // (B, NH, T)
                                    const float* qkv,    // (B, T, (NH + 2 NKV) HS)
                                    int B, int T, int NH, int NKV) {
    __shared__ float4 smem[4 * TILE / 4];               // q (64 rows) first; then two buffers of (k, v)
    float* S = (float*)smem;
    int W = (NH + 2 * NKV) * HS, C = NH * HS, tile = gridDim.y - 1 - blockIdx.y;   // the last rows first (mma.cuh)
    int h = blockIdx.x, b = blockIdx.z, kvh = kv_head(h);
    int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    const float* qbase = qkv + (long long)b * T * W + h * HS;
    const float* kbase = qkv + (long long)b * T * W + (NH + kvh) * HS;   // the group's key head
    const float* vbase = kbase + NKV * HS;                               // and its value head
    int first = tile * FA_ROWS + warp * 16, row0 = first + g, row1 = row0 + 8;   // my two query rows
    stage_rows(S, qbase, tile * FA_ROWS, FA_ROWS, T, W);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    unsigned int qa[HS / 8][4];
    load_a_frags(qa, S + warp * 16 * S_LD);
    __syncthreads();                              // q is in registers: its shared memory becomes the buffers
    stage_rows(S, kbase, 0, KT, T, W);            // key tile 0 into buffer 0
    stage_rows(S + TILE, vbase, 0, KT, T, W);
    cp_async_commit();
    const float sl2 = LOG2E / sqrtf((float)HS);   // scores in base 2: exp(x / sqrt(HS)) = exp2(x * sl2)
    float o[HS / 8][4] = {}, m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    int tiles = CEIL_DIV(min(T, (tile + 1) * FA_ROWS), KT);  // keys <= last row
    for (int kt = 0; kt < tiles; kt++) {
        const float* Ks = S + 2 * (kt % 2) * TILE;
        const float* Vs = Ks + TILE;
        if (kt + 1 < tiles) {
            float* next = S + 2 * ((kt + 1) % 2) * TILE;
            stage_rows(next, kbase, (kt + 1) * KT, KT, T, W);
            stage_rows(next + TILE, vbase, (kt + 1) * KT, KT, T, W);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        if (kt * KT <= first + 15) {              // (else the whole tile lies after my 16 rows: nothing to add)
            float s[KT / 8][4];
            mma_rows<KT / 8>(s, qa, Ks);          // s (16 x 32) = q k^T
            bool diagonal = kt * KT + KT - 1 > first;
            float mx[2] = {m[0], m[1]};
            for (int n = 0; n < KT / 8; n++) {
                for (int i = 0; i < 4; i++) {
                    int key = kt * KT + 8 * n + 2 * t + (i & 1), row = i < 2 ? row0 : row1;
                    s[n][i] = (diagonal && key > row) ? NEG_INF : s[n][i] * sl2;
                    mx[i / 2] = fmaxf(mx[i / 2], s[n][i]);
                }
            }
            float alpha[2];
            for (int r = 0; r < 2; r++) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
                alpha[r] = exp2f(m[r] - mx[r]);   // rescales what was summed against the old maximum
                m[r] = mx[r];
                l[r] *= alpha[r];
            }
            for (int n = 0; n < HS / 8; n++)
                for (int i = 0; i < 4; i++) o[n][i] *= alpha[i / 2];
            for (int n = 0; n < KT / 8; n++) {
                for (int i = 0; i < 4; i++) {
                    s[n][i] = exp2f(s[n][i] - m[i / 2]);   // p, unnormalised, in float32
                    l[i / 2] += s[n][i];
                }
            }
            mma_cols<KT / 8>(o, s, Vs);           // o += p v
        }
        __syncthreads();                          // every warp is done with this buffer before it is refilled
    }
    for (int r = 0; r < 2; r++) l[r] = row_sum4(l[r]);
    store_rows(out + (long long)b * T * C + h * HS, o, 1.0f / l[0], 1.0f / l[1], first, T, C);
    if (t == 0) {
        float* L = lse + ((long long)b * NH + h) * T;
        if (row0 < T) L[row0] = (m[0] + log2f(l[0])) / LOG2E;
        if (row1 < T) L[row1] = (m[1] + log2f(l[1])) / LOG2E;
    }
}

// One 16 x 32 piece of the backward, in place: s holds q k^T and dp holds do v^T on entry; on exit s holds
// p = exp(s / sqrt(HS) - L) (0 where masked) and dp holds ds = p (dp - D). masked(n, i), L2(n, i) (L in
// base 2) and D(n, i) describe lane element i of 16 x 8 tile n.
template <typename Masked, typename RowL, typename RowD>
__device__ __forceinline__ void softmax_grad(float s[KT / 8][4], float dp[KT / 8][4], Masked masked, RowL L2,
                                             RowD D) {
    const float sl2 = LOG2E / sqrtf((float)HS);
    for (int n = 0; n < KT / 8; n++) {
        for (int i = 0; i < 4; i++) {
            float p = exp2f(s[n][i] * sl2 - L2(n, i));   // every lane reads its L (no branch around the load)
            p = masked(n, i) ? 0.0f : p;
            s[n][i] = p;
            dp[n][i] = p * (dp[n][i] - D(n, i));
        }
    }
}

extern "C" __global__ void __launch_bounds__(FA_THREADS)
flash_attention_backward_dq_tf32_kernel(float* dqkv,          // (B, T, (NH + 2 NKV) HS): the dq part
                                        float* Dout,          // (B, NH, T): D_i = dout_i . out_i
                                        const float* dout,    // (B, T, NH HS)
                                        const float* qkv,     // (B, T, (NH + 2 NKV) HS)
                                        const float* out,     // (B, T, NH HS)
                                        const float* lse,     // (B, NH, T)
                                        int B, int T, int NH, int NKV) {
    __shared__ float4 smem[4 * TILE / 4];               // dout, out (then q) of my 64 rows; then two buffers of (k, v)
    float* S = (float*)smem;
    int W = (NH + 2 * NKV) * HS, C = NH * HS, tile = gridDim.y - 1 - blockIdx.y;   // the last rows first
    int h = blockIdx.x, b = blockIdx.z, kvh = kv_head(h);
    int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    const float* qbase = qkv + (long long)b * T * W + h * HS;
    const float* kbase = qkv + (long long)b * T * W + (NH + kvh) * HS;
    const float* vbase = kbase + NKV * HS;
    long long bhT = ((long long)b * NH + h) * T;
    int first = tile * FA_ROWS + warp * 16, row0 = first + g, row1 = row0 + 8;
    // D in float32 from dout and out as they are; then my rows of dout and q as TF32 A fragments
    stage_rows(S, dout + (long long)b * T * C + h * HS, tile * FA_ROWS, FA_ROWS, T, C);
    stage_rows(S + 2 * TILE, out + (long long)b * T * C + h * HS, tile * FA_ROWS, FA_ROWS, T, C);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    const float* dOs = S + warp * 16 * S_LD;
    const float* Os = S + 2 * TILE + warp * 16 * S_LD;
    float D[2] = {0.0f, 0.0f};                    // rowsum(dout * out) for rows g and g+8
    for (int c = t; c < HS; c += 4) {
        D[0] += dOs[g * S_LD + c] * Os[g * S_LD + c];
        D[1] += dOs[(g + 8) * S_LD + c] * Os[(g + 8) * S_LD + c];
    }
    unsigned int doa[HS / 8][4], qa[HS / 8][4];
    load_a_frags(doa, dOs);
    __syncthreads();
    stage_rows(S, qbase, tile * FA_ROWS, FA_ROWS, T, W);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    load_a_frags(qa, S + warp * 16 * S_LD);
    __syncthreads();
    stage_rows(S, kbase, 0, KT, T, W);            // key tile 0 into buffer 0
    stage_rows(S + TILE, vbase, 0, KT, T, W);
    cp_async_commit();
    float L2[2];
    dq_row_stats(D, L2, Dout + bhT, lse + bhT, row0, row1, T);
    float dq[HS / 8][4] = {};
    int tiles = CEIL_DIV(min(T, (tile + 1) * FA_ROWS), KT);
    for (int kt = 0; kt < tiles; kt++) {
        const float* Ks = S + 2 * (kt % 2) * TILE;
        const float* Vs = Ks + TILE;
        if (kt + 1 < tiles) {
            float* next = S + 2 * ((kt + 1) % 2) * TILE;
            stage_rows(next, kbase, (kt + 1) * KT, KT, T, W);
            stage_rows(next + TILE, vbase, (kt + 1) * KT, KT, T, W);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        if (kt * KT <= first + 15) {
            float s[KT / 8][4], dp[KT / 8][4];
            mma_rows<KT / 8>(s, qa, Ks);          // s = q k^T
            mma_rows<KT / 8>(dp, doa, Vs);        // dp = do v^T
            bool diagonal = kt * KT + KT - 1 > first;
            softmax_grad(s, dp,
                [&](int n, int i) { return diagonal && kt * KT + 8 * n + 2 * t + (i & 1) > (i < 2 ? row0 : row1); },
                [&](int, int i) { return L2[i / 2]; }, [&](int, int i) { return D[i / 2]; });
            mma_cols<KT / 8>(dq, dp, Ks);         // dq += ds k
        }
        __syncthreads();
    }
    const float scale = 1.0f / sqrtf((float)HS);
    store_rows(dqkv + (long long)b * T * W + h * HS, dq, scale, scale, first, T, W);
}

extern "C" __global__ void __launch_bounds__(FA_THREADS)
flash_attention_backward_dkdv_tf32_kernel(float* dqkv,          // (B, T, (NH + 2 NKV) HS): the dk and dv parts
                                          const float* dout,    // (B, T, NH HS)
                                          const float* qkv,     // (B, T, (NH + 2 NKV) HS)
                                          const float* lse,     // (B, NH, T)
                                          const float* Dq,      // (B, NH, T), from the dq kernel
                                          int B, int T, int NH, int NKV) {
    __shared__ float4 smem[4 * TILE / 4];               // k, v of my 64 rows first; then two buffers of (q, dout)
    __shared__ float Ls[2][KT], Ds[2][KT];              // and of their rows' L (base 2) and D
    float* S = (float*)smem;
    int W = (NH + 2 * NKV) * HS, C = NH * HS, tile = blockIdx.y;   // key tile; the first ones see the most queries
    int kvh = blockIdx.x, b = blockIdx.z;
    int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    const float* kbase = qkv + (long long)b * T * W + (NH + kvh) * HS;
    const float* vbase = kbase + NKV * HS;
    int first = tile * FA_ROWS + warp * 16, key0 = first + g, key1 = key0 + 8;   // my two key rows
    unsigned int ka[HS / 8][4], va[HS / 8][4];
    stage_rows(S, kbase, tile * FA_ROWS, FA_ROWS, T, W);
    stage_rows(S + 2 * TILE, vbase, tile * FA_ROWS, FA_ROWS, T, W);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    load_a_frags(ka, S + warp * 16 * S_LD);
    load_a_frags(va, S + 2 * TILE + warp * 16 * S_LD);
    __syncthreads();
    // the steps: for each query head h of the group (in order), the query tiles from this key tile to the end
    int qt0 = tile * FA_ROWS / KT, per_head = CEIL_DIV(T, KT) - qt0, steps = GROUP * per_head;
    auto stage = [&](int step) {                  // step's (q, dout, L, D) into buffer step % 2
        int buf = step % 2, h = kvh * GROUP + step / per_head, q0 = (qt0 + step % per_head) * KT;
        long long bhT = ((long long)b * NH + h) * T;
        stage_rows(S + 2 * buf * TILE, qkv + (long long)b * T * W + h * HS, q0, KT, T, W);
        stage_rows(S + (2 * buf + 1) * TILE, dout + (long long)b * T * C + h * HS, q0, KT, T, C);
        if (threadIdx.x < KT) {
            int row = q0 + threadIdx.x;
            Ls[buf][threadIdx.x] = row < T ? lse[bhT + row] * LOG2E : 0.0f;
            Ds[buf][threadIdx.x] = row < T ? Dq[bhT + row] : 0.0f;
        }
    };
    stage(0);
    cp_async_commit();
    float dk[HS / 8][4] = {}, dv[HS / 8][4] = {};
    for (int step = 0; step < steps; step++) {
        int buf = step % 2, q0 = (qt0 + step % per_head) * KT;
        const float* Qs = S + 2 * buf * TILE;
        const float* dOs = Qs + TILE;
        if (step + 1 < steps) stage(step + 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        if (q0 + KT - 1 >= first) {               // (else the whole tile lies before my 16 keys: nothing to add)
            float st[KT / 8][4], dpt[KT / 8][4];  // s^T (my 16 keys x 32 queries) and dp^T
            mma_rows<KT / 8>(st, ka, Qs);         // s^T = k q^T
            mma_rows<KT / 8>(dpt, va, dOs);       // dp^T = v do^T
            auto col = [&](int n, int i) { return 8 * n + 2 * t + (i & 1); };   // query within the tile
            softmax_grad(st, dpt,
                [&](int n, int i) { int q = q0 + col(n, i); return q >= T || q < (i < 2 ? key0 : key1); },
                [&](int n, int i) { return Ls[buf][col(n, i)]; }, [&](int n, int i) { return Ds[buf][col(n, i)]; });
            mma_cols<KT / 8>(dv, st, dOs);        // dv += p^T do
            mma_cols<KT / 8>(dk, dpt, Qs);        // dk += ds^T q
        }
        __syncthreads();
    }
    const float scale = 1.0f / sqrtf((float)HS);
    float* drow = dqkv + (long long)b * T * W + (NH + kvh) * HS;
    store_rows(drow, dk, scale, scale, first, T, W);
    store_rows(drow + NKV * HS, dv, 1.0f, 1.0f, first, T, W);
}
