#include "bf16.cuh"
// four elements a thread: 16-byte loads of grads, m, v, master; one 8-byte store of the four bf16 copies
extern "C" __global__ void adamw_bf16_kernel4(float* master, bf16* params, const float* grads, float* m, float* v,
                                              int N, float lr, float beta1, float beta2, float beta1_correction,
                                              float beta2_correction, float eps, float weight_decay,
                                              float grad_scale, int stochastic, unsigned int seed) {
    int i4 = blockIdx.x * blockDim.x + threadIdx.x;
    int i = 4 * i4;
    if (i + 3 < N) {
        float4 g = ((const float4*)grads)[i4], mm = ((float4*)m)[i4], vv = ((float4*)v)[i4], pp = ((float4*)master)[i4];
        float gs[4] = {g.x, g.y, g.z, g.w}, ms[4] = {mm.x, mm.y, mm.z, mm.w}, vs[4] = {vv.x, vv.y, vv.z, vv.w};
        float ps[4] = {pp.x, pp.y, pp.z, pp.w};
        unsigned short out[4];
        for (int k = 0; k < 4; k++) {
            float gk = gs[k] * grad_scale;
            float mi = beta1 * ms[k] + (1.0f - beta1) * gk;
            float vi = beta2 * vs[k] + (1.0f - beta2) * gk * gk;
            ms[k] = mi; vs[k] = vi;
            float p = ps[k];
            p -= lr * ((mi / beta1_correction) / (sqrtf(vi / beta2_correction) + eps) + weight_decay * p);
            ps[k] = p;
            out[k] = stochastic ? bf16_stochastic(p, seed, (unsigned int)(i + k)) : bf16_from_float(p);
        }
        ((float4*)m)[i4] = make_float4(ms[0], ms[1], ms[2], ms[3]);
        ((float4*)v)[i4] = make_float4(vs[0], vs[1], vs[2], vs[3]);
        ((float4*)master)[i4] = make_float4(ps[0], ps[1], ps[2], ps[3]);
        uint2 o; o.x = out[0] | ((unsigned int)out[1] << 16); o.y = out[2] | ((unsigned int)out[3] << 16);
        ((uint2*)params)[i4] = o;
    } else {
        for (; i < N; i++) {
            float gk = grads[i] * grad_scale;
            float mi = beta1 * m[i] + (1.0f - beta1) * gk;
            float vi = beta2 * v[i] + (1.0f - beta2) * gk * gk;
            m[i] = mi; v[i] = vi;
            float p = master[i];
            p -= lr * ((mi / beta1_correction) / (sqrtf(vi / beta2_correction) + eps) + weight_decay * p);
            master[i] = p;
            params[i] = stochastic ? bf16_stochastic(p, seed, (unsigned int)i) : bf16_from_float(p);
        }
    }
}
