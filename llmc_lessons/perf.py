"""Tools of lesson 12: counting launches, CUDA graphs through CuPy, and the roofline picture."""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

from llmc_lessons import device
from llmc_lessons.cuda import launch_listeners


@contextmanager
def count_launches():
    """`with count_launches() as c: ...` counts every kernel launch through llmc_lessons.cuda.RawKernel and every
    cuBLAS call through llmc_lessons.cublas, by name (c is a Counter). CuPy's own elementwise operations
    (`a += b`, `xp.zeros`) are not counted."""
    counts = Counter()
    listener = counts.update
    launch_listeners.append(lambda name: listener([name]))
    try:
        yield counts
    finally:
        launch_listeners.pop()


def capture_graph(fn, stream=None):
    """Record everything fn() launches on the GPU into a CUDA graph; returns (graph, stream).

    `graph.launch(stream)` then replays all of it with one call. fn must not synchronise with the host
    (no .item(), float(), to_host, xp.nonzero) and must not allocate outside CuPy's memory pool; the replay
    uses the same pointers, so the arrays fn read and wrote must stay alive. fn runs on `stream` (default: a
    new non-blocking one): CuPy's pool gives the arrays fn allocates memory of that stream, which other
    streams' allocations never reuse, so arrays fn freed may be reused by a later recording on the same
    stream but not by work between replays.
    """
    if not device.on_gpu():
        raise RuntimeError("CUDA graphs need a GPU: the emulator runs each kernel at once, there is nothing to record")
    xp = device.xp
    stream = xp.cuda.Stream(non_blocking=True) if stream is None else stream
    with stream:
        stream.begin_capture()
        try:
            fn()
        finally:
            graph = stream.end_capture()
    return graph, stream


def roofline(rows, bandwidth_gbps: float, peak_tflops: float, ax=None, title: str = ""):
    """Plot achieved GFLOP/s against arithmetic intensity (FLOP per byte) for rows of
    (name, bytes, flops, ms), under the memory roof (bandwidth x intensity) and the compute roof."""
    import matplotlib.pyplot as plt
    import numpy as np
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    x = np.logspace(-2, 3, 200)
    ax.loglog(x, np.minimum(bandwidth_gbps * x, peak_tflops * 1e3), "k-", lw=1)
    ridge = peak_tflops * 1e3 / bandwidth_gbps
    ax.axvline(ridge, color="grey", ls=":", lw=0.8)
    for name, nbytes, flops, ms in rows:
        intensity = max(flops, 1) / nbytes
        ax.loglog(intensity, max(flops, 1) / (ms * 1e-3) / 1e9, "o")
        ax.annotate(name, (intensity, max(flops, 1) / (ms * 1e-3) / 1e9), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    ax.set_xlabel("arithmetic intensity (FLOP per byte moved)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title(title or f"roofline: {bandwidth_gbps:.0f} GB/s, {peak_tflops:.0f} TFLOP/s (ridge at {ridge:.0f} FLOP/B)")
    return ax
