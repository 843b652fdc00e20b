"""Softmax and cross-entropy: the last layer of GPT-2, turning logits into a loss and the loss into dlogits.

    probs_v  = exp(logits_v - max_u logits_u) / sum_u exp(logits_u - max_u logits_u)     (v, u < V)
    loss     = -log probs[target]                              one loss per (b, t)
    dlogits_v = (probs_v - [v == target]) * dloss              the fused softmax + cross-entropy gradient

Shapes: logits, probs, dlogits (B, T, Vp); targets (B, T) int32 in 0..V-1; losses, dlosses (B, T).
The vocabulary is padded as in llm.c: GPT-2 has V = 50257 tokens, the arrays hold Vp = 50304 columns (a
multiple of 128, so rows stay aligned for the GPU). Columns V..Vp-1 are padding: they never enter the max,
the sum or the loss, their probs are exactly 0 and their dlogits are exactly 0.

Read top-down: the NumPy references (forward, then backward), then the launchers of the kernels in
`kernels/crossentropy.cu`: softmax_forward_kernel (a block per row), crossentropy_forward_kernel (a thread
per row), crossentropy_softmax_backward_kernel (a block per row), and fused_classifier_kernel, which does all
three in one pass per row and writes dlogits OVER the logits (llm.c's fused_classifier).
"""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.layers.bf16 import kernel_with_shared, require_bf16_array, require_multiple_of_8

# ---------------------------------------------------------------------------------------------------------
# NumPy reference


def _check_V(where: str, V, Vp: int) -> int:
    if isinstance(V, bool) or not isinstance(V, (int, np.integer)) or not 1 <= V <= Vp:
        raise ValueError(f"{where}: V (the real vocabulary size) must be an int in 1..Vp = 1..{Vp}, got {V!r}")
    return int(V)


def _check_targets(where: str, targets, BT: tuple, V: int | None) -> np.ndarray:
    targets = np.asarray(targets)
    if not np.issubdtype(targets.dtype, np.integer):
        raise TypeError(f"{where}: targets must be an integer array of token ids (int32), got dtype {targets.dtype}")
    if targets.shape != BT:
        raise ValueError(f"{where}: targets must have shape (B, T) = {BT}, got {targets.shape}")
    if targets.size and (targets.min() < 0 or (V is not None and targets.max() >= V)):
        hi = f"V - 1 = {V - 1}" if V is not None else "Vp - 1"
        raise ValueError(f"{where}: every target must be a token id in 0..{hi}, got values in "
                         f"{targets.min()}..{targets.max()}")
    return targets


def softmax_forward(logits, V):
    """(B, T, Vp) -> probs (B, T, Vp): softmax over the first V columns of each row; padded columns are 0.

    Stable: the row maximum is subtracted before exp, so exp never sees a large positive number.
    """
    logits = np.asarray(logits)
    if logits.ndim != 3:
        raise ValueError(f"softmax_forward: logits must have shape (B, T, Vp), got {logits.shape}")
    V = _check_V("softmax_forward", V, logits.shape[-1])
    x = logits[..., :V]                                    # (B, T, V): the real tokens only
    maxval = x.max(axis=-1, keepdims=True)                 # (B, T, 1)
    e = np.exp(x - maxval)                                 # (B, T, V), every value in (0, 1]
    probs = np.zeros_like(logits)                          # padded columns stay exactly 0
    probs[..., :V] = e / e.sum(axis=-1, keepdims=True)
    return probs


def crossentropy_forward(probs, targets):
    """(B, T, Vp), (B, T) int -> losses (B, T): losses[b, t] = -log probs[b, t, targets[b, t]]."""
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ValueError(f"crossentropy_forward: probs must have shape (B, T, Vp), got {probs.shape}")
    targets = _check_targets("crossentropy_forward", targets, probs.shape[:2], None)
    if targets.size and targets.max() >= probs.shape[-1]:
        raise ValueError(f"crossentropy_forward: a target ({targets.max()}) is past the last column of probs")
    p = np.take_along_axis(probs, targets[..., None].astype(np.intp), axis=-1)[..., 0]  # (B, T)
    return -np.log(p)


def crossentropy_softmax_backward(dlosses, probs, targets, V):
    """(B, T), (B, T, Vp), (B, T) int, V -> dlogits (B, T, Vp) = (probs - onehot(targets)) * dlosses.

    Columns V..Vp-1 of dlogits are 0 whatever probs holds there. For the mean loss, dlosses = 1/(B*T).
    """
    dlosses, probs = np.asarray(dlosses), np.asarray(probs)
    if probs.ndim != 3:
        raise ValueError(f"crossentropy_softmax_backward: probs must have shape (B, T, Vp), got {probs.shape}")
    B, T, Vp = probs.shape
    V = _check_V("crossentropy_softmax_backward", V, Vp)
    if dlosses.shape != (B, T):
        raise ValueError(f"crossentropy_softmax_backward: dlosses must have shape (B, T) = {(B, T)}, "
                         f"got {dlosses.shape}")
    targets = _check_targets("crossentropy_softmax_backward", targets, (B, T), V)
    dlogits = np.zeros_like(probs)                                   # (B, T, Vp), padding stays 0
    dlogits[..., :V] = probs[..., :V]                                # d loss / d logits_v = p_v ...
    b, t = np.indices((B, T))                                        # (B, T) row coordinates
    dlogits[b, t, targets] -= 1                                      # ... minus 1 at the target column
    dlogits *= dlosses[..., None]                                    # chain rule: times d L / d loss
    return dlogits


# ---------------------------------------------------------------------------------------------------------
# Kernel launchers (backend arrays: CuPy on a GPU, NumPy + the emulator on a CPU)


def _require_logits(name: str, a, V):
    device.require_array(name, a, shape=(None, None, None))
    B, T, Vp = a.shape
    V = _check_V(name, V, Vp)
    return B, T, Vp, V


def _require_targets(targets, B: int, T: int, hi: int, check: bool | None):
    """targets as a (B, T) int32 backend array with ids in 0..hi-1: a kernel indexes a row with each one, so an
    id out of range would read (the fused classifier: write) outside the array.

    The range check is one reduction on the device and a copy of two ints to the host, which on a GPU waits
    for the GPU (and cannot run inside a CUDA graph capture). So check=None checks on the CPU backend, where
    it costs nothing next to the emulated kernel, and not on a GPU, where GPT2.forward has checked the ids on
    the host before copying them over; check=True checks on a GPU too, check=False never.
    """
    device.require_array("targets", targets, shape=(B, T), dtype=np.int32)
    if check is None:
        check = not device.on_gpu()
    if check and targets.size:
        lo, top = int(targets.min()), int(targets.max())
        if lo < 0 or top >= hi:
            raise ValueError(f"every target must be a token id in 0..{hi - 1}, got values in {lo}..{top}")


def softmax_forward_cuda(logits, V, block_size: int = 512):
    """(B, T, Vp) -> probs (B, T, Vp), a fresh array, through softmax_forward_kernel (a block per row)."""
    from llmc_lessons.cuda import load_kernel

    block_size = device.require_block_size(block_size, warps=True)
    B, T, Vp, V = _require_logits("logits", logits, V)
    probs = device.xp.empty((B, T, Vp), dtype=np.float32)
    N = B * T
    if N:
        load_kernel("crossentropy.cu", "softmax_forward_kernel")(
            (N,), (block_size,), (probs, logits, np.int32(N), np.int32(V), np.int32(Vp)))
    return probs


def crossentropy_forward_cuda(probs, targets, block_size: int = 128, check_targets: bool | None = None):
    """(B, T, Vp), (B, T) int32 -> losses (B, T), a fresh array, through crossentropy_forward_kernel.

    The kernel reads probs at whatever column a target names: targets must lie in 0..Vp-1 (as for
    crossentropy_forward), and a padded column V..Vp-1 has probability 0, so its loss is inf. check_targets:
    see _require_targets (None: checked on the CPU backend, not on a GPU).
    """
    from llmc_lessons.cuda import load_kernel

    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or not 1 <= block_size <= 1024:
        raise ValueError(f"block_size must be an int in 1..1024, got {block_size!r}")
    device.require_array("probs", probs, shape=(None, None, None))
    B, T, Vp = probs.shape
    _require_targets(targets, B, T, Vp, check_targets)
    losses = device.xp.empty((B, T), dtype=np.float32)
    N = B * T
    if N:
        load_kernel("crossentropy.cu", "crossentropy_forward_kernel")(
            (-(-N // int(block_size)),), (int(block_size),), (losses, probs, targets, np.int32(N), np.int32(Vp)))
    return losses


def crossentropy_softmax_backward_cuda(dlosses, probs, targets, V, block_size: int = 512,
                                       check_targets: bool | None = None):
    """(B, T), (B, T, Vp), (B, T) int32 in 0..V-1, V -> dlogits (B, T, Vp), a fresh array (padded columns 0).
    check_targets: see _require_targets (None: checked on the CPU backend, not on a GPU)."""
    from llmc_lessons.cuda import load_kernel

    block_size = device.require_block_size(block_size, warps=True)
    B, T, Vp, V = _require_logits("probs", probs, V)
    device.require_array("dlosses", dlosses, shape=(B, T))
    _require_targets(targets, B, T, V, check_targets)
    dlogits = device.xp.empty((B, T, Vp), dtype=np.float32)
    N = B * T
    if N:
        load_kernel("crossentropy.cu", "crossentropy_softmax_backward_kernel")(
            (N,), (block_size,), (dlogits, dlosses, probs, targets, np.int32(N), np.int32(V), np.int32(Vp)))
    return dlogits


def fused_classifier_cuda(logits, targets, V, block_size: int = 512, dloss=None, version: int | None = None,
                          check_targets: bool | None = None):
    """(B, T, Vp), (B, T) int32, V -> (losses (B, T), dlogits (B, T, Vp)) in one kernel: fused_classifier_kernel
    (version 1), or fused_classifier_kernel2 (version 2: float4 accesses, needs Vp % 4 == 0 and a 16-byte
    aligned array; None: version 2 where it fits).

    IN PLACE: dlogits IS `logits` -- the kernel overwrites the logits with the gradient, as llm.c does, so the
    (B, T, Vp) probs buffer never exists. After the call the logits are gone; copy them first if you need them.
    dloss: the gradient of the final loss with respect to each per-row loss, one float for every row
    (default 1 / (B*T), the mean over all positions). losses is a fresh (B, T) array. targets must lie in
    0..V-1; check_targets: see _require_targets (None: checked on the CPU backend, not on a GPU).
    """
    from llmc_lessons.cuda import load_kernel

    block_size = device.require_block_size(block_size, warps=True)
    B, T, Vp, V = _require_logits("logits", logits, V)
    _require_targets(targets, B, T, V, check_targets)
    N = B * T
    if dloss is None:
        dloss = 1.0 / max(N, 1)
    if isinstance(dloss, bool) or not isinstance(dloss, (int, float, np.floating, np.integer)) or not np.isfinite(dloss):
        raise TypeError(f"dloss must be a finite float (the same d L / d loss for every row) or None, got {dloss!r}")
    fits = Vp % 4 == 0 and device.address(logits) % 16 == 0
    if version is None:
        version = 2 if fits else 1
    if version not in (1, 2):
        raise ValueError(f"version must be 1, 2 or None, got {version!r}")
    if version == 2 and not fits:
        raise ValueError(f"version 2 moves float4s: it needs Vp % 4 == 0 and a 16-byte aligned array (Vp = {Vp}); "
                         f"use version=1")
    losses = device.xp.empty((B, T), dtype=np.float32)
    if N:
        load_kernel("crossentropy.cu", "fused_classifier_kernel" if version == 1 else "fused_classifier_kernel2")(
            (N,), (block_size,), (logits, losses, targets, np.float32(dloss), np.int32(N), np.int32(V), np.int32(Vp)))
    return losses, logits

# ---------------------------------------------------------------------------------------------------------
# bf16 (lesson 14): launchers of the bf16 kernels in kernels/crossentropy.cu (bf16 arrays are uint16 arrays of
# the bits; layers/bf16.py has the checks they share)


def fused_classifier_bf16_cuda(logits, targets, V: int, dloss: float, block_size: int = 512,
                               check_targets: bool | None = None):
    """logits (B, T, Vp) bf16, overwritten in place with dlogits = dloss * (softmax - onehot(target));
    targets (B, T) int32 in [0, V) -> losses (B, T) float32. A block keeps its row in Vp * 2 bytes of shared
    memory (Vp <= 116,096 on an H100 or H200). check_targets: as _require_targets (None: checked on the CPU
    backend, not on a GPU)."""
    require_bf16_array("logits", logits, (None, None, None))
    B, T, Vp = logits.shape
    require_multiple_of_8("Vp", Vp)
    V = device.require_int("V", V)
    if V > Vp:
        raise ValueError(f"V = {V} is larger than the logits' Vp = {Vp}")
    shared = 2 * Vp
    # shared + 256: the row, and the kernel's two arrays of 32 floats
    kernel = kernel_with_shared("crossentropy.cu", "fused_classifier_bf16_kernel", shared + 256,
                                f"a row of Vp = {Vp} logits")
    _require_targets(targets, B, T, V, check_targets)
    block_size = device.require_block_size(block_size, warps=True)
    losses = device.xp.empty((B, T), np.float32)
    if B * T:
        kernel((B * T,), (block_size,), (logits, losses, targets, np.float32(dloss), np.int32(B * T), np.int32(V),
                                         np.int32(Vp)), shared_mem=shared)
    return losses
