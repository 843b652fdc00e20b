"""What the bf16 launchers share (lesson 14): the argument checks of their 16-byte accesses, the launch
helpers, and float32 -> bf16 for a whole array (kernels/bf16.cu).

Each layer's bf16 launchers live in that layer's module (layers/gelu.py, layers/layernorm.py, ...) beside its
float32 ones, as its bf16 kernels live in its kernels/<layer>.cu. bf16 arrays are uint16 arrays holding the
bits, and so are the step's weight gradients (as in llm.c); float32 stays float32 (layernorm parameters, biases,
statistics); the conversions (to_bf16, from_bf16, ...) are in llmc_lessons/precision.py. The kernels of the bf16
training step move 8 bf16 values (16 bytes) at a time: the sizes the launchers name must be multiples of 8 and
the arrays they read that way 16-byte aligned (a gradient vector, added into one value at a time, need not be).
"""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.cuda import DEFAULT_SHARED_LIMIT, SHARED_LIMIT_OPT_IN, load_kernel


def require_multiple_of_8(name: str, n: int) -> int:
    if n % 8:
        raise ValueError(f"{name} = {n} must be a multiple of 8: the bf16 kernels move 8 values (16 bytes) "
                         f"at a time")
    return int(n)


def require_aligned16(name: str, a):
    """An array (bf16 or float32) whose start is 16-byte aligned (a view at an odd offset into a buffer may not be)."""
    if device.address(a) % 16:
        raise ValueError(f"{name} must start at a 16-byte aligned address for the 16-byte loads; "
                         f"pass xp.ascontiguousarray(...) of a fresh array")
    return a


def require_bf16_array(name: str, a, shape, aligned: bool = True):
    """A bf16 array: its bits as uint16 (precision.to_bf16 or float_to_bf16_cuda make one from floats; casting
    with .astype(np.uint16) would keep the numbers' integer parts, not their bits), C-contiguous, 16-byte aligned
    unless aligned=False (an array no kernel reads 16 bytes at a time, such as a bias's gradient)."""
    dtype = getattr(a, "dtype", None)
    if dtype is not None and np.issubdtype(dtype, np.floating):
        raise TypeError(f"{name} must hold bf16 bits (dtype uint16), got {dtype}: convert it with "
                        f"float_to_bf16_cuda(...) (llmc_lessons.layers.bf16) or precision.to_bf16(...)")
    a = device.require_array(name, a, shape=shape, dtype=np.uint16)
    return require_aligned16(name, a) if aligned else a


def require_float_vector(name: str, a, n: int):
    """A float32 (n,) vector the kernels read 8 values at a time (two 16-byte loads): 16-byte aligned."""
    return require_aligned16(name, device.require_array(name, a, shape=(n,)))


def kernel_with_shared(filename: str, kernel: str, shared: int, what: str):
    """The kernel of kernels/<filename>, allowed `shared` bytes of dynamic shared memory (above 48 KiB a kernel
    must ask for it, on a GPU as in the emulator); a clear error beyond what a block may have. `what` names the
    need in it."""
    if shared > SHARED_LIMIT_OPT_IN:
        raise ValueError(f"{what} needs {shared} bytes of shared memory; a block may have at most "
                         f"{SHARED_LIMIT_OPT_IN}")
    k = load_kernel(filename, kernel)
    if shared > DEFAULT_SHARED_LIMIT:
        k.max_dynamic_shared_size_bytes = max(shared, k.max_dynamic_shared_size_bytes)
    return k


def launch_1d(filename: str, kernel: str, n: int, block_size: int, args):
    """The kernel of kernels/<filename> with one thread per unit of n, rounded up to whole blocks (the kernel
    checks its index against n); nothing is launched when n is 0."""
    if n:
        load_kernel(filename, kernel)((-(-n // block_size),), (block_size,), args)


def float_to_bf16_cuda(inp, out=None, stochastic: bool = False, seed: int = 0, block_size: int = 256):
    """float32 array -> bf16 bits of the same shape (into `out` if given), to nearest-even, or stochastically
    with the hash that adamw_bf16_kernel uses (same seed, same bits)."""
    device.require_array("inp", inp)
    out = device.xp.empty(inp.shape, np.uint16) if out is None else \
        device.require_array("out", out, shape=inp.shape, dtype=np.uint16)
    launch_1d("bf16.cu", "float_to_bf16_kernel", inp.size, device.require_block_size(block_size),
              (out, inp, np.int32(inp.size), np.int32(bool(stochastic)), np.uint32(seed)))
    return out


_counters = None


def zero_counters(n: int):
    """A device array of at least n uint32 zeros for the kernels' last-block reductions (which leave them
    zero again), made once per process."""
    global _counters
    if _counters is None or _counters.size < n:
        _counters = device.xp.zeros(max(n, 1024), np.uint32)
    return _counters


def column_groups(N: int, OC: int, block_columns, block_rows, grid_rows):
    """The launch shape of the column-sum kernels: -> (N, column groups, R, X, Y) for blocks of (X, Y)
    threads, each thread 8 columns, R blocks splitting the N rows of a group (by default, 16 rows a thread)."""
    X, Y = device.require_int("block_columns", block_columns), device.require_int("block_rows", block_rows)
    if X * Y > 1024:
        raise ValueError(f"block_columns * block_rows must be at most 1024 threads, got {X} * {Y}")
    R = max(1, -(-N // (16 * Y))) if grid_rows is None else device.require_int("grid_rows", grid_rows)
    return N, -(-OC // (8 * X)), R, X, Y
