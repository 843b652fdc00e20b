// flash_attention.cu: causal self-attention that never stores the T x T matrices (lesson 13).
//
// Layouts as in attention.cu (lesson 05): qkv (B, T, 3C) holds [q | k | v] along its last axis, head h at
// channels h*hs .. h*hs+hs-1 of each; out (B, T, C). Instead of att (B, NH, T, T) the forward keeps
// L (B, NH, T), the log of each row's softmax denominator, from which the backward recomputes any
// probability: p[i, j] = exp(q_i . k_j * scale - L_i).
//
// flash_attention_forward_kernel: a block owns Br = blockDim.x query rows of one (b, h); thread t owns query
//   row i. The block walks the key/value rows in tiles of Bc = blockDim.x rows staged in shared memory; each
//   thread keeps a running maximum m, a running sum l and an output accumulator o (hs floats in registers)
//   and rescales l and o by exp(m_old - m_new) whenever the maximum grows (the online softmax).
// flash_attention_backward_kv_kernel: a block owns Bc key rows of one (b, h); thread t owns key row j and
//   accumulates dk_j and dv_j over the query rows i >= j, staged in tiles in shared memory.
// flash_attention_backward_q_kernel: a block owns Br query rows; thread t accumulates dq_i over the key rows
//   j <= i. Two kernels instead of atomicAdd on dq: every sum runs in a fixed order (deterministic).
// All three need D_i = dout_i . out_i (computed by the launcher) and hs <= HS_MAX.
#include "common.cuh"

#define HS_MAX 64

extern "C" __global__ void flash_attention_forward_kernel(float* out,        // (B, T, C)
                                                          float* L,          // (B, NH, T)
                                                          const float* qkv,  // (B, T, 3C)
                                                          int B, int T, int NH, int hs, float scale) {
    extern __shared__ float smem[];                   // K tile (Bc, hs), then V tile (Bc, hs)
    int Bc = blockDim.x;
    float* Ks = smem;
    float* Vs = smem + Bc * hs;
    int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    int C = NH * hs, C3 = 3 * C;
    const float* base = qkv + (long long)b * T * C3;  // seek to batch b
    int i = blockIdx.x * blockDim.x + threadIdx.x;    // my query row
    float q[HS_MAX], o[HS_MAX];
    for (int d = 0; d < hs; d++) {
        q[d] = i < T ? base[i * C3 + h * hs + d] * scale : 0.0f;  // the 1/sqrt(hs) scale folded into q
        o[d] = 0.0f;
    }
    float m = NEG_INF;                                // running maximum of my scores
    float l = 0.0f;                                   // running sum of exp(score - m)
    int last = min(T, (int)(blockIdx.x + 1) * (int)blockDim.x) - 1;  // the block's last query row: later keys are masked
    for (int j0 = 0; j0 <= last; j0 += Bc) {
        int j = j0 + threadIdx.x;                     // each thread stages one key row and one value row
        for (int d = 0; d < hs; d++) {
            Ks[threadIdx.x * hs + d] = j < T ? base[j * C3 + C + h * hs + d] : 0.0f;
            Vs[threadIdx.x * hs + d] = j < T ? base[j * C3 + 2 * C + h * hs + d] : 0.0f;
        }
        __syncthreads();
        int n = i < T ? min(Bc, i - j0 + 1) : 0;      // causal: keys j0 .. i of this tile (none past my row)
        if (n > 0) {
            float tile_max = NEG_INF;
            for (int jj = 0; jj < n; jj++) {
                float s = 0.0f;
                for (int d = 0; d < hs; d++) s += q[d] * Ks[jj * hs + d];
                tile_max = fmaxf(tile_max, s);
            }
            float m_new = fmaxf(m, tile_max);
            float correction = expf(m - m_new);       // exp(-inf) = 0 on the first tile
            l *= correction;
            for (int d = 0; d < hs; d++) o[d] *= correction;
            m = m_new;
            for (int jj = 0; jj < n; jj++) {
                float s = 0.0f;
                for (int d = 0; d < hs; d++) s += q[d] * Ks[jj * hs + d];
                float p = expf(s - m);
                l += p;
                for (int d = 0; d < hs; d++) o[d] += p * Vs[jj * hs + d];
            }
        }
        __syncthreads();                              // the tile is consumed before the next one overwrites it
    }
    if (i < T) {
        for (int d = 0; d < hs; d++) out[((long long)b * T + i) * C + h * hs + d] = o[d] / l;
        L[(long long)bh * T + i] = m + logf(l);
    }
}

extern "C" __global__ void flash_attention_backward_kv_kernel(float* dqkv,         // (B, T, 3C): dk, dv parts
                                                              const float* dout,   // (B, T, C)
                                                              const float* qkv,    // (B, T, 3C)
                                                              const float* L,      // (B, NH, T)
                                                              const float* D,      // (B, NH, T)
                                                              int B, int T, int NH, int hs, float scale) {
    extern __shared__ float smem[];                   // Q tile (Br, hs), dO tile (Br, hs), L and D (Br each)
    int Br = blockDim.x;
    float* Qs = smem;
    float* dOs = smem + Br * hs;
    float* Ls = smem + 2 * Br * hs;
    float* Ds = Ls + Br;
    int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    int C = NH * hs, C3 = 3 * C;
    const float* base = qkv + (long long)b * T * C3;
    const float* dbase = dout + (long long)b * T * C;
    int j = blockIdx.x * blockDim.x + threadIdx.x;    // my key row
    float k[HS_MAX], v[HS_MAX], dk[HS_MAX], dv[HS_MAX];
    for (int d = 0; d < hs; d++) {
        k[d] = j < T ? base[j * C3 + C + h * hs + d] : 0.0f;
        v[d] = j < T ? base[j * C3 + 2 * C + h * hs + d] : 0.0f;
        dk[d] = 0.0f;
        dv[d] = 0.0f;
    }
    for (int i0 = blockIdx.x * blockDim.x; i0 < T; i0 += Br) {  // query rows at or after the block's first key
        int i = i0 + threadIdx.x;
        for (int d = 0; d < hs; d++) {
            Qs[threadIdx.x * hs + d] = i < T ? base[i * C3 + h * hs + d] : 0.0f;
            dOs[threadIdx.x * hs + d] = i < T ? dbase[i * C + h * hs + d] : 0.0f;
        }
        Ls[threadIdx.x] = i < T ? L[(long long)bh * T + i] : 0.0f;
        Ds[threadIdx.x] = i < T ? D[(long long)bh * T + i] : 0.0f;
        __syncthreads();
        if (j < T) {
            for (int ii = 0; ii < Br && i0 + ii < T; ii++) {
                if (i0 + ii < j) continue;            // causal: query i sees key j only when j <= i
                float s = 0.0f, dp = 0.0f;
                for (int d = 0; d < hs; d++) {
                    s += Qs[ii * hs + d] * k[d];
                    dp += dOs[ii * hs + d] * v[d];
                }
                float p = expf(s * scale - Ls[ii]);   // the forward's probability, recomputed
                float ds = p * (dp - Ds[ii]);         // the softmax backward, with D_i = sum_j p_ij dp_ij
                for (int d = 0; d < hs; d++) {
                    dv[d] += p * dOs[ii * hs + d];
                    dk[d] += ds * Qs[ii * hs + d] * scale;
                }
            }
        }
        __syncthreads();
    }
    if (j < T) {
        for (int d = 0; d < hs; d++) {
            dqkv[((long long)b * T + j) * C3 + C + h * hs + d] = dk[d];
            dqkv[((long long)b * T + j) * C3 + 2 * C + h * hs + d] = dv[d];
        }
    }
}

extern "C" __global__ void flash_attention_backward_q_kernel(float* dqkv,         // (B, T, 3C): the dq part
                                                             const float* dout,   // (B, T, C)
                                                             const float* qkv,    // (B, T, 3C)
                                                             const float* L,      // (B, NH, T)
                                                             const float* D,      // (B, NH, T)
                                                             int B, int T, int NH, int hs, float scale) {
    extern __shared__ float smem[];                   // K tile (Bc, hs), then V tile (Bc, hs)
    int Bc = blockDim.x;
    float* Ks = smem;
    float* Vs = smem + Bc * hs;
    int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    int C = NH * hs, C3 = 3 * C;
    const float* base = qkv + (long long)b * T * C3;
    int i = blockIdx.x * blockDim.x + threadIdx.x;    // my query row
    float q[HS_MAX], dO[HS_MAX], dq[HS_MAX];
    for (int d = 0; d < hs; d++) {
        q[d] = i < T ? base[i * C3 + h * hs + d] : 0.0f;
        dO[d] = i < T ? dout[((long long)b * T + i) * C + h * hs + d] : 0.0f;
        dq[d] = 0.0f;
    }
    float Li = i < T ? L[(long long)bh * T + i] : 0.0f;
    float Di = i < T ? D[(long long)bh * T + i] : 0.0f;
    int last = min(T, (int)(blockIdx.x + 1) * (int)blockDim.x) - 1;
    for (int j0 = 0; j0 <= last; j0 += Bc) {
        int j = j0 + threadIdx.x;
        for (int d = 0; d < hs; d++) {
            Ks[threadIdx.x * hs + d] = j < T ? base[j * C3 + C + h * hs + d] : 0.0f;
            Vs[threadIdx.x * hs + d] = j < T ? base[j * C3 + 2 * C + h * hs + d] : 0.0f;
        }
        __syncthreads();
        int n = i < T ? min(Bc, i - j0 + 1) : 0;
        for (int jj = 0; jj < n; jj++) {
            float s = 0.0f, dp = 0.0f;
            for (int d = 0; d < hs; d++) {
                s += q[d] * Ks[jj * hs + d];
                dp += dO[d] * Vs[jj * hs + d];
            }
            float ds = expf(s * scale - Li) * (dp - Di);
            for (int d = 0; d < hs; d++) dq[d] += ds * Ks[jj * hs + d] * scale;
        }
        __syncthreads();
    }
    if (i < T) {
        for (int d = 0; d < hs; d++) dqkv[((long long)b * T + i) * C3 + h * hs + d] = dq[d];
    }
}

// ---------------------------------------------------------------------------------------------------------
// Version 2: bf16 on the tensor cores (GPT2(precision="bf16") and Llama(precision="bf16") use it).
//
// The same algorithm, with every product on the tensor cores (mma.cuh: a warp computes a 16 x 8 tile of a
// product per instruction). A block of 4 warps owns 64 rows: queries in the forward and the dq kernel, keys
// in the dk/dv kernel. Each warp owns 16 of them and keeps their q (or k and v, or dout) as A fragments in
// registers for the whole kernel. The other side walks in tiles of 64 rows through shared memory, two
// buffers deep: cp.async brings in tile i + 1 while the warps compute on tile i. ldmatrix reads the
// fragments from the tiles, transposed where a product needs a tile along its other axis (p v, ds k, ...),
// so nothing is ever transposed in memory. The head size HS is a compile-time constant (-DHS=64 for GPT-2;
// a multiple of 16), so every loop over it unrolls into registers.
//
// Layouts as version 1, in bf16, with grouped-query attention (lesson 16): NKV key/value heads, NKV dividing
// NH. qkv (B, T, W), W = (NH + 2 NKV) HS, holds the NH query heads, then the NKV key heads, then the NKV value
// heads along its last axis (W = 3C for GPT-2, NKV = NH), its bias already added. Query head h reads key/value
// head h / GROUP (kv_head), found once at the start of a block; GROUP = NH / NKV is a compile-time constant like
// HS (-DGROUP=1 for GPT-2). out and dout (B, T, C); dqkv (B, T, W) gets dq, dk and dv in place, ready for the
// qkv matmul's backward; lse (B, NH, T) float32 is L.
//
// flash_attention_forward_bf16_kernel:       out, lse; a block per (query head, query tile, b), the grid's x, y
//                                            and z (mma.cuh, "The order of the blocks").
// flash_attention_backward_dq_bf16_kernel:   dq, and D_i = dout_i . out_i, written for the next kernel; a block
//                                            per (query head, query tile, b).
// flash_attention_backward_dkdv_bf16_kernel: dk, dv (launched second: it reads D); a block per (key/value head,
//                                            key tile, b) walks the GROUP query heads of its group
//                                            in order and sums their dk and dv in registers: every key/value
//                                            gradient has one block, so no atomics and a fixed order.
// Both also leave the column sums of the dqkv values they store (a row of partial (B * tiles, W) per block
// and part): summed over the rows by column_sum_add_bf16_kernel (layernorm.cu), that is the qkv bias's gradient, taken
// without reading dqkv again.
#include "mma.cuh"

#ifndef HS
#define HS 64
#endif
#define FA_ROWS 64                  // rows a block owns, and rows per tile
#define FA_THREADS 128              // 4 warps x 16 rows
#if FA_WGMMA                        // version 4: tiles in wgmma's 128-byte swizzled layout (mma.cuh): rows of
#define S_LD HS                     //   HS = 64 values, the 16-byte piece c of row r stored as piece c ^ (r % 8)
static_assert(HS == 64, "version 4's tiles have rows of 128 bytes: HS = 64");
__device__ __forceinline__ int tile_index(int r, int c) { return r * HS + (((c / 8) ^ (r % 8)) * 8) + c % 8; }
#else
#define S_LD (HS + 8)               // row stride of a tile in shared memory: 16 bytes of padding put the 8
                                    //   rows that one ldmatrix reads in 8 different banks
__device__ __forceinline__ int tile_index(int r, int c) { return r * S_LD + c; }
#endif
#define TILE (FA_ROWS * S_LD)       // bf16 values per tile
// The causal mask runs on the tiles that need it only (the diagonal one; in the dkdv kernel also rows past T).
// Version 4 once ran it on every tile: its forward as first written (each product waited for before the softmax,
// bbba60f) gave, with the mask behind the diagonal tile's branch, results wrong on every query tile after the
// first, the same wrong bits in every run, on an H100; why was not found. The forward as it is now (the products
// overlapping the softmax) and the two backward kernels give version 2's bits with the branch, and run 2-5%
// faster for it (the variants, measured on an H100: 29db388).

// One warp, one instruction (lesson 13's picture of the fragments): D (16 x 8) = A (16 x 16) @ B (16 x 8) + C
// from row-major matrices, each lane gathering its fragments as mma.cuh lays them out. D comes back
// row-major, and regs (32, 4) holds what each lane's 4 accumulator registers held.
__device__ __forceinline__ unsigned int two_bf16(bf16 lo, bf16 hi) { return (unsigned int)lo | ((unsigned int)hi << 16); }

extern "C" __global__ void mma_bf16_16816_kernel(float* D, float* regs, const bf16* A, const bf16* B, const float* C) {
    int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    unsigned int a[4] = {two_bf16(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]),
                         two_bf16(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]),
                         two_bf16(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]),
                         two_bf16(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9])};
    unsigned int b[2] = {two_bf16(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]),
                         two_bf16(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g])};
    float d[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
    mma_bf16_16816(d, a, b);
    for (int i = 0; i < 4; i++) regs[lane * 4 + i] = d[i];
    D[g * 8 + 2 * t] = d[0];
    D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2];
    D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// Start copying rows row0 .. row0+63 of one head into a tile: src is row 0 of this (b, h), ld elements
// apart; rows at or past T become zeros. Consecutive threads copy consecutive 16-byte pieces of a row (in either
// layout to 8 different bank groups). Where the block's threads split a row evenly (HS = 16, 32, 64), each thread
// copies the same piece of every ROWS_PER_PASS-th row, so its two addresses are worked out once and then step by
// a constant, and a tile that lies wholly before T (every tile but the last) needs no bound check: computed for
// every piece, as in the loop below, the addresses were a quarter of the forward's time on an H100.
#define PIECES (HS / 8)                     // 16-byte pieces in a row of a tile
#define ROWS_PER_PASS (FA_THREADS / PIECES) // rows the block's threads copy at once
#if FA_WGMMA
static_assert(ROWS_PER_PASS % 8 == 0, "a thread's rows are 8k apart: its piece keeps its swizzled place");
#endif
__device__ __forceinline__ void stage_rows(bf16* tile, const bf16* src, int row0, int T, int ld) {
    if (FA_THREADS % PIECES || FA_ROWS % ROWS_PER_PASS) {           // HS = 48: pieces a thread in turn
        for (int c = threadIdx.x; c < FA_ROWS * PIECES; c += FA_THREADS) {
            int r = c / PIECES, d0 = (c % PIECES) * 8, row = row0 + r;
            cp_async16(tile + tile_index(r, d0), src + (long long)min(row, T - 1) * ld + d0, row < T);
        }
        return;
    }
    int r = threadIdx.x / PIECES, d0 = (threadIdx.x % PIECES) * 8;  // my first row and my piece's column
    bf16* dst = tile + tile_index(r, d0);
    if (row0 + FA_ROWS <= T) {
        const bf16* from = src + (long long)(row0 + r) * ld + d0;
        for (int i = 0; i < FA_ROWS / ROWS_PER_PASS; i++)
            cp_async16(dst + i * ROWS_PER_PASS * S_LD, from + (long long)i * ROWS_PER_PASS * ld, true);
    } else {
        for (int i = 0; i < FA_ROWS / ROWS_PER_PASS; i++) {
            int row = row0 + r + i * ROWS_PER_PASS;
            cp_async16(dst + i * ROWS_PER_PASS * S_LD, src + (long long)min(row, T - 1) * ld + d0, row < T);
        }
    }
}

// The warp's A fragments of 16 rows of a tile, `rows` pointing at the first: frag[kk] covers columns
// 16kk .. 16kk+15 (ldmatrix matrices: rows 0-7 | 8-15 x columns 0-7 | 8-15).
__device__ __forceinline__ void load_a_frags(unsigned int frag[HS / 16][4], const bf16* rows) {
    int lane = threadIdx.x % 32;
    for (int kk = 0; kk < HS / 16; kk++)
        ldmatrix_x4(frag[kk], rows + tile_index(lane % 8 + 8 * ((lane / 8) % 2), 16 * kk + 8 * (lane / 16)));
}

// P (16 x 16K, held as 2K accumulators of 16 x 8) rounded to bf16 as K A operands of 16 x 16: the accumulator
// layout of two neighbouring 16 x 8 tiles is the A layout of one 16 x 16 operand.
template <int K>
__device__ __forceinline__ void pack_p(unsigned int a[K][4], const float p[2 * K][4]) {
    for (int kk = 0; kk < K; kk++) {
        a[kk][0] = pack_bf16x2(p[2 * kk][0], p[2 * kk][1]);
        a[kk][1] = pack_bf16x2(p[2 * kk][2], p[2 * kk][3]);
        a[kk][2] = pack_bf16x2(p[2 * kk + 1][0], p[2 * kk + 1][1]);
        a[kk][3] = pack_bf16x2(p[2 * kk + 1][2], p[2 * kk + 1][3]);
    }
}

#if FA_WGMMA
// Version 4: the same two products as below, each a batch of wgmma instructions of the whole warpgroup (the
// block's 4 warps; every call below is made by all of them together, on the same tile). In a tile, the next
// atom of 8 rows is 1024 bytes on.
// The _start forms issue the batch and return at once: the caller waits (wgmma_wait) before reading acc, and keeps
// a (wgmma_keep) until then.
template <int N>
__device__ __forceinline__ void mma_rows_start(float acc[N][4], const unsigned int a[HS / 16][4], const bf16* rows) {
    wgmma_fence<8 * N>(acc);
    for (int kk = 0; kk < HS / 16; kk++)          // B (k: 16 channels, n: N*8 rows) is K-major in the tile
        wgmma_bf16<8 * N, false>(acc, a[kk], rows, 32 * kk, 1024, kk > 0);
    wgmma_commit();
}

template <int N>
__device__ __forceinline__ void mma_rows(float acc[N][4], const unsigned int a[HS / 16][4], const bf16* rows) {
    mma_rows_start<N>(acc, a, rows);
    wgmma_wait<0, 8 * N>(acc);
}

template <int K>
__device__ __forceinline__ void mma_cols_start(float acc[HS / 8][4], const unsigned int a[K][4], const bf16* tile,
                                               int k0) {
    wgmma_fence<HS>(acc);
    for (int kk = 0; kk < K; kk++)                // B (k: 16 rows, n: HS channels) is MN-major in the tile
        wgmma_bf16<HS, true>(acc, a[kk], tile, (k0 + 16 * kk) * 128, 1024, true);
    wgmma_commit();
}

template <int K>
__device__ __forceinline__ void mma_cols(float acc[HS / 8][4], const float p[2 * K][4], const bf16* tile, int k0) {
    unsigned int a[K][4];                         // every A fragment first: an asynchronous wgmma reads its A
    pack_p<K>(a, p);                              // registers until the batch is waited for, so none is reused
    mma_cols_start<K>(acc, a, tile, k0);
    wgmma_wait<0, HS>(acc);
    wgmma_keep<K>(a);
}
#else
// acc[n] (16 x 8 each, N of them) = A (16 x HS) @ tile^T over N*8 rows of a tile from `rows`: B[k][n] is
// tile[n][k], so each ldmatrix gives the B fragments of two 8-row groups (q k^T, do v^T, k q^T, v do^T).
template <int N>
__device__ __forceinline__ void mma_rows(float acc[N][4], const unsigned int a[HS / 16][4], const bf16* rows) {
    int lane = threadIdx.x % 32;
    for (int n = 0; n < N; n++)
        for (int i = 0; i < 4; i++) acc[n][i] = 0.0f;
    for (int n = 0; n < N; n += 2) {
        for (int kk = 0; kk < HS / 16; kk++) {
            unsigned int b[4];
            ldmatrix_x4(b, rows + (8 * n + lane % 8 + 8 * (lane / 16)) * S_LD + 16 * kk + 8 * ((lane / 8) % 2));
            mma_bf16_16816(acc[n], a[kk], b);
            mma_bf16_16816(acc[n + 1], a[kk], b + 2);
        }
    }
}

// acc (16 x HS) += P (16 x 16K, held as 2K accumulators of 16 x 8) @ rows k0 .. k0+16K-1 of a tile: B[k][n]
// is tile[k0 + k][n], read with the transposed ldmatrix (p v, p^T do, ds k, ds^T q), P rounded to bf16 (pack_p).
// mma_cols_step is one 16-row step of it: acc += A (16 x 16, fragments a) @ rows k0 .. k0+15 of the tile.
__device__ __forceinline__ void mma_cols_step(float acc[HS / 8][4], const unsigned int a[4], const bf16* tile, int k0) {
    int lane = threadIdx.x % 32;
    for (int n = 0; n < HS / 8; n += 2) {
        unsigned int b[4];
        ldmatrix_x4_trans(b, tile + (k0 + lane % 8 + 8 * ((lane / 8) % 2)) * S_LD + 8 * n + 8 * (lane / 16));
        mma_bf16_16816(acc[n], a, b);
        mma_bf16_16816(acc[n + 1], a, b + 2);
    }
}

template <int K>
__device__ __forceinline__ void mma_cols(float acc[HS / 8][4], const float p[2 * K][4], const bf16* tile, int k0) {
    for (int kk = 0; kk < K; kk++) {
        unsigned int a[1][4];
        pack_p<1>(a, p + 2 * kk);
        mma_cols_step(acc, a[0], tile, k0 + 16 * kk);
    }
}

// mma.sync has nothing to start: the _start forms compute at once (the forward kernel is written for version 4's
// overlap, and runs the same steps in the same order here).
template <int N>
__device__ __forceinline__ void mma_rows_start(float acc[N][4], const unsigned int a[HS / 16][4], const bf16* rows) {
    mma_rows<N>(acc, a, rows);
}

template <int K>
__device__ __forceinline__ void mma_cols_start(float acc[HS / 8][4], const unsigned int a[K][4], const bf16* tile,
                                               int k0) {
    for (int kk = 0; kk < K; kk++) mma_cols_step(acc, a[kk], tile, k0 + 16 * kk);
}
#endif

// Write the warp's 16 x HS accumulator as bf16 rows row0 .. row0+15 of dst (ld apart), row g times scale0
// and row g+8 times scale1; rows at or past T are skipped. colsum[n][e] gets the thread's share of the column
// sums of what was written (column 8n + 2t + e, its two rows, the values as stored in bf16).
__device__ __forceinline__ void store_rows(bf16* dst, const float acc[HS / 8][4], float scale0, float scale1,
                                           int row0, int T, int ld, float colsum[HS / 8][2]) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    for (int n = 0; n < HS / 8; n++) {
        colsum[n][0] = colsum[n][1] = 0.0f;
        if (row0 + g < T) {
            unsigned int two = pack_bf16x2(acc[n][0] * scale0, acc[n][1] * scale0);
            *reinterpret_cast<unsigned int*>(dst + (long long)(row0 + g) * ld + 8 * n + 2 * t) = two;
            colsum[n][0] += bf16_lo(two);
            colsum[n][1] += bf16_hi(two);
        }
        if (row0 + g + 8 < T) {
            unsigned int two = pack_bf16x2(acc[n][2] * scale1, acc[n][3] * scale1);
            *reinterpret_cast<unsigned int*>(dst + (long long)(row0 + g + 8) * ld + 8 * n + 2 * t) = two;
            colsum[n][0] += bf16_lo(two);
            colsum[n][1] += bf16_hi(two);
        }
    }
}

// The block's column sums of a 64 x HS piece that its 4 warps wrote with store_rows, into partial[0 .. HS-1]:
// each warp adds its 8 row groups (lanes t, t + 4, ..., shuffles), then warp 0's, 1's, 2's and 3's sums are
// added in that order. Deterministic. sums: (4, HS) floats of shared memory.
__device__ __forceinline__ void block_column_sums(float* partial, float colsum[HS / 8][2], float* sums) {
    int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    for (int n = 0; n < HS / 8; n++) {
        for (int e = 0; e < 2; e++) {
            float v = colsum[n][e];
            for (int offset = 4; offset < 32; offset *= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
            if (g == 0) sums[warp * HS + 8 * n + 2 * t + e] = v;
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < HS; c += blockDim.x)
        partial[c] = sums[c] + sums[HS + c] + sums[2 * HS + c] + sums[3 * HS + c];
}

// One step of the online softmax for the warp's rows row0 and row1 (g and g + 8 of its 16): s, the 16 x 64
// scores of key tile kt (unscaled), becomes p = 2^(s sl2 - m sl2) with m the new running maximum; l, the running
// sums, and alpha, the factor that rescales what was summed against the old maximum. mask: the tile holds keys
// past a row (the diagonal tile): the causal mask runs there.
__device__ __forceinline__ void online_softmax(float s[FA_ROWS / 8][4], float m[2], float l[2], float alpha[2],
                                               float sl2, bool mask, int k0, int row0, int row1) {
    int t = threadIdx.x % 4;
    if (mask) {
        for (int n = 0; n < FA_ROWS / 8; n++)
            for (int i = 0; i < 4; i++)
                if (k0 + 8 * n + 2 * t + (i & 1) > (i < 2 ? row0 : row1)) s[n][i] = NEG_INF;
    }
    float mx[2] = {m[0], m[1]};                   // the running maximum, of unscaled scores (sl2 > 0 keeps order)
    for (int n = 0; n < FA_ROWS / 8; n++)
        for (int i = 0; i < 4; i++) mx[i / 2] = fmaxf(mx[i / 2], s[n][i]);
    float msl2[2];
    for (int r = 0; r < 2; r++) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        alpha[r] = fast_exp2((m[r] - mx[r]) * sl2);
        m[r] = mx[r];
        msl2[r] = mx[r] * sl2;
        l[r] *= alpha[r];
    }
    for (int n = 0; n < FA_ROWS / 8; n++) {
        for (int i = 0; i < 4; i++) {
            s[n][i] = fast_exp2(fmaf(s[n][i], sl2, -msl2[i / 2]));   // p, unnormalised: one FFMA, one exp
            l[i / 2] += s[n][i];                    // this lane's part of the row sum
        }
    }
}

// A block per (head, 64-row query tile, b), the 4 warps 16 rows each, walking the key tiles 0 .. tile. The
// products of one key tile overlap the softmax of another: with the scores s of tile kt - 1 turned into p, the
// block starts s = q k^T of tile kt and o += p v of tile kt - 1 together (version 4's wgmma runs them while the
// warps go on), waits for s only, computes its softmax, then waits for o and rescales it. Every key and value
// tile is copied in a whole step before it is needed (two buffers of each), while the block computes.
extern "C" __global__ void __launch_bounds__(FA_THREADS, 4)
flash_attention_forward_bf16_kernel(bf16* out,          // (B, T, C)
                                    float* lse,         // (B, NH, T)
                                    const bf16* qkv,    // (B, T, W), W = (NH + 2 NKV) HS
                                    int B, int T, int NH, int NKV) {
    __shared__ __align__(1024) int4 smem[5 * TILE / 8];                 // q, two key tiles, two value tiles
    bf16* Qs = (bf16*)smem;
    bf16* Ks = Qs + TILE;                               // key tile kt in Ks + (kt % 2) TILE
    bf16* Vs = Qs + 3 * TILE;                           // value tile kt in Vs + (kt % 2) TILE
    int C = NH * HS, W = (NH + 2 * NKV) * HS;
    int tile = gridDim.y - 1 - blockIdx.y;              // the last rows first: they see the most keys (mma.cuh)
    int h = blockIdx.x, b = blockIdx.z, warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    const bf16* qbase = qkv + (long long)b * T * W + h * HS;                      // q of (b, 0, h)
    const bf16* kbase = qkv + (long long)b * T * W + C + kv_head(h) * HS;         // k of its key/value head
    const bf16* vbase = kbase + NKV * HS;                                         // and v
    int row0 = tile * FA_ROWS + warp * 16 + g, row1 = row0 + 8;      // my two query rows
    const float sl2 = LOG2E / sqrtf((float)HS);   // scores in base 2: exp(x / sqrt(HS)) = exp2(x * sl2)
    float o[HS / 8][4] = {}, m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f}, alpha[2];  // per row: running max, sum
    float s[FA_ROWS / 8][4];
    unsigned int qa[HS / 16][4], pa[FA_ROWS / 16][4];   // q's and p's A fragments
    stage_rows(Qs, qbase, tile * FA_ROWS, T, W);
    stage_rows(Ks, kbase, 0, T, W);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    if (tile > 0) stage_rows(Ks + TILE, kbase, FA_ROWS, T, W);       // key tile 1 and value tile 0 come in
    stage_rows(Vs, vbase, 0, T, W);                                   // during tile 0's scores and softmax
    cp_async_commit();
    load_a_frags(qa, Qs + warp * 16 * S_LD);
    mma_rows<FA_ROWS / 8>(s, qa, Ks);                                 // key tile 0 alone: nothing to overlap
    online_softmax(s, m, l, alpha, sl2, tile == 0, 0, row0, row1);
    pack_p<FA_ROWS / 16>(pa, s);
    for (int kt = 1; kt <= tile; kt++) {
        cp_async_wait<0>();                       // key tile kt and value tile kt - 1 have arrived,
        __syncthreads();                          // for every warp; and every warp is done with key tile kt - 1
        // key tile kt + 1 goes where key tile kt - 1 was, value tile kt where value tile kt - 2 was: both read
        // by products that have finished
        if (kt < tile) stage_rows(Ks + ((kt + 1) % 2) * TILE, kbase, (kt + 1) * FA_ROWS, T, W);
        stage_rows(Vs + (kt % 2) * TILE, vbase, kt * FA_ROWS, T, W);
        cp_async_commit();
        mma_rows_start<FA_ROWS / 8>(s, qa, Ks + (kt % 2) * TILE);                        // s = q k^T
        mma_cols_start<FA_ROWS / 16>(o, pa, Vs + ((kt - 1) % 2) * TILE, 0);              // o += p v, tile kt - 1
        wgmma_wait<1, FA_ROWS>(s);                // s has finished (o may still be running)
        online_softmax(s, m, l, alpha, sl2, kt == tile, kt * FA_ROWS, row0, row1);
        wgmma_wait<0, HS>(o);
        wgmma_keep<FA_ROWS / 16>(pa);             // tile kt - 1's p is read until here
        for (int n = 0; n < HS / 8; n++)
            for (int i = 0; i < 4; i++) o[n][i] *= alpha[i / 2];
        pack_p<FA_ROWS / 16>(pa, s);
    }
    cp_async_wait<0>();                           // the last value tile
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

// The two products of the flash kernels, alone, on one 64 x HS tile Q (query rows) and one K (key rows): S = Q K^T
// (64 x 64, mma_rows<8>), S32 = Q K[32:64]^T (64 x 32, mma_rows<4> from row 32) and O = bf16(S) K (64 x HS,
// mma_cols<4>), written row-major. One block of FA_THREADS threads; version 2 or 4 (FA_WGMMA) as compiled.
extern "C" __global__ void __launch_bounds__(FA_THREADS)
flash_products_kernel(float* S, float* S32, float* O, const bf16* Q, const bf16* K) {
    __shared__ __align__(1024) int4 smem[2 * TILE / 8];
    bf16* Qs = (bf16*)smem;
    bf16* Ks = Qs + TILE;
    stage_rows(Qs, Q, 0, FA_ROWS, HS);
    stage_rows(Ks, K, 0, FA_ROWS, HS);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    unsigned int qa[HS / 16][4];
    load_a_frags(qa, Qs + warp * 16 * S_LD);
    float s[8][4], s32[4][4], o[HS / 8][4] = {};
    mma_rows<8>(s, qa, Ks);
    mma_rows<4>(s32, qa, Ks + 32 * S_LD);
    mma_cols<4>(o, s, Ks, 0);
    auto put = [&](float* dst, int ld, int n, int i, float v) {
        dst[(16 * warp + g + 8 * (i / 2)) * ld + 8 * n + 2 * t + i % 2] = v;
    };
    for (int i = 0; i < 4; i++) {
        for (int n = 0; n < 8; n++) put(S, 64, n, i, s[n][i]);
        for (int n = 0; n < 4; n++) put(S32, 32, n, i, s32[n][i]);
        for (int n = 0; n < HS / 8; n++) put(O, HS, n, i, o[n][i]);
    }
}

// One 16 x 32 piece of the backward, in place: s holds q k^T and dp holds do v^T on entry; on exit s holds
// p = exp(s / sqrt(HS) - L) (0 where masked) and dp holds ds = p (dp - D). masked(n, i), L2(n, i) (L in
// base 2) and D(n, i) describe lane element i of 16 x 8 tile n. MASK = false for the tiles that no mask
// touches (most of them), which then skip the index arithmetic.
template <bool MASK, typename Masked, typename RowL, typename RowD>
__device__ __forceinline__ void softmax_grad(float s[4][4], float dp[4][4], Masked masked, RowL L2, RowD D) {
    const float sl2 = LOG2E / sqrtf((float)HS);
    for (int n = 0; n < 4; n++) {
        for (int i = 0; i < 4; i++) {
            float p = (MASK && masked(n, i)) ? 0.0f : fast_exp2(fmaf(s[n][i], sl2, -L2(n, i)));
            s[n][i] = p;
            dp[n][i] = p * (dp[n][i] - D(n, i));
        }
    }
}

extern "C" __global__ void __launch_bounds__(FA_THREADS, 4)
flash_attention_backward_dq_bf16_kernel(bf16* dqkv,          // (B, T, W): the dq part
                                        float* partial,      // (B * tiles, W): the dq part's column sums
                                        float* Dout,         // (B, NH, T): D_i = dout_i . out_i
                                        const bf16* dout,    // (B, T, C)
                                        const bf16* qkv,     // (B, T, W), W = (NH + 2 NKV) HS
                                        const bf16* out,     // (B, T, C)
                                        const float* lse,    // (B, NH, T)
                                        int B, int T, int NH, int NKV) {
    __shared__ __align__(1024) int4 smem[4 * TILE / 8];                 // two buffers of (k, v)
    bf16* S = (bf16*)smem;
    int C = NH * HS, W = (NH + 2 * NKV) * HS, tile = gridDim.y - 1 - blockIdx.y;   // the last rows first
    int h = blockIdx.x, b = blockIdx.z, warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    const bf16* qbase = qkv + (long long)b * T * W + h * HS;                      // q of (b, 0, h)
    const bf16* kbase = qkv + (long long)b * T * W + C + kv_head(h) * HS;         // k of its key/value head
    const bf16* vbase = kbase + NKV * HS;                                         // and v
    const bf16* dbase = dout + (long long)b * T * C + h * HS;
    long long bhT = ((long long)b * NH + h) * T;
    int first = tile * FA_ROWS + warp * 16, row0 = first + g, row1 = row0 + 8;
    // my rows of q, dout and out as A fragments, staged through the buffers before the loop needs them
    unsigned int qa[HS / 16][4], doa[HS / 16][4], oa[HS / 16][4];
    stage_rows(S, qbase, tile * FA_ROWS, T, W);
    stage_rows(S + TILE, dbase, tile * FA_ROWS, T, C);
    stage_rows(S + 2 * TILE, out + (long long)b * T * C + h * HS, tile * FA_ROWS, T, C);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    load_a_frags(qa, S + warp * 16 * S_LD);
    load_a_frags(doa, S + TILE + warp * 16 * S_LD);
    load_a_frags(oa, S + 2 * TILE + warp * 16 * S_LD);
    __syncthreads();
    stage_rows(S, kbase, 0, T, W);                // key tile 0 into buffer 0
    stage_rows(S + TILE, vbase, 0, T, W);
    cp_async_commit();
    float D[2] = {0.0f, 0.0f};                    // rowsum(dout * out): registers 0, 2 hold row g, 1, 3 row g+8
    for (int kk = 0; kk < HS / 16; kk++)
        for (int j = 0; j < 4; j++)
            D[j % 2] += bf16_lo(doa[kk][j]) * bf16_lo(oa[kk][j]) + bf16_hi(doa[kk][j]) * bf16_hi(oa[kk][j]);
    float L2[2];
    dq_row_stats(D, L2, Dout + bhT, lse + bhT, row0, row1, T);
    float dq[HS / 8][4] = {};
    for (int kt = 0; kt <= tile; kt++) {
        const bf16* Ks = S + 2 * (kt % 2) * TILE;
        const bf16* Vs = Ks + TILE;
        if (kt < tile) {
            bf16* next = S + 2 * ((kt + 1) % 2) * TILE;
            stage_rows(next, kbase, (kt + 1) * FA_ROWS, T, W);
            stage_rows(next + TILE, vbase, (kt + 1) * FA_ROWS, T, W);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        for (int half = 0; half < 2; half++) {    // 32 keys at a time keeps s and dp in registers
            int k0 = 32 * half;
            float s[4][4], dp[4][4];
            mma_rows<4>(s, qa, Ks + k0 * S_LD);    // s = q k^T
            mma_rows<4>(dp, doa, Vs + k0 * S_LD);  // dp = do v^T
            auto masked = [&](int n, int i) { return kt * FA_ROWS + k0 + 8 * n + 2 * t + (i & 1) > (i < 2 ? row0 : row1); };
            auto rowL = [&](int, int i) { return L2[i / 2]; };
            auto rowD = [&](int, int i) { return D[i / 2]; };
            if (kt == tile) softmax_grad<true>(s, dp, masked, rowL, rowD);   // diagonal: keys past a row
            else softmax_grad<false>(s, dp, masked, rowL, rowD);
            mma_cols<2>(dq, dp, Ks, k0);           // dq += ds k
        }
        __syncthreads();
    }
    const float scale = 1.0f / sqrtf((float)HS);
    float colsum[HS / 8][2];
    store_rows(dqkv + (long long)b * T * W + h * HS, dq, scale, scale, first, T, W, colsum);
    block_column_sums(partial + ((long long)b * gridDim.y + tile) * W + h * HS, colsum, (float*)smem);
}

extern "C" __global__ void __launch_bounds__(FA_THREADS, 3)
flash_attention_backward_dkdv_bf16_kernel(bf16* dqkv,          // (B, T, W): the dk and dv parts
                                          float* partial,      // (B * tiles, W): their column sums
                                          const bf16* dout,    // (B, T, C)
                                          const bf16* qkv,     // (B, T, W), W = (NH + 2 NKV) HS
                                          const float* lse,    // (B, NH, T)
                                          const float* Dq,     // (B, NH, T), from the dq kernel
                                          int B, int T, int NH, int NKV) {
    __shared__ __align__(1024) int4 smem[4 * TILE / 8];                 // two buffers of (q, dout)
    __shared__ float Ls[2][FA_ROWS], Ds[2][FA_ROWS];    // and of their rows' L (base 2) and D
    bf16* S = (bf16*)smem;
    int C = NH * HS, W = (NH + 2 * NKV) * HS, tile = blockIdx.y;   // key tile; the first ones see the most queries
    int kvh = blockIdx.x, b = blockIdx.z, warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    int h0 = kvh * GROUP;                         // query heads h0 .. h0 + GROUP - 1 read key/value head kvh
    const bf16* kbase = qkv + (long long)b * T * W + C + kvh * HS;   // k of (b, 0, kvh); v at + NKV HS
    int first = tile * FA_ROWS + warp * 16, key0 = first + g, key1 = key0 + 8;   // my two key rows
    unsigned int ka[HS / 16][4], va[HS / 16][4];
    stage_rows(S, kbase, tile * FA_ROWS, T, W);
    stage_rows(S + TILE, kbase + NKV * HS, tile * FA_ROWS, T, W);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    load_a_frags(ka, S + warp * 16 * S_LD);
    load_a_frags(va, S + TILE + warp * 16 * S_LD);
    __syncthreads();
    auto stage = [&](int h, int qt, int buf) {    // query tile qt of head h (q, dout, L, D) into buffer buf
        int q0 = qt * FA_ROWS;
        long long bhT = ((long long)b * NH + h) * T;
        stage_rows(S + 2 * buf * TILE, qkv + (long long)b * T * W + h * HS, q0, T, W);
        stage_rows(S + (2 * buf + 1) * TILE, dout + (long long)b * T * C + h * HS, q0, T, C);
        if (threadIdx.x < FA_ROWS) {
            int row = q0 + threadIdx.x;
            Ls[buf][threadIdx.x] = row < T ? lse[bhT + row] * LOG2E : 0.0f;
            Ds[buf][threadIdx.x] = row < T ? Dq[bhT + row] : 0.0f;
        }
    };
    stage(h0, tile, 0);
    cp_async_commit();
    float dk[HS / 8][4] = {}, dv[HS / 8][4] = {};
    int buf = 0;                                  // the buffer this step reads; the next tile goes to buf ^ 1
    for (int h = h0; h < h0 + GROUP; h++) {       // the group's query heads in order: dk, dv sum over them here
        for (int qt = tile; qt < (int)gridDim.y; qt++, buf ^= 1) {
            int q0 = qt * FA_ROWS;
            const bf16* Qs = S + 2 * buf * TILE;
            const bf16* dOs = Qs + TILE;
            bool last = qt + 1 == (int)gridDim.y;  // next: this head's next tile, or the next head's first
            if (!last || h + 1 < h0 + GROUP) stage(last ? h + 1 : h, last ? tile : qt + 1, buf ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
            __syncthreads();
            for (int half = 0; half < 2; half++) {    // 32 queries at a time
                int c0 = 32 * half;
                float st[4][4], dpt[4][4];            // s^T (my 16 keys x 32 queries) and dp^T
                mma_rows<4>(st, ka, Qs + c0 * S_LD);   // s^T = k q^T
                mma_rows<4>(dpt, va, dOs + c0 * S_LD); // dp^T = v do^T
                auto col = [&](int n, int i) { return c0 + 8 * n + 2 * t + (i & 1); };   // query within the tile
                auto masked = [&](int n, int i) { int q = q0 + col(n, i); return q >= T || q < (i < 2 ? key0 : key1); };
                auto rowL = [&](int n, int i) { return Ls[buf][col(n, i)]; };
                auto rowD = [&](int n, int i) { return Ds[buf][col(n, i)]; };
                if (qt == tile || q0 + FA_ROWS > T)   // the diagonal tile, or rows past T
                    softmax_grad<true>(st, dpt, masked, rowL, rowD);
                else softmax_grad<false>(st, dpt, masked, rowL, rowD);
                mma_cols<2>(dv, st, dOs, c0);         // dv += p^T do
                mma_cols<2>(dk, dpt, Qs, c0);         // dk += ds^T q
            }
            __syncthreads();
        }
    }
    const float scale = 1.0f / sqrtf((float)HS);
    bf16* drow = dqkv + (long long)b * T * W + C + kvh * HS;   // dk of (b, 0, kvh); dv at + NKV HS
    float colsum[HS / 8][2];
    float* prow = partial + ((long long)b * gridDim.y + tile) * W + C + kvh * HS;
    store_rows(drow, dk, scale, scale, first, T, W, colsum);
    block_column_sums(prow, colsum, (float*)smem);
    __syncthreads();                              // the shared sums are read before they are written again
    store_rows(drow + NKV * HS, dv, 1.0f, 1.0f, first, T, W, colsum);
    block_column_sums(prow + NKV * HS, colsum, (float*)smem);
}
