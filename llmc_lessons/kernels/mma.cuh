// mma.cuh: the warp-level instructions of the tensor-core flash attention (lesson 13): mma.sync m16n8k16 (bf16
// inputs, float32 accumulators) and m16n8k8 (TF32 inputs, further down), ldmatrix (fragments from shared
// memory) and cp.async (global -> shared copies that run while the warp computes).
//
// D (16 x 8) += A (16 x 16) @ B (16 x 8), computed by the 32 lanes of a warp together. No lane holds a whole
// matrix: each holds a fixed piece (its "fragment"), as the PTX manual lays out. With g = lane / 4 (0..7)
// and t = lane % 4 (0..3), each 32-bit register holding two bf16 values, the lower 16 bits the first:
//
//   A, 4 registers:  a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]
//                    a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   B, 2 registers:  b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]       (two rows of column g)
//   D, 4 floats:     d[0], d[1] = D[g][2t, 2t+1]    d[2], d[3] = D[g+8][2t, 2t+1]
//
// So the lane that owns row g of D also holds row g of A, and the four lanes 4g .. 4g+3 share rows g and g+8.
// The D layout of two neighbouring 16 x 8 products is the A layout of one 16 x 16 operand: flash attention
// feeds its probabilities P from one product straight into the next without moving them between lanes.
//
// On a GPU each function is its PTX instruction. In the CPU emulator (no __CUDA_ARCH__), on a GPU older than
// sm_80 (no LLMC_SM80, bf16.cuh), or with -DLLMC_MMA_SHUFFLE, mma and ldmatrix are computed with warp
// shuffles: each lane fetches what it needs from the lanes that hold it. That version is plain CUDA, and
// states the layouts as code. Every lane of the warp must call them together (they are warp collectives), in
// a 1-D block.
#pragma once
#include "bf16.cuh"
#include "common.cuh"

#if defined(LLMC_SM80) && !defined(LLMC_MMA_SHUFFLE)
#define LLMC_PTX 1
#endif

// d += A @ B for the warp's 16 x 16 A and 16 x 8 B fragments (layouts above).
__device__ __forceinline__ void mma_bf16_16816(float d[4], const unsigned int a[4], const unsigned int b[2]) {
#if LLMC_PTX
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    unsigned long long a01 = ((unsigned long long)a[1] << 32) | a[0];
    unsigned long long a23 = ((unsigned long long)a[3] << 32) | a[2];
    unsigned long long b01 = ((unsigned long long)b[1] << 32) | b[0];
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int s = 0; s < 4; s++) {  // lane 4g + s holds A's rows g, g+8 at columns 2s, 2s+1, 2s+8, 2s+9
        unsigned long long ra01 = __shfl_sync(0xffffffffu, a01, 4 * g + s);
        unsigned long long ra23 = __shfl_sync(0xffffffffu, a23, 4 * g + s);
        // lane 4n + s holds B's column n at rows 2s, 2s+1 (low word) and 2s+8, 2s+9 (high word)
        unsigned long long c0 = __shfl_sync(0xffffffffu, b01, 4 * (2 * t) + s);      // column 2t
        unsigned long long c1 = __shfl_sync(0xffffffffu, b01, 4 * (2 * t + 1) + s);  // column 2t + 1
        unsigned int A0 = (unsigned int)ra01, A1 = (unsigned int)(ra01 >> 32);      // row g, row g+8: k = 2s, 2s+1
        unsigned int A2 = (unsigned int)ra23, A3 = (unsigned int)(ra23 >> 32);      // row g, row g+8: k = 2s+8, 2s+9
        unsigned int B0lo = (unsigned int)c0, B0hi = (unsigned int)(c0 >> 32);
        unsigned int B1lo = (unsigned int)c1, B1hi = (unsigned int)(c1 >> 32);
        acc[0] += bf16_lo(A0) * bf16_lo(B0lo) + bf16_hi(A0) * bf16_hi(B0lo) + bf16_lo(A2) * bf16_lo(B0hi) + bf16_hi(A2) * bf16_hi(B0hi);
        acc[1] += bf16_lo(A0) * bf16_lo(B1lo) + bf16_hi(A0) * bf16_hi(B1lo) + bf16_lo(A2) * bf16_lo(B1hi) + bf16_hi(A2) * bf16_hi(B1hi);
        acc[2] += bf16_lo(A1) * bf16_lo(B0lo) + bf16_hi(A1) * bf16_hi(B0lo) + bf16_lo(A3) * bf16_lo(B0hi) + bf16_hi(A3) * bf16_hi(B0hi);
        acc[3] += bf16_lo(A1) * bf16_lo(B1lo) + bf16_hi(A1) * bf16_hi(B1lo) + bf16_lo(A3) * bf16_lo(B1hi) + bf16_hi(A3) * bf16_hi(B1hi);
    }
    for (int i = 0; i < 4; i++) d[i] += acc[i];
#endif
}

// Grouped-query attention (lesson 16): GROUP = NH / NKV query heads share a key/value head, compiled in like HS
// (-DGROUP; 1 for GPT-2). kv_head(h) is the key/value head of query head h, h / GROUP, as a multiply and a shift:
// exact, and within an int, for NH * GROUP <= 2^15 (the launchers check it). A compiler's division (by a constant
// or a run-time value) uses a multiply-high that only the per-thread datapath has; the block's head index and the
// addresses made from it would then sit in per-thread registers instead of the block-wide (uniform) ones: 168
// registers a thread for the bf16 dq kernel at GROUP = 3, not 128 (ptxas -v, sm_90, CUDA 13.0), and one block
// fewer per multiprocessor.
#ifndef GROUP
#define GROUP 1
#endif
__device__ __forceinline__ int kv_head(int h) { return (h * ((65535 + GROUP) / GROUP)) >> 16; }

// The order of the blocks. Causal attention gives the blocks of a grid unequal work: the last query tile of a head
// reads every key tile, its first reads one (and the other way round for the key tiles of the backward). A GPU
// starts a grid's blocks in the order of their linear index x + X (y + Y z) (X, Y: the grid's sizes in x and y), x
// fastest and z slowest, and each multiprocessor takes the next block as one of its own finishes (what GPUs are seen
// to do; CUDA does not promise an order). So the flash kernels take a grid of (heads, tiles, B), the tile read from
// blockIdx.y so that the heaviest tiles of a batch row's heads start first and their lightest last, where they fill
// the gaps the others leave (longest first, the classic rule for packing jobs onto machines). With the tile in x,
// each head's tiles came in a run from heaviest to lightest, and a heavy tile could still be running when the other
// multiprocessors had nothing left to do. With the tile in z (the heaviest tiles of the whole batch first) the
// backward measured 11% slower than with the tile in x at B = 16, T = 1024, likely because the blocks running at
// once then spread over all the batch's heads, so fewer of them share each head's keys and values while these sit in
// the L2 cache (docs/performance.md). blockIdx.x and .z map to the head and the batch row with no division.

// The sum over the 4 lanes that share rows g and g+8 of D (lanes 4g .. 4g+3), for the bf16 and TF32
// products alike (their D layouts are the same).
__device__ __forceinline__ float row_sum4(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// The dq kernels' per-row numbers of the lane's rows row0 and row1 (= row0 + 8) of one head: D[r], the lane's part
// of dout . out, becomes the row's sum (over its 4 lanes) and is stored in Dout for the dk/dv kernel; L2[r] is the
// row's L in base 2. Rows at or past T store nothing.
__device__ __forceinline__ void dq_row_stats(float D[2], float L2[2], float* Dout, const float* lse, int row0,
                                             int row1, int T) {
    for (int r = 0; r < 2; r++) {
        D[r] = row_sum4(D[r]);
        int row = r ? row1 : row0;
        L2[r] = row < T ? lse[row] * LOG2E : 0.0f;
        if (threadIdx.x % 4 == 0 && row < T) Dout[row] = D[r];
    }
}

// TF32 (version 3 of lesson 13, the fp32 model's attention): mma.sync m16n8k8 on float32 data. TF32 keeps
// float32's sign and 8 exponent bits and 10 of its 23 mantissa bits; the tensor core reads the top 19 bits of
// each 32-bit register and adds the products in float32. D (16 x 8) += A (16 x 8) @ B (8 x 8), one value a
// register, with g = lane / 4 and t = lane % 4 as above:
//
//   A, 4 registers:  a[0] = A[g][t]    a[1] = A[g+8][t]    a[2] = A[g][t+4]    a[3] = A[g+8][t+4]
//   B, 2 registers:  b[0] = B[t][g]    b[1] = B[t+4][g]                     (two rows of column g)
//   D, 4 floats:     as for bf16: d[0], d[1] = D[g][2t, 2t+1]    d[2], d[3] = D[g+8][2t, 2t+1]
//
// Here the D layout is NOT the A layout of a next product: a lane holds D's columns 2t, 2t+1 but A's columns
// t, t+4. The flash attention kernels number the k axis of the next product to fit (flash_attention_tf32.cu).

// float32 -> TF32 bits, rounding to nearest with ties away from zero (cvt.rna.tf32.f32): add half of the last
// kept bit to the 13 dropped ones, then clear them. Infinity and NaN pass unchanged.
__device__ __forceinline__ unsigned int tf32_bits(float x) {
#if LLMC_PTX
    unsigned int r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
#else
    unsigned int u = __float_as_uint(x);
    return (u & 0x7f800000u) == 0x7f800000u ? u : (u + 0x1000u) & 0xffffe000u;
#endif
}

// d += A @ B for the warp's 16 x 8 A and 8 x 8 B fragments of TF32 bits (layouts above).
__device__ __forceinline__ void mma_tf32_1688(float d[4], const unsigned int a[4], const unsigned int b[2]) {
#if LLMC_PTX
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int s = 0; s < 4; s++) {  // lane 4g + s holds A's rows g, g+8 at columns s, s+4
        float A0 = __uint_as_float(__shfl_sync(0xffffffffu, a[0], 4 * g + s) & 0xffffe000u);   // A[g][s]
        float A1 = __uint_as_float(__shfl_sync(0xffffffffu, a[1], 4 * g + s) & 0xffffe000u);   // A[g+8][s]
        float A2 = __uint_as_float(__shfl_sync(0xffffffffu, a[2], 4 * g + s) & 0xffffe000u);   // A[g][s+4]
        float A3 = __uint_as_float(__shfl_sync(0xffffffffu, a[3], 4 * g + s) & 0xffffe000u);   // A[g+8][s+4]
        // lane 4n + s holds B's column n at rows s and s+4
        float B0 = __uint_as_float(__shfl_sync(0xffffffffu, b[0], 4 * (2 * t) + s) & 0xffffe000u);      // B[s][2t]
        float B1 = __uint_as_float(__shfl_sync(0xffffffffu, b[1], 4 * (2 * t) + s) & 0xffffe000u);      // B[s+4][2t]
        float C0 = __uint_as_float(__shfl_sync(0xffffffffu, b[0], 4 * (2 * t + 1) + s) & 0xffffe000u);  // B[s][2t+1]
        float C1 = __uint_as_float(__shfl_sync(0xffffffffu, b[1], 4 * (2 * t + 1) + s) & 0xffffe000u);  // B[s+4][2t+1]
        acc[0] += A0 * B0 + A2 * B1;
        acc[1] += A0 * C0 + A2 * C1;
        acc[2] += A1 * B0 + A3 * B1;
        acc[3] += A1 * C0 + A3 * C1;
    }
    for (int i = 0; i < 4; i++) d[i] += acc[i];
#endif
}

// ldmatrix: four 8 x 8 bf16 matrices M_0 .. M_3 from shared memory into fragments. Lane l passes the address
// of row l % 8 of M_{l / 8} (16 contiguous bytes). Lane (g, t) receives r[j] = M_j[g][2t, 2t+1]; with
// _trans it receives the transposed fragment, r[j] = M_j[2t, 2t+1][g] (two rows, one column: what a B operand
// stored row by row along k needs).
__device__ __forceinline__ void ldmatrix_x4(unsigned int r[4], const bf16* row) {
#if LLMC_PTX
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"((unsigned int)__cvta_generic_to_shared(row)));
#else
    int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    for (int j = 0; j < 4; j++) {
        const bf16* p = (const bf16*)__shfl_sync(0xffffffffu, (unsigned long long)row, 8 * j + g);  // row g of M_j
        r[j] = (unsigned int)p[2 * t] | ((unsigned int)p[2 * t + 1] << 16);
    }
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned int r[4], const bf16* row) {
#if LLMC_PTX
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"((unsigned int)__cvta_generic_to_shared(row)));
#else
    int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    for (int j = 0; j < 4; j++) {
        const bf16* p0 = (const bf16*)__shfl_sync(0xffffffffu, (unsigned long long)row, 8 * j + 2 * t);
        const bf16* p1 = (const bf16*)__shfl_sync(0xffffffffu, (unsigned long long)row, 8 * j + 2 * t + 1);
        r[j] = (unsigned int)p0[g] | ((unsigned int)p1[g] << 16);   // rows 2t and 2t+1 of M_j, column g
    }
#endif
}

// cp.async: copy 16 bytes from global to shared memory without passing through registers, so the loads of
// the next tile run while the warp computes on this one; valid = false writes 16 zero bytes instead (a row
// past the end). A thread's copies are grouped by cp_async_commit(); cp_async_wait<N>() waits until at most
// the N newest groups are still in flight, and a __syncthreads() after it shows the data to the whole block.
// (The emulator, and a GPU older than sm_80, copy at once: the data just arrives early, which is one of the
// orders a GPU may take.)
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#if defined(LLMC_SM80)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"((unsigned int)__cvta_generic_to_shared(smem)), "l"(gmem), "r"(valid ? 16 : 0));
#else
    *reinterpret_cast<int4*>(smem) = valid ? *reinterpret_cast<const int4*>(gmem) : make_int4(0, 0, 0, 0);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(LLMC_SM80)
    asm volatile("cp.async.commit_group;");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(LLMC_SM80)
    asm volatile("cp.async.wait_group %0;" :: "n"(N));
#endif
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)   // wgmma reads shared memory through the "async proxy", cp.async and
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");   // ordinary stores write through the generic
#endif                                   // one: this fence (then the barrier) makes the copies visible to wgmma
}

// ---------------------------------------------------------------------------------------------------------
// Hopper (sm_90a): wgmma, the warpgroup's matrix product (lesson 13, version 4). Four warps (a warpgroup, 128
// threads) compute D (64 x N) += A (64 x 16) @ B (16 x N) in one asynchronous instruction. Warp w holds rows
// 16w .. 16w+15 of A and D, in exactly the layouts of mma_bf16_16816 above: A as 4 registers (the same a[4]),
// D as N/8 accumulators of 16 x 8 (d[n][4], columns 8n .. 8n+7). The tensor core reads B itself from shared
// memory, described by a 64-bit "matrix descriptor", so no ldmatrix and no B registers.
//
// The layout the descriptor describes, with 128-byte swizzling (the mode the course uses): B lives in a tile
// whose rows are 128 bytes (64 bf16; 1024-byte aligned), 8 rows making a 1024-byte "atom". Within a row the 8
// pieces of 16 bytes are stored in the order piece ^ (row % 8): the byte at offset x of the tile sits at
// x ^ (((x >> 7) & 7) << 4). So the 8 rows of any 16-byte column are in 8 different 16-byte bank groups, and
// the tensor core reads 8 rows of a column without bank conflicts (the unswizzled layout has them all in one).
// B stored by column (B[k][n] at row n, byte 2k: "K-major", as q k^T reads the key tile) or by row (B[k][n] at
// row k, byte 2n: "MN-major", TRANS_B, as p v reads the value tile), the same tile either way; SBO, the stride
// byte offset, is the distance from one 8-row atom to the next (1024), and the start of B moves 32 bytes along
// a row per 16 values of k (K-major) or 16 rows (MN-major). The flash attention tiles (FA_WGMMA,
// flash_attention.cu) are laid out so (hs = 64: one row a tile row).
//
// wgmma_bf16 issues one instruction; before the first of a batch, wgmma_fence() (the registers it reads were
// written by ordinary instructions), after the last, wgmma_commit() (the batch is closed), and before d is read,
// wgmma_wait<PENDING>() (the batch has finished and d holds the result); the A registers are kept until then
// (wgmma_keep). On the CPU emulator, and on a GPU compiled without sm_90a's features, wgmma_bf16 computes the
// same product at once from the same registers and the same shared memory: the warp shuffles A's rows (as
// mma_bf16_16816 does) and each lane reads the B values its accumulators need, at the addresses the
// descriptor's rule gives. A warpgroup's 128 threads must call these together, with the same b.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && !defined(LLMC_MMA_SHUFFLE)
#define LLMC_WGMMA 1
#endif

#if LLMC_WGMMA
__device__ __forceinline__ unsigned long long wgmma_descriptor(const bf16* b, int sbo) {
    unsigned long long address = (unsigned int)__cvta_generic_to_shared(b);   // bits 62-63 = 1: 128-byte swizzle;
    return ((address & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(sbo >> 4) << 32) | (1ull << 62);
}                                                                          // LBO (bits 16-29) unused: 1
#define WG_D16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define WG_D32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
               "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define WG_ACC4(n) "+f"(d[n][0]), "+f"(d[n][1]), "+f"(d[n][2]), "+f"(d[n][3])
#endif

// Wait for the operands an earlier instruction wrote, and keep the compiler from moving accumulator reads or
// writes across the asynchronous instructions (an empty asm that "changes" every accumulator).
template <int N>
__device__ __forceinline__ void wgmma_fence(float d[N / 8][4]) {
#if LLMC_WGMMA
    for (int n = 0; n < N / 8; n++)
        for (int i = 0; i < 4; i++) asm volatile("" : "+f"(d[n][i]) :: "memory");
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}

// wgmma_commit() closes a batch; wgmma_wait<PENDING>(d) waits until at most the PENDING newest batches are still
// running (batches finish in order) and d, the accumulator of a finished one, may be read. Work placed between
// them runs while the tensor core computes (the forward kernel's softmax, flash_attention.cu).
__device__ __forceinline__ void wgmma_commit() {
#if LLMC_WGMMA
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#endif
}

template <int PENDING, int N>
__device__ __forceinline__ void wgmma_wait(float d[N / 8][4]) {
#if LLMC_WGMMA
    asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(PENDING) : "memory");
    for (int n = 0; n < N / 8; n++)
        for (int i = 0; i < 4; i++) asm volatile("" : "+f"(d[n][i]) :: "memory");
#endif
}

// After the wait for a batch: its A fragments "change" here, so the compiler keeps their registers untouched
// until the batch has finished reading them.
template <int K>
__device__ __forceinline__ void wgmma_keep(unsigned int a[K][4]) {
#if LLMC_WGMMA
    for (int kk = 0; kk < K; kk++)
        for (int i = 0; i < 4; i++) asm volatile("" : "+r"(a[kk][i]) :: "memory");
#endif
}

// d (the warp's 16 x N) = (accumulate ? d : 0) + A @ B, B (16 x N) in the swizzled tile at `tile` (1024-byte
// aligned on a GPU), starting `start` bytes into it (layout above; sbo in bytes). N is 32 or 64.
template <int N, bool TRANS_B>
__device__ __forceinline__ void wgmma_bf16(float d[N / 8][4], const unsigned int a[4], const bf16* tile, int start,
                                           int sbo, bool accumulate) {
#if LLMC_WGMMA
    unsigned long long desc = wgmma_descriptor(tile + start / 2, sbo);
    if constexpr (N == 32) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 " WG_D16
                     ", {%16, %17, %18, %19}, %20, p, 1, 1, %22;\n}"
                     : WG_ACC4(0), WG_ACC4(1), WG_ACC4(2), WG_ACC4(3)
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"((int)accumulate), "n"(TRANS_B ? 1 : 0));
    } else {
        static_assert(N == 64, "wgmma_bf16: N is 32 or 64");
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WG_D32
                     ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}"
                     : WG_ACC4(0), WG_ACC4(1), WG_ACC4(2), WG_ACC4(3), WG_ACC4(4), WG_ACC4(5), WG_ACC4(6), WG_ACC4(7)
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"((int)accumulate), "n"(TRANS_B ? 1 : 0));
    }
#else
    int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    float A[2][16];                                   // rows g and g+8 of the warp's A, gathered from lanes 4g .. 4g+3
    for (int s = 0; s < 4; s++) {
        unsigned int r[4];
        for (int j = 0; j < 4; j++) r[j] = __shfl_sync(0xffffffffu, a[j], 4 * g + s);
        for (int e = 0; e < 2; e++) {                 // a[0], a[2]: row g at k = 2s + e, 2s + 8 + e; a[1], a[3]: row g+8
            A[0][2 * s + e] = e ? bf16_hi(r[0]) : bf16_lo(r[0]);
            A[1][2 * s + e] = e ? bf16_hi(r[1]) : bf16_lo(r[1]);
            A[0][2 * s + 8 + e] = e ? bf16_hi(r[2]) : bf16_lo(r[2]);
            A[1][2 * s + 8 + e] = e ? bf16_hi(r[3]) : bf16_lo(r[3]);
        }
    }
    const char* base = (const char*)tile;
    for (int n = 0; n < N / 8; n++) {
        for (int i = 0; i < 4; i++) {
            int col = 8 * n + 2 * t + (i & 1);
            float sum = 0.0f;
            for (int k = 0; k < 16; k++) {            // B[k][col], where the descriptor's rule puts it
                int at = start + (TRANS_B ? (k / 8) * sbo + (k % 8) * 128 + col * 2 : (col / 8) * sbo + (col % 8) * 128 + k * 2);
                at ^= ((at >> 7) & 7) << 4;           // the swizzle
                sum += A[i / 2][k] * bf16_to_float(*(const bf16*)(base + at));
            }
            d[n][i] = (accumulate ? d[n][i] : 0.0f) + sum;
        }
    }
#endif
}
