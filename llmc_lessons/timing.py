"""Timing on the GPU done properly: CUDA events, warm-up, the median of many repeats, and the card's ceilings.

Timings mean nothing on the CPU emulator, so every function here refuses to run there.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np

from llmc_lessons.device import on_gpu, xp
from llmc_lessons.precision import tf32


def _require_gpu(what: str):
    if not on_gpu():
        raise RuntimeError(f"{what} needs a GPU: the CPU emulator's timings say nothing about GPU speed")


def time_ms(fn: Callable[[], object], warmup: int = 3, repeat: int = 20, flush_l2: bool = False,
            hide_host: bool = False) -> float:
    """Median wall time of fn() in milliseconds, measured with CUDA events around each call.

    flush_l2: before each timed call, overwrite a buffer larger than the L2 cache (outside the timed region),
    so that fn reads its inputs from memory, not from a cache warmed by the previous repeat.
    hide_host: before each timed call, hold the GPU in a 1 ms wait (one thread spinning), so that everything
    Python does to enqueue fn's work (argument checks, allocations, launches) is done before the GPU reaches
    the start event: the events then time the GPU's work alone, as a profiler would, and as the kernels run
    inside a CUDA graph. Without it, a call that takes Python longer than its kernels measures Python.
    """
    _require_gpu("time_ms")
    for _ in range(warmup):
        fn()
    scratch = xp.empty(64 * 2**20, dtype=xp.float32) if flush_l2 else None  # 256 MB > any L2 (H100: 50 MB)
    start, end = xp.cuda.Event(), xp.cuda.Event()
    times = []
    for _ in range(repeat):
        if scratch is not None:
            scratch.fill(0)
        if hide_host:
            _gpu_wait(1_000_000)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(xp.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


def burst_ms(fn: Callable[[], object], launches: int = 4) -> float:
    """GPU milliseconds of one fn(): after a warm-up call, `launches` calls back to back, timed with CUDA events
    around them all, divided by `launches`. A short wait on the GPU first (as time_ms's hide_host) lets Python
    enqueue the first call before the start event is reached; later calls are enqueued while the GPU runs earlier
    ones, so a call whose GPU work outlasts its Python (a large matmul) is timed as GPU work alone."""
    _require_gpu("burst_ms")
    fn()
    start, end = xp.cuda.Event(), xp.cuda.Event()
    _gpu_wait(100_000)
    start.record()
    for _ in range(launches):
        fn()
    end.record()
    end.synchronize()
    return xp.cuda.get_elapsed_time(start, end) / launches


_WAIT_SOURCE = r"""
extern "C" __global__ void gpu_wait(unsigned long long ns) {   // one thread spins for ns nanoseconds
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns);
}
"""


def _gpu_wait(ns: int):
    """Enqueue a kernel that keeps the current stream busy for about ns nanoseconds."""
    kernel = _wait_kernel()
    kernel((1,), (1,), (np.uint64(ns),))


@lru_cache(maxsize=None)
def _wait_kernel():
    return xp.RawKernel(_WAIT_SOURCE, "gpu_wait")


def gbps(nbytes: float, ms: float) -> float:
    """Achieved bandwidth in GB/s for `nbytes` moved in `ms` milliseconds."""
    return nbytes / (ms * 1e-3) / 1e9


def tflops(flops: float, ms: float) -> float:
    """Achieved rate in TFLOP/s."""
    return flops / (ms * 1e-3) / 1e12


@lru_cache(maxsize=None)
def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """The measured memory ceiling: a device-to-device copy of an nbytes buffer, counting bytes read plus bytes
    written (2 * nbytes), timed from memory (L2 flushed) on the GPU alone (hide_host). A short copy pays a
    start and a finish that a long one spreads out: its bandwidth is lower (a 50 MB copy on the H200: about
    three quarters of a 1 GiB copy's)."""
    _require_gpu("copy_bandwidth_gbps")
    a = xp.empty(max(1, nbytes // 4), dtype=xp.float32)
    b = xp.empty_like(a)
    ms = time_ms(lambda: b.__setitem__(Ellipsis, a), warmup=3, repeat=10, flush_l2=True, hide_host=True)
    return gbps(2 * a.nbytes, ms)


@lru_cache(maxsize=None)
def matmul_tflops(n: int = 8192) -> float:
    """The measured FLOP ceiling: an n x n x n float32 matmul through cuBLAS (CuPy's default precision)."""
    _require_gpu("matmul_tflops")
    gen = xp.random.default_rng(0)
    a = gen.standard_normal((n, n), dtype=xp.float32)
    b = gen.standard_normal((n, n), dtype=xp.float32)
    ms = time_ms(lambda: a @ b, warmup=2, repeat=5)
    return tflops(2 * n ** 3, ms)


@lru_cache(maxsize=None)
def matmul_tflops_tf32(n: int = 8192) -> float:
    """The measured TF32 tensor-core ceiling: the same float32 matmul with cuBLAS's TF32 mode switched on."""
    _require_gpu("matmul_tflops_tf32")
    with tf32(True):
        return matmul_tflops.__wrapped__(n)
