"""bfloat16 (lesson 14): references and the launchers of kernels/bf16.cu.

bf16 arrays are uint16 arrays holding the bits; the conversions (to_bf16, from_bf16, ...) are in
llmc_lessons/precision.py.
"""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.cublas import gemm, gemm_batched
from llmc_lessons.cuda import DEFAULT_SHARED_LIMIT, SHARED_LIMIT_OPT_IN, load_kernel
from llmc_lessons.layers.encoder import _require_ids
from llmc_lessons.layers.layernorm import layernorm_forward
from llmc_lessons.precision import from_bf16, to_bf16


def gelu_forward_bf16(inp_bits) -> np.ndarray:
    """Reference of gelu_forward_bf16_kernel: bf16 in, the GELU in float64, rounded once to bf16.

    Computed as x / (1 + exp(-2u)), the same function as 0.5 x (1 + tanh u): the tanh form cancels for
    x < -7 even in float64 (1 + tanh u is then below float64's 1e-16 spacing near 1)."""
    x = from_bf16(inp_bits).astype(np.float64)
    u = np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)
    with np.errstate(over="ignore"):
        return to_bf16((x / (1.0 + np.exp(-2.0 * u))).astype(np.float32))


def layernorm_forward_bf16(inp_bits, weight, bias):
    """Reference of layernorm_forward_bf16_kernel: (out bits, mean, rstd) with float32 statistics."""
    out, mean, rstd = layernorm_forward(from_bf16(inp_bits).astype(np.float64), weight.astype(np.float64),
                                        bias.astype(np.float64))
    return to_bf16(out.astype(np.float32)), mean.astype(np.float32), rstd.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Launchers

def gelu_forward_bf16_cuda(inp, block_size: int = 256, version: int = 1):
    """uint16 bf16 bits (any shape) -> gelu of them, bf16 bits, through gelu_forward_bf16_kernel (version 1,
    a thread per value) or gelu_forward_bf16_kernel2 (version 2, 8 values per thread in 128-bit accesses;
    needs inp.size % 8 == 0)."""
    device.require_array("inp", inp, dtype=np.uint16)
    block_size = device.require_block_size(block_size)
    out = device.xp.empty_like(inp)
    if version == 1:
        if inp.size:
            load_kernel("bf16.cu", "gelu_forward_bf16_kernel")(
                (-(-inp.size // block_size),), (block_size,), (out, inp, np.int32(inp.size)))
    elif version == 2:
        if inp.size % 8:
            raise ValueError(f"version=2 moves 8 bf16 values (16 bytes) at a time: inp.size must be a multiple of 8, "
                             f"got {inp.size}; use version=1")
        n8 = inp.size // 8
        if n8:  # the kernel sees the bits as int4: 4 int32 = 8 bf16
            load_kernel("bf16.cu", "gelu_forward_bf16_kernel2")(
                (-(-n8 // block_size),), (block_size,), (out.reshape(-1).view(np.int32), inp.reshape(-1).view(np.int32),
                                                         np.int32(n8)))
    else:
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    return out


def layernorm_forward_bf16_cuda(inp, weight, bias, block_size: int = 256, version: int = 1):
    """(B, T, C) bf16 bits, (C,), (C,) float32 -> out (B, T, C) bf16 bits, mean, rstd (B, T) float32.

    version 1: layernorm_forward_bf16_kernel, two-byte loads (any C). version 2: layernorm_forward_bf16_kernel2,
    the row in registers through 16-byte loads (the training step's; C a multiple of 8, at most 1024)."""
    device.require_array("inp", inp, shape=(None, None, None), dtype=np.uint16)
    B, T, C = inp.shape
    if version == 2:
        _aligned("inp", inp)
        _eight("C", C)
        _row_in_registers(C)
        _float_vector("weight", weight, C)
        _float_vector("bias", bias, C)
    elif version == 1:
        device.require_array("weight", weight, shape=(C,))
        device.require_array("bias", bias, shape=(C,))
    else:
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    block_size = device.require_block_size(block_size, warps=True)
    xp = device.xp
    out, mean, rstd = xp.empty((B, T, C), np.uint16), xp.empty((B, T), np.float32), xp.empty((B, T), np.float32)
    if B * T:
        load_kernel("bf16.cu", "layernorm_forward_bf16_kernel" + ("2" if version == 2 else ""))(
            (-(-(B * T) // (block_size // 32)),), (block_size,),
            (out, mean, rstd, inp, weight, bias, np.int32(B * T), np.int32(C)))
    return out, mean, rstd


def adamw_update_bf16_cuda(master, params, grads, m, v, t: int, lr: float, beta1: float = 0.9,
                           beta2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.0,
                           stochastic: bool = False, seed: int = 0, block_size: int = 512, grad_scale: float = 1.0):
    """AdamW on float32 `master` weights and moments in place, then `params` (uint16) = their bf16 copy.
    grad_scale multiplies every gradient first (the clip factor)."""
    device.require_array("master", master)
    n = master.size
    device.require_array("params", params, shape=master.shape, dtype=np.uint16)
    for name, a in (("grads", grads), ("m", m), ("v", v)):
        device.require_array(name, a, shape=master.shape)
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1:
        raise ValueError(f"t counts steps from 1, got {t!r}")
    block_size = device.require_block_size(block_size)
    if n:
        load_kernel("bf16.cu", "adamw_bf16_kernel")(
            (-(-n // block_size),), (block_size,),
            (master, params, grads, m, v, np.int32(n), np.float32(lr), np.float32(beta1), np.float32(beta2),
             np.float32(1 - beta1 ** t), np.float32(1 - beta2 ** t), np.float32(eps), np.float32(weight_decay),
             np.float32(grad_scale), np.int32(bool(stochastic)), np.uint32(seed)))


def matmul_bf16(a, b, trans_b: bool = False):
    """(M, K) bf16 bits @ (K, N) bf16 bits (or (N, K) with trans_b) -> (M, N) float32, accumulated in float32.

    On a GPU: cuBLAS's gemmEx with bf16 inputs on the tensor cores. On a CPU: the same numbers in NumPy.
    """
    device.require_array("a", a, shape=(None, None), dtype=np.uint16)
    device.require_array("b", b, shape=(None, None), dtype=np.uint16)
    return gemm(a, b, trans_b=trans_b, out_dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------
# The bf16 training step (GPT2(precision="bf16")): launchers of the second half of kernels/bf16.cu.
# bf16 arrays are uint16; float32 stays float32 (layernorm parameters, biases, statistics, weight gradients).
# The kernels move 8 bf16 values (16 bytes) at a time: the sizes named below must be multiples of 8.

def _eight(name: str, n: int) -> int:
    if n % 8:
        raise ValueError(f"{name} = {n} must be a multiple of 8: the bf16 kernels move 8 values (16 bytes) "
                         f"at a time")
    return int(n)


def _aligned(name: str, a):
    """A bf16 array whose start is 16-byte aligned (a view at an odd offset into a buffer may not be)."""
    if device.address(a) % 16:
        raise ValueError(f"{name} must start at a 16-byte aligned address for the 16-byte loads; "
                         f"pass xp.ascontiguousarray(...) of a fresh array")
    return a


LAYERNORM_BACKWARD_BLOCKS = 256
"""The bf16 layernorm backward's default grid: 2 blocks of 8 warps per multiprocessor of an H100 or H200 fit
at once (128 registers a thread), and 256 blocks give each warp of GPT-2's 16,384 rows exactly 8 (no
ragged last round); more blocks also mean more partial rows for the column sums to add
(tools/tune_bf16_kernels.py times the choices)."""

ROW_MAX_C = 1024
"""The bf16 layernorm kernels keep a row in registers: C <= 1024 (GPT-2 124M and 350M)."""


def _row_in_registers(C: int):
    if C > ROW_MAX_C:
        raise ValueError(f"the bf16 layernorm kernels keep a row in registers: C must be <= {ROW_MAX_C}, got {C}")


def _bf16_array(name: str, a, shape):
    return _aligned(name, device.require_array(name, a, shape=shape, dtype=np.uint16))


def _float_vector(name: str, a, n: int):
    """A float32 (n,) vector the kernels read 8 values at a time (two 16-byte loads): 16-byte aligned."""
    return _aligned(name, device.require_array(name, a, shape=(n,)))


def _kernel_with_shared(kernel: str, shared: int, what: str):
    """The kernel, allowed `shared` bytes of dynamic shared memory (above 48 KiB a kernel must ask for it, on a
    GPU as in the emulator); a clear error beyond what a block may have. `what` names the need in it."""
    if shared > SHARED_LIMIT_OPT_IN:
        raise ValueError(f"{what} needs {shared} bytes of shared memory; a block may have at most "
                         f"{SHARED_LIMIT_OPT_IN}")
    k = load_kernel("bf16.cu", kernel)
    if shared > DEFAULT_SHARED_LIMIT:
        k.max_dynamic_shared_size_bytes = max(shared, k.max_dynamic_shared_size_bytes)
    return k


def _launch(kernel: str, n: int, block_size: int, args):
    """One thread per unit of n (rounded up to whole blocks)."""
    if n:
        load_kernel("bf16.cu", kernel)((-(-n // block_size),), (block_size,), args)


def float_to_bf16_cuda(inp, out=None, stochastic: bool = False, seed: int = 0, block_size: int = 256):
    """float32 array -> bf16 bits of the same shape (into `out` if given), to nearest-even, or stochastically
    with the hash that adamw_bf16_kernel uses (same seed, same bits)."""
    device.require_array("inp", inp)
    out = device.xp.empty(inp.shape, np.uint16) if out is None else \
        device.require_array("out", out, shape=inp.shape, dtype=np.uint16)
    _launch("float_to_bf16_kernel", inp.size, device.require_block_size(block_size),
            (out, inp, np.int32(inp.size), np.int32(bool(stochastic)), np.uint32(seed)))
    return out


def encoder_forward_bf16_cuda(inp, wte, wpe, block_size: int = 256, check_ids: bool = True):
    """Token ids (B, T) int32, wte (Vp, C), wpe (maxT, C) bf16 -> encoded (B, T, C) bf16.

    check_ids=False skips the range check of the ids (it waits for the GPU), for a caller that checked them
    already, as GPT2.forward does on the host."""
    _bf16_array("wte", wte, (None, None))
    _require_ids(inp, wte.shape[0], check_range=check_ids)
    B, T = inp.shape
    C = _eight("C", wte.shape[1])
    _bf16_array("wpe", wpe, (None, C))
    if T > wpe.shape[0]:
        raise ValueError(f"T = {T} is longer than wpe's {wpe.shape[0]} positions")
    out = device.xp.empty((B, T, C), np.uint16)
    _launch("encoder_forward_bf16_kernel", B * T * C // 8, device.require_block_size(block_size),
            (out, inp, wte, wpe, np.int32(B), np.int32(T), np.int32(C)))
    return out


def residual_layernorm_forward_bf16_cuda(inp1, inp2, bias2, weight, bias, block_size: int = 256):
    """residual = inp1 + (inp2 + bias2), out = layernorm(residual) with weight, bias.
    inp1, inp2 (B, T, C) bf16; bias2, weight, bias (C,) float32 -> residual, out (B, T, C) bf16, mean, rstd
    (B, T) float32."""
    _bf16_array("inp1", inp1, (None, None, None))
    B, T, C = inp1.shape
    _eight("C", C)
    _row_in_registers(C)
    _bf16_array("inp2", inp2, (B, T, C))
    for name, a in (("bias2", bias2), ("weight", weight), ("bias", bias)):
        _float_vector(name, a, C)
    block_size = device.require_block_size(block_size, warps=True)
    xp = device.xp
    residual, out = xp.empty((B, T, C), np.uint16), xp.empty((B, T, C), np.uint16)
    mean, rstd = xp.empty((B, T), np.float32), xp.empty((B, T), np.float32)
    _launch("residual_layernorm_forward_bf16_kernel", B * T * 32, block_size,
            (residual, out, mean, rstd, inp1, inp2, bias2, weight, bias, np.int32(B * T), np.int32(C)))
    return residual, out, mean, rstd


def split_heads_bf16_cuda(inp, n: int, NH: int, bias=None, block_size: int = 256):
    """(B, T, n*C) bf16 [+ bias (n*C,) float32] -> (n, B, NH, T, hs) bf16: q, k, v as one matrix per head
    (n = 3, from qkv with its bias) or the gradient of attention's output (n = 1, no bias)."""
    _bf16_array("inp", inp, (None, None, None))
    B, T, nC = inp.shape
    n, NH = device.require_int("n", n), device.require_int("NH", NH)
    if nC % (n * NH):
        raise ValueError(f"the last axis ({nC}) must be n * C with C a multiple of NH = {NH} (n = {n})")
    hs = _eight("the head size", nC // (n * NH))
    if bias is None:
        bias = device.xp.zeros((nC,), np.float32)
    device.require_array("bias", bias, shape=(nC,))
    out = device.xp.empty((n, B, NH, T, hs), np.uint16)
    _launch("split_heads_bf16_kernel", out.size // 8, device.require_block_size(block_size),
            (out, inp, bias, np.int32(n), np.int32(B), np.int32(T), np.int32(NH), np.int32(hs)))
    return out


def merge_heads_bf16_cuda(inp, block_size: int = 256):
    """(n, B, NH, T, hs) bf16 -> (B, T, n*NH*hs) bf16, the inverse of split_heads_bf16_cuda (no bias)."""
    _bf16_array("inp", inp, (None, None, None, None, None))
    n, B, NH, T, hs = inp.shape
    _eight("the head size", hs)
    out = device.xp.empty((B, T, n * NH * hs), np.uint16)
    _launch("merge_heads_bf16_kernel", out.size // 8, device.require_block_size(block_size),
            (out, inp, np.int32(n), np.int32(B), np.int32(T), np.int32(NH), np.int32(hs)))
    return out


def softmax_forward_bf16_cuda(preatt, scale: float, out=None, block_size: int = 256):
    """(N, T, T) bf16 scores -> causal softmax(scale * scores) (N, T, T) bf16; out may be preatt (in place)."""
    _bf16_array("preatt", preatt, (None, None, None))
    N, T, T2 = preatt.shape
    if T != T2:
        raise ValueError(f"preatt must be (N, T, T), got {tuple(preatt.shape)}")
    _eight("T", T)
    out = device.xp.empty_like(preatt) if out is None else _bf16_array("out", out, preatt.shape)
    _launch("softmax_forward_bf16_kernel", N * T * 32, device.require_block_size(block_size, warps=True),
            (out, preatt, np.float32(scale), np.int32(N), np.int32(T)))
    return out


def softmax_backward_bf16_cuda(datt, att, scale: float, out=None, block_size: int = 256):
    """(N, T, T) bf16 datt and att -> dpreatt (N, T, T) bf16 (causal, times scale); out may be datt."""
    _bf16_array("att", att, (None, None, None))
    N, T, _ = att.shape
    _eight("T", T)
    _bf16_array("datt", datt, att.shape)
    out = device.xp.empty_like(att) if out is None else _bf16_array("out", out, att.shape)
    _launch("softmax_backward_bf16_kernel", N * T * 32, device.require_block_size(block_size, warps=True),
            (out, datt, att, np.float32(scale), np.int32(N), np.int32(T)))
    return out


def add_bias_bf16_cuda(inp, bias, out=None, block_size: int = 256):
    """(B, T, OC) bf16 product, (OC,) float32 bias -> inp + bias (B, T, OC) bf16; out may be inp (in place)."""
    _bf16_array("inp", inp, (None, None, None))
    OC = _eight("OC", inp.shape[-1])
    _float_vector("bias", bias, OC)
    out = device.xp.empty_like(inp) if out is None else _bf16_array("out", out, inp.shape)
    _launch("add_bias_bf16_kernel", inp.size // 8, device.require_block_size(block_size),
            (out, inp, bias, np.int32(inp.size // OC), np.int32(OC)))
    return out


def gelu_bias_forward_bf16_cuda(inp, bias, block_size: int = 256):
    """(B, T, OC) bf16 product, (OC,) float32 bias -> gelu(inp + bias) (B, T, OC) bf16."""
    _bf16_array("inp", inp, (None, None, None))
    OC = _eight("OC", inp.shape[-1])
    _float_vector("bias", bias, OC)
    out = device.xp.empty_like(inp)
    _launch("gelu_bias_forward_bf16_kernel", inp.size // 8, device.require_block_size(block_size),
            (out, inp, bias, np.int32(inp.size // OC), np.int32(OC)))
    return out


def gelu_bias_backward_bf16_cuda(dout, inp, bias, dbias, out=None, block_columns: int = 16, block_rows: int = 16,
                                 grid_rows: int | None = None):
    """dout, inp (B, T, OC) bf16, bias (OC,) -> dinp = dout * gelu'(inp + bias) bf16 (out may be dout), and
    dbias (OC,) float32 += the column sums of dinp: the fc bias's gradient, in the same pass.

    Blocks of (block_columns, block_rows) threads, each thread 8 columns, so a block covers 8 * block_columns
    columns; grid_rows: how many blocks split the rows of one column group (R partial sums, the last block of
    the group adds them), by default enough for each thread to sum 16 rows."""
    _bf16_array("inp", inp, (None, None, None))
    OC = _eight("OC", inp.shape[-1])
    _bf16_array("dout", dout, inp.shape)
    _float_vector("bias", bias, OC)
    device.require_array("dbias", dbias, shape=(OC,))
    out = device.xp.empty_like(inp) if out is None else _bf16_array("out", out, inp.shape)
    N, groups, R, X, Y = _column_groups(inp.size // OC, OC, block_columns, block_rows, grid_rows)
    partial = device.xp.empty((R, OC), np.float32)
    load_kernel("bf16.cu", "gelu_bias_backward_bf16_kernel")(
        (groups, R), (X, Y), (out, dbias, partial, _zero_counters(groups), dout, inp, bias, np.int32(N), np.int32(OC)),
        shared_mem=4 * 8 * X * Y)
    return out


def column_sum_add_cuda(out1, out2, out3, partial, columns_per_block: int = 8, rows_per_block: int = 32):
    """out1, out2, out3 (C,) float32 += the column sums of partial[:, :C], [:, C:2C], [:, 2C:] for partial
    (R, 3C) float32, in a fixed order (column_sum_add_kernel, one launch, blocks of (columns_per_block,
    rows_per_block) threads): the end of the reductions that leave a row of partial sums per block."""
    device.require_array("partial", partial, shape=(None, None))
    R, C3 = partial.shape
    if C3 % 3:
        raise ValueError(f"partial must have 3C columns, got {C3}")
    for name, a in (("out1", out1), ("out2", out2), ("out3", out3)):
        device.require_array(name, a, shape=(C3 // 3,))
    X, Y = columns_per_block, rows_per_block
    if C3:
        load_kernel("bf16.cu", "column_sum_add_kernel")((-(-C3 // X),), (X, Y),
                                                         (out1, out2, out3, partial, np.int32(R), np.int32(C3 // 3)),
                                                         shared_mem=4 * X * Y)


_counters = None


def _zero_counters(n: int):
    """A device array of at least n uint32 zeros for the kernels' last-block reductions (which leave them
    zero again), made once per process."""
    global _counters
    if _counters is None or _counters.size < n:
        _counters = device.xp.zeros(max(n, 1024), np.uint32)
    return _counters


def _column_groups(N: int, OC: int, block_columns, block_rows, grid_rows):
    """The launch shape of the column-sum kernels: -> (N, column groups, R, X, Y) for blocks of (X, Y)
    threads, each thread 8 columns, R blocks splitting the N rows of a group (by default, 16 rows a thread)."""
    X, Y = device.require_int("block_columns", block_columns), device.require_int("block_rows", block_rows)
    if X * Y > 1024:
        raise ValueError(f"block_columns * block_rows must be at most 1024 threads, got {X} * {Y}")
    R = max(1, -(-N // (16 * Y))) if grid_rows is None else device.require_int("grid_rows", grid_rows)
    return N, -(-OC // (8 * X)), R, X, Y


def layernorm_backward_bf16_cuda(dinp, dout, inp, weight, mean, rstd, dweight, dbias, dresidual_bias=None,
                                 block_size: int = 256, max_blocks: int = LAYERNORM_BACKWARD_BLOCKS):
    """The layernorm backward on bf16 dout, inp (B, T, C): dinp (B, T, C) float32 += the input gradient,
    dweight, dbias (C,) float32 += theirs. Returns dinp's new value in bf16 (for the next matmul backward).
    dresidual_bias (C,) float32, if given, += the column sums of that bf16 value: the bias gradient of the
    projection whose output was added into this residual stream, in the same pass.

    max_blocks caps the grid: each warp loops over rows, each block leaves one row of partial sums of the
    three (its warps' sums: 3C floats a warp, 3 * block_size * C / 8 bytes of shared memory), which a
    second kernel adds in order."""
    _bf16_array("inp", inp, (None, None, None))
    B, T, C = inp.shape
    _eight("C", C)
    _row_in_registers(C)
    _bf16_array("dout", dout, (B, T, C))
    _aligned("dinp", device.require_array("dinp", dinp, shape=(B, T, C)))
    _float_vector("weight", weight, C)
    for name, a in (("dweight", dweight), ("dbias", dbias)):
        device.require_array(name, a, shape=(C,))
    xp = device.xp
    if dresidual_bias is None:
        dresidual_bias = xp.zeros(C, np.float32)     # computed and dropped
    device.require_array("dresidual_bias", dresidual_bias, shape=(C,))
    for name, a in (("mean", mean), ("rstd", rstd)):
        device.require_array(name, a, shape=(B, T))
    block_size = device.require_block_size(block_size, warps=True)
    N, wpb = B * T, block_size // 32
    shared = 4 * wpb * 3 * C
    kernel = _kernel_with_shared("layernorm_backward_bf16_kernel", shared,
                                 f"block_size {block_size} (use fewer warps per block) for C = {C}")
    blocks = max(1, min(device.require_int("max_blocks", max_blocks), -(-N // wpb)))
    dinp_bf16 = xp.empty((B, T, C), np.uint16)
    partial = xp.empty((blocks, 3 * C), np.float32)
    if N:
        kernel(
            (blocks,), (block_size,), (dinp, dinp_bf16, partial, dout, inp, weight, mean, rstd, np.int32(N),
                                       np.int32(C)), shared_mem=shared)
        column_sum_add_cuda(dweight, dbias, dresidual_bias, partial)
    return dinp_bf16


def fused_classifier_bf16_cuda(logits, targets, V: int, dloss: float, block_size: int = 512):
    """logits (B, T, Vp) bf16, overwritten in place with dlogits = dloss * (softmax - onehot(target));
    targets (B, T) int32 in [0, V) -> losses (B, T) float32. A block keeps its row in Vp * 2 bytes of shared
    memory (Vp <= 116,096 on an H100 or H200)."""
    _bf16_array("logits", logits, (None, None, None))
    B, T, Vp = logits.shape
    _eight("Vp", Vp)
    V = device.require_int("V", V)
    if V > Vp:
        raise ValueError(f"V = {V} is larger than the logits' Vp = {Vp}")
    shared = 2 * Vp
    kernel = _kernel_with_shared("fused_classifier_bf16_kernel", shared + 256,   # + its two 32-float arrays
                                 f"a row of Vp = {Vp} logits")
    device.require_array("targets", targets, shape=(B, T), dtype=np.int32)
    block_size = device.require_block_size(block_size, warps=True)
    losses = device.xp.empty((B, T), np.float32)
    if B * T:
        kernel((B * T,), (block_size,), (logits, losses, targets, np.float32(dloss), np.int32(B * T), np.int32(V),
                                         np.int32(Vp)), shared_mem=shared)
    return losses


def attention_forward_bf16_cuda(qkv, qkvb, NH: int, block_size: int = 256):
    """qkv (B, T, 3C) bf16 (the product, no bias), qkvb (3C,) float32 -> atty (B, T, C) bf16, and for the
    backward qkvh (3, B, NH, T, hs) (q, k, v per head) and att (B, NH, T, T), all bf16.

    split heads (+ bias) -> preatt = q @ k^T (cuBLAS, bf16 out) -> causal softmax in place -> att @ v -> merge.
    The model runs flash attention instead (layers/flash_attention.py, version 2); this is the baseline it is
    measured against (bench.bench_attention).
    """
    _bf16_array("qkv", qkv, (None, None, None))
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
    _bf16_array("qkvh", qkvh, (3, None, None, None, None))
    _, B, NH, T, hs = qkvh.shape
    _bf16_array("datty", datty, (B, T, NH * hs))
    _bf16_array("att", att, (B, NH, T, T))
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
