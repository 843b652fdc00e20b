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
