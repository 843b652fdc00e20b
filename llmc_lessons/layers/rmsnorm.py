"""RMSNorm, LLaMA's normalisation (lesson 15): LayerNorm without the mean and without the bias.

    rstd = 1 / sqrt((1/C) sum_c x_c^2 + eps)        norm_c = x_c * rstd        out_c = norm_c * weight_c

Shapes: inp and out (B, T, C), weight (C,), rstd (B, T). eps = 1e-5, as in LLaMA.

Backward, with dnorm = dout * weight:

    dinp = rstd * (dnorm - norm * mean_c(dnorm * norm))        dweight = sum over (b, t) of dout * norm

LayerNorm's dinp has one more term, - mean_c(dnorm): it comes from the mean, which RMSNorm does not subtract.

Read top-down: the NumPy forward and backward references, then the launchers of the kernels in
`kernels/rmsnorm.cu`.
"""
from __future__ import annotations

import numpy as np


# ---------------------------------------------------------------------------------------------------------
# NumPy reference


def _check_shapes(where: str, inp, weight, **others) -> None:
    if inp.ndim != 3:
        raise ValueError(f"{where}: inp must have shape (B, T, C), got {inp.shape}")
    B, T, C = inp.shape
    if weight.shape != (C,):
        raise ValueError(f"{where}: weight must have shape (C,) = ({C},), got {weight.shape}")
    for name, a in others.items():
        want = (B, T, C) if name == "dout" else (B, T)
        if a.shape != want:
            raise ValueError(f"{where}: {name} must have shape {want}, got {a.shape}")


def rmsnorm_forward(inp, weight, eps: float = 1e-5):
    """(B, T, C), (C,) -> out (B, T, C), rstd (B, T); rstd is kept for the backward."""
    inp, weight = np.asarray(inp), np.asarray(weight)
    _check_shapes("rmsnorm_forward", inp, weight)
    ms = (inp * inp).mean(axis=-1)                             # (B, T): the mean square, no mean subtracted
    rstd = 1.0 / np.sqrt(ms + np.asarray(eps, dtype=inp.dtype))  # (B, T): 1 / root mean square
    norm = inp * rstd[..., None]                               # (B, T, C): root mean square ~1 per row
    out = norm * weight                                        # (B, T, C): no bias
    return out, rstd


def rmsnorm_backward(dout, inp, weight, rstd):
    """(B, T, C), (B, T, C), (C,), (B, T) -> dinp (B, T, C), dweight (C,).

    dinp = rstd * (dnorm - norm * mean_c(dnorm * norm)) with dnorm = dout * weight.
    """
    dout, inp, weight, rstd = np.asarray(dout), np.asarray(inp), np.asarray(weight), np.asarray(rstd)
    _check_shapes("rmsnorm_backward", inp, weight, dout=dout, rstd=rstd)
    norm = inp * rstd[..., None]                               # (B, T, C), recomputed from the cache
    dnorm = dout * weight                                      # (B, T, C)
    dnorm_norm_mean = (dnorm * norm).mean(axis=-1, keepdims=True)  # (B, T, 1)
    dinp = rstd[..., None] * (dnorm - norm * dnorm_norm_mean)
    dweight = (dout * norm).sum(axis=(0, 1))                   # (C,): weight was used at every (b, t)
    return dinp, dweight
