"""Checks for lesson 07's residual kernel (Exercise 7.3); the NumPy residual and the block's checks are in
checks/block.py."""
from __future__ import annotations

import numpy as np

from llmc_lessons import device
from llmc_lessons.checks import CHECKED_MODE_TIP, ExerciseFailed, assert_close, exercise_kernel, passed, poisoned, rng


def check_residual_forward_kernel(source: str, block_sizes=(32, 128)) -> None:
    """Exercise 7.3: residual_forward_kernel(float* out, const float* inp1, const float* inp2, int N) in `source`,
    against out = inp1 + inp2, with NaN-poisoned output, an awkward N and several block sizes."""
    ex = "Exercise 7.3"
    kernel = exercise_kernel(ex, source, "residual_forward_kernel")
    gen = rng()
    for block_size in block_sizes:
        N = int(gen.integers(3, 12)) * block_size + int(gen.integers(1, block_size))  # not a multiple
        inp1, inp2 = (gen.standard_normal(N).astype(np.float32) for _ in range(2))
        # Each array is the front of a longer one: threads past the end (i >= N) that forget the bounds check
        # then touch memory that exists, and the NaN tail after out shows whether they wrote to it.
        guard = block_size
        buf = poisoned((N + guard,))
        in1 = device.to_device(np.concatenate([inp1, np.ones(guard, np.float32)]))
        in2 = device.to_device(np.concatenate([inp2, np.ones(guard, np.float32)]))
        grid = (N + block_size - 1) // block_size
        kernel((grid,), (block_size,), (buf[:N], in1[:N], in2[:N], np.int32(N)))
        device.synchronize()
        a, b = inp1.astype(np.float64), inp2.astype(np.float64)
        assert_close(ex, f"out (N={N}, block_size={block_size})", buf[:N], a + b, atol=0, rtol=1e-7,
                     known_mistakes={
                         "only inp1 was written: the branch's output inp2 was never added": a,
                         "only inp2 was written: the skip path inp1 was never added": b,
                         "inp1 - inp2: the residual connection adds the branch's output": a - b,
                         "inp1 + inp1: the second input is inp2": a + a,
                     }, hint="one thread per element, as in lesson 06's gelu_forward_kernel1: the global index, "
                             "the bounds check, one add.")
        if not np.all(np.isnan(device.to_host(buf[N:]))):
            raise ExerciseFailed(f"{ex}: the kernel wrote past the end of out (N={N}, block_size={block_size}): "
                                 f"the last block has threads with i >= N, and they must not write. "
                                 f"{CHECKED_MODE_TIP}")
    passed(ex, f"block sizes {tuple(block_sizes)}, awkward N, output poisoned with NaN")
