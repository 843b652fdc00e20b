"""The encoder: GPT-2's first layer, token embedding plus position embedding.

    out[b, t, :] = wte[inp[b, t], :] + wpe[t, :]

Shapes: inp (B, T) integer token ids, wte (V, C), wpe (maxT, C), out (B, T, C), with T <= maxT.

Read top-down: the NumPy forward and backward references, then the launchers of the kernels in
`kernels/encoder.cu` (forward: kernel1 one thread per element, kernel2 float4; backward: kernel1 with atomics,
or the deterministic kernel2 pair).
"""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.cuda import load_kernel
from llmc_lessons.layers.bf16 import launch_1d, require_bf16_array, require_multiple_of_8

# ---------------------------------------------------------------------------------------------------------
# NumPy reference


def _check_ids(inp, V: int, where: str) -> None:
    """Token ids must be integers in [0, V): NumPy would wrap a negative id around silently."""
    if inp.ndim != 2:
        raise ValueError(f"{where}: inp must have shape (B, T), got {tuple(inp.shape)}")
    if not np.issubdtype(inp.dtype, np.integer):
        raise TypeError(f"{where}: inp must hold integer token ids, got dtype {inp.dtype}")
    if inp.size and (int(inp.min()) < 0 or int(inp.max()) >= V):
        raise ValueError(f"{where}: token ids must lie in [0, {V}), got ids from {int(inp.min())} to "
                         f"{int(inp.max())}")


def encoder_forward(inp, wte, wpe):
    """(B, T) ids, (V, C), (maxT, C) -> (B, T, C): out[b, t] = wte[inp[b, t]] + wpe[t]."""
    inp, wte, wpe = np.asarray(inp), np.asarray(wte), np.asarray(wpe)
    if wte.ndim != 2 or wpe.ndim != 2 or wte.shape[1] != wpe.shape[1]:
        raise ValueError(f"encoder_forward: wte (V, C) and wpe (maxT, C) need the same C, got {wte.shape} "
                         f"and {wpe.shape}")
    _check_ids(inp, wte.shape[0], "encoder_forward")
    B, T = inp.shape
    if T > wpe.shape[0]:
        raise ValueError(f"encoder_forward: T = {T} is longer than the {wpe.shape[0]} positions of wpe")
    return wte[inp] + wpe[:T]  # (B, T, C) + (T, C) broadcasts over b


def encoder_backward(dout, inp, V: int, maxT: int):
    """(B, T, C), (B, T) ids -> dwte (V, C), dwpe (maxT, C).

    A token that appears at several positions collects the sum of their gradients: np.add.at adds once per
    occurrence (plain fancy-index assignment `dwte[inp] += dout` would keep only one of them).
    """
    dout, inp = np.asarray(dout), np.asarray(inp)
    _check_ids(inp, V, "encoder_backward")
    B, T = inp.shape
    if dout.ndim != 3 or dout.shape[:2] != (B, T):
        raise ValueError(f"encoder_backward: dout must have shape (B, T, C) = ({B}, {T}, C), got {dout.shape}")
    if T > maxT:
        raise ValueError(f"encoder_backward: T = {T} is longer than maxT = {maxT}")
    C = dout.shape[2]
    dwte = np.zeros((V, C), dtype=dout.dtype)
    np.add.at(dwte, inp, dout)          # dwte[inp[b, t]] += dout[b, t], once per (b, t)
    dwpe = np.zeros((maxT, C), dtype=dout.dtype)
    dwpe[:T] = dout.sum(axis=0)         # position t was used once per sequence b; rows T.. stay zero
    return dwte, dwpe


# ---------------------------------------------------------------------------------------------------------
# Kernel launchers (backend arrays: CuPy on a GPU, NumPy + the emulator on a CPU)


def _require_ids(inp, V: int, check_range: bool = True):
    """inp as a (B, T) int32 backend array with ids in [0, V): an id out of range would read outside wte.
    The range check copies the smallest and largest id to the host, so on a GPU it waits for the GPU."""
    device.require_array("inp", inp, shape=(None, None), dtype=np.int32)
    if check_range and inp.size and (int(inp.min()) < 0 or int(inp.max()) >= V):
        raise ValueError(f"token ids must lie in [0, {V}) (the rows of wte), got ids from {int(inp.min())} to "
                         f"{int(inp.max())}")
    return inp


def encoder_forward_cuda(inp, wte, wpe, block_size: int = 256, version: int = 1, check_ids: bool = True):
    """(B, T) int32, (V, C), (maxT, C) -> (B, T, C) through encoder_forward_kernel<version>.

    version 1: one thread per output float. version 2: one thread per float4 (needs C % 4 == 0).
    check_ids=False skips the range check of the ids, which makes the CPU wait for the GPU: only for a caller
    that checked them already (GPT2.forward checks them on the host before they go to the GPU).
    """
    block_size = device.require_block_size(block_size)
    device.require_array("wte", wte, shape=(None, None))
    V, C = wte.shape
    device.require_array("wpe", wpe, shape=(None, C))
    _require_ids(inp, V, check_range=check_ids)
    B, T = inp.shape
    if T > wpe.shape[0]:
        raise ValueError(f"T = {T} is longer than the {wpe.shape[0]} positions of wpe")
    out = device.xp.empty((B, T, C), dtype=np.float32)
    if version == 1:
        n = B * T * C
        kernel = load_kernel("encoder.cu", "encoder_forward_kernel1")
    elif version == 2:
        if C % 4:
            raise ValueError(f"version 2 moves 4 channels at a time as a float4 and needs C % 4 == 0, got C = {C}; "
                             f"use version=1")
        n = B * T * C // 4
        kernel = load_kernel("encoder.cu", "encoder_forward_kernel2")
    else:
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    if n:
        grid = (-(-n // block_size),)
        kernel(grid, (block_size,), (out, inp, wte, wpe, np.int32(B), np.int32(T), np.int32(C)))
    return out


def _token_buckets(inp):
    """Group the B*T flat positions by token id: (positions, bucket_start, bucket_token), int32 backend arrays.

    positions lists the flat positions b*T+t sorted by (token id, position); bucket k holds the positions
    positions[bucket_start[k]:bucket_start[k+1]], all with token id bucket_token[k]. The sort key
    token * (B*T) + position is unique, so the result does not depend on how the sort breaks ties.
    NumPy ids give NumPy arrays: on the host nothing waits for the GPU (on a GPU, nonzero does).
    """
    xp = np if isinstance(inp, np.ndarray) else device.xp   # host ids (GPT2.forward) or backend ids
    flat = inp.reshape(-1)
    n = flat.size
    key = flat.astype(xp.int64) * n + xp.arange(n, dtype=xp.int64)
    positions = xp.argsort(key).astype(xp.int32)
    tokens = flat[positions]
    new = xp.empty(n, dtype=bool)
    new[0] = True
    new[1:] = tokens[1:] != tokens[:-1]                   # True where a new token id begins
    starts = xp.nonzero(new)[0].astype(xp.int32)
    bucket_start = xp.concatenate([starts, xp.asarray([n], dtype=xp.int32)])
    bucket_token = xp.ascontiguousarray(tokens[starts])
    return xp.ascontiguousarray(positions), bucket_start, bucket_token


def encoder_backward_cuda(dout, inp, V: int, maxT: int, deterministic: bool = True, block_size: int = 256,
                          buckets=None, dwte=None, dwpe=None):
    """(B, T, C), (B, T) int32 -> dwte (V, C), dwpe (maxT, C): fresh zero-initialised float32 gradients, or the
    given dwte and dwpe added into (the kernels accumulate, as every backward does).

    dwte and dwpe have one dtype: float32, or bf16 (uint16) for the bf16 step, which keeps its weight gradients in
    bf16 as llm.c does (dout stays float32; each element gets its float32 sum added and is rounded once).
    deterministic=False: encoder_backward_kernel1, atomicAdd (the last bits may differ between runs; float32 only).
    deterministic=True: token buckets + encoder_backward_wte_kernel2 and encoder_backward_wpe_kernel2 (for bf16,
    encoder_backward_wte_bf16_kernel and encoder_backward_wpe_bf16_kernel, in the same order).
    buckets: _token_buckets of the ids made ahead (GPT2.forward makes them on the host, where it checked the
    ids), as backend arrays: then nothing here waits for the GPU.
    """
    block_size = device.require_block_size(block_size)
    for name, value in (("V", V), ("maxT", maxT)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(f"deterministic must be True or False, got {deterministic!r}")
    _require_ids(inp, int(V), check_range=buckets is None)
    B, T = inp.shape
    device.require_array("dout", dout, shape=(B, T, None))
    C = dout.shape[2]
    if T > maxT:
        raise ValueError(f"T = {T} is longer than maxT = {maxT}")
    xp = device.xp
    dwte = xp.zeros((int(V), C), dtype=np.float32) if dwte is None else \
        device.require_array("dwte", dwte, shape=(int(V), C), dtype=(np.float32, np.uint16))
    dwpe = xp.zeros((int(maxT), C), dtype=np.float32) if dwpe is None else \
        device.require_array("dwpe", dwpe, shape=(int(maxT), C), dtype=(np.float32, np.uint16))
    if dwte.dtype != dwpe.dtype:
        raise TypeError(f"dwte and dwpe must have the same dtype (float32, or uint16 for bf16 gradients; one not "
                        f"given is float32), got {dwte.dtype} and {dwpe.dtype}")
    bf16 = dwte.dtype == np.uint16
    if bf16 and not deterministic:
        raise ValueError("bf16 gradients (uint16 dwte and dwpe) need deterministic=True: there is no atomicAdd "
                         "kernel for bf16")
    if B * T * C == 0:
        return dwte, dwpe
    if not deterministic:
        n = B * T * C
        load_kernel("encoder.cu", "encoder_backward_kernel1")(
            (-(-n // block_size),), (block_size,), (dwte, dwpe, dout, inp, np.int32(B), np.int32(T), np.int32(C)))
        return dwte, dwpe
    if buckets is None:
        buckets = _token_buckets(inp)
    positions, bucket_start, bucket_token = buckets
    for name, a in zip(("positions", "bucket_start", "bucket_token"), buckets):
        device.require_array(name, a, shape=(None,), dtype=np.int32)
    if positions.size != B * T or bucket_start.size != bucket_token.size + 1:
        raise ValueError(f"buckets do not fit ids of shape {(B, T)}: make them with _token_buckets(ids)")
    n_buckets = int(bucket_token.size)
    n = n_buckets * C
    load_kernel("encoder.cu", "encoder_backward_wte_bf16_kernel" if bf16 else "encoder_backward_wte_kernel2")(
        (-(-n // block_size),), (block_size,),
        (dwte, dout, positions, bucket_start, bucket_token, np.int32(n_buckets), np.int32(C)))
    n = T * C
    load_kernel("encoder.cu", "encoder_backward_wpe_bf16_kernel" if bf16 else "encoder_backward_wpe_kernel2")(
        (-(-n // block_size),), (block_size,), (dwpe, dout, np.int32(B), np.int32(T), np.int32(C)))
    return dwte, dwpe

# ---------------------------------------------------------------------------------------------------------
# bf16 (lesson 14): launchers of the bf16 kernels in kernels/encoder.cu (bf16 arrays are uint16 arrays of
# the bits; layers/bf16.py has the checks they share)


def encoder_forward_bf16_cuda(inp, wte, wpe, block_size: int = 256, check_ids: bool = True):
    """Token ids (B, T) int32, wte (Vp, C), wpe (maxT, C) bf16 -> encoded (B, T, C) bf16.

    check_ids=False skips the range check of the ids (it waits for the GPU), for a caller that checked them
    already, as GPT2.forward does on the host."""
    require_bf16_array("wte", wte, (None, None))
    _require_ids(inp, wte.shape[0], check_range=check_ids)
    B, T = inp.shape
    C = require_multiple_of_8("C", wte.shape[1])
    require_bf16_array("wpe", wpe, (None, C))
    if T > wpe.shape[0]:
        raise ValueError(f"T = {T} is longer than wpe's {wpe.shape[0]} positions")
    out = device.xp.empty((B, T, C), np.uint16)
    launch_1d("encoder.cu", "encoder_forward_bf16_kernel", B * T * C // 8, device.require_block_size(block_size),
              (out, inp, wte, wpe, np.int32(B), np.int32(T), np.int32(C)))
    return out
