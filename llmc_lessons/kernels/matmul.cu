// matmul.cu: the linear layer of GPT-2, out = inp @ weight^T + bias, and the products of its backward.
//
// Shapes (llm.c's layout): inp (B, T, C) seen as a (B*T, C) matrix, weight (OC, C), bias (OC,),
// out (B, T, OC) seen as (B*T, OC). The backward needs two more products of the same kind:
//     dinp    (B*T, C) = dout (B*T, OC) @ weight (OC, C)
//     dweight (OC, C)  = dout^T (OC, B*T) @ inp (B*T, C)
// and a column sum, dbias (OC,) = dout summed over its B*T rows.
//
// So the matmul kernels here compute ONE general product
//     out (M, N) = A (M, K) @ B (K, N)  [+ bias (N,)]
// where A and B are read through strides: element A(m, k) is A[m * sam + k * sak] and B(k, n) is
// B[k * sbk + n * sbn] (strides counted in elements, like NumPy's `strides` divided by 4). A transposed
// operand is the same memory read with its two strides swapped, so each kernel serves all three products:
//     forward: A = inp (sam = C, sak = 1),    B = weight^T (sbk = 1, sbn = C)
//     dinp:    A = dout (sam = OC, sak = 1),  B = weight (sbk = C, sbn = 1)
//     dweight: A = dout^T (sam = 1, sak = OC), B = inp (sbk = C, sbn = 1)
// out is always a fresh row-major (M, N) array (row stride N).
//
// kernel1 is naive: one thread per output element, a 2-D grid of 2-D blocks, each thread a K-long dot product
//         read straight from global memory.
// kernel2 is tiled: a block of TILE x TILE threads owns a TILE x TILE tile of out; it walks K in steps of
//         TILE, each step loading one TILE x TILE tile of A and one of B into shared memory cooperatively
//         (one element per thread), then every thread reads TILE values of each from shared memory.
//         TILE = blockDim.x (8, 16 or 32), shared memory sized at launch.
// kernel3 is register-blocked: a block of 16 x 16 threads owns a 128 x 128 tile of out, each thread an
//         8 x 8 patch of it held in registers; each K step of 16 loads 128 x 16 tiles of A and B.
// matmul_backward_bias_kernel sums dout's columns for dbias: one block per 32 columns, no atomics.
// add_bias_kernel adds bias (N,) to every row of out (M, N) in place: the bias step after a cuBLAS product.
//
// Indices are int: the launchers refuse matrices with 2^31 elements or more.
#include "common.cuh"

// ------------------------------------------------------------------------------------------------------------
// kernel1: one thread per output element.
// Thread (threadIdx.y, threadIdx.x) of block (blockIdx.y, blockIdx.x) owns out[m, n] with
//     m = blockIdx.y * blockDim.y + threadIdx.y   (a row of out: a row of A)
//     n = blockIdx.x * blockDim.x + threadIdx.x   (a column of out: a column of B)
// Neighbouring threads (consecutive threadIdx.x) own neighbouring columns, so the writes to out coalesce.
// Every thread reads 2K floats from global memory for 2K flops: memory traffic, not arithmetic, limits it.

extern "C" __global__ void matmul_kernel1(float* out,            // (M, N), row stride N
                                          const float* A,        // A(m, k) = A[m * sam + k * sak]
                                          const float* B,        // B(k, n) = B[k * sbk + n * sbn]
                                          const float* bias,     // (N,), read only when use_bias != 0
                                          int M, int N, int K, int sam, int sak, int sbk, int sbn,
                                          int use_bias) {
    int m = blockIdx.y * blockDim.y + threadIdx.y;
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M || n >= N) return;  // the grid is rounded up to whole blocks: threads past the edge idle
    float acc = use_bias ? bias[n] : 0.0f;
    for (int k = 0; k < K; k++) {
        acc += A[m * sam + k * sak] * B[k * sbk + n * sbn];
    }
    out[m * N + n] = acc;
}

// ------------------------------------------------------------------------------------------------------------
// kernel2: shared-memory tiles. Block (blockIdx.y, blockIdx.x) owns the TILE x TILE tile of out whose top-left
// corner is (m0, n0) = (blockIdx.y * TILE, blockIdx.x * TILE); thread (ty, tx) owns out[m0 + ty, n0 + tx].
// For each k0 = 0, TILE, 2 TILE, ... the block
//   1. loads As (TILE x TILE) = A[m0 : m0 + TILE, k0 : k0 + TILE], thread (ty, tx) fetching A(m0 + ty, k0 + tx),
//      and Bs = B[k0 : k0 + TILE, n0 : n0 + TILE] stored transposed, Bs[c][kk] = B(k0 + kk, n0 + c): thread
//      (ty, tx) fetches B(k0 + tx, n0 + ty). Consecutive tx walk k, which is the contiguous axis of both inp
//      and weight in the forward, so a warp's loads coalesce. Elements past the edge of A or B are stored
//      as 0, so a partial last tile adds nothing;
//   2. __syncthreads(): no thread may read the tiles before every thread has written its element;
//   3. accumulates acc += As[ty][kk] * Bs[tx][kk] for kk < TILE: each value loaded from global memory is
//      now used TILE times, by TILE different threads;
//   4. __syncthreads(): no thread may overwrite the tiles (next k0) while another still reads them.
// Bs rows are padded to TILE + 1 floats: in step 3 the 32 threads of a warp read Bs[tx][kk] for 32 (or 16)
// different tx; with a row stride of TILE = 32 floats those would all fall in one of the 32 shared-memory
// banks and be served one after another; with a stride of 33 they fall in 32 different banks.
// Dynamic shared memory: (TILE * TILE + TILE * (TILE + 1)) floats, passed by the launcher.

extern "C" __global__ void matmul_kernel2(float* out,            // (M, N), row stride N
                                          const float* A,        // A(m, k) = A[m * sam + k * sak]
                                          const float* B,        // B(k, n) = B[k * sbk + n * sbn]
                                          const float* bias,     // (N,), read only when use_bias != 0
                                          int M, int N, int K, int sam, int sak, int sbk, int sbn,
                                          int use_bias) {
    extern __shared__ float smem[];
    const int TILE = blockDim.x;             // blockDim.y == blockDim.x: square tiles
    float* As = smem;                        // As[r * TILE + kk]       = A(m0 + r, k0 + kk)
    float* Bs = smem + TILE * TILE;          // Bs[c * (TILE + 1) + kk] = B(k0 + kk, n0 + c)
    int tx = threadIdx.x, ty = threadIdx.y;
    int m0 = blockIdx.y * TILE, n0 = blockIdx.x * TILE;
    int m = m0 + ty, n = n0 + tx;            // the element of out this thread owns
    float acc = 0.0f;
    for (int k0 = 0; k0 < K; k0 += TILE) {
        int k = k0 + tx;                     // the column of A and the row of B this thread fetches
        As[ty * TILE + tx] = (m < M && k < K) ? A[m * sam + k * sak] : 0.0f;
        Bs[ty * (TILE + 1) + tx] = (n0 + ty < N && k < K) ? B[k * sbk + (n0 + ty) * sbn] : 0.0f;
        __syncthreads();
        for (int kk = 0; kk < TILE; kk++) {
            acc += As[ty * TILE + kk] * Bs[tx * (TILE + 1) + kk];
        }
        __syncthreads();
    }
    if (m < M && n < N) {
        out[m * N + n] = acc + (use_bias ? bias[n] : 0.0f);
    }
}

// ------------------------------------------------------------------------------------------------------------
// kernel3: register blocking. Block (blockIdx.y, blockIdx.x) owns the BM x BN tile of out at
// (m0, n0) = (blockIdx.y * BM, blockIdx.x * BN), with 16 x 16 threads. Thread (ty, tx) owns the 8 x 8 outputs
//     out[m0 + ty + 16 i, n0 + tx + 16 j]   for i, j in 0..7
// (spread out with stride 16 rather than an 8 x 8 square: then in the inner loop the 16 threads of a half
// warp read 16 consecutive floats of Bs, all in different banks, and their writes to out coalesce).
// Per K step of BK = 16 the block loads As = A[m0 : m0 + BM, k0 : k0 + BK] and Bs = B[k0 : k0 + BK, n0 : n0 + BN]
// (BM * BK = 2048 floats each, 8 per thread), both stored k-major: As[kk][r], Bs[kk][c]. Then for each kk a
// thread loads 8 values of A and 8 of B into registers and does 64 multiply-adds with them: 8 flops per
// shared-memory load instead of kernel2's 1, which is what lets the arithmetic units rather than shared
// memory set the pace.
// Loads follow whichever axis is contiguous (sak == 1 or not, sbn == 1 or not), so all three products of
// the layer read global memory coalesced.

#define K3_BM 128
#define K3_BN 128
#define K3_BK 16
#define K3_TM 8
#define K3_TN 8
#define K3_THREADS 256                       // 16 x 16

extern "C" __global__ void matmul_kernel3(float* out,            // (M, N), row stride N
                                          const float* A,        // A(m, k) = A[m * sam + k * sak]
                                          const float* B,        // B(k, n) = B[k * sbk + n * sbn]
                                          const float* bias,     // (N,), read only when use_bias != 0
                                          int M, int N, int K, int sam, int sak, int sbk, int sbn,
                                          int use_bias) {
    __shared__ float As[K3_BK][K3_BM + 1];   // As[kk][r] = A(m0 + r, k0 + kk); +1 so a transposing store
    __shared__ float Bs[K3_BK][K3_BN + 1];   // Bs[kk][c] = B(k0 + kk, n0 + c);  spreads over the banks
    int tx = threadIdx.x, ty = threadIdx.y;
    int tid = ty * 16 + tx;                  // 0..255
    int m0 = blockIdx.y * K3_BM, n0 = blockIdx.x * K3_BN;
    float acc[K3_TM][K3_TN];
    #pragma unroll
    for (int i = 0; i < K3_TM; i++)
        #pragma unroll
        for (int j = 0; j < K3_TN; j++) acc[i][j] = 0.0f;
    float a[K3_TM], b[K3_TN];

    for (int k0 = 0; k0 < K; k0 += K3_BK) {
        // Load: element e of a tile (e = tid, tid + 256, ...) goes to (r, kk) so that consecutive threads
        // read consecutive addresses of whichever axis is contiguous in memory.
        for (int e = tid; e < K3_BM * K3_BK; e += K3_THREADS) {
            int r, kk;
            if (sak == 1) { r = e / K3_BK; kk = e % K3_BK; }   // rows of A contiguous along k
            else          { r = e % K3_BM; kk = e / K3_BM; }   // columns of A contiguous along m
            int m = m0 + r, k = k0 + kk;
            As[kk][r] = (m < M && k < K) ? A[m * sam + k * sak] : 0.0f;
        }
        for (int e = tid; e < K3_BN * K3_BK; e += K3_THREADS) {
            int c, kk;
            if (sbn == 1) { c = e % K3_BN; kk = e / K3_BN; }   // rows of B contiguous along n
            else          { c = e / K3_BK; kk = e % K3_BK; }   // columns of B contiguous along k
            int n = n0 + c, k = k0 + kk;
            Bs[kk][c] = (n < N && k < K) ? B[k * sbk + n * sbn] : 0.0f;
        }
        __syncthreads();
        // Fully unrolled (constant trip counts), so acc, a and b live in registers, not in local memory.
        #pragma unroll
        for (int kk = 0; kk < K3_BK; kk++) {
            #pragma unroll
            for (int i = 0; i < K3_TM; i++) a[i] = As[kk][ty + 16 * i];
            #pragma unroll
            for (int j = 0; j < K3_TN; j++) b[j] = Bs[kk][tx + 16 * j];
            #pragma unroll
            for (int i = 0; i < K3_TM; i++)
                #pragma unroll
                for (int j = 0; j < K3_TN; j++) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
    #pragma unroll
    for (int i = 0; i < K3_TM; i++) {
        int m = m0 + ty + 16 * i;
        #pragma unroll
        for (int j = 0; j < K3_TN; j++) {
            int n = n0 + tx + 16 * j;
            if (m < M && n < N) out[m * N + n] = acc[i][j] + (use_bias ? bias[n] : 0.0f);
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// matmul_backward_bias_kernel: dbias[oc] = sum over the BT rows of dout[row, oc].
// Block (32, R) threads, one block per 32 consecutive columns: thread (ty, tx) owns column
// oc = blockIdx.x * 32 + tx and sums rows ty, ty + R, ty + 2R, ... A warp (one ty, 32 tx) reads 32 consecutive
// floats of one row: coalesced. The R partial sums of each column then meet in shared memory and are added in
// a tree (R a power of two: R/2 threads add pairs, then R/4, ...), and thread (0, tx) writes the column's total.
// No atomics: every column is summed by one block in a fixed order, so the result is the same bits on every
// run (atomicAdd would let blocks add in whatever order they finish). The price: only OC / 32 blocks.
// Dynamic shared memory: 32 * R floats.

extern "C" __global__ void matmul_backward_bias_kernel(float* dbias,       // (OC,)
                                                       const float* dout,  // (BT, OC)
                                                       int BT, int OC) {
    extern __shared__ float partial[];       // partial[ty * 32 + tx]: rows ty, ty + R, ... of column oc
    int tx = threadIdx.x, ty = threadIdx.y, R = blockDim.y;
    int oc = blockIdx.x * 32 + tx;
    float sum = 0.0f;
    if (oc < OC) {
        for (int row = ty; row < BT; row += R) {
            sum += dout[row * OC + oc];
        }
    }
    partial[ty * 32 + tx] = sum;
    __syncthreads();
    for (int stride = R / 2; stride > 0; stride /= 2) {
        if (ty < stride) {
            partial[ty * 32 + tx] += partial[(ty + stride) * 32 + tx];
        }
        __syncthreads();
    }
    if (ty == 0 && oc < OC) {
        dbias[oc] = partial[tx];
    }
}

// ---------------------------------------------------------------------------------------------------------
// add_bias_kernel: out[row, col] += bias[col], after cuBLAS computed out = A @ B (cuBLAS has no bias).
// One thread per element; neighbouring threads touch neighbouring columns of a row (coalesced).

extern "C" __global__ void add_bias_kernel(float* out,         // (M, N), updated in place
                                           const float* bias,  // (N,)
                                           int M, int N) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long long)M * N) {
        out[i] += bias[i % N];
    }
}
