"""The emulator's memory predictions beside what a GPU shows, for a dozen kernels (course kernels and bad ones).

    python tools/memory_check.py --out results/gpu-run/kernels/memory-h100-2026-01-01   # writes .json and .md
    python tools/memory_check.py --emulator-only --out /tmp/memory                      # the predictions alone

For each case the emulator traces one small launch (llmc_lessons.cuda.trace): global load and store requests and
sectors, shared-memory wavefronts and bank conflicts. On the GPU, where Nsight Compute's `ncu` runs, the same launch
is profiled in a child process for the matching counters (l1tex__t_requests / t_sectors of global loads and stores,
l1tex__data_pipe_lsu_wavefronts / data_bank_conflicts of shared loads and stores); where it does not (not installed,
or no permission for the GPU's counters), a large launch of the same pattern is timed instead and its bandwidth of
useful bytes reported, whose ordering the predicted efficiency should explain. A case that fails is recorded with
its error and the others go on. tools/gpu_check.sh runs it as its `memory` stage.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmc_lessons import device  # noqa: E402
from llmc_lessons.cuda import RawKernel, kernel_source, load_kernel  # noqa: E402
from llmc_lessons.files import atomic_write  # noqa: E402

SYNTHETIC = r'''
extern "C" __global__ void copy_strided(const float* x, float* y, int n, int stride, int offset) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[(long long)i * stride + offset];
}
extern "C" __global__ void broadcast(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[0];
}
extern "C" __global__ void copy_float4(const float4* x, float4* y, int n4) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n4) y[i] = x[i];
}
extern "C" __global__ void shared_strided(float* y, int stride, int reps) {
    __shared__ float s[32 * 33];
    int t = threadIdx.x;                              // one warp per block
    for (int k = t; k < 32 * 33; k += 32) s[k] = k;
    __syncthreads();
    float acc = 0.0f;
    for (int r = 0; r < reps; r++) acc += s[(t * stride + r % 32) % (32 * 33)];
    y[blockIdx.x * 32 + t] = acc;
}
'''

METRICS = {
    "global_ld_requests": "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum",
    "global_ld_sectors": "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
    "global_st_requests": "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum",
    "global_st_sectors": "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum",
    "shared_ld_wavefronts": "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum",
    "shared_ld_conflicts": "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
    "shared_st_wavefronts": "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum",
    "shared_st_conflicts": "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum",
}


def _arr(a):
    return device.to_device(np.ascontiguousarray(a))


def _synthetic(name):
    return RawKernel(SYNTHETIC, name)


def _copy(stride, offset=0):
    def build(small):
        n = 4096 if small else 1 << 22
        x = _arr(np.random.default_rng(0).standard_normal(n * stride + offset + 1).astype(np.float32))
        y = _arr(np.zeros(n, np.float32))
        return _synthetic("copy_strided"), (n // 256,), (256,), (x, y, np.int32(n), np.int32(stride),
                                                                  np.int32(offset)), 0, 8 * n
    return build


def _broadcast(small):
    n = 4096 if small else 1 << 22
    return (_synthetic("broadcast"), (n // 256,), (256,), (_arr(np.ones(4, np.float32)), _arr(np.zeros(n, np.float32)),
                                                          np.int32(n)), 0, 4 * n)


def _float4(small):
    n = 4096 if small else 1 << 22
    x = _arr(np.ones(4 * n, np.float32))
    return _synthetic("copy_float4"), (n // 256,), (256,), (x, _arr(np.zeros(4 * n, np.float32)), np.int32(n)), 0, 32 * n


def _shared(stride):
    def build(small):
        blocks, reps = (4, 32) if small else (4096, 1024)
        return (_synthetic("shared_strided"), (blocks,), (32,), (_arr(np.zeros(32 * blocks, np.float32)),
                                                                 np.int32(stride), np.int32(reps)), 0,
                4 * 32 * blocks * reps)
    return build


def _matmul(version, tile=16, padded=True):
    def build(small):
        M = N = K = 64 if small else 2048
        a = _arr(np.random.default_rng(1).standard_normal((M, K)).astype(np.float32))
        b = _arr(np.random.default_rng(2).standard_normal((N, K)).astype(np.float32))
        out = _arr(np.zeros((M, N), np.float32))
        if padded:
            k = load_kernel("matmul.cu", f"matmul_kernel{version}")
        else:
            k = RawKernel(kernel_source("matmul.cu").replace("(TILE + 1)", "TILE"), "matmul_kernel2")
        shared = 4 * (tile * tile + tile * (tile + 1)) if version == 2 else 0
        args = (out, a, b, b, np.int32(M), np.int32(N), np.int32(K), np.int32(K), np.int32(1), np.int32(1),
                np.int32(K), np.int32(0))
        return k, (N // tile, M // tile), (tile, tile), args, shared, 4 * (M * K + N * K + M * N)
    return build


def _encoder(version):
    def build(small):
        B, T, C, V = (2, 16, 128, 64) if small else (8, 1024, 768, 50257)
        inp = _arr(np.random.default_rng(3).integers(0, V, (B, T)).astype(np.int32))
        wte, wpe = _arr(np.ones((V, C), np.float32)), _arr(np.ones((T, C), np.float32))
        out = _arr(np.zeros((B, T, C), np.float32))
        n = B * T * C // (4 if version == 2 else 1)
        args = (out, inp, wte, wpe, np.int32(B), np.int32(T), np.int32(C))
        return (load_kernel("encoder.cu", f"encoder_forward_kernel{version}"), (-(-n // 256),), (256,), args, 0,
                12 * B * T * C)
    return build


def _layernorm(version):
    def build(small):
        N, C = (64, 256) if small else (8192, 768)
        x = _arr(np.random.default_rng(4).standard_normal((N, C)).astype(np.float32))
        w, b = _arr(np.ones(C, np.float32)), _arr(np.zeros(C, np.float32))
        out, mean, rstd = _arr(np.zeros((N, C), np.float32)), _arr(np.zeros(N, np.float32)), _arr(np.zeros(N, np.float32))
        grid = (-(-N // 64),) if version == 1 else (-(-N // 2),)
        args = (out, mean, rstd, x, w, b, np.int32(N), np.int32(C), np.float32(1e-5))
        return load_kernel("layernorm.cu", f"layernorm_forward_kernel{version}"), grid, (64,), args, 0, 8 * N * C
    return build


CASES = {
    "copy, coalesced": _copy(1),
    "copy, misaligned by 4 bytes": _copy(1, offset=1),
    "copy, stride 2": _copy(2),
    "copy, stride 32": _copy(32),
    "broadcast": _broadcast,
    "copy, float4": _float4,
    "shared, stride 1": _shared(1),
    "shared, stride 2 (2-way)": _shared(2),
    "shared, stride 32 (32-way)": _shared(32),
    "shared, stride 33 (padded)": _shared(33),
    "matmul_kernel1 (naive)": _matmul(1),
    "matmul_kernel2 (tiled, TILE 32)": _matmul(2, 32),
    "matmul_kernel2 unpadded (TILE 32)": _matmul(2, 32, padded=False),
    "encoder_forward_kernel1": _encoder(1),
    "encoder_forward_kernel2 (float4)": _encoder(2),
    "layernorm_forward_kernel1 (thread per row)": _layernorm(1),
    "layernorm_forward_kernel2 (warp per row)": _layernorm(2),
}


def predict(case: str) -> dict:
    """The emulator's counts for the small launch of `case`, in the GPU counters' terms."""
    kernel, grid, block, args, shared, _ = CASES[case](True)
    t = kernel(grid, block, args, shared_mem=shared, trace=True)
    q = t.requests
    out = {"kernel": t.kernel}
    for space, shared_mem in (("global", False), ("shared", True)):
        for op, code in (("ld", 0), ("st", 1)):
            m = (q.shared == shared_mem) & (q.op == code)
            if space == "global":
                out[f"global_{op}_requests"] = int(m.sum())
                out[f"global_{op}_sectors"] = int(q.sectors[m].sum())
            else:
                out[f"shared_{op}_wavefronts"] = int(q.wavefronts[m].sum())
                out[f"shared_{op}_conflicts"] = int((q.wavefronts[m] - q.phases[m]).sum())
    return out


def run_once(case: str) -> None:
    """The small launch of `case` on the GPU, once compiled (the second launch is the one ncu profiles)."""
    kernel, grid, block, args, shared, _ = CASES[case](True)
    for _ in range(2):
        kernel(grid, block, args, shared_mem=shared)
    import cupy
    cupy.cuda.runtime.deviceSynchronize()


def profile(case: str, kernel_name: str) -> dict:
    """Nsight Compute's counters for the second launch of `case` (the first compiles)."""
    cmd = ["ncu", "--csv", "--metrics", ",".join(METRICS.values()), "--kernel-name", kernel_name,
           "--launch-skip", "1", "--launch-count", "1", sys.executable, str(Path(__file__).resolve()), "--run", case]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    rows = [line for line in res.stdout.splitlines() if line.startswith('"')]
    values = {}
    for row in csv.DictReader(io.StringIO("\n".join(rows))):
        for key, metric in METRICS.items():
            if row.get("Metric Name") == metric:
                values[key] = int(float(row["Metric Value"].replace(",", "")))
    if not values:
        raise RuntimeError(f"ncu gave no counters (exit {res.returncode}): "
                           f"{(res.stderr or res.stdout).strip().splitlines()[-3:]}")
    return values


def bandwidth(case: str) -> dict:
    """The large launch of `case` timed on the GPU: milliseconds and useful GB/s."""
    from llmc_lessons import timing
    kernel, grid, block, args, shared, useful = CASES[case](False)
    ms = timing.time_ms(lambda: kernel(grid, block, args, shared_mem=shared), flush_l2=True)
    return {"ms": ms, "useful_gbps": timing.gbps(useful, ms)}


def _table(rows: list[dict], mode: str) -> str:
    def per(a, b):
        return f"{a / b:.2f}" if b else "-"
    head = ("| case | emulator: global ld sectors/req | st sectors/req | shared ld wavefronts (conflicts) | "
            "st wavefronts (conflicts) | GPU: " + {"ncu": "the same four, from ncu", "bandwidth": "useful GB/s",
                                               "emulator": "not run"}[mode] + " |")
    lines = [head, "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        p, g = r.get("emulator") or {}, r.get("gpu") or {}
        def cells(d):
            if not d or "global_ld_sectors" not in d:
                return ["-"] * 4
            return [per(d["global_ld_sectors"], d["global_ld_requests"]), per(d["global_st_sectors"],
                    d["global_st_requests"]), f"{d['shared_ld_wavefronts']} ({d['shared_ld_conflicts']})",
                    f"{d['shared_st_wavefronts']} ({d['shared_st_conflicts']})"]
        gpu = (" / ".join(cells(g)) if mode == "ncu" else f"{g['useful_gbps']:.0f}" if "useful_gbps" in g else "-")
        if r.get("errors"):
            gpu += " (" + "; ".join(r["errors"]) + ")"
        lines.append(f"| {r['case']} | " + " | ".join(cells(p)) + f" | {gpu} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="path of the records, without extension (.json and .md are written)")
    ap.add_argument("--emulator-only", action="store_true", help="the emulator's predictions alone (no GPU)")
    ap.add_argument("--run", help=argparse.SUPPRESS)   # the child that ncu profiles
    a = ap.parse_args()
    if a.run:
        run_once(a.run)
        return 0
    gpu = device.on_gpu() and not a.emulator_only
    mode = "ncu" if gpu and shutil.which("ncu") else "bandwidth" if gpu else "emulator"
    rows = []
    for case in CASES:
        row = {"case": case, "errors": []}
        t0 = time.perf_counter()
        try:
            row["emulator"] = predict(case)
        except Exception as e:   # noqa: BLE001  (a case that fails is recorded, the others go on)
            row["errors"].append(f"emulator: {type(e).__name__}: {str(e)[:200]}")
        if gpu:
            try:
                if mode == "ncu":
                    name = row.get("emulator", {}).get("kernel") or case.split()[0]
                    row["gpu"] = profile(case, name)
            except Exception as e:   # noqa: BLE001
                row["errors"].append(f"ncu: {type(e).__name__}: {str(e)[:300]}")
            if mode == "bandwidth" or "gpu" not in row:
                try:
                    row["gpu"] = {**row.get("gpu", {}), **bandwidth(case)}
                except Exception as e:   # noqa: BLE001
                    row["errors"].append(f"timing: {type(e).__name__}: {str(e)[:200]}")
        print(f"{case}: {time.perf_counter() - t0:.1f} s {row}", flush=True)
        rows.append(row)
    text = (f"# Memory: the emulator's predictions beside the GPU ({mode})\n\n{device.describe()}\n\n"
            + _table(rows, mode))
    print(text)
    if a.out:
        out = Path(a.out)
        for ext, body in ((".json", json.dumps({"mode": mode, "device": device.describe(), "rows": rows}, indent=1)),
                          (".md", text)):
            atomic_write(out.with_name(out.name + ext), body.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
