// attention.cu: causal multi-head self-attention, forward and backward.
//
//   qkv (B, T, 3C) holds [q | k | v] along its last axis; each is C = NH * hs wide, head h at h*hs:(h+1)*hs.
//   preatt[b, h, t, t2] = q[b, t, h, :] . k[b, t2, h, :]               (scaled by 1/sqrt(hs) in the softmax)
//   att[b, h, t, t2]    = softmax over t2 <= t of preatt / sqrt(hs)    (0 for t2 > t: the future is masked)
//   out[b, t, h, :]     = sum over t2 <= t of att[b, h, t, t2] * v[b, t2, h, :]
//
// Forward, version "naive":
//   attention_forward_kernel1   one thread per (b, t, h) does a whole row: scores, max, exp-sum, weighted sum.
// Forward, version "cublas" (the structure of llm.c's train_gpt2.cu):
//   permute_kernel              qkv (B, T, 3C) -> q, k, v each (B, NH, T, hs), so every head is one matrix
//   (batched matmul)            preatt = q @ k^T, (B*NH) matmuls of (T, hs) x (hs, T): cuBLAS on a GPU
//   softmax_forward_kernel      one warp per row of preatt, reading only its causal half; scale folded in
//   (batched matmul)            out_h = att @ v, (B*NH) matmuls of (T, T) x (T, hs)
//   unpermute_kernel            out_h (B, NH, T, hs) -> out (B, T, C)
// Backward:
//   unpermute_kernel_backward   dout (B, T, C) -> dout_h (B, NH, T, hs)
//   (batched matmuls)           datt = dout_h @ v^T, dv = att^T @ dout_h
//   softmax_autoregressive_backward_kernel   dpreatt = scale * att * (datt - sum(att * datt)), causal half
//   (batched matmuls)           dq = dpreatt @ k, dk = dpreatt^T @ q
//   permute_kernel_backward     dq, dk, dv (B, NH, T, hs) -> dqkv (B, T, 3C)
// Grouped-query attention (lesson 16), NKV key/value heads for NH query heads, group = NH / NKV:
//   repkv_forward_kernel        qkv (B, T, (NH + 2 NKV) hs) -> (B, T, 3C), each k/v head copied group times
//   repkv_backward_kernel       dqkv (B, T, 3C) -> (B, T, (NH + 2 NKV) hs), each k/v head the sum of its copies
//
// Unlike llm.c, whose kernels accumulate gradients (+=) into buffers zeroed once per step, these kernels write
// (=) into fresh outputs: the launchers in llmc_lessons/layers/attention.py allocate every output.
#include "common.cuh"

// ---------------------------------------------------------------------------------------------------------
// Grouped-query attention: one thread per element of the (B, T, 3C) side. Query head h reads key/value head
// h / group. Forward: the thread copies its element from the (B, T, (NH + 2 NKV) hs) side.

extern "C" __global__ void repkv_forward_kernel(float* out,        // (B, T, 3, NH, hs) = (B, T, 3C)
                                                const float* inp,  // (B, T, NH + 2 NKV, hs)
                                                int B, int T, int NH, int NKV, int hs) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * T * 3 * NH * hs) return;
    // idx = (((b * T + t) * 3 + part) * NH + h) * hs + i, part 0 = q, 1 = k, 2 = v
    int i = idx % hs;
    int h = (idx / hs) % NH;
    int part = (idx / (hs * NH)) % 3;
    int bt = idx / (hs * NH * 3);
    // the head this element comes from, counted along inp's (NH + 2 NKV) heads
    int src_head = part == 0 ? h : NH + (part - 1) * NKV + h / (NH / NKV);
    out[idx] = inp[((size_t)bt * (NH + 2 * NKV) + src_head) * hs + i];
}

// Backward: one thread per element of the (B, T, (NH + 2 NKV) hs) side, summing over its copies (one for q,
// group for k and v): the thread owns its output, so no atomics are needed.
extern "C" __global__ void repkv_backward_kernel(float* dinp,        // (B, T, NH + 2 NKV, hs)
                                                 const float* dout,  // (B, T, 3, NH, hs) = (B, T, 3C)
                                                 int B, int T, int NH, int NKV, int hs) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    int heads = NH + 2 * NKV;
    if (idx >= B * T * heads * hs) return;
    int i = idx % hs;
    int head = (idx / hs) % heads;
    int bt = idx / (hs * heads);
    const float* row = dout + (size_t)bt * 3 * NH * hs;
    if (head < NH) {                                   // a query head: its one copy
        dinp[idx] = row[head * hs + i];
        return;
    }
    int part = head < NH + NKV ? 1 : 2;                // k or v
    int g = head - NH - (part - 1) * NKV;              // its key/value head
    int group = NH / NKV;
    float sum = 0.0f;
    for (int j = 0; j < group; j++) {
        sum += row[(part * NH + g * group + j) * hs + i];
    }
    dinp[idx] = sum;
}

// ---------------------------------------------------------------------------------------------------------
// Version "naive": one thread owns one (b, t, h) and computes the whole attention row of that query.

extern "C" __global__ void attention_forward_kernel1(float* out,        // (B, T, C)
                                                     float* att,        // (B, NH, T, T)
                                                     const float* qkv,  // (B, T, 3C)
                                                     int B, int T, int C, int NH) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * T * NH) return;
    // idx walks (b, t, h) with h fastest
    int h = idx % NH;
    int t = (idx / NH) % T;
    int b = idx / (NH * T);
    int C3 = 3 * C;
    int hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);

    // seek to the query q[b, t, h, :] (the first third of qkv[b, t, :]) and to the row att[b, h, t, :]
    const float* query_t = qkv + (size_t)(b * T + t) * C3 + h * hs;
    float* att_row = att + ((size_t)(b * NH + h) * T + t) * T;

    // pass 1: the scores of the visible keys t2 = 0..t (stored in att_row for now) and their maximum
    float maxval = -3.402823466e38f;  // the most negative float (NVRTC, CuPy's compiler, has no INFINITY)
    for (int t2 = 0; t2 <= t; t2++) {
        const float* key_t2 = qkv + (size_t)(b * T + t2) * C3 + C + h * hs;  // k[b, t2, h, :]: + C skips q
        float score = 0.0f;
        for (int i = 0; i < hs; i++) {
            score += query_t[i] * key_t2[i];
        }
        score *= scale;
        att_row[t2] = score;
        maxval = fmaxf(maxval, score);
    }
    // pass 2: exponentiate (shifted by the maximum, so nothing overflows) and sum
    float expsum = 0.0f;
    for (int t2 = 0; t2 <= t; t2++) {
        float e = expf(att_row[t2] - maxval);
        att_row[t2] = e;
        expsum += e;
    }
    // pass 3: normalize; the future keys t2 > t get probability exactly 0
    float expsum_inv = 1.0f / expsum;
    for (int t2 = 0; t2 < T; t2++) {
        att_row[t2] = (t2 <= t) ? att_row[t2] * expsum_inv : 0.0f;
    }
    // pass 4: out[b, t, h, :] = sum over t2 <= t of att[t2] * v[b, t2, h, :]
    float* out_bth = out + (size_t)(b * T + t) * C + h * hs;
    for (int i = 0; i < hs; i++) {
        out_bth[i] = 0.0f;
    }
    for (int t2 = 0; t2 <= t; t2++) {
        const float* value_t2 = qkv + (size_t)(b * T + t2) * C3 + 2 * C + h * hs;  // v[b, t2, h, :]
        float a = att_row[t2];
        for (int i = 0; i < hs; i++) {
            out_bth[i] += a * value_t2[i];
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Version "cublas": permute, batched matmul, warp-per-row softmax, batched matmul, unpermute.

// One thread per element of q (B*NH*T*hs threads); each copies one float of q, one of k and one of v.
extern "C" __global__ void permute_kernel(float* q, float* k, float* v,  // each (B, NH, T, hs)
                                          const float* inp,              // (B, T, 3, NH, hs) = (B, T, 3C)
                                          int B, int T, int NH, int hs) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * NH * T * hs) return;
    // idx = ((b * NH + h) * T + t) * hs + i: the position in q
    int i = idx % hs;
    int t = (idx / hs) % T;
    int h = (idx / (hs * T)) % NH;
    int b = idx / (hs * T * NH);
    // the same element in inp: inp[b, t, 0, h, i]; k and v sit NH*hs = C and 2C further along
    int C = NH * hs;
    size_t inp_idx = (size_t)(b * T + t) * 3 * C + h * hs + i;
    q[idx] = inp[inp_idx];
    k[idx] = inp[inp_idx + C];
    v[idx] = inp[inp_idx + 2 * C];
}

// Causal softmax of an (N, T, T) stack of score matrices, N = B*NH, one warp (32 threads) per row.
// Row `row` of the stack is query position t = row % T; it may look at keys 0..t only, so the warp reads
// only those t+1 scores: lane l handles keys l, l+32, l+64, ... and warp reductions combine the lanes.
// The scale 1/sqrt(hs) is applied here (inv_temperature), so the matmul before it needs no scaling.
extern "C" __global__ void softmax_forward_kernel(float* out,             // (N, T, T) att
                                                  float inv_temperature,  // 1/sqrt(hs)
                                                  const float* inp,       // (N, T, T) preatt, unscaled
                                                  int N, int T) {
    int lane = threadIdx.x % warpSize;
    int warps_per_block = blockDim.x / warpSize;
    int row = blockIdx.x * warps_per_block + threadIdx.x / warpSize;
    if (row >= N * T) return;  // a whole warp leaves together (blockDim.x is a multiple of 32)
    int own_pos = row % T;     // t: this row's query position
    const float* x = inp + (size_t)row * T;
    float* y = out + (size_t)row * T;

    // the future (keys own_pos+1 .. T-1) is masked: probability exactly 0
    for (int i = own_pos + 1 + lane; i < T; i += warpSize) {
        y[i] = 0.0f;
    }
    // the maximum over the visible keys: each lane over its own keys, then across the warp
    float maxval = -3.402823466e38f;  // the most negative float: a lane with no keys keeps it
    for (int i = lane; i <= own_pos; i += warpSize) {
        maxval = fmaxf(maxval, x[i]);
    }
    maxval = warpReduceMax(maxval);
    // exp(scale * (x - max)) for each visible key, and the sum of them across the warp
    float sumval = 0.0f;
    for (int i = lane; i <= own_pos; i += warpSize) {
        float e = expf(inv_temperature * (x[i] - maxval));
        y[i] = e;
        sumval += e;
    }
    sumval = warpReduceSum(sumval);
    // normalize: each lane rescales the values it wrote itself
    float norm = 1.0f / sumval;
    for (int i = lane; i <= own_pos; i += warpSize) {
        y[i] *= norm;
    }
}

// One thread per element of out_h (B*NH*T*hs threads): out[b, t, h, i] = inp[b, h, t, i].
extern "C" __global__ void unpermute_kernel(float* out,        // (B, T, NH, hs) = (B, T, C)
                                            const float* inp,  // (B, NH, T, hs)
                                            int B, int T, int NH, int hs) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * NH * T * hs) return;
    int i = idx % hs;
    int t = (idx / hs) % T;
    int h = (idx / (hs * T)) % NH;
    int b = idx / (hs * T * NH);
    out[((size_t)(b * T + t) * NH + h) * hs + i] = inp[idx];
}

// ---------------------------------------------------------------------------------------------------------
// Backward.

// The inverse move of unpermute_kernel, for the gradient: dinp[b, h, t, i] = dout[b, t, h, i].
extern "C" __global__ void unpermute_kernel_backward(float* dinp,        // (B, NH, T, hs)
                                                     const float* dout,  // (B, T, NH, hs) = (B, T, C)
                                                     int B, int T, int NH, int hs) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * NH * T * hs) return;
    int i = idx % hs;
    int t = (idx / hs) % T;
    int h = (idx / (hs * T)) % NH;
    int b = idx / (hs * T * NH);
    dinp[idx] = dout[((size_t)(b * T + t) * NH + h) * hs + i];
}

// The softmax's backward, one warp per row of the (N, T, T) stack, reading only the causal half:
//   dpreatt[t2] = scale * att[t2] * (datt[t2] - sum over t3 <= t of att[t3] * datt[t3])   for t2 <= t
// and 0 for t2 > t (those scores were masked, so nothing flows back to them).
extern "C" __global__ void softmax_autoregressive_backward_kernel(float* dpreatt,     // (N, T, T)
                                                                  const float* datt,  // (N, T, T)
                                                                  const float* att,   // (N, T, T)
                                                                  int N, int T, float scale) {
    int lane = threadIdx.x % warpSize;
    int warps_per_block = blockDim.x / warpSize;
    int row = blockIdx.x * warps_per_block + threadIdx.x / warpSize;
    if (row >= N * T) return;
    int own_pos = row % T;
    const float* att_row = att + (size_t)row * T;
    const float* datt_row = datt + (size_t)row * T;
    float* dpreatt_row = dpreatt + (size_t)row * T;

    // the dot product sum(att * datt) over the visible keys, across the warp
    float dot = 0.0f;
    for (int i = lane; i <= own_pos; i += warpSize) {
        dot += att_row[i] * datt_row[i];
    }
    dot = warpReduceSum(dot);
    for (int i = lane; i <= own_pos; i += warpSize) {
        dpreatt_row[i] = scale * att_row[i] * (datt_row[i] - dot);
    }
    for (int i = own_pos + 1 + lane; i < T; i += warpSize) {
        dpreatt_row[i] = 0.0f;
    }
}

// The inverse move of permute_kernel: dq, dk, dv back into one (B, T, 3C) array laid out like qkv.
extern "C" __global__ void permute_kernel_backward(float* dinp,  // (B, T, 3, NH, hs) = (B, T, 3C)
                                                   const float* dq, const float* dk, const float* dv,  // (B, NH, T, hs)
                                                   int B, int T, int NH, int hs) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * NH * T * hs) return;
    int i = idx % hs;
    int t = (idx / hs) % T;
    int h = (idx / (hs * T)) % NH;
    int b = idx / (hs * T * NH);
    int C = NH * hs;
    size_t inp_idx = (size_t)(b * T + t) * 3 * C + h * hs + i;
    dinp[inp_idx] = dq[idx];
    dinp[inp_idx + C] = dk[idx];
    dinp[inp_idx + 2 * C] = dv[idx];
}

// =========================================================================================================
// The bf16 training step (GPT2(precision="bf16")): kernels/bf16.cuh says what its kernels share.
// =========================================================================================================
#include "bf16.cuh"

// The heads of attention as separate matrices: inp (B, T, n, NH, hs), as qkv (n = 3) or atty's gradient
// (n = 1), plus bias (n*C,) -> out (n, B, NH, T, hs), so out[0], out[1], out[2] are q, k, v. One thread per
// 8 outputs, in output order (16-byte writes side by side).
extern "C" __global__ void split_heads_bf16_kernel(bf16* out,          // (n, B, NH, T, hs)
                                                   const bf16* inp,    // (B, T, n * NH * hs)
                                                   const float* bias,  // (n * NH * hs,)
                                                   int n, int B, int T, int NH, int hs) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int hs8 = hs / 8;
    if (i >= n * B * NH * T * hs8) return;
    int d = (i % hs8) * 8;
    int rest = i / hs8;
    int t = rest % T; rest /= T;
    int h = rest % NH; rest /= NH;
    int b = rest % B;
    int m = rest / B;
    int C = NH * hs;
    int col = m * C + h * hs + d;                   // column of inp's row (b, t), and of bias
    float a[8];
    load8(a, inp + ((size_t)b * T + t) * n * C + col);
    for (int k = 0; k < 8; k++) a[k] += bias[col + k];
    store8(out + (size_t)i * 8, a);
}

// The inverse move: inp (n, B, NH, T, hs) -> out (B, T, n * NH * hs). Attention's output y (n = 1) back to
// (B, T, C); dq, dk, dv (n = 3) into one dqkv laid out like qkv.
extern "C" __global__ void merge_heads_bf16_kernel(bf16* out,         // (B, T, n * NH * hs)
                                                   const bf16* inp,   // (n, B, NH, T, hs)
                                                   int n, int B, int T, int NH, int hs) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int C = NH * hs, nC8 = n * C / 8;
    if (i >= B * T * nC8) return;
    int col = (i % nC8) * 8, bt = i / nC8;
    int b = bt / T, t = bt % T;
    int m = col / C, h = (col % C) / hs, d = col % hs;
    float a[8];
    load8(a, inp + ((((size_t)m * B + b) * NH + h) * T + t) * hs + d);
    store8(out + (size_t)i * 8, a);
}

// att = softmax(scale * preatt) over the causal part of each row (columns 0..t), zeros after it. One warp
// per row of the (N, T, T) scores; online max and sum in one pass, then the outputs. att may be preatt
// (in place): a lane writes only the 8-value chunks it read itself.
extern "C" __global__ void softmax_forward_bf16_kernel(bf16* att,           // (N, T, T)
                                                       const bf16* preatt,  // (N, T, T) q @ k^T, unscaled
                                                       float scale, int N, int T) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N * T) return;
    int t = row % T;
    size_t base = (size_t)row * T;
    int chunks = t / 8 + 1;                     // chunks holding columns 0..t; the last one is masked
    float maxval = NEG_INF, sum = 0.0f;
    for (int ch = lane; ch < chunks; ch += 32) {
        float x[8];
        load8(x, preatt + base + ch * 8);
        float chunk_max = NEG_INF;
        for (int k = 0; k < 8; k++) {
            x[k] = ch * 8 + k <= t ? x[k] * scale : NEG_INF;   // the future counts as exp(-inf) = 0
            chunk_max = fmaxf(chunk_max, x[k]);
        }
        float new_max = fmaxf(maxval, chunk_max);  // finite: every chunk holds column ch * 8 <= t
        sum *= __expf(maxval - new_max);           // rescale what was summed so far (once per chunk)
        for (int k = 0; k < 8; k++) sum += __expf(x[k] - new_max);   // (the fast exp: the output is bf16)
        maxval = new_max;
    }
    float row_max = warpReduceMax(maxval);
    float row_sum = warpReduceSum(maxval == NEG_INF ? 0.0f : sum * __expf(maxval - row_max));
    float inv = 1.0f / row_sum;
    for (int ch = lane; ch < T / 8; ch += 32) {
        float x[8];
        if (ch < chunks) load8(x, preatt + base + ch * 8);
        for (int k = 0; k < 8; k++) x[k] = (ch * 8 + k <= t) ? __expf(x[k] * scale - row_max) * inv : 0.0f;
        store8(att + base + ch * 8, x);
    }
}

// dpreatt = scale * att * (datt - sum_j att_j datt_j) on the causal part of each row, zeros after it (the
// softmax's Jacobian-vector product, lesson 05). One warp per row; dpreatt may be datt (in place).
extern "C" __global__ void softmax_backward_bf16_kernel(bf16* dpreatt,       // (N, T, T)
                                                        const bf16* datt,    // (N, T, T)
                                                        const bf16* att,     // (N, T, T)
                                                        float scale, int N, int T) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N * T) return;
    int t = row % T;
    size_t base = (size_t)row * T;
    int chunks = t / 8 + 1;
    float dot = 0.0f;
    for (int ch = lane; ch < chunks; ch += 32) {
        float a[8], d[8];
        load8(a, att + base + ch * 8);
        load8(d, datt + base + ch * 8);
        for (int k = 0; k < 8 && ch * 8 + k <= t; k++) dot += a[k] * d[k];
    }
    dot = warpReduceSum(dot);
    for (int ch = lane; ch < T / 8; ch += 32) {
        float a[8], d[8];
        if (ch < chunks) {
            load8(a, att + base + ch * 8);
            load8(d, datt + base + ch * 8);
        }
        for (int k = 0; k < 8; k++) a[k] = (ch * 8 + k <= t) ? scale * a[k] * (d[k] - dot) : 0.0f;
        store8(dpreatt + base + ch * 8, a);
    }
}
