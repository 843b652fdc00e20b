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
// Version 2: bf16 on the tensor cores (GPT2(precision="bf16") uses it).
//
// The same algorithm with the products on the tensor cores (mma.cuh: one warp computes a 16 x 8 tile of a
// product per instruction). A block of 4 warps owns 64 rows (queries in the forward and the dq kernel, keys
// in the dk/dv kernel); each warp owns 16 of them and keeps their q (or k, v) as A fragments in registers.
// The other side walks in tiles of 64 rows staged in shared memory. The head size HS is a compile-time
// constant (-DHS=64 for GPT-2; any multiple of 16), so every loop over it unrolls into registers.
//
// q, k and v are read straight from qkv (B, T, 3C) as the product left it, without bias: the bias is added
// as each row is staged (then rounded to bf16, as split_heads_bf16_kernel does), so no (3, B, NH, T, hs)
// copy is made. out and dout are (B, T, C); dqkv (B, T, 3C) gets dq, dk, dv in place, ready for the qkv
// matmul's backward. lse (B, NH, T) = log of each row's softmax denominator (natural log, as L above).
//
// flash_attention_forward_bf16_kernel:      out, lse from qkv.
// flash_attention_backward_dq_bf16_kernel:  dq, and D_i = dout_i . out_i (written for the next kernel).
// flash_attention_backward_dkdv_bf16_kernel: dk, dv (run second: it reads D).
#include "mma.cuh"

#ifndef HS
#define HS 64
#endif
#define FA_ROWS 64                  // rows a block owns, and rows per staged tile
#define FA_THREADS 128              // 4 warps x 16 rows
#define S_LD (HS + 8)               // row stride of a staged tile: 16 bytes of padding put the 8 rows that a
#define T_LD (FA_ROWS + 8)          //   warp's fragment load touches in 8 different banks; a transposed tile
#define LOG2E 1.4426950408889634f   //   (column-major copy, for operands read along the other axis) likewise

__device__ __forceinline__ unsigned int ld32(const bf16* p) { return *reinterpret_cast<const unsigned int*>(p); }

// Stage rows row0 .. row0+63 of one head's q, k, v or dout into shared memory, + bias (nullptr: none), rows
// at or past T as zeros. src: row 0 of this (b, h), ld: elements between rows. dst (64, S_LD) row-major
// and/or dst_t (HS, T_LD) transposed; nullptr skips one. Thread i moves 16 bytes (8 values) at a time;
// consecutive threads take consecutive rows, so the transposed 2-byte stores of a warp hit different banks.
__device__ void stage_rows(bf16* dst, bf16* dst_t, const bf16* src, const float* bias, int row0, int T, int ld) {
    for (int c = threadIdx.x; c < FA_ROWS * HS / 8; c += FA_THREADS) {
        int r = c % FA_ROWS, d0 = (c / FA_ROWS) * 8, row = row0 + r;
        int4 v = make_int4(0, 0, 0, 0);
        if (row < T) {
            v = *reinterpret_cast<const int4*>(src + (long long)row * ld + d0);
            if (bias) {
                unsigned int w[4] = {(unsigned int)v.x, (unsigned int)v.y, (unsigned int)v.z, (unsigned int)v.w};
                for (int i = 0; i < 4; i++)
                    w[i] = pack_bf16x2(bf16_lo(w[i]) + bias[d0 + 2 * i], bf16_hi(w[i]) + bias[d0 + 2 * i + 1]);
                v = make_int4((int)w[0], (int)w[1], (int)w[2], (int)w[3]);
            }
        }
        if (dst) *reinterpret_cast<int4*>(dst + r * S_LD + d0) = v;
        if (dst_t) {
            const bf16* e = reinterpret_cast<const bf16*>(&v);
            for (int i = 0; i < 8; i++) dst_t[(d0 + i) * T_LD + r] = e[i];
        }
    }
}

// The A fragments of the 16 rows starting at `rows` of a staged row-major tile: frag[kk] covers columns
// 16kk .. 16kk+15.
__device__ __forceinline__ void load_a_frags(unsigned int frag[HS / 16][4], const bf16* rows) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    for (int kk = 0; kk < HS / 16; kk++) {
        frag[kk][0] = ld32(rows + g * S_LD + 16 * kk + 2 * t);
        frag[kk][1] = ld32(rows + (g + 8) * S_LD + 16 * kk + 2 * t);
        frag[kk][2] = ld32(rows + g * S_LD + 16 * kk + 2 * t + 8);
        frag[kk][3] = ld32(rows + (g + 8) * S_LD + 16 * kk + 2 * t + 8);
    }
}

// acc[n][.] (16 x 8N) = A (16 x HS, fragments) @ tile^T, for N consecutive rows of a staged row-major tile
// starting at `rows` (so B[k][n] = tile[n][k]: q k^T, do v^T, k q^T, v do^T).
template <int N>
__device__ __forceinline__ void mma_rows(float acc[N][4], const unsigned int a[HS / 16][4], const bf16* rows) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    for (int n = 0; n < N; n++) {
        for (int i = 0; i < 4; i++) acc[n][i] = 0.0f;
        for (int kk = 0; kk < HS / 16; kk++) {
            unsigned int b[2] = {ld32(rows + (8 * n + g) * S_LD + 16 * kk + 2 * t),
                                 ld32(rows + (8 * n + g) * S_LD + 16 * kk + 2 * t + 8)};
            mma_bf16_16816(acc[n], a[kk], b);
        }
    }
}

// acc (16 x HS) += P (16 x 16K, in the D layout of K*2 products of 16 x 8) @ rows k0 .. k0+16K-1 of a tile,
// read from its transposed copy tile_t (HS, T_LD): p v, p^T do, ds k, ds^T q.
template <int K>
__device__ __forceinline__ void mma_cols(float acc[HS / 8][4], const float p[2 * K][4], const bf16* tile_t, int k0) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    for (int kk = 0; kk < K; kk++) {
        unsigned int a[4] = {pack_bf16x2(p[2 * kk][0], p[2 * kk][1]), pack_bf16x2(p[2 * kk][2], p[2 * kk][3]),
                             pack_bf16x2(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                             pack_bf16x2(p[2 * kk + 1][2], p[2 * kk + 1][3])};
        for (int n = 0; n < HS / 8; n++) {
            unsigned int b[2] = {ld32(tile_t + (8 * n + g) * T_LD + k0 + 16 * kk + 2 * t),
                                 ld32(tile_t + (8 * n + g) * T_LD + k0 + 16 * kk + 2 * t + 8)};
            mma_bf16_16816(acc[n], a, b);
        }
    }
}

// The sum over the 4 lanes that share a row (lanes 4g .. 4g+3).
__device__ __forceinline__ float row_sum4(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Write the warp's 16 x HS accumulator, times `scale`, as bf16 rows row0 .. row0+15 of dst (ld apart), rows
// at or past T skipped.
__device__ __forceinline__ void store_rows(bf16* dst, const float acc[HS / 8][4], float scale0, float scale1,
                                           int row0, int T, int ld) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    for (int n = 0; n < HS / 8; n++) {
        if (row0 + g < T)
            *reinterpret_cast<unsigned int*>(dst + (long long)(row0 + g) * ld + 8 * n + 2 * t) =
                pack_bf16x2(acc[n][0] * scale0, acc[n][1] * scale0);
        if (row0 + g + 8 < T)
            *reinterpret_cast<unsigned int*>(dst + (long long)(row0 + g + 8) * ld + 8 * n + 2 * t) =
                pack_bf16x2(acc[n][2] * scale1, acc[n][3] * scale1);
    }
}

extern "C" __global__ void __launch_bounds__(FA_THREADS)
flash_attention_forward_bf16_kernel(bf16* out,           // (B, T, C)
                                    float* lse,          // (B, NH, T)
                                    const bf16* qkv,     // (B, T, 3C), no bias
                                    const float* qkvb,   // (3C,)
                                    int B, int T, int NH) {
    __shared__ int4 q_smem[FA_ROWS * S_LD / 8], k_smem[FA_ROWS * S_LD / 8], vt_smem[HS * T_LD / 8];
    bf16 *Qs = (bf16*)q_smem, *Ks = (bf16*)k_smem, *Vt = (bf16*)vt_smem;
    int C = NH * HS, tile = gridDim.x - 1 - blockIdx.x;   // the longest rows first (they see the most keys)
    int h = blockIdx.y, b = blockIdx.z, warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    const bf16* base = qkv + (long long)b * T * 3 * C + h * HS;       // q of (b, 0, h); k at +C, v at +2C
    int row0 = tile * FA_ROWS + warp * 16 + g, row1 = row0 + 8;       // my two query rows
    stage_rows(Qs, nullptr, base, qkvb + h * HS, tile * FA_ROWS, T, 3 * C);
    __syncthreads();
    unsigned int qa[HS / 16][4];
    load_a_frags(qa, Qs + warp * 16 * S_LD);
    const float sl2 = LOG2E / sqrtf((float)HS);   // scores in base 2: exp(x / sqrt(HS)) = exp2(x * sl2)
    float o[HS / 8][4] = {}, m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};  // per row: running max and sum
    for (int kt = 0; kt <= tile; kt++) {
        __syncthreads();                          // every warp is done with the previous tile
        stage_rows(Ks, nullptr, base + C, qkvb + C + h * HS, kt * FA_ROWS, T, 3 * C);
        stage_rows(nullptr, Vt, base + 2 * C, qkvb + 2 * C + h * HS, kt * FA_ROWS, T, 3 * C);
        __syncthreads();
        float s[FA_ROWS / 8][4];
        mma_rows<FA_ROWS / 8>(s, qa, Ks);          // s (16 x 64) = q k^T
        float mx[2] = {m[0], m[1]};
        for (int n = 0; n < FA_ROWS / 8; n++) {
            for (int i = 0; i < 4; i++) {
                int key = kt * FA_ROWS + 8 * n + 2 * t + (i & 1), row = i < 2 ? row0 : row1;
                s[n][i] = (kt == tile && key > row) ? NEG_INF : s[n][i] * sl2;   // causal mask on the diagonal
                mx[i / 2] = fmaxf(mx[i / 2], s[n][i]);
            }
        }
        float alpha[2];
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            alpha[r] = exp2f(m[r] - mx[r]);       // rescales what was summed against the old maximum
            m[r] = mx[r];
            l[r] *= alpha[r];
        }
        for (int n = 0; n < HS / 8; n++)
            for (int i = 0; i < 4; i++) o[n][i] *= alpha[i / 2];
        for (int n = 0; n < FA_ROWS / 8; n++) {
            for (int i = 0; i < 4; i++) {
                s[n][i] = exp2f(s[n][i] - m[i / 2]);   // p, unnormalised
                l[i / 2] += s[n][i];                    // this lane's part of the row sum
            }
        }
        mma_cols<FA_ROWS / 16>(o, s, Vt, 0);      // o += p v
    }
    for (int r = 0; r < 2; r++) l[r] = row_sum4(l[r]);
    store_rows(out + (long long)b * T * C + h * HS, o, 1.0f / l[0], 1.0f / l[1], tile * FA_ROWS + warp * 16, T, C);
    if (t == 0) {
        float* L = lse + ((long long)b * NH + h) * T;
        if (row0 < T) L[row0] = (m[0] + log2f(l[0])) / LOG2E;
        if (row1 < T) L[row1] = (m[1] + log2f(l[1])) / LOG2E;
    }
}

// The probabilities and their gradient for one 16 x 8N tile, in place: s holds q k^T, dp holds do v^T on
// entry; on exit s holds p = exp(s / sqrt(HS) - L) (0 where masked) and dp holds ds = p (dp - D).
// Lane element i is at row r(i), column c(i) of the tile; masked(i) says the causal mask hides it.
template <int N, typename Masked, typename RowL, typename RowD>
__device__ __forceinline__ void softmax_grad(float s[N][4], float dp[N][4], Masked masked, RowL L2, RowD D) {
    const float sl2 = LOG2E / sqrtf((float)HS);
    for (int n = 0; n < N; n++) {
        for (int i = 0; i < 4; i++) {
            float p = masked(n, i) ? 0.0f : exp2f(s[n][i] * sl2 - L2(n, i));
            s[n][i] = p;
            dp[n][i] = p * (dp[n][i] - D(n, i));
        }
    }
}

extern "C" __global__ void __launch_bounds__(FA_THREADS)
flash_attention_backward_dq_bf16_kernel(bf16* dqkv,          // (B, T, 3C): the dq part
                                        float* Dout,         // (B, NH, T): D_i = dout_i . out_i
                                        const bf16* dout,    // (B, T, C)
                                        const bf16* qkv,     // (B, T, 3C), no bias
                                        const float* qkvb,   // (3C,)
                                        const bf16* out,     // (B, T, C)
                                        const float* lse,    // (B, NH, T)
                                        int B, int T, int NH) {
    __shared__ int4 k_smem[FA_ROWS * S_LD / 8], v_smem[FA_ROWS * S_LD / 8], kt_smem[HS * T_LD / 8];
    bf16 *Ks = (bf16*)k_smem, *Vs = (bf16*)v_smem, *Kt = (bf16*)kt_smem;
    int C = NH * HS, tile = gridDim.x - 1 - blockIdx.x;
    int h = blockIdx.y, b = blockIdx.z, warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    const bf16* base = qkv + (long long)b * T * 3 * C + h * HS;
    long long bhT = ((long long)b * NH + h) * T;
    int first = tile * FA_ROWS + warp * 16, row0 = first + g, row1 = row0 + 8;
    // my rows of q, dout and out as A fragments (staged through the k and v buffers, free until the loop)
    unsigned int qa[HS / 16][4], doa[HS / 16][4], oa[HS / 16][4];
    stage_rows(Ks, nullptr, base, qkvb + h * HS, tile * FA_ROWS, T, 3 * C);
    stage_rows(Vs, nullptr, dout + (long long)b * T * C + h * HS, nullptr, tile * FA_ROWS, T, C);
    __syncthreads();
    load_a_frags(qa, Ks + warp * 16 * S_LD);
    load_a_frags(doa, Vs + warp * 16 * S_LD);
    __syncthreads();
    stage_rows(Ks, nullptr, out + (long long)b * T * C + h * HS, nullptr, tile * FA_ROWS, T, C);
    __syncthreads();
    load_a_frags(oa, Ks + warp * 16 * S_LD);
    float D[2] = {0.0f, 0.0f};                   // D = rowsum(dout * out): lanes hold rows g (regs 0, 2), g+8 (1, 3)
    for (int kk = 0; kk < HS / 16; kk++) {
        for (int j = 0; j < 4; j++) {
            D[j % 2] += bf16_lo(doa[kk][j]) * bf16_lo(oa[kk][j]) + bf16_hi(doa[kk][j]) * bf16_hi(oa[kk][j]);
        }
    }
    float L2[2];
    for (int r = 0; r < 2; r++) {
        D[r] = row_sum4(D[r]);
        int row = r ? row1 : row0;
        L2[r] = row < T ? lse[bhT + row] * LOG2E : 0.0f;
        if (t == 0 && row < T) Dout[bhT + row] = D[r];
    }
    float dq[HS / 8][4] = {};
    for (int kt = 0; kt <= tile; kt++) {
        __syncthreads();
        stage_rows(Ks, Kt, base + C, qkvb + C + h * HS, kt * FA_ROWS, T, 3 * C);
        stage_rows(Vs, nullptr, base + 2 * C, qkvb + 2 * C + h * HS, kt * FA_ROWS, T, 3 * C);
        __syncthreads();
        for (int half = 0; half < 2; half++) {   // 32 keys at a time keeps s and dp in registers
            int k0 = 32 * half;
            float s[4][4], dp[4][4];
            mma_rows<4>(s, qa, Ks + k0 * S_LD);   // s = q k^T
            mma_rows<4>(dp, doa, Vs + k0 * S_LD); // dp = do v^T
            softmax_grad<4>(s, dp,
                [&](int n, int i) { return kt == tile && kt * FA_ROWS + k0 + 8 * n + 2 * t + (i & 1) > (i < 2 ? row0 : row1); },
                [&](int, int i) { return L2[i / 2]; }, [&](int, int i) { return D[i / 2]; });
            mma_cols<2>(dq, dp, Kt, k0);          // dq += ds k
        }
    }
    const float scale = 1.0f / sqrtf((float)HS);
    store_rows(dqkv + (long long)b * T * 3 * C + h * HS, dq, scale, scale, first, T, 3 * C);
}

extern "C" __global__ void __launch_bounds__(FA_THREADS)
flash_attention_backward_dkdv_bf16_kernel(bf16* dqkv,          // (B, T, 3C): the dk and dv parts
                                          const bf16* dout,    // (B, T, C)
                                          const bf16* qkv,     // (B, T, 3C), no bias
                                          const float* qkvb,   // (3C,)
                                          const float* lse,    // (B, NH, T)
                                          const float* Dq,     // (B, NH, T), from the dq kernel
                                          int B, int T, int NH) {
    __shared__ int4 q_smem[FA_ROWS * S_LD / 8], qt_smem[HS * T_LD / 8], do_smem[FA_ROWS * S_LD / 8],
        dot_smem[HS * T_LD / 8];
    __shared__ float Ls[FA_ROWS], Ds[FA_ROWS];
    bf16 *Qs = (bf16*)q_smem, *Qt = (bf16*)qt_smem, *dOs = (bf16*)do_smem, *dOt = (bf16*)dot_smem;
    int C = NH * HS, tile = blockIdx.x;           // key tile; the first ones see the most queries
    int h = blockIdx.y, b = blockIdx.z, warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    const bf16* base = qkv + (long long)b * T * 3 * C + h * HS;
    const bf16* dbase = dout + (long long)b * T * C + h * HS;
    long long bhT = ((long long)b * NH + h) * T;
    int first = tile * FA_ROWS + warp * 16, key0 = first + g, key1 = key0 + 8;   // my two key rows
    unsigned int ka[HS / 16][4], va[HS / 16][4];
    stage_rows(Qs, nullptr, base + C, qkvb + C + h * HS, tile * FA_ROWS, T, 3 * C);
    stage_rows(dOs, nullptr, base + 2 * C, qkvb + 2 * C + h * HS, tile * FA_ROWS, T, 3 * C);
    __syncthreads();
    load_a_frags(ka, Qs + warp * 16 * S_LD);
    load_a_frags(va, dOs + warp * 16 * S_LD);
    float dk[HS / 8][4] = {}, dv[HS / 8][4] = {};
    for (int qt = tile; qt < (int)gridDim.x; qt++) {
        int q0 = qt * FA_ROWS;
        __syncthreads();
        stage_rows(Qs, Qt, base, qkvb + h * HS, q0, T, 3 * C);
        stage_rows(dOs, dOt, dbase, nullptr, q0, T, C);
        if (threadIdx.x < FA_ROWS) {
            int row = q0 + threadIdx.x;
            Ls[threadIdx.x] = row < T ? lse[bhT + row] * LOG2E : 0.0f;
            Ds[threadIdx.x] = row < T ? Dq[bhT + row] : 0.0f;
        }
        __syncthreads();
        for (int half = 0; half < 2; half++) {   // 32 queries at a time
            int c0 = 32 * half;
            float st[4][4], dpt[4][4];           // s^T (my 16 keys x 32 queries) and dp^T
            mma_rows<4>(st, ka, Qs + c0 * S_LD);   // s^T = k q^T
            mma_rows<4>(dpt, va, dOs + c0 * S_LD); // dp^T = v do^T
            auto col = [&](int n, int i) { return c0 + 8 * n + 2 * t + (i & 1); };   // query within the tile
            softmax_grad<4>(st, dpt,
                [&](int n, int i) { int q = q0 + col(n, i); return q >= T || q < (i < 2 ? key0 : key1); },
                [&](int n, int i) { return Ls[col(n, i)]; }, [&](int n, int i) { return Ds[col(n, i)]; });
            mma_cols<2>(dv, st, dOt, c0);        // dv += p^T do
            mma_cols<2>(dk, dpt, Qt, c0);        // dk += ds^T q
        }
    }
    const float scale = 1.0f / sqrtf((float)HS);
    bf16* drow = dqkv + (long long)b * T * 3 * C + h * HS;
    store_rows(drow + C, dk, scale, scale, first, T, 3 * C);
    store_rows(drow + 2 * C, dv, 1.0f, 1.0f, first, T, 3 * C);
}
