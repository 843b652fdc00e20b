"""AdamW: the optimizer step that turns gradients into new parameters, and global gradient-norm clipping.

For every parameter element, at step t = 1, 2, 3, ... with gradient g:

    m = beta1 * m + (1 - beta1) * g            running mean of the gradient      (first moment)
    v = beta2 * v + (1 - beta2) * g^2          running mean of its square        (second moment)
    m_hat = m / (1 - beta1^t)                  bias corrections: m and v start at 0, so early
    v_hat = v / (1 - beta2^t)                  averages are too small by exactly these factors
    param = param - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * param)

The weight decay is "decoupled" (the W of AdamW): it shrinks the parameter directly instead of being added
to the gradient, so Adam's per-element scaling does not touch it.

Clipping: norm = sqrt(sum of g^2 over every gradient of the model); when norm > max_norm, every gradient is
multiplied by grad_scale = max_norm / norm (llm.c passes that factor to its AdamW kernel).

Read top-down: the NumPy references, then the launchers of the kernels in `kernels/adamw.cu`.
"""
from __future__ import annotations

import math

import numpy as np

from llmc_lessons import device
from llmc_lessons.cuda import load_kernel
from llmc_lessons.layers.bf16 import require_bf16_array

# ---------------------------------------------------------------------------------------------------------
# NumPy reference


def _check_hyper(where: str, t, lr, beta1, beta2, eps, weight_decay) -> None:
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1:
        raise ValueError(f"{where}: t is the step number and counts from 1, got {t!r}")
    for name, val in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(val, bool) or not isinstance(val, (int, float, np.floating, np.integer)) or not val >= 0:
            raise ValueError(f"{where}: {name} must be a float >= 0, got {val!r}")
    for name, val in (("beta1", beta1), ("beta2", beta2)):
        if isinstance(val, bool) or not isinstance(val, (int, float, np.floating)) or not 0 <= val < 1:
            raise ValueError(f"{where}: {name} must be a float in [0, 1), got {val!r}")


def adamw_update(param, grad, m, v, t, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0):
    """(N...), (N...), (N...), (N...), step t >= 1 -> new (param, m, v), same shapes; the inputs are not changed."""
    param, grad, m, v = (np.asarray(a) for a in (param, grad, m, v))
    for name, a in (("grad", grad), ("m", m), ("v", v)):
        if a.shape != param.shape:
            raise ValueError(f"adamw_update: {name} must have the shape of param {param.shape}, got {a.shape}")
    _check_hyper("adamw_update", t, lr, beta1, beta2, eps, weight_decay)
    m = beta1 * m + (1 - beta1) * grad                  # first moment
    v = beta2 * v + (1 - beta2) * grad * grad           # second moment
    m_hat = m / (1 - beta1 ** t)                        # bias corrections
    v_hat = v / (1 - beta2 ** t)
    param = param - lr * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * param)
    dt = param.dtype
    return param.astype(dt, copy=False), m.astype(dt, copy=False), v.astype(dt, copy=False)


def global_norm(grads) -> float:
    """One array or a list of arrays -> sqrt(sum of squares of every element of every array), a float. Arrays of
    values: bf16 bits (uint16, a bf16 model's gradients) are refused, their values are model.gradient()'s."""
    arrays = list(grads) if isinstance(grads, (list, tuple)) else [grads]
    if any(getattr(g, "dtype", None) == np.uint16 for g in arrays):
        raise TypeError("global_norm: these gradients are bf16 bits (uint16), not values: pass model.gradient() "
                        "(float32 values), or use global_norm_cuda, which reads the bits")
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(g, dtype=np.float64)))) for g in arrays))


def clip_grad_norm(grads, max_norm) -> float:
    """The clip factor grad_scale (a float, nothing is modified): max_norm / norm when norm > max_norm, else 1.

    Multiply every gradient by it (or pass it to adamw_update_cuda as grad_scale, as llm.c does) so the
    global norm becomes at most max_norm. Like llm.c's trainer, and unlike torch's clip_grad_norm_, it
    returns the factor, not the norm.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float, np.floating)) or not max_norm > 0:
        raise ValueError(f"clip_grad_norm: max_norm must be a float > 0, got {max_norm!r}")
    norm = global_norm(grads)
    return float(max_norm / norm) if norm > max_norm else 1.0


# ---------------------------------------------------------------------------------------------------------
# Kernel launchers (backend arrays: CuPy on a GPU, NumPy + the emulator on a CPU)


def adamw_update_cuda(param, grad, m, v, t, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0,
                      grad_scale=1.0, block_size: int = 512) -> None:
    """(N...) float32 x4 -> None: IN PLACE, param, m and v are overwritten with their new values.

    One thread per element (adamw_kernel). grad is read only; it is multiplied by grad_scale first (the clip
    factor from clip_grad_norm / global_norm_cuda). Returns nothing, to make the in-place update plain.
    """
    block_size = device.require_block_size(block_size, warps=False)
    device.require_array("param", param)
    shape = tuple(param.shape)
    for name, a in (("grad", grad), ("m", m), ("v", v)):
        device.require_array(name, a, shape=shape)
    _check_hyper("adamw_update_cuda", t, lr, beta1, beta2, eps, weight_decay)
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float, np.floating)) or not grad_scale >= 0:
        raise ValueError(f"grad_scale must be a float >= 0 (the clip factor), got {grad_scale!r}")
    N = int(param.size)
    if N >= 2**31:
        raise ValueError(f"param has {N} elements; the kernel indexes with int (at most 2**31 - 1)")
    if N == 0:
        return None
    load_kernel("adamw.cu", "adamw_kernel")(
        (-(-N // block_size),), (block_size,),
        (param, grad, m, v, np.int32(N), np.float32(lr), np.float32(beta1), np.float32(beta2),
         np.float32(1 - beta1 ** t), np.float32(1 - beta2 ** t), np.float32(eps), np.float32(weight_decay),
         np.float32(grad_scale)))
    return None


def global_norm_squared_cuda(grads, block_size: int = 512, max_blocks: int = 1024):
    """One float32 or bf16 (uint16) array or a list of them -> the sum of all their squares, as a (1,) device
    array (no wait for the GPU: the caller reads it when it needs it). bf16: the bf16 step keeps its weight
    gradients in bf16, as llm.c does; their squares are added in float32 all the same.

    global_norm_squared_kernel (global_norm_squared_bf16_kernel for bf16): block b sums the squares of a
    grid-stride slice into partial[b], every array into the same slots; then global_sum_deterministic_kernel adds
    the partial sums in a fixed order. The same arrays at the same block_size and max_blocks give the same bits at
    every call.
    """
    block_size = device.require_block_size(block_size, warps=True)
    if isinstance(max_blocks, bool) or not isinstance(max_blocks, (int, np.integer)) or max_blocks < 1:
        raise ValueError(f"max_blocks must be a positive int, got {max_blocks!r}")
    arrays = list(grads) if isinstance(grads, (list, tuple)) else [grads]
    for i, g in enumerate(arrays):
        device.require_array(f"grads[{i}]" if isinstance(grads, (list, tuple)) else "grads", g,
                             dtype=(np.float32, np.uint16))
        if g.size >= 2**31:
            raise ValueError(f"grads[{i}] has {g.size} elements; the kernel indexes with int")
    grids = [min(-(-int(g.size) // block_size), int(max_blocks)) for g in arrays]
    partial = device.xp.zeros((max(grids, default=0) or 1,), dtype=np.float32)
    for g, grid in zip(arrays, grids):
        if grid:
            name = "global_norm_squared_bf16_kernel" if g.dtype == np.uint16 else "global_norm_squared_kernel"
            load_kernel("adamw.cu", name)((grid,), (block_size,), (partial, g, np.int32(g.size)))
    out = device.xp.empty((1,), dtype=np.float32)
    load_kernel("adamw.cu", "global_sum_deterministic_kernel")((1,), (32,), (out, partial, np.int32(partial.size)))
    return out


def global_norm_cuda(grads, block_size: int = 512, max_blocks: int = 1024) -> float:
    """One float32 or bf16 (uint16) array or a list of them -> the global L2 norm, a float: the square root, on the
    host, of global_norm_squared_cuda's sum (copying it to the host waits for the GPU)."""
    return math.sqrt(float(device.to_host(global_norm_squared_cuda(grads, block_size, max_blocks))[0]))

# ---------------------------------------------------------------------------------------------------------
# bf16 (lesson 14): launchers of the bf16 kernels in kernels/adamw.cu (bf16 arrays are uint16 arrays of
# the bits; layers/bf16.py has the checks they share)


def adamw_update_bf16_cuda(master, params, grads, m, v, t: int, lr: float, beta1: float = 0.9,
                           beta2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.0,
                           stochastic: bool = False, seed: int = 0, block_size: int = 512, grad_scale: float = 1.0):
    """AdamW on float32 `master` weights and moments in place, then `params` (uint16) = their bf16 copy.
    `grads` are bf16 (uint16): the bf16 step keeps its weight gradients in bf16, as llm.c does. grad_scale multiplies
    every gradient first (the clip factor). Four elements a thread in 16- and 8-byte accesses where the arrays line
    up (_vector_head), else one: the same fmaf sequence for each element either way."""
    device.require_array("master", master)
    n = master.size
    device.require_array("params", params, shape=master.shape, dtype=np.uint16)
    require_bf16_array("grads", grads, master.shape, aligned=False)
    for name, a in (("m", m), ("v", v)):
        device.require_array(name, a, shape=master.shape)
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1:
        raise ValueError(f"t counts steps from 1, got {t!r}")
    block_size = device.require_block_size(block_size)
    if n:
        head = _vector_head(master, params, grads, m, v, n)
        threads = n if head < 0 else max(head, -(-(n - head) // 4))
        load_kernel("adamw.cu", "adamw_bf16_kernel")(
            (-(-threads // block_size),), (block_size,),
            (master, params, grads, m, v, np.int32(n), np.int32(head), np.float32(lr), np.float32(beta1),
             np.float32(beta2), np.float32(1 - beta1 ** t), np.float32(1 - beta2 ** t), np.float32(eps),
             np.float32(weight_decay), np.float32(grad_scale), np.int32(bool(stochastic)), np.uint32(seed)))


def _vector_head(master, params, grads, m, v, n: int) -> int:
    """adamw_bf16_kernel's `head`: how many elements come before the one where master, m and v (float32) all start a
    16-byte piece and params and grads (bf16) an 8-byte one (0 to 3, at most n), or -1 when there is no such element
    (the kernel then takes one element a thread)."""
    a = device.address(master)
    head = (-a % 16) // 4 if a % 4 == 0 else -1
    if head < 0 or any((device.address(x) + 4 * head) % 16 for x in (m, v)) or \
            any((device.address(x) + 2 * head) % 8 for x in (params, grads)):
        return -1
    return min(head, n)
