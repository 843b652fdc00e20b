"""Time the CPU emulator on two course kernels, with one core and with all of them.

    LLMC_DEVICE=cpu python tools/emulator_bench.py

LayerNorm forward (kernel2, a warp per row) at B*T = 512, C = 768, and the tiled matmul (kernel2, 16 x 16
tiles) at 512 x 768 @ 768 x 2304. These are emulator timings: they say how long a lesson waits on a CPU,
nothing about a GPU.
"""
import os
import platform
import time

import numpy as np

from llmc_lessons import device
from llmc_lessons.layers.layernorm import layernorm_forward, layernorm_forward_cuda
from llmc_lessons.layers.matmul import gemm_cuda


def best_of(fn, repeat):
    fn()  # compile (or load from the cache) and warm up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    if device.on_gpu():
        raise SystemExit("run with LLMC_DEVICE=cpu: this measures the CPU emulator")
    gen = np.random.default_rng(0)
    x = gen.standard_normal((1, 512, 768)).astype(np.float32)
    w, b = gen.standard_normal(768).astype(np.float32), gen.standard_normal(768).astype(np.float32)
    a, m = gen.standard_normal((512, 768)).astype(np.float32), gen.standard_normal((768, 2304)).astype(np.float32)
    out, _, _ = layernorm_forward_cuda(x, w, b, version=2)
    assert np.allclose(out, layernorm_forward(x, w, b)[0], atol=1e-4)
    assert np.allclose(gemm_cuda(a, m, version=2), a @ m, rtol=1e-3, atol=1e-2)
    cores = os.cpu_count() or 1
    print(f"{platform.processor() or platform.machine()}, {cores} cores, {device.describe()}")
    print(f"{'kernel':<46}{'1 core':>10}{f'{cores} cores':>12}")
    for name, fn, repeat in [
        ("layernorm_forward_kernel2, B*T=512, C=768", lambda: layernorm_forward_cuda(x, w, b, version=2), 5),
        ("matmul_kernel2, 512x768 @ 768x2304", lambda: gemm_cuda(a, m, version=2), 2),
    ]:
        row = []
        for threads in (1, cores):
            os.environ["LLMC_EMU_THREADS"] = str(threads)
            row.append(best_of(fn, repeat))
        print(f"{name:<46}{row[0] * 1e3:>8.1f} ms{row[1] * 1e3:>10.1f} ms")


if __name__ == "__main__":
    main()
