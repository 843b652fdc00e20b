"""Run at bf58c8f (the tile in z). The flash kernels with the tile slowest in the grid (heaviest tiles of every
head first) against the same kernels with the tile fastest (HEAD's copy in kernels/flash_attention_head.cu, _tf32_head.cu), GPU work alone.
Checks that both give the same bits, then times forward and backward at GPT-2's shapes, and SDPA beside them."""
import sys
import numpy as np
from llmc_lessons import device, timing
from llmc_lessons.layers import flash_attention as fa
from llmc_lessons.layers.bf16 import float_to_bf16_cuda

xp = device.xp


def old_fwd(qkv, NH, filename, name, hs, out_dtype, version):
    B, T, W = qkv.shape
    C = NH * hs
    out, lse = xp.empty((B, T, C), out_dtype), xp.empty((B, NH, T), np.float32)
    fa._flash_kernel(name, hs, 1, filename=filename, version=version)(
        (-(-T // 64), NH, B), (128,), (out, lse, qkv, np.int32(B), np.int32(T), np.int32(NH), np.int32(NH)))
    return out, lse


def old_bwd_bf16(dout, qkv, out, lse, NH, hs):
    B, T, W = qkv.shape
    tiles = -(-T // 64)
    dqkv, D = xp.empty((B, T, W), np.uint16), xp.empty((B, NH, T), np.float32)
    partial = xp.empty((B * tiles, W), np.float32)
    sizes = (np.int32(B), np.int32(T), np.int32(NH), np.int32(NH))
    fa._flash_kernel("flash_attention_backward_dq_bf16_kernel", hs, 1, filename="flash_attention_head.cu", version=4)(
        (tiles, NH, B), (128,), (dqkv, partial, D, dout, qkv, out, lse, *sizes))
    fa._flash_kernel("flash_attention_backward_dkdv_bf16_kernel", hs, 1, filename="flash_attention_head.cu", version=4)(
        (tiles, NH, B), (128,), (dqkv, partial, dout, qkv, lse, D, *sizes))
    return dqkv


def old_bwd_tf32(dout, qkv, out, lse, NH, hs):
    B, T, W = qkv.shape
    dqkv, D = xp.empty(qkv.shape, np.float32), xp.empty((B, NH, T), np.float32)
    sizes = (np.int32(B), np.int32(T), np.int32(NH), np.int32(NH))
    f = "flash_attention_tf32_head.cu"
    fa._flash_kernel("flash_attention_backward_dq_tf32_kernel", hs, 1, filename=f)(
        (-(-T // 64), NH, B), (128,), (dqkv, D, dout, qkv, out, lse, *sizes))
    fa._flash_kernel("flash_attention_backward_dkdv_tf32_kernel", hs, 1, filename=f)(
        (-(-T // 64), NH, B), (128,), (dqkv, dout, qkv, lse, D, *sizes))
    return dqkv


def per_row_variant():
    """The current kernels with y and z swapped: grid (NH, tiles, B), the heaviest tiles first within each batch
    row's heads (12 heads: better L2 reuse of a head's keys and values than the whole grid's order)."""
    import pathlib
    from llmc_lessons.cuda import KERNELS_DIR
    src = (pathlib.Path(KERNELS_DIR) / "flash_attention.cu").read_text()
    src = src.replace("blockIdx.y", "@BY").replace("blockIdx.z", "blockIdx.y").replace("@BY", "blockIdx.z")
    src = src.replace("gridDim.y", "@GY").replace("gridDim.z", "gridDim.y").replace("@GY", "gridDim.z")
    (pathlib.Path(KERNELS_DIR) / "flash_attention_rows.cu").write_text(src)


def row_fwd(qkv, NH, hs):
    B, T, W = qkv.shape
    out, lse = xp.empty((B, T, NH * hs), np.uint16), xp.empty((B, NH, T), np.float32)
    fa._flash_kernel("flash_attention_forward_bf16_kernel", hs, 1, filename="flash_attention_rows.cu", version=4)(
        (NH, -(-T // 64), B), (128,), (out, lse, qkv, np.int32(B), np.int32(T), np.int32(NH), np.int32(NH)))
    return out, lse


def row_bwd(dout, qkv, out, lse, NH, hs):
    B, T, W = qkv.shape
    tiles = -(-T // 64)
    dqkv, D = xp.empty((B, T, W), np.uint16), xp.empty((B, NH, T), np.float32)
    partial = xp.empty((B * tiles, W), np.float32)
    sizes = (np.int32(B), np.int32(T), np.int32(NH), np.int32(NH))
    fa._flash_kernel("flash_attention_backward_dq_bf16_kernel", hs, 1, filename="flash_attention_rows.cu", version=4)(
        (NH, tiles, B), (128,), (dqkv, partial, D, dout, qkv, out, lse, *sizes))
    fa._flash_kernel("flash_attention_backward_dkdv_bf16_kernel", hs, 1, filename="flash_attention_rows.cu", version=4)(
        (NH, tiles, B), (128,), (dqkv, partial, dout, qkv, lse, D, *sizes))
    return dqkv


def t(fn):
    return timing.time_ms(fn, repeat=20, hide_host=True)


def main():
    import torch
    import torch.nn.functional as F
    print(device.describe())
    NH, hs = 12, 64
    per_row_variant()
    for B, T in ((16, 1024), (8, 2048), (4, 4096)):
        C = NH * hs
        gen = np.random.default_rng(T)
        q32 = xp.asarray(gen.standard_normal((B, T, 3 * C), dtype=np.float32))
        d32 = xp.asarray(gen.standard_normal((B, T, C), dtype=np.float32))
        q16, d16 = float_to_bf16_cuda(q32), float_to_bf16_cuda(d32)
        flops = 7 * B * NH * T * T * hs
        # bf16 (version 4)
        o_new, l_new = fa.flash_attention_forward_bf16_cuda(q16, NH)
        o_old, l_old = old_fwd(q16, NH, "flash_attention_head.cu", "flash_attention_forward_bf16_kernel", hs, np.uint16, 4)
        g_new = fa.flash_attention_backward_bf16_cuda(d16, q16, o_new, l_new, NH)
        g_old = old_bwd_bf16(d16, q16, o_old, l_old, NH, hs)
        same = bool((o_new == o_old).all() and (l_new == l_old).all() and (g_new == g_old).all())
        o_row, l_row = row_fwd(q16, NH, hs)
        g_row = row_bwd(d16, q16, o_row, l_row, NH, hs)
        same_row = bool((o_row == o_new).all() and (l_row == l_new).all() and (g_row == g_new).all())
        fr = t(lambda: row_fwd(q16, NH, hs))
        br = t(lambda: row_bwd(d16, q16, o_row, l_row, NH, hs))
        rows = []
        for _ in range(2):     # two rounds, alternating, to see the spread
            fn = t(lambda: fa.flash_attention_forward_bf16_cuda(q16, NH))
            bn = t(lambda: fa.flash_attention_backward_bf16_cuda(d16, q16, o_new, l_new, NH))
            fo = t(lambda: old_fwd(q16, NH, "flash_attention_head.cu", "flash_attention_forward_bf16_kernel", hs, np.uint16, 4))
            bo = t(lambda: old_bwd_bf16(d16, q16, o_old, l_old, NH, hs))
            rows.append((fo, bo, fn, bn))
        # SDPA as PyTorch picks
        tq = torch.as_tensor(q32, device="cuda").to(torch.bfloat16).view(B, T, 3, NH, hs)
        qq, kk, vv = (tq[:, :, i].transpose(1, 2).contiguous().requires_grad_() for i in range(3))
        dt = torch.as_tensor(d32, device="cuda").to(torch.bfloat16).view(B, T, NH, hs).transpose(1, 2).contiguous()
        o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
        sf = t(lambda: F.scaled_dot_product_attention(qq, kk, vv, is_causal=True))
        sb = t(lambda: torch.autograd.grad(o, (qq, kk, vv), dt, retain_graph=True))
        print(f"bf16 B={B} T={T}: same bits {same}, per-row order same bits {same_row}")
        print(f"  per batch row (grid NH, tiles, B): fwd {fr:.4f} bwd {br:.4f} ms, {flops / (fr + br) / 1e9:.1f} TFLOP/s")
        for fo, bo, fn, bn in rows:
            print(f"  tile fastest (HEAD): fwd {fo:.4f} bwd {bo:.4f} ms, {flops / (fo + bo) / 1e9:.1f} TFLOP/s | "
                  f"tile slowest: fwd {fn:.4f} bwd {bn:.4f} ms, {flops / (fn + bn) / 1e9:.1f} TFLOP/s | "
                  f"fwd {fo / fn:.3f}x bwd {bo / bn:.3f}x")
        print(f"  SDPA ({'cuDNN/auto'}): fwd {sf:.4f} bwd {sb:.4f} ms, {flops / (sf + sb) / 1e9:.1f} TFLOP/s; "
              f"course new / SDPA: {(sf + sb) / (rows[-1][2] + rows[-1][3]):.3f}x")
        # TF32
        if T <= 2048:
            o_new, l_new = fa.flash_attention_forward_tf32_cuda(q32, NH)
            o_old, l_old = old_fwd(q32, NH, "flash_attention_tf32_head.cu", "flash_attention_forward_tf32_kernel", hs, np.float32, 2)
            g_new = fa.flash_attention_backward_tf32_cuda(d32, q32, o_new, l_new, NH)
            g_old = old_bwd_tf32(d32, q32, o_old, l_old, NH, hs)
            same = bool((o_new == o_old).all() and (l_new == l_old).all() and (g_new == g_old).all())
            fn = t(lambda: fa.flash_attention_forward_tf32_cuda(q32, NH))
            bn = t(lambda: fa.flash_attention_backward_tf32_cuda(d32, q32, o_new, l_new, NH))
            fo = t(lambda: old_fwd(q32, NH, "flash_attention_tf32_head.cu", "flash_attention_forward_tf32_kernel", hs, np.float32, 2))
            bo = t(lambda: old_bwd_tf32(d32, q32, o_old, l_old, NH, hs))
            print(f"tf32 B={B} T={T}: same bits {same}; HEAD fwd {fo:.4f} bwd {bo:.4f}; new fwd {fn:.4f} bwd {bn:.4f}; "
                  f"fwd {fo / fn:.3f}x bwd {bo / bn:.3f}x")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
