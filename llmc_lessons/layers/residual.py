"""The residual connection, out = inp1 + inp2 (lesson 07).

The forward adds a branch's output back onto the residual stream. The backward is the simplest of all: the
derivative of a sum with respect to each summand is 1, so the upstream gradient flows unchanged into both
inputs. The reverse also holds: where one tensor is read by two branches (a fork), the two gradients that
come back add up, and that add is again a residual_forward.
"""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.layers.bf16 import launch_1d


def residual_forward(inp1, inp2):
    """inp1, inp2 (same shape, e.g. (B, T, C)) -> out = inp1 + inp2 (a new array)."""
    inp1, inp2 = np.asarray(inp1), np.asarray(inp2)
    if inp1.shape != inp2.shape:
        raise ValueError(f"inp1 has shape {inp1.shape} but inp2 has shape {inp2.shape}; they must match")
    return inp1 + inp2


def residual_backward(dout):
    """dout (any shape) -> (dinp1, dinp2): both are copies of dout, since d(a + b)/da = d(a + b)/db = 1."""
    dout = np.asarray(dout)
    return dout.copy(), dout.copy()


# ---------------------------------------------------------------------------------------------------------
# Kernel launcher (kernels/residual.cu)


def residual_forward_cuda(inp1, inp2, block_size: int = 256):
    """inp1, inp2 (same shape, float32 backend arrays) -> out = inp1 + inp2 through residual_forward_kernel."""
    device.require_array("inp1", inp1)
    device.require_array("inp2", inp2, shape=tuple(inp1.shape))
    block_size = device.require_block_size(block_size, warps=True)
    N = int(inp1.size)
    out = device.xp.empty_like(inp1)
    launch_1d("residual.cu", "residual_forward_kernel", N, block_size, (out, inp1, inp2, np.int32(N)))
    return out

