"""The bf16 matmul peak (8192^3, out = a @ b^T, bf16 out) as bench.matmul_peaks times it, with cuBLASLt's heuristic's
first algorithm and with the measured one (LLMC_GEMM_ALGORITHMS), beside torch.matmul; three rounds each."""
import json, os
import numpy as np
from llmc_lessons import device, timing, cublas
from llmc_lessons.cublas import gemm
from llmc_lessons.layers.bf16 import float_to_bf16_cuda
n = 8192
gen = np.random.default_rng(0)
a, b = (float_to_bf16_cuda(device.xp.asarray(gen.standard_normal((n, n), dtype=np.float32))) for _ in range(2))
rows = []
for r in range(3):
    ms = timing.time_ms(lambda: gemm(a, b, trans_b=True), warmup=3, repeat=10)
    bms = timing.burst_ms(lambda: gemm(a, b, trans_b=True), launches=10)
    rows.append(dict(round=r, time_ms_tflops=timing.tflops(2 * n**3, ms), burst_tflops=timing.tflops(2 * n**3, bms)))
try:
    import torch
    ta, tb = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for r in range(3):
        ms = timing.time_ms(lambda: ta @ tb.T, warmup=3, repeat=10)
        rows.append(dict(round=r, torch_tflops=timing.tflops(2 * n**3, ms)))
except ImportError:
    pass
print(json.dumps(dict(mode=os.environ.get("LLMC_GEMM_ALGORITHMS", "measure"), report=cublas.algorithm_report(), rows=rows)))
