// Probe: the version 4 forward with its tile copies changed. PROBE_MODE 0: as in the package (stage_rows);
// 1: stage_rows_fast (each thread's piece and row offsets computed once); 2: no key/value copies inside the loop
// (wrong results: the bound of what the copies cost).
#include "flash_attention.cu"
#ifndef PROBE_MODE
#define PROBE_MODE 0
#endif
#define PIECES (HS / 8)
#define ROWS_PER_PASS (FA_THREADS / PIECES)
__device__ __forceinline__ void stage_rows_fast(bf16* tile, const bf16* src, int row0, int T, int ld) {
    int r = threadIdx.x / PIECES, d0 = (threadIdx.x % PIECES) * 8;
    bf16* s = tile + tile_index(r, d0);
    if (row0 + FA_ROWS <= T) {
        const bf16* g = src + (long long)(row0 + r) * ld + d0;
        #pragma unroll
        for (int i = 0; i < FA_ROWS / ROWS_PER_PASS; i++)
            cp_async16(s + i * ROWS_PER_PASS * S_LD, g + (long long)i * ROWS_PER_PASS * ld, true);
    } else {
        #pragma unroll
        for (int i = 0; i < FA_ROWS / ROWS_PER_PASS; i++) {
            int row = row0 + r + i * ROWS_PER_PASS;
            cp_async16(s + i * ROWS_PER_PASS * S_LD, src + (long long)min(row, T - 1) * ld + d0, row < T);
        }
    }
}
#if PROBE_MODE == 1
#define STAGE stage_rows_fast
#else
#define STAGE stage_rows
#endif

extern "C" __global__ void __launch_bounds__(FA_THREADS, 4)
fwd_probe_kernel(bf16* out, float* lse, const bf16* qkv, int B, int T, int NH, int NKV) {
    __shared__ __align__(1024) int4 smem[5 * TILE / 8];
    bf16* Qs = (bf16*)smem;
    bf16* Ks = Qs + TILE;
    bf16* Vs = Qs + 3 * TILE;
    int C = NH * HS, W = (NH + 2 * NKV) * HS;
    int tile = gridDim.x - 1 - blockIdx.x;
    int h = blockIdx.y, b = blockIdx.z, warp = threadIdx.x / 32, t = threadIdx.x % 4, g = (threadIdx.x % 32) / 4;
    const bf16* qbase = qkv + (long long)b * T * W + h * HS;
    const bf16* kbase = qkv + (long long)b * T * W + C + kv_head(h) * HS;
    const bf16* vbase = kbase + NKV * HS;
    int row0 = tile * FA_ROWS + warp * 16 + g, row1 = row0 + 8;
    const float sl2 = LOG2E / sqrtf((float)HS);
    float o[HS / 8][4] = {}, m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f}, alpha[2];
    float s[FA_ROWS / 8][4];
    unsigned int qa[HS / 16][4], pa[FA_ROWS / 16][4];
    STAGE(Qs, qbase, tile * FA_ROWS, T, W);
    STAGE(Ks, kbase, 0, T, W);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    if (tile > 0) STAGE(Ks + TILE, kbase, FA_ROWS, T, W);
    STAGE(Vs, vbase, 0, T, W);
    cp_async_commit();
    load_a_frags(qa, Qs + warp * 16 * S_LD);
    mma_rows<FA_ROWS / 8>(s, qa, Ks);
    online_softmax(s, m, l, alpha, sl2, tile == 0, 0, row0, row1);
    pack_p<FA_ROWS / 16>(pa, s);
    for (int kt = 1; kt <= tile; kt++) {
        cp_async_wait<0>();
        __syncthreads();
#if PROBE_MODE != 2
        if (kt < tile) STAGE(Ks + ((kt + 1) % 2) * TILE, kbase, (kt + 1) * FA_ROWS, T, W);
        STAGE(Vs + (kt % 2) * TILE, vbase, kt * FA_ROWS, T, W);
#else
        if (kt == 1) STAGE(Vs + TILE, vbase, FA_ROWS, T, W);
#endif
        cp_async_commit();
        mma_rows_start<FA_ROWS / 8>(s, qa, Ks + (kt % 2) * TILE);
        mma_cols_start<FA_ROWS / 16>(o, pa, Vs + ((kt - 1) % 2) * TILE, 0);
        wgmma_wait<1, FA_ROWS>(s);
        online_softmax(s, m, l, alpha, sl2, kt == tile, kt * FA_ROWS, row0, row1);
        wgmma_wait<0, HS>(o);
        wgmma_keep<FA_ROWS / 16>(pa);
        for (int n = 0; n < HS / 8; n++)
            for (int i = 0; i < 4; i++) o[n][i] *= alpha[i / 2];
        pack_p<FA_ROWS / 16>(pa, s);
    }
    cp_async_wait<0>();
    __syncthreads();
    mma_cols_start<FA_ROWS / 16>(o, pa, Vs + (tile % 2) * TILE, 0);
    wgmma_wait<0, HS>(o);
    wgmma_keep<FA_ROWS / 16>(pa);
    for (int r = 0; r < 2; r++) l[r] = row_sum4(l[r]);
    float unused[HS / 8][2];
    store_rows(out + (long long)b * T * C + h * HS, o, 1.0f / l[0], 1.0f / l[1], tile * FA_ROWS + warp * 16, T, C,
               unused);
    if (t == 0) {
        float* L = lse + ((long long)b * NH + h) * T;
        if (row0 < T) L[row0] = (m[0] * sl2 + log2f(l[0])) / LOG2E;
        if (row1 < T) L[row1] = (m[1] * sl2 + log2f(l[1])) / LOG2E;
    }
}
