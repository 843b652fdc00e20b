"""Causal multi-head self-attention: the only layer of GPT-2 where positions talk to each other.

    qkv (B, T, 3C) = [q | k | v] along the last axis, each C = NH * hs wide, head h at columns h*hs:(h+1)*hs
    preatt[b, h, t, t2] = q[b, t, h] . k[b, t2, h] / sqrt(hs)         for t2 <= t (the past and itself)
    att[b, h, t, :]     = softmax over t2 <= t of preatt[b, h, t, :]  (exactly 0 for t2 > t: the future)
    out[b, t, h]        = sum over t2 of att[b, h, t, t2] * v[b, t2, h]   -> out (B, T, C)

Shapes: B batch, T positions, C channels, NH heads, hs = C / NH channels per head.

Grouped-query attention (GQA, lesson 16) keeps fewer key/value heads than query heads: NKV of them, NKV
dividing NH, and the NH / NKV query heads of group g = h // (NH / NKV) share key/value head g. Then qkv is
(B, T, (NH + 2 NKV) hs) = [q (NH heads) | k (NKV heads) | v (NKV heads)]. repkv_forward copies each key/value
head to the query heads of its group, giving the (B, T, 3C) layout above, and attention runs as before;
repkv_backward sums the gradients of a group's copies back into its one head. NKV = NH (GPT-2) changes nothing.

Read top-down: the NumPy references (split into heads, causal softmax, forward, backward), then the
launchers of the kernels in `kernels/attention.cu`:
  forward version "naive":  attention_forward_kernel1, one thread per (b, t, h) row does everything;
  forward version "cublas": permute_kernel -> batched matmul (cuBLAS through CuPy on a GPU, NumPy's matmul on
                            the CPU) -> softmax_forward_kernel (one warp per row) -> batched matmul ->
                            unpermute_kernel, the structure llm.c's train_gpt2.cu uses;
  backward: unpermute_kernel_backward -> batched matmuls -> softmax_autoregressive_backward_kernel ->
            batched matmuls -> permute_kernel_backward;
  GQA: repkv_forward_kernel before the forward, repkv_backward_kernel after the backward.
"""
from __future__ import annotations

import math

import numpy as np

from llmc_lessons import device
from llmc_lessons.cublas import gemm_batched
from llmc_lessons.cuda import load_kernel
from llmc_lessons.layers.bf16 import launch_1d, require_bf16_array, require_multiple_of_8

# ---------------------------------------------------------------------------------------------------------
# NumPy reference


def _kv_heads(NH, NKV, where: str) -> int:
    """NKV checked against NH (None: NKV = NH): positive ints, NKV dividing NH."""
    for name, value in (("NH (the number of heads)", NH), ("NKV (the number of key/value heads)", NKV)):
        if (value is not None or name[:2] == "NH") and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
    NKV = NH if NKV is None else NKV
    if NH % NKV:
        raise ValueError(f"{where}: NKV = {NKV} key/value heads must divide NH = {NH} query heads (each serves "
                         f"a group of NH / NKV)")
    return int(NKV)


def _sizes(qkv, NH, where: str, NKV=None):
    """(B, T, C, hs) from qkv (B, T, (NH + 2 NKV) hs) and NH, NKV (None: NKV = NH, qkv is (B, T, 3C)), with a
    clear error when they do not fit together."""
    NKV = _kv_heads(NH, NKV, where)
    if NKV == NH:
        if qkv.ndim != 3 or qkv.shape[2] % 3:
            raise ValueError(f"{where}: qkv must have shape (B, T, 3C), got {tuple(qkv.shape)}")
        B, T, C3 = qkv.shape
        C = C3 // 3
        if C % NH:
            raise ValueError(f"{where}: C = {C} channels do not split into NH = {NH} heads (C % NH must be 0)")
        return B, T, C, C // NH
    if qkv.ndim != 3 or qkv.shape[2] % (NH + 2 * NKV):
        raise ValueError(f"{where}: qkv must have shape (B, T, (NH + 2 NKV) hs) with NH = {NH}, NKV = {NKV}, got "
                         f"{tuple(qkv.shape)}")
    B, T, width = qkv.shape
    hs = width // (NH + 2 * NKV)
    return B, T, NH * hs, hs


def split_heads(x, NH):
    """(B, T, C) -> (B, NH, T, hs): head h is the channels h*hs:(h+1)*hs, moved to an axis of its own."""
    B, T, C = x.shape
    return x.reshape(B, T, NH, C // NH).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, NH, T, hs) -> (B, T, C): the inverse of split_heads (a C-contiguous copy)."""
    B, NH, T, hs = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(B, T, NH * hs)


def causal_softmax(preatt, inv_temperature=1.0):
    """(..., T, T) -> (..., T, T): row t is softmax(inv_temperature * preatt[t, :t+1]), then zeros for t2 > t.

    The row maximum is subtracted before exp (softmax does not change when every entry moves by the same
    amount, and exp of a large number overflows). Masked entries become exactly 0.
    """
    preatt = np.asarray(preatt)
    T = preatt.shape[-1]
    visible = np.tril(np.ones((T, T), dtype=bool))                         # visible[t, t2] = (t2 <= t)
    scores = np.where(visible, preatt * np.asarray(inv_temperature, dtype=preatt.dtype), -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)                   # the diagonal is always visible
    e = np.exp(scores)                                                      # exp(-inf) = 0 for the future
    return e / e.sum(axis=-1, keepdims=True)


def repkv_forward(qkv, NH, NKV):
    """(B, T, (NH + 2 NKV) hs) -> (B, T, 3C), C = NH * hs: q as it is, each of the NKV key (and value) heads
    copied to the NH / NKV query heads of its group (query head h reads key/value head h // (NH / NKV))."""
    qkv = np.asarray(qkv)
    B, T, C, hs = _sizes(qkv, NH, "repkv_forward", NKV)
    group = NH // NKV
    k = qkv[:, :, C:C + NKV * hs].reshape(B, T, NKV, 1, hs)
    v = qkv[:, :, C + NKV * hs:].reshape(B, T, NKV, 1, hs)
    k_rep = np.broadcast_to(k, (B, T, NKV, group, hs)).reshape(B, T, C)   # heads g, g, .., g+1, g+1, ..
    v_rep = np.broadcast_to(v, (B, T, NKV, group, hs)).reshape(B, T, C)
    return np.concatenate([qkv[:, :, :C], k_rep, v_rep], axis=2)


def repkv_backward(dqkv_rep, NH, NKV):
    """(B, T, 3C) -> (B, T, (NH + 2 NKV) hs): the backward of repkv_forward. A key/value head was read by
    each of its group's query heads, so its gradient is the SUM of its copies' gradients."""
    dqkv_rep = np.asarray(dqkv_rep)
    B, T, C, hs = _sizes(dqkv_rep, NH, "repkv_backward")
    NKV = _kv_heads(NH, NKV, "repkv_backward")
    group = NH // NKV
    dk = dqkv_rep[:, :, C:2 * C].reshape(B, T, NKV, group, hs).sum(axis=3).reshape(B, T, NKV * hs)
    dv = dqkv_rep[:, :, 2 * C:].reshape(B, T, NKV, group, hs).sum(axis=3).reshape(B, T, NKV * hs)
    return np.concatenate([dqkv_rep[:, :, :C], dk, dv], axis=2)


def attention_forward(qkv, NH, NKV=None):
    """(B, T, 3C) -> out (B, T, C), att (B, NH, T, T): causal self-attention with NH heads.

    With NKV key/value heads (grouped-query attention), qkv is (B, T, (NH + 2 NKV) hs) and is first expanded
    by repkv_forward. att is the post-softmax attention (zeros above the diagonal); the backward needs it.
    """
    qkv = np.asarray(qkv)
    B, T, C, hs = _sizes(qkv, NH, "attention_forward", NKV)
    if NKV is not None and NKV != NH:
        qkv = repkv_forward(qkv, NH, NKV)                # (B, T, 3C)
    q = split_heads(qkv[:, :, 0 * C:1 * C], NH)         # (B, NH, T, hs)
    k = split_heads(qkv[:, :, 1 * C:2 * C], NH)         # (B, NH, T, hs)
    v = split_heads(qkv[:, :, 2 * C:3 * C], NH)         # (B, NH, T, hs)
    scale = 1.0 / math.sqrt(hs)
    preatt = q @ k.transpose(0, 1, 3, 2)                # (B, NH, T, T): preatt[t, t2] = q_t . k_t2
    att = causal_softmax(preatt, scale)                 # (B, NH, T, T), rows sum to 1, future = 0
    out_h = att @ v                                     # (B, NH, T, hs): weighted sum of the values
    return merge_heads(out_h), att


def attention_backward(dout, qkv, att, NH, NKV=None):
    """(B, T, C), (B, T, 3C), (B, NH, T, T) -> dqkv (B, T, 3C), laid out [dq | dk | dv] like qkv.

    The forward's steps in reverse; see lesson 05 for the derivation of each line. With NKV key/value heads,
    qkv and dqkv are (B, T, (NH + 2 NKV) hs), and repkv_backward sums each group's gradients (lesson 16).
    """
    dout, qkv, att = np.asarray(dout), np.asarray(qkv), np.asarray(att)
    B, T, C, hs = _sizes(qkv, NH, "attention_backward", NKV)
    if dout.shape != (B, T, C):
        raise ValueError(f"attention_backward: dout must have shape (B, T, C) = {(B, T, C)}, got {dout.shape}")
    if att.shape != (B, NH, T, T):
        raise ValueError(f"attention_backward: att must have shape (B, NH, T, T) = {(B, NH, T, T)}, "
                         f"got {att.shape}")
    grouped = NKV is not None and NKV != NH
    if grouped:
        qkv = repkv_forward(qkv, NH, NKV)                # (B, T, 3C)
    q = split_heads(qkv[:, :, 0 * C:1 * C], NH)         # (B, NH, T, hs)
    k = split_heads(qkv[:, :, 1 * C:2 * C], NH)
    v = split_heads(qkv[:, :, 2 * C:3 * C], NH)
    scale = 1.0 / math.sqrt(hs)
    dout_h = split_heads(dout, NH)                      # (B, NH, T, hs)
    # out_h = att @ v
    datt = dout_h @ v.transpose(0, 1, 3, 2)             # (B, NH, T, T)
    dv = att.transpose(0, 1, 3, 2) @ dout_h             # (B, NH, T, hs)
    # att = softmax(scale * preatt) row by row: the Jacobian-vector product of softmax, times the scale
    dpreatt = att * (datt - (att * datt).sum(axis=-1, keepdims=True)) * np.asarray(scale, dtype=att.dtype)
    # preatt = q @ k^T
    dq = dpreatt @ k                                    # (B, NH, T, hs)
    dk = dpreatt.transpose(0, 1, 3, 2) @ q              # (B, NH, T, hs)
    dqkv = np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=2)
    return repkv_backward(dqkv, NH, NKV) if grouped else dqkv


# ---------------------------------------------------------------------------------------------------------
# Kernel launchers (backend arrays: CuPy on a GPU, NumPy + the emulator on a CPU)


def _permute(qkv, B, T, NH, hs, block_size):
    """(B, T, 3C) -> q, k, v each (B, NH, T, hs) through permute_kernel."""
    xp = device.xp
    q, k, v = (xp.empty((B, NH, T, hs), dtype=np.float32) for _ in range(3))
    launch_1d("attention.cu", "permute_kernel", B * NH * T * hs, block_size,
              (q, k, v, qkv, np.int32(B), np.int32(T), np.int32(NH), np.int32(hs)))
    return q, k, v


def _softmax_rows(kernel, N, T, block_size, args) -> None:
    """Launch a one-warp-per-row kernel over the N*T rows of an (N, T, T) array."""
    warps_per_block = block_size // 32
    if N * T:
        kernel(((N * T + warps_per_block - 1) // warps_per_block,), (block_size,), args)




def attention_forward_cuda(qkv, NH, version: str = "cublas", block_size: int = 256, NKV=None):
    """(B, T, 3C) -> out (B, T, C), att (B, NH, T, T) through the kernels of attention.cu.

    version "naive": attention_forward_kernel1, one thread per (b, t, h).
    version "cublas": permute -> batched matmul -> softmax_forward_kernel -> batched matmul -> unpermute.
    block_size: threads per block (a multiple of 32 for "cublas", whose softmax gives each row a warp).
    NKV: key/value heads (grouped-query attention, qkv (B, T, (NH + 2 NKV) hs)), expanded by repkv first.
    """
    if version not in ("naive", "cublas"):
        raise ValueError(f"version must be 'naive' or 'cublas', got {version!r}")
    block_size = device.require_block_size(block_size, warps=(version == "cublas"))
    device.require_array("qkv", qkv, shape=(None, None, None))
    B, T, C, hs = _sizes(qkv, NH, "attention_forward_cuda", NKV)
    NH = int(NH)
    if NKV is not None and NKV != NH:
        qkv = repkv_forward_cuda(qkv, NH, NKV, block_size)
    xp = device.xp
    out = xp.empty((B, T, C), dtype=np.float32)
    att = xp.empty((B, NH, T, T), dtype=np.float32)
    if version == "naive":
        launch_1d("attention.cu", "attention_forward_kernel1", B * T * NH, block_size,
                  (out, att, qkv, np.int32(B), np.int32(T), np.int32(C), np.int32(NH)))
        return out, att
    N = B * NH
    q, k, v = _permute(qkv, B, T, NH, hs, block_size)                   # each (B, NH, T, hs)
    preatt = gemm_batched(q.reshape(N, T, hs), k.reshape(N, T, hs), trans_b=True)  # (N, T, T), unscaled
    _softmax_rows(load_kernel("attention.cu", "softmax_forward_kernel"), N, T, block_size,
                  (att, np.float32(1.0 / math.sqrt(hs)), preatt, np.int32(N), np.int32(T)))
    out_h = gemm_batched(att.reshape(N, T, T), v.reshape(N, T, hs))             # (N, T, hs)
    launch_1d("attention.cu", "unpermute_kernel", B * NH * T * hs, block_size,
              (out, out_h, np.int32(B), np.int32(T), np.int32(NH), np.int32(hs)))
    return out, att


def attention_backward_cuda(dout, qkv, att, NH, block_size: int = 256, NKV=None):
    """(B, T, C), (B, T, 3C), (B, NH, T, T) -> dqkv (B, T, 3C) through the backward kernels of attention.cu.

    q, k, v are permuted again from qkv (llm.c keeps them from the forward pass instead).
    block_size: threads per block, a multiple of 32 (the softmax backward gives each row a warp).
    NKV: key/value heads (grouped-query attention): qkv and dqkv are (B, T, (NH + 2 NKV) hs).
    """
    block_size = device.require_block_size(block_size, warps=True)
    device.require_array("qkv", qkv, shape=(None, None, None))
    B, T, C, hs = _sizes(qkv, NH, "attention_backward_cuda", NKV)
    NH = int(NH)
    grouped = NKV is not None and NKV != NH
    if grouped:
        qkv = repkv_forward_cuda(qkv, NH, NKV, block_size)
    device.require_array("dout", dout, shape=(B, T, C))
    device.require_array("att", att, shape=(B, NH, T, T))
    xp = device.xp
    N = B * NH
    q, k, v = _permute(qkv, B, T, NH, hs, block_size)                   # each (B, NH, T, hs)
    n = B * NH * T * hs
    dout_h = xp.empty((B, NH, T, hs), dtype=np.float32)
    launch_1d("attention.cu", "unpermute_kernel_backward", n, block_size,
              (dout_h, dout, np.int32(B), np.int32(T), np.int32(NH), np.int32(hs)))
    dout_h, q, k, v = (a.reshape(N, T, hs) for a in (dout_h, q, k, v))
    att3 = att.reshape(N, T, T)
    datt = gemm_batched(dout_h, v, trans_b=True)                           # (N, T, T)
    dv = gemm_batched(att3, dout_h, trans_a=True)                          # (N, T, hs)
    dpreatt = xp.empty((N, T, T), dtype=np.float32)
    _softmax_rows(load_kernel("attention.cu", "softmax_autoregressive_backward_kernel"), N, T, block_size,
                  (dpreatt, datt, att3, np.int32(N), np.int32(T), np.float32(1.0 / math.sqrt(hs))))
    dq = gemm_batched(dpreatt, k)                                              # (N, T, hs)
    dk = gemm_batched(dpreatt, q, trans_a=True)                            # (N, T, hs)
    dqkv = xp.empty((B, T, 3 * C), dtype=np.float32)
    launch_1d("attention.cu", "permute_kernel_backward", n, block_size,
              (dqkv, dq, dk, dv, np.int32(B), np.int32(T), np.int32(NH), np.int32(hs)))
    return repkv_backward_cuda(dqkv, NH, NKV, block_size) if grouped else dqkv


def repkv_forward_cuda(qkv, NH: int, NKV: int, block_size: int = 256):
    """(B, T, (NH + 2 NKV) hs) -> (B, T, 3C) through repkv_forward_kernel (grouped-query attention)."""
    block_size = device.require_block_size(block_size)
    device.require_array("qkv", qkv, shape=(None, None, None))
    NKV = _kv_heads(NH, NKV, "repkv_forward_cuda")
    B, T, C, hs = _sizes(qkv, NH, "repkv_forward_cuda", NKV)
    out = device.xp.empty((B, T, 3 * C), dtype=np.float32)
    launch_1d("attention.cu", "repkv_forward_kernel", out.size, block_size,
              (out, qkv, np.int32(B), np.int32(T), np.int32(NH), np.int32(NKV), np.int32(hs)))
    return out


def repkv_backward_cuda(dqkv_rep, NH: int, NKV: int, block_size: int = 256):
    """(B, T, 3C) -> (B, T, (NH + 2 NKV) hs) through repkv_backward_kernel: each key/value head's gradient is
    the sum over its group's copies."""
    block_size = device.require_block_size(block_size)
    device.require_array("dqkv_rep", dqkv_rep, shape=(None, None, None))
    B, T, C, hs = _sizes(dqkv_rep, NH, "repkv_backward_cuda")
    NKV = _kv_heads(NH, NKV, "repkv_backward_cuda")
    out = device.xp.empty((B, T, (NH + 2 * NKV) * hs), dtype=np.float32)
    launch_1d("attention.cu", "repkv_backward_kernel", out.size, block_size,
              (out, dqkv_rep, np.int32(B), np.int32(T), np.int32(NH), np.int32(NKV), np.int32(hs)))
    return out


# ---------------------------------------------------------------------------------------------------------
# bf16 (lesson 14): launchers of the bf16 kernels in kernels/attention.cu (bf16 arrays are uint16 arrays of
# the bits; layers/bf16.py has the checks they share)


def split_heads_bf16_cuda(inp, n: int, NH: int, bias=None, block_size: int = 256):
    """(B, T, n*C) bf16 [+ bias (n*C,) float32] -> (n, B, NH, T, hs) bf16: q, k, v as one matrix per head
    (n = 3, from qkv with its bias) or the gradient of attention's output (n = 1, no bias)."""
    require_bf16_array("inp", inp, (None, None, None))
    B, T, nC = inp.shape
    n, NH = device.require_int("n", n), device.require_int("NH", NH)
    if nC % (n * NH):
        raise ValueError(f"the last axis ({nC}) must be n * C with C a multiple of NH = {NH} (n = {n})")
    hs = require_multiple_of_8("the head size", nC // (n * NH))
    if bias is None:
        bias = device.xp.zeros((nC,), np.float32)
    device.require_array("bias", bias, shape=(nC,))
    out = device.xp.empty((n, B, NH, T, hs), np.uint16)
    launch_1d("attention.cu", "split_heads_bf16_kernel", out.size // 8, device.require_block_size(block_size),
              (out, inp, bias, np.int32(n), np.int32(B), np.int32(T), np.int32(NH), np.int32(hs)))
    return out


def merge_heads_bf16_cuda(inp, block_size: int = 256):
    """(n, B, NH, T, hs) bf16 -> (B, T, n*NH*hs) bf16, the inverse of split_heads_bf16_cuda (no bias)."""
    require_bf16_array("inp", inp, (None, None, None, None, None))
    n, B, NH, T, hs = inp.shape
    require_multiple_of_8("the head size", hs)
    out = device.xp.empty((B, T, n * NH * hs), np.uint16)
    launch_1d("attention.cu", "merge_heads_bf16_kernel", out.size // 8, device.require_block_size(block_size),
              (out, inp, np.int32(n), np.int32(B), np.int32(T), np.int32(NH), np.int32(hs)))
    return out


def softmax_forward_bf16_cuda(preatt, scale: float, out=None, block_size: int = 256):
    """(N, T, T) bf16 scores -> causal softmax(scale * scores) (N, T, T) bf16; out may be preatt (in place)."""
    require_bf16_array("preatt", preatt, (None, None, None))
    N, T, T2 = preatt.shape
    if T != T2:
        raise ValueError(f"preatt must be (N, T, T), got {tuple(preatt.shape)}")
    require_multiple_of_8("T", T)
    out = device.xp.empty_like(preatt) if out is None else require_bf16_array("out", out, preatt.shape)
    block_size = device.require_block_size(block_size, warps=True)
    launch_1d("attention.cu", "softmax_forward_bf16_kernel", N * T * 32, block_size,
              (out, preatt, np.float32(scale), np.int32(N), np.int32(T)))
    return out


def softmax_backward_bf16_cuda(datt, att, scale: float, out=None, block_size: int = 256):
    """(N, T, T) bf16 datt and att -> dpreatt (N, T, T) bf16 (causal, times scale); out may be datt."""
    require_bf16_array("att", att, (None, None, None))
    N, T, _ = att.shape
    require_multiple_of_8("T", T)
    require_bf16_array("datt", datt, att.shape)
    out = device.xp.empty_like(att) if out is None else require_bf16_array("out", out, att.shape)
    block_size = device.require_block_size(block_size, warps=True)
    launch_1d("attention.cu", "softmax_backward_bf16_kernel", N * T * 32, block_size,
              (out, datt, att, np.float32(scale), np.int32(N), np.int32(T)))
    return out


def attention_forward_bf16_cuda(qkv, qkvb, NH: int, block_size: int = 256):
    """qkv (B, T, 3C) bf16 (the product, no bias), qkvb (3C,) float32 -> atty (B, T, C) bf16, and for the
    backward qkvh (3, B, NH, T, hs) (q, k, v per head) and att (B, NH, T, T), all bf16.

    split heads (+ bias) -> preatt = q @ k^T (cuBLAS, bf16 out) -> causal softmax in place -> att @ v -> merge.
    The model runs flash attention instead (layers/flash_attention.py, version 2 or 4); this is the baseline it is
    measured against (bench.bench_attention).
    """
    require_bf16_array("qkv", qkv, (None, None, None))
    B, T, C3 = qkv.shape
    qkvh = split_heads_bf16_cuda(qkv, 3, NH, qkvb, block_size)
    _, _, NH, _, hs = qkvh.shape
    N = B * NH
    q, k, v = (qkvh[i].reshape(N, T, hs) for i in range(3))
    att = gemm_batched(q, k, trans_b=True)                                # (N, T, T) unscaled scores
    softmax_forward_bf16_cuda(att, 1.0 / np.sqrt(hs), out=att, block_size=block_size)
    y = gemm_batched(att, v)                                              # (N, T, hs)
    atty = merge_heads_bf16_cuda(y.reshape(1, B, NH, T, hs), block_size)
    return atty, qkvh, att.reshape(B, NH, T, T)


def attention_backward_bf16_cuda(datty, qkvh, att, block_size: int = 256):
    """datty (B, T, C), qkvh (3, B, NH, T, hs), att (B, NH, T, T) bf16 -> dqkv (B, T, 3C) bf16 (no bias
    gradient: the step's flash attention backward sums it, flash_attention_backward_bf16_cuda(dbias=))."""
    require_bf16_array("qkvh", qkvh, (3, None, None, None, None))
    _, B, NH, T, hs = qkvh.shape
    require_bf16_array("datty", datty, (B, T, NH * hs))
    require_bf16_array("att", att, (B, NH, T, T))
    N = B * NH
    dy = split_heads_bf16_cuda(datty, 1, NH, block_size=block_size).reshape(N, T, hs)
    q, k, v = (qkvh[i].reshape(N, T, hs) for i in range(3))
    att3 = att.reshape(N, T, T)
    dqkvh = device.xp.empty((3, N, T, hs), np.uint16)
    datt = gemm_batched(dy, v, trans_b=True)                              # (N, T, T)
    gemm_batched(att3, dy, trans_a=True, out=dqkvh[2])                    # dv = att^T @ dy
    softmax_backward_bf16_cuda(datt, att3, 1.0 / np.sqrt(hs), out=datt, block_size=block_size)
    gemm_batched(datt, k, out=dqkvh[0])                                   # dq = dpreatt @ k
    gemm_batched(datt, q, trans_a=True, out=dqkvh[1])                     # dk = dpreatt^T @ q
    return merge_heads_bf16_cuda(dqkvh.reshape(3, B, NH, T, hs), block_size)
