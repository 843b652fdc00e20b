"""Flash attention (lesson 13): causal self-attention without the (B, NH, T, T) matrices.

The forward walks the keys in tiles and keeps, per query row, a running maximum m, a running sum l and an
output accumulator o (the online softmax); it returns out (B, T, C), as lesson 05's attention, and
L = m + log(l) (B, NH, T) instead of att. The backward recomputes each probability from L.

Version 2 runs the same algorithm in bf16 on the tensor cores; the bf16 models use it. Version 3 (the last
section) runs it in TF32 on the tensor cores, on float32 data; the fp32 models use it when TF32 matmuls are on.
Both take NKV <= NH key/value heads (grouped-query attention, lesson 16) and read a group's head in place.
"""
from __future__ import annotations

import math

import numpy as np

from llmc_lessons import device
from llmc_lessons.cuda import SM90A, load_kernel
from llmc_lessons.layers.attention import _kv_heads, _sizes, merge_heads, split_heads
from llmc_lessons.layers.bf16 import require_aligned16, require_bf16_array
from llmc_lessons.layers.layernorm import column_sum_add_cuda

HS_MAX = 64  # flash_attention.cu keeps hs floats per thread in registers


def online_softmax_update(m, l, o, s, v):
    """One tile of the online softmax: running max m (R,), sum l (R,), accumulator o (R, hs); scores s (R, n)
    of this tile's n keys (-inf where masked) and their values v (n, hs) -> the updated (m, l, o)."""
    m_new = np.maximum(m, s.max(axis=-1))
    correction = np.exp(m - m_new)               # rescales what was summed against the old maximum
    p = np.exp(s - m_new[:, None])
    return m_new, l * correction + p.sum(axis=-1), o * correction[:, None] + p @ v


def flash_attention_forward(qkv, NH, Bc: int = 16):
    """(B, T, 3C) -> out (B, T, C), L (B, NH, T), walking the keys in tiles of Bc (NumPy reference)."""
    B, T, C, hs = _sizes(qkv, NH, "flash_attention_forward")
    q, k, v = (split_heads(qkv[..., i * C:(i + 1) * C], NH) for i in range(3))   # (B, NH, T, hs)
    dtype = np.result_type(qkv.dtype, np.float32)
    out_h = np.zeros((B, NH, T, hs), dtype)
    L = np.zeros((B, NH, T), dtype)
    rows = np.arange(T)
    for b in range(B):
        for h in range(NH):
            m, l, o = np.full(T, -np.inf, dtype), np.zeros(T, dtype), np.zeros((T, hs), dtype)
            for j0 in range(0, T, Bc):
                cols = np.arange(j0, min(j0 + Bc, T))
                s = (q[b, h] @ k[b, h, cols].T) / math.sqrt(hs)                  # (T, n): one tile, not T x T
                s = np.where(cols[None, :] <= rows[:, None], s, -np.inf)         # causal mask
                seen = cols[0] <= rows                                           # rows with a key in this tile
                m[seen], l[seen], o[seen] = online_softmax_update(m[seen], l[seen], o[seen], s[seen], v[b, h, cols])
            out_h[b, h] = o / l[:, None]
            L[b, h] = m + np.log(l)
    return merge_heads(out_h), L


def flash_attention_backward(dout, qkv, out, L, NH):
    """(B, T, C), (B, T, 3C), (B, T, C), (B, NH, T) -> dqkv (B, T, 3C), recomputing P = exp(S - L) (NumPy)."""
    B, T, C, hs = _sizes(qkv, NH, "flash_attention_backward")
    q, k, v = (split_heads(qkv[..., i * C:(i + 1) * C], NH) for i in range(3))
    do, o = split_heads(dout, NH), split_heads(out, NH)
    scale = 1.0 / math.sqrt(hs)
    s = (q @ k.swapaxes(-1, -2)) * scale                                      # (B, NH, T, T), NumPy only
    p = np.where(np.tril(np.ones((T, T), bool)), np.exp(s - L[..., None]), 0.0)
    D = (do * o).sum(-1)                                                      # = sum_j p_ij dp_ij
    dp = do @ v.swapaxes(-1, -2)
    ds = p * (dp - D[..., None])
    dq, dk, dv = ds @ k * scale, ds.swapaxes(-1, -2) @ q * scale, p.swapaxes(-1, -2) @ do
    return np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)


def _check(qkv, NH, block_size, where):
    device.require_array("qkv", qkv, shape=(None, None, None))
    B, T, C, hs = _sizes(qkv, NH, where)
    if hs > HS_MAX:
        raise ValueError(f"{where}: head size hs = {hs} exceeds {HS_MAX}, the most a thread of the kernel holds in "
                         f"registers (GPT-2 uses 64)")
    device.require_block_size(block_size)
    return B, T, C, hs


def flash_attention_forward_cuda(qkv, NH, block_size: int = 32, kernel=None):
    """(B, T, 3C) -> out (B, T, C), L (B, NH, T) through flash_attention_forward_kernel.

    block_size: query rows per block, and key rows per tile. kernel: a RawKernel with the same parameters
    to launch instead (the lesson's exercise check uses it).
    """
    B, T, C, hs = _check(qkv, NH, block_size, "flash_attention_forward_cuda")
    NH, xp = int(NH), device.xp
    out, L = xp.empty((B, T, C), np.float32), xp.empty((B, NH, T), np.float32)
    if B * T:
        (kernel or load_kernel("flash_attention.cu", "flash_attention_forward_kernel"))(
            (-(-T // block_size), B * NH), (block_size,),
            (out, L, qkv, np.int32(B), np.int32(T), np.int32(NH), np.int32(hs), np.float32(1.0 / math.sqrt(hs))),
            shared_mem=2 * block_size * hs * 4)
    return out, L


def flash_attention_backward_cuda(dout, qkv, out, L, NH, block_size: int = 32):
    """(B, T, C), (B, T, 3C), (B, T, C), (B, NH, T) -> dqkv (B, T, 3C) through the two backward kernels."""
    B, T, C, hs = _check(qkv, NH, block_size, "flash_attention_backward_cuda")
    NH, xp = int(NH), device.xp
    device.require_array("dout", dout, shape=(B, T, C))
    device.require_array("out", out, shape=(B, T, C))
    device.require_array("L", L, shape=(B, NH, T))
    D = xp.ascontiguousarray((dout * out).reshape(B, T, NH, hs).sum(-1).transpose(0, 2, 1))   # (B, NH, T)
    dqkv = xp.empty((B, T, 3 * C), np.float32)
    if B * T:
        grid, args = (-(-T // block_size), B * NH), (dqkv, dout, qkv, L, D, np.int32(B), np.int32(T), np.int32(NH),
                                                      np.int32(hs), np.float32(1.0 / math.sqrt(hs)))
        load_kernel("flash_attention.cu", "flash_attention_backward_kv_kernel")(
            grid, (block_size,), args, shared_mem=(2 * block_size * hs + 2 * block_size) * 4)
        load_kernel("flash_attention.cu", "flash_attention_backward_q_kernel")(
            grid, (block_size,), args, shared_mem=2 * block_size * hs * 4)
    return dqkv


# ---------------------------------------------------------------------------------------------------------
# Version 2: bf16 on the tensor cores (flash_attention.cu's second half; GPT2(precision="bf16") uses it).

FA_ROWS = 64          # rows a block owns and rows per staged tile
FA_THREADS = 128      # 4 warps of 16 rows
BF16_HEAD_SIZES = (16, 32, 48, 64)   # hs is compiled in (-DHS); shared memory fits these


def tile_grid(T: int, heads: int, B: int) -> tuple:
    """The grid of the tensor-core flash kernels: (heads, tiles of FA_ROWS rows, B), so that the GPU starts the
    heaviest tiles of a batch row's heads first (mma.cuh, "The order of the blocks")."""
    return (int(heads), -(-int(T) // FA_ROWS), int(B))


def mma_bf16_16816_cuda(A, B, C):
    """One tensor-core instruction through mma_bf16_16816_kernel: A (16, 16) and B (16, 8) bf16 bits, C (16, 8)
    float32 -> D = A @ B + C (16, 8) float32, and regs (32, 4): what each lane's accumulator registers held."""
    require_bf16_array("A", A, (16, 16))
    require_bf16_array("B", B, (16, 8))
    device.require_array("C", C, shape=(16, 8))
    D, regs = device.xp.empty((16, 8), np.float32), device.xp.empty((32, 4), np.float32)
    _flash_kernel("mma_bf16_16816_kernel", 64)((1,), (32,), (D, regs, A, B, C))
    return D, regs


def _check_bf16(qkv, NH, where, NKV=None):
    """(B, T, C, hs, NKV) of qkv (B, T, (NH + 2 NKV) hs) bf16 (NKV None: NH), or a clear error."""
    require_bf16_array("qkv", qkv, (None, None, None))
    B, T, C, hs = _sizes(qkv, NH, where, NKV)
    if hs not in BF16_HEAD_SIZES:
        raise ValueError(f"{where}: head size hs = {hs} is not one of {BF16_HEAD_SIZES}: the tensor-core kernels "
                         f"work on 16-wide pieces of a head and keep their tiles in 48 KiB of shared memory")
    return B, T, C, hs, _tensor_core_kv_heads(NH, NKV, where)


def _tensor_core_kv_heads(NH, NKV, where) -> int:
    """NKV (None: NH) checked as attention's _kv_heads does, and refused where the tensor-core kernels'
    multiply-and-shift division h / (NH / NKV) (kv_head in mma.cuh) stops being exact."""
    NKV = _kv_heads(NH, NKV, where)
    if NH * (NH // NKV) > 2 ** 15:
        raise ValueError(f"{where}: NH * (NH / NKV) = {NH * (NH // NKV)} exceeds 2^15, where the kernels' "
                         f"multiply-and-shift division h / (NH / NKV) (kv_head) stops being exact")
    return NKV


WGMMA_HEAD_SIZES = (64,)   # version 4: its tiles have rows of 128 bytes, wgmma's swizzle atom (mma.cuh)


def flash_version(hs: int) -> int:
    """The version the bf16 launchers run when not told: 4 (wgmma, Hopper's warpgroup products) on an sm_90 GPU
    for a head size in WGMMA_HEAD_SIZES, else 2 (mma.sync). The CPU emulator runs version 2 unless asked for 4
    (which it then emulates: the same kernels, the same tile layout)."""
    return 4 if device.compute_capability() == 90 and hs in WGMMA_HEAD_SIZES else 2


def _flash_version(version, hs, where) -> int:
    if version is None:
        return flash_version(hs)
    if version not in (2, 4):
        raise ValueError(f"{where}: version is 2 (mma.sync), 4 (wgmma) or None (the best this device runs), got "
                         f"{version!r}")
    if version == 4:
        if hs not in WGMMA_HEAD_SIZES:
            raise ValueError(f"{where}: version 4 takes a head size in {WGMMA_HEAD_SIZES}, got {hs}")
        if device.on_gpu() and device.compute_capability() != 90:
            raise ValueError(f"{where}: version 4 (wgmma) runs on an sm_90 GPU (H100, H200) or in the CPU emulator; "
                             f"this GPU is sm_{device.compute_capability()}: use version 2")
    return version


def _flash_kernel(name, hs, group=1, *, filename="flash_attention.cu", version=2):
    """The kernel of `filename` (version 2's, or flash_attention_tf32.cu's) compiled for head size hs and group =
    NH / NKV query heads per key/value head; version 4 with the tiles in wgmma's layout and its products
    (FA_WGMMA), for sm_90a (SM90A; the emulator ignores it)."""
    wgmma = ("-DFA_WGMMA=1", SM90A) if version == 4 else ()
    return load_kernel(filename, name, (f"-DHS={hs}", f"-DGROUP={group}") + wgmma)


def flash_attention_forward_bf16_cuda(qkv, NH, NKV=None, version=None):
    """qkv (B, T, (NH + 2 NKV) hs) bf16, its bias added -> out (B, T, C) bf16 and lse (B, NH, T) float32 (L), on
    the tensor cores; nothing of size T x T is made. NKV key/value heads (None: NKV = NH, qkv is (B, T, 3C)):
    query head h reads key/value head h // (NH / NKV) where it lies, with no copy (grouped-query attention).
    version: 2 (mma.sync), 4 (wgmma) or None (flash_version: 4 on an H100 or H200)."""
    B, T, C, hs, NKV = _check_bf16(qkv, NH, "flash_attention_forward_bf16_cuda", NKV)
    version = _flash_version(version, hs, "flash_attention_forward_bf16_cuda")
    NH, xp = int(NH), device.xp
    out, lse = xp.empty((B, T, C), np.uint16), xp.empty((B, NH, T), np.float32)
    if B * T:
        _flash_kernel("flash_attention_forward_bf16_kernel", hs, NH // NKV, version=version)(
            tile_grid(T, NH, B), (FA_THREADS,),
            (out, lse, qkv, np.int32(B), np.int32(T), np.int32(NH), np.int32(NKV)))
    return out, lse


def flash_attention_backward_bf16_cuda(dout, qkv, out, lse, NH, dbias=None, NKV=None, version=None):
    """dout (B, T, C) bf16, and the forward's qkv, out, lse -> dqkv bf16, laid out as qkv (B, T, (NH + 2 NKV) hs):
    dq, dk, dv. A key/value head's dk and dv sum over its group's query heads in one block, in a fixed order.
    dbias (3C,) bf16 (the bf16 step's weight gradient), if given, += the column sums of dqkv (the qkv bias's
    gradient): the two kernels sum the values they store, a row of partial sums per block (partial is as wide as
    dqkv), and one column_sum_add_cuda launch adds the rows in order. That launch adds three parts of equal width, so dbias
    needs NKV = NH (GPT-2's qkv bias; the LLaMA-style model has none). version: as the forward's."""
    where = "flash_attention_backward_bf16_cuda"
    B, T, C, hs, NKV = _check_bf16(qkv, NH, where, NKV)
    version = _flash_version(version, hs, where)
    NH = int(NH)
    require_bf16_array("dout", dout, (B, T, C))
    require_bf16_array("out", out, (B, T, C))
    device.require_array("lse", lse, shape=(B, NH, T))
    if dbias is not None:
        if NKV != NH:
            raise ValueError(f"{where}: dbias is summed for NKV = NH only (column_sum_add_cuda adds three parts "
                             f"of equal width), got NKV = {NKV}, NH = {NH}")
        require_bf16_array("dbias", dbias, (3 * C,), aligned=False)
    xp = device.xp
    tiles, W = -(-T // FA_ROWS), (NH + 2 * NKV) * hs
    dqkv, D = xp.empty((B, T, W), np.uint16), xp.empty((B, NH, T), np.float32)
    partial = xp.empty((B * tiles, W), np.float32)
    if B * T:
        sizes = (np.int32(B), np.int32(T), np.int32(NH), np.int32(NKV))
        _flash_kernel("flash_attention_backward_dq_bf16_kernel", hs, NH // NKV, version=version)(
            tile_grid(T, NH, B), (FA_THREADS,), (dqkv, partial, D, dout, qkv, out, lse, *sizes))
        _flash_kernel("flash_attention_backward_dkdv_bf16_kernel", hs, NH // NKV, version=version)(
            tile_grid(T, NKV, B), (FA_THREADS,), (dqkv, partial, dout, qkv, lse, D, *sizes))
        if dbias is not None:
            column_sum_add_cuda(dbias[:C], dbias[C:2 * C], dbias[2 * C:], partial)
    return dqkv


# ---------------------------------------------------------------------------------------------------------
# Version 3: TF32 on the tensor cores (flash_attention_tf32.cu; the fp32 model's kernel path uses it when TF32
# matmuls are on). float32 in and out; each product rounds its inputs to TF32 and adds in float32. qkv may hold
# fewer key/value heads (NKV, grouped-query attention): the kernels read a group's head where it is.

TF32_HEAD_SIZES = tuple(range(8, 65, 8))   # hs is compiled in (-DHS): 8-wide k steps, a head's fragments in registers
TF32_FILE = "flash_attention_tf32.cu"


def _check_tf32(qkv, NH, NKV, where):
    device.require_array("qkv", qkv, shape=(None, None, None))
    require_aligned16("qkv", qkv)
    B, T, C, hs = _sizes(qkv, NH, where, NKV)
    if hs not in TF32_HEAD_SIZES:
        raise ValueError(f"{where}: head size hs = {hs} is not one of {TF32_HEAD_SIZES}: the TF32 kernels take "
                         f"8 channels of a head per instruction and hold a thread's fragments of a head in registers")
    return B, T, C, hs, int(NH), _tensor_core_kv_heads(NH, NKV, where)


def flash_attention_forward_tf32_cuda(qkv, NH, NKV=None):
    """qkv (B, T, (NH + 2 NKV) hs) float32 (NKV = None: NH, qkv is (B, T, 3C)) -> out (B, T, C) float32 and lse
    (B, NH, T) float32 (L), TF32 products on the tensor cores; nothing of size T x T is made."""
    B, T, C, hs, NH, NKV = _check_tf32(qkv, NH, NKV, "flash_attention_forward_tf32_cuda")
    xp = device.xp
    out, lse = xp.empty((B, T, C), np.float32), xp.empty((B, NH, T), np.float32)
    if B * T:
        _flash_kernel("flash_attention_forward_tf32_kernel", hs, NH // NKV, filename=TF32_FILE)(
            tile_grid(T, NH, B), (FA_THREADS,), (out, lse, qkv, np.int32(B), np.int32(T), np.int32(NH), np.int32(NKV)))
    return out, lse


def flash_attention_backward_tf32_cuda(dout, qkv, out, lse, NH, NKV=None):
    """dout (B, T, C) float32 and the forward's qkv, out, lse -> dqkv in qkv's layout: dq, dk, dv (each key/value
    head's gradient summed over its group in a fixed order: deterministic)."""
    B, T, C, hs, NH, NKV = _check_tf32(qkv, NH, NKV, "flash_attention_backward_tf32_cuda")
    for name, a in (("dout", dout), ("out", out)):
        require_aligned16(name, device.require_array(name, a, shape=(B, T, C)))
    device.require_array("lse", lse, shape=(B, NH, T))
    xp = device.xp
    dqkv, D = xp.empty(qkv.shape, np.float32), xp.empty((B, NH, T), np.float32)
    if B * T:
        sizes = (np.int32(B), np.int32(T), np.int32(NH), np.int32(NKV))
        _flash_kernel("flash_attention_backward_dq_tf32_kernel", hs, NH // NKV, filename=TF32_FILE)(
            tile_grid(T, NH, B), (FA_THREADS,), (dqkv, D, dout, qkv, out, lse, *sizes))
        _flash_kernel("flash_attention_backward_dkdv_tf32_kernel", hs, NH // NKV, filename=TF32_FILE)(
            tile_grid(T, NKV, B), (FA_THREADS,), (dqkv, dout, qkv, lse, D, *sizes))
    return dqkv
