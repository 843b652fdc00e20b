// cooperative_groups.h for the CPU emulator: the part of CUDA's cooperative groups that kernels use to name a
// block and its warps (or smaller tiles). A tile's collectives are the warp collectives of llmc_cuda.h with the
// tile's lanes as the mask, so the emulator checks them the same way. On a GPU, #include
// <cooperative_groups.h> finds CUDA's header; in the emulator it finds this one.
//
// Collectives take the caller's file and line as default arguments, so an error names the kernel's line.
#pragma once
#include "llmc_cuda.h"

namespace cooperative_groups {

// The linear index of the calling thread in its block, and the number of threads of the block.
static inline unsigned llmc_block_rank() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
static inline unsigned llmc_block_size() { return blockDim.x * blockDim.y * blockDim.z; }

class thread_block {
  public:
    unsigned thread_rank() const { return llmc_block_rank(); }
    unsigned size() const { return llmc_block_size(); }
    unsigned num_threads() const { return llmc_block_size(); }
    dim3 group_index() const { return dim3(blockIdx.x, blockIdx.y, blockIdx.z); }
    dim3 thread_index() const { return dim3(threadIdx.x, threadIdx.y, threadIdx.z); }
    dim3 group_dim() const { return dim3(blockDim.x, blockDim.y, blockDim.z); }
    dim3 dim_threads() const { return group_dim(); }
    void sync(const char *file = __builtin_FILE(), int line = __builtin_LINE()) const {
        llmc_rt_syncthreads(file, line);
    }
};
static inline thread_block this_thread_block() { return thread_block(); }

// A tile of N consecutive threads of a block (N a power of two, at most 32): thread_rank() within the tile,
// meta_group_rank() = which tile, meta_group_size() = how many tiles the block holds.
template <unsigned N, typename Parent = void>
class thread_block_tile {
    static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "tiled_partition<N>: N must be 1, 2, 4, 8, 16 or 32");

  public:
    thread_block_tile() = default;
    template <typename P>
    thread_block_tile(const thread_block_tile<N, P> &) {}
    static constexpr unsigned num_threads() { return N; }
    static constexpr unsigned size() { return N; }
    unsigned thread_rank() const { return llmc_block_rank() % N; }
    unsigned meta_group_rank() const { return llmc_block_rank() / N; }
    unsigned meta_group_size() const { return (llmc_block_size() + N - 1) / N; }
    // The lanes a tile's collective waits for: the whole warp (of the lanes that exist, for tiles smaller
    // than a warp). So the tiles of one warp must call the same collectives together, as the lanes of a warp
    // do with a full mask; a tile of a warp that goes its own way is reported as a deadlock or a disagreement.
    unsigned llmc_mask() const {
        unsigned left = llmc_block_size() - (llmc_block_rank() & ~31u);
        return N == 32 || left >= 32 ? 0xffffffffu : (1u << left) - 1u;
    }
    void sync(const char *file = __builtin_FILE(), int line = __builtin_LINE()) const {
        llmc_rt_syncwarp(llmc_mask(), file, line);
    }
    template <typename T>
    T shfl(T var, int src, const char *file = __builtin_FILE(), int line = __builtin_LINE()) const {
        return llmc_shfl(llmc_mask(), var, llmc_src_idx(src, N), LLMC_SHFL_IDX, file, line);
    }
    template <typename T>
    T shfl_up(T var, unsigned d, const char *file = __builtin_FILE(), int line = __builtin_LINE()) const {
        return llmc_shfl(llmc_mask(), var, llmc_src_up(d, N), LLMC_SHFL_UP, file, line);
    }
    template <typename T>
    T shfl_down(T var, unsigned d, const char *file = __builtin_FILE(), int line = __builtin_LINE()) const {
        return llmc_shfl(llmc_mask(), var, llmc_src_down(d, N), LLMC_SHFL_DOWN, file, line);
    }
    template <typename T>
    T shfl_xor(T var, int m, const char *file = __builtin_FILE(), int line = __builtin_LINE()) const {
        return llmc_shfl(llmc_mask(), var, llmc_src_xor(m, N), LLMC_SHFL_XOR, file, line);
    }
    // Votes over the tile: the ballot's bit i is the tile's thread i.
    unsigned ballot(int pred, const char *file = __builtin_FILE(), int line = __builtin_LINE()) const {
        unsigned votes = llmc_rt_vote(llmc_mask(), pred ? 1 : 0, file, line) >> (llmc_rt_self->lane & ~(N - 1));
        return N == 32 ? votes : votes & ((1u << N) - 1u);
    }
    bool any(int pred, const char *file = __builtin_FILE(), int line = __builtin_LINE()) const {
        return ballot(pred, file, line) != 0u;
    }
    bool all(int pred, const char *file = __builtin_FILE(), int line = __builtin_LINE()) const {
        return ballot(!pred, file, line) == 0u;
    }
};

template <unsigned N>
static inline thread_block_tile<N, thread_block> tiled_partition(const thread_block &) {
    return thread_block_tile<N, thread_block>();
}

static inline void sync(const thread_block &g, const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
    g.sync(file, line);
}
template <unsigned N, typename P>
static inline void sync(const thread_block_tile<N, P> &g, const char *file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
    g.sync(file, line);
}

// The operators of cooperative_groups/reduce.h.
template <typename T> struct plus { T operator()(const T &a, const T &b) const { return a + b; } };
template <typename T> struct less { T operator()(const T &a, const T &b) const { return b < a ? b : a; } };
template <typename T> struct greater { T operator()(const T &a, const T &b) const { return a < b ? b : a; } };
template <typename T> struct bit_and { T operator()(const T &a, const T &b) const { return a & b; } };
template <typename T> struct bit_or { T operator()(const T &a, const T &b) const { return a | b; } };
template <typename T> struct bit_xor { T operator()(const T &a, const T &b) const { return a ^ b; } };

// op applied over the tile's values (a butterfly of xor shuffles); every thread of the tile gets the result.
template <unsigned N, typename P, typename T, typename Op>
static inline T reduce(const thread_block_tile<N, P> &g, T val, Op op, const char *file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
    for (unsigned m = N / 2; m > 0; m /= 2) val = op(val, g.shfl_xor(val, (int)m, file, line));
    return val;
}

}  // namespace cooperative_groups
