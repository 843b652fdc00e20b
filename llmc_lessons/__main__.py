"""`python -m llmc_lessons doctor`: can this machine run the course, and if not, what to do.

It prints the versions that matter (Python, NumPy, CuPy, CUDA), the GPU, the backend the course will use
and why, the C++ compiler the CPU kernel emulator uses, and whether the shipped tokenizer and corpus files
are there; it launches one tiny kernel on the chosen backend; and for every missing piece it prints one line
saying what to do. Exit status 0 when the course can run (on the CPU at least), 1 otherwise.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
RANKS_FILE = ASSETS / "gpt2.tiktoken"
CORPUS_FILE = ASSETS / "shakespeare.txt.xz"
REQUIRED = ["numpy", "matplotlib", "ipywidgets", "tiktoken", "regex", "jupyterlab", "tqdm", "safetensors"]
MIN_PYTHON = (3, 10)

_SMOKE_KERNEL = r'''
extern "C" __global__ void doctor_axpy(const float* x, float* y, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { y[i] = a * x[i] + y[i]; }
}
'''


class Report:
    """Lines of `name: value`, plus one `-> what to do` line under each problem; `ok` is False after a fatal one."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.ok = True

    def line(self, name: str, value: str) -> None:
        print(f"{name + ':':<22}{value}", file=self.out)

    def todo(self, what: str, fatal: bool) -> None:
        print(f"{'':<22}-> {what}", file=self.out)
        if fatal:
            self.ok = False


def _version(module) -> str:
    return getattr(module, "__version__", "installed (version unknown)")


def _check_python(r: Report) -> None:
    r.line("Python", f"{platform.python_version()} ({sys.executable})")
    if sys.version_info < MIN_PYTHON:
        r.todo(f"the course needs Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}: install a newer Python and make a "
               f"new virtual environment with it", fatal=True)


def _check_packages(r: Report) -> None:
    for name in REQUIRED:
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001  (a broken install raises more than ImportError)
            r.line(name, f"MISSING ({type(e).__name__}: {e})")
            r.todo('install the course\'s dependencies: pip install -e . (from the repository root)', fatal=True)
        else:
            r.line(name, _version(mod))
    try:
        import torch
        r.line("PyTorch", f"{torch.__version__} (optional: tests compare with it)")
    except Exception:  # noqa: BLE001
        r.line("PyTorch", "not installed (optional: only tests and benchmarks compare with it)")


def _check_cuda(r: Report) -> None:
    try:
        import cupy
    except Exception as e:  # noqa: BLE001
        r.line("CuPy", f"not installed ({type(e).__name__})")
        r.todo('only needed for a GPU: pip install -e ".[cuda12]" (or ".[cuda13]" for a CUDA 13 driver); '
               'without it kernels run in the CPU emulator', fatal=False)
        return
    r.line("CuPy", cupy.__version__)
    try:
        rt = cupy.cuda.runtime.runtimeGetVersion()
        drv = cupy.cuda.runtime.driverGetVersion()
        r.line("CUDA", f"runtime {rt // 1000}.{rt % 1000 // 10}, driver supports {drv // 1000}.{drv % 1000 // 10}")
        n = cupy.cuda.runtime.getDeviceCount()
        for i in range(n):
            props = cupy.cuda.runtime.getDeviceProperties(i)
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            r.line(f"GPU {i}", f"{name}, {props['totalGlobalMem'] / 2**30:.1f} GiB, "
                               f"compute capability {props['major']}.{props['minor']}")
        if n == 0:
            r.line("GPU", "none found")
    except Exception as e:  # noqa: BLE001
        r.line("CUDA", f"unusable ({type(e).__name__}: {e})")
        r.todo("CuPy cannot reach a GPU: check `nvidia-smi`, and that the cupy-cudaXXx wheel matches the "
               "driver's CUDA major version; the course falls back to the CPU", fatal=False)


def _check_backend(r: Report):
    try:
        from llmc_lessons import device
    except Exception as e:  # noqa: BLE001  (e.g. LLMC_DEVICE=gpu without a GPU, or a bad LLMC_DEVICE value)
        r.line("backend", f"ERROR: {e}")
        r.todo("fix or unset the LLMC_DEVICE environment variable (allowed: cpu, gpu)", fatal=True)
        return None
    r.line("backend", device.describe())
    cc = device.compute_capability()
    if cc is not None:
        r.line("GPU architecture", f"sm_{cc} (compute capability {cc // 10}.{cc % 10})")
        why = device.bf16_unsupported()
        if why is None:
            r.line("can run", "every lesson and kernel, the bf16 tensor-core parts (lessons 13-14, "
                              "--precision bf16) included")
        else:
            r.line("can run", "every lesson and kernel; lessons 13-14's bf16 kernels run without the tensor "
                              "cores (plain CUDA, same results, slower)")
            r.todo(f"GPT2(precision='bf16') and `train --precision bf16` train in fp32 here: {why}", fatal=False)
    return device


def _find_compiler() -> tuple[tuple[str, ...], str]:
    """(command, version line) of the C++ compiler the emulator will use; RuntimeError when there is none."""
    try:
        from llmc_lessons.cuda import emulator
    except Exception:  # noqa: BLE001  (the package's CUDA layer failed to import: look the same way it does)
        emulator = None
    if emulator is not None:
        return emulator.compiler(), emulator.compiler_version()
    cmd = tuple(os.environ["CXX"].split()) if os.environ.get("CXX") else None
    for name in ("g++", "clang++", "c++"):
        if cmd is None and shutil.which(name):
            cmd = (shutil.which(name),)
    if cmd is None:
        raise RuntimeError("no C++ compiler found")
    out = subprocess.run([*cmd, "--version"], capture_output=True, text=True)
    return cmd, ((out.stdout or out.stderr).splitlines() or ["unknown"])[0]


def _check_compiler(r: Report, device) -> bool:
    """The emulator's C++ compiler; fatal only where kernels must run on the CPU."""
    fatal = device is None or not device.on_gpu()
    try:
        cmd, version = _find_compiler()
    except Exception:  # noqa: BLE001
        r.line("C++ compiler", "MISSING (the CPU kernel emulator compiles kernels with it)")
        if os.environ.get("CXX"):
            r.todo(f"$CXX is set to {os.environ['CXX']!r}, which cannot be run: fix or unset it", fatal=fatal)
        r.todo("install one (Debian/Ubuntu: sudo apt install g++; Fedora: sudo dnf install gcc-c++; macOS: "
               "xcode-select --install; conda: conda install -c conda-forge cxx-compiler; pip: pip install "
               "ziglang), or point $CXX at one" + ("" if fatal else " (needed only to run kernels on the CPU)"),
               fatal=fatal)
        return False
    r.line("C++ compiler", f"{' '.join(cmd)} ({version})")
    return True


def _check_kernel(r: Report, device) -> None:
    """Launch one tiny kernel on the chosen backend and compare with NumPy."""
    import numpy as np
    try:
        from llmc_lessons.cuda import RawKernel
        n = 100
        x = np.arange(n, dtype=np.float32)
        xd, yd = device.to_device(x), device.to_device(np.ones(n, dtype=np.float32))
        RawKernel(_SMOKE_KERNEL, "doctor_axpy")((4,), (32,), (xd, yd, np.float32(2.0), np.int32(n)))
        device.synchronize()
        if not np.allclose(device.to_host(yd), 2 * x + 1):
            raise RuntimeError("the kernel ran but computed a wrong result")
    except Exception as e:  # noqa: BLE001
        where = "on the GPU" if device.on_gpu() else "in the CPU emulator"
        r.line("test kernel", f"FAILED {where} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        r.todo("run `python -m pytest tests/test_emulator.py -x` for details"
               + ("; LLMC_DEVICE=cpu falls back to the CPU" if device.on_gpu() else ""), fatal=True)
        return
    r.line("test kernel", "ran " + ("on the GPU" if device.on_gpu() else "in the CPU emulator") + ": ok")


def _check_assets(r: Report) -> None:
    for label, path, what in (("tokenizer ranks", RANKS_FILE, "GPT-2's BPE ranks"),
                              ("corpus", CORPUS_FILE, "the Shakespeare corpus")):
        if path.is_file():
            r.line(label, f"{path} ({path.stat().st_size / 2**20:.1f} MiB)")
        else:
            r.line(label, f"MISSING: {path}")
            r.todo(f"{path.name} ({what}) ships with the package: reinstall from a complete checkout "
                   f"(pip install -e .), see llmc_lessons/assets/PROVENANCE.md", fatal=True)


def doctor(out=None, run_kernel: bool = True) -> int:
    """Print the report; return 0 when the course can run here, else 1."""
    r = Report(out)
    _check_python(r)
    _check_packages(r)
    _check_cuda(r)
    device = _check_backend(r)
    compiler_ok = _check_compiler(r, device)
    if device is not None and run_kernel and (device.on_gpu() or compiler_ok):
        _check_kernel(r, device)
    _check_assets(r)
    print("", file=r.out)
    if r.ok:
        where = "on the GPU" if device.on_gpu() else "on the CPU (kernels through the emulator)"
        print(f"The course can run here, {where}.", file=r.out)
    else:
        print("The course cannot run here yet: fix the lines marked -> above, then run this again.", file=r.out)
    return 0 if r.ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmc_lessons",
                                     description="Tools of the llmc-lessons course.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="check this machine can run the course, and say what to fix")
    p.add_argument("--no-kernel", action="store_true", help="skip launching the test kernel")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        return doctor(run_kernel=not args.no_kernel)
    return 2  # pragma: no cover  (argparse refuses other commands)


if __name__ == "__main__":
    sys.exit(main())
