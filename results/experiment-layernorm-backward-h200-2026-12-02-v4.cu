// 4 adjacent columns a lane per chunk (8-byte bf16 loads, 16-byte float32 accesses, warp-contiguous)
#ifndef CH4
#define CH4 6
#endif
__device__ __forceinline__ void unpack4(float* f, uint2 v) {
    f[0] = bf16_lo(v.x); f[1] = bf16_hi(v.x); f[2] = bf16_lo(v.y); f[3] = bf16_hi(v.y);
}
extern "C" __global__ void layernorm_backward_bf16_kernel(float* dinp, bf16* dinp_bf16, float* partial,
                                                         const bf16* dout, const bf16* inp, const float* weight,
                                                         const float* mean, const float* rstd, int N, int C) {
    extern __shared__ float buf[];
    int lane = threadIdx.x % 32, w = threadIdx.x / 32, warps = blockDim.x / 32;
    int W = gridDim.x * warps;
    float* dw = buf + (size_t)w * 3 * C;
    float* db = dw + C;
    float* dr = db + C;
    for (int i = 0; i < CH4; i++) {
        int c = (lane + 32 * i) * 4;
        if (c < C) {
            *(float4*)(dw + c) = *(float4*)(db + c) = *(float4*)(dr + c) = make_float4(0.f, 0.f, 0.f, 0.f);
        }
    }
    for (int row0 = blockIdx.x * warps + w; row0 < N; row0 += LNR * W) {
        uint2 rd[LNR][CH4], ri[LNR][CH4];
        float m[LNR], s[LNR], a[LNR], bb[LNR];
        for (int r = 0; r < LNR; r++) {
            int row = row0 + r * W;
            bool in = row < N;
            m[r] = in ? mean[row] : 0.0f;
            s[r] = in ? rstd[row] : 0.0f;
            a[r] = bb[r] = 0.0f;
            for (int i = 0; i < CH4; i++) {
                int c = (lane + 32 * i) * 4;
                if (c < C) {
                    rd[r][i] = in ? *(const uint2*)(dout + (size_t)row * C + c) : make_uint2(0, 0);
                    ri[r][i] = in ? *(const uint2*)(inp + (size_t)row * C + c) : make_uint2(0, 0);
                }
            }
        }
        for (int i = 0; i < CH4; i++) {
            int c = (lane + 32 * i) * 4;
            if (c < C) {
                float4 wt4 = *(const float4*)(weight + c), sw4 = *(float4*)(dw + c), sb4 = *(float4*)(db + c);
                float wt[4] = {wt4.x, wt4.y, wt4.z, wt4.w}, sw[4] = {sw4.x, sw4.y, sw4.z, sw4.w}, sb[4] = {sb4.x, sb4.y, sb4.z, sb4.w};
                for (int r = 0; r < LNR; r++) {
                    float d[4], x[4];
                    unpack4(d, rd[r][i]);
                    unpack4(x, ri[r][i]);
                    for (int k = 0; k < 4; k++) {
                        float norm = (x[k] - m[r]) * s[r];
                        float dnorm = wt[k] * d[k];
                        a[r] += dnorm;
                        bb[r] += dnorm * norm;
                        sb[k] += d[k];
                        sw[k] += norm * d[k];
                    }
                }
                *(float4*)(dw + c) = make_float4(sw[0], sw[1], sw[2], sw[3]);
                *(float4*)(db + c) = make_float4(sb[0], sb[1], sb[2], sb[3]);
            }
        }
        for (int r = 0; r < LNR; r++) {
            a[r] = warpReduceSum(a[r]) / C;
            bb[r] = warpReduceSum(bb[r]) / C;
        }
        for (int i = 0; i < CH4; i++) {
            int c = (lane + 32 * i) * 4;
            if (c < C) {
                float4 wt4 = *(const float4*)(weight + c), sr4 = *(float4*)(dr + c);
                float wt[4] = {wt4.x, wt4.y, wt4.z, wt4.w}, sr[4] = {sr4.x, sr4.y, sr4.z, sr4.w};
                for (int r = 0; r < LNR; r++) {
                    int row = row0 + r * W;
                    if (row >= N) break;
                    size_t at = (size_t)row * C + c;
                    float d[4], x[4];
                    unpack4(d, rd[r][i]);
                    unpack4(x, ri[r][i]);
                    float4 g4 = *(const float4*)(dinp + at);
                    float g[4] = {g4.x, g4.y, g4.z, g4.w};
                    for (int k = 0; k < 4; k++) {
                        float norm = (x[k] - m[r]) * s[r];
                        g[k] += s[r] * (wt[k] * d[k] - a[r] - norm * bb[r]);
                        sr[k] += round_bf16(g[k]);
                    }
                    *(float4*)(dinp + at) = make_float4(g[0], g[1], g[2], g[3]);
                    *(uint2*)(dinp_bf16 + at) = make_uint2(pack_bf16x2(g[0], g[1]), pack_bf16x2(g[2], g[3]));
                }
                *(float4*)(dr + c) = make_float4(sr[0], sr[1], sr[2], sr[3]);
            }
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < 3 * C; c += blockDim.x) {
        float sum = 0.0f;
        for (int j = 0; j < warps; j++) sum += buf[(size_t)j * 3 * C + c];
        partial[(size_t)blockIdx.x * 3 * C + c] = sum;
    }
}
