"""The CPU emulator: compile CUDA C with the host C++ compiler against llmc_cuda.h and run it with fibers.

The runtime (runtime.cpp) is built once; each kernel source is built into its own shared library. Both are
cached on disk by a hash of everything that goes into them, written atomically (temp file + rename) so
parallel test runs can share the cache.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

from llmc_lessons.cuda import source as cu_source

HERE = Path(__file__).resolve().parent
KERNELS_DIR = cu_source.KERNELS_DIR
HEADER = HERE / "llmc_cuda.h"
RUNTIME = HERE / "runtime.cpp"
STACK_SIZE = int(os.environ.get("LLMC_FIBER_STACK", 256 * 1024))
_lock = threading.Lock()  # one launch at a time: the runtime's error and output slots are global


class _ShownBriefly(RuntimeError):
    """An error whose message says all there is (the kernel's own file and line): Jupyter shows it without the
    emulator's frames, which would only bury it."""

    def _render_traceback_(self) -> list[str]:   # IPython calls this instead of formatting the frames
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}"]


class CompileError(_ShownBriefly):
    """The C++ compiler rejected a kernel source; the message holds its diagnostics, pointing at the .cu lines."""


class KernelError(_ShownBriefly):
    """A kernel failed while running in the emulator (deadlock, failed assert, bad collective, ...)."""


def cache_dir() -> Path:
    d = Path(os.environ.get("LLMC_CACHE") or Path.home() / ".cache" / "llmc_lessons") / "emulator"
    d.mkdir(parents=True, exist_ok=True)
    return d


@lru_cache(maxsize=None)
def compiler() -> tuple[str, ...]:
    """The C++ compiler command: $CXX, else g++, clang++ or c++ on PATH, else the `ziglang` package."""
    if os.environ.get("CXX"):
        return tuple(os.environ["CXX"].split())
    for name in ("g++", "clang++", "c++"):
        path = shutil.which(name)
        if path:
            return (path,)
    try:
        import ziglang  # noqa: F401  (pip install ziglang: a C++ compiler from PyPI)
        return (sys.executable, "-m", "ziglang", "c++")
    except ImportError:
        pass
    raise RuntimeError(
        "The CPU kernel emulator needs a C++ compiler and none was found. Install one:\n"
        "  Debian/Ubuntu: sudo apt install build-essential\n"
        "  Fedora:        sudo dnf install gcc-c++\n"
        "  macOS:         xcode-select --install\n"
        "  conda:         conda install -c conda-forge cxx-compiler\n"
        "  pip only:      pip install ziglang   (ships a C++ compiler)\n"
        "or point $CXX at one.")


@lru_cache(maxsize=None)
def compiler_version() -> str:
    out = subprocess.run([*compiler(), "--version"], capture_output=True, text=True)
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "unknown"


def _flags(checked: bool) -> list[str]:
    flags = ["-std=c++17", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing"]
    if checked:
        flags += ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-DLLMC_UCONTEXT"]
    else:
        flags += ["-O2"]
    return flags


def _build(tag: str, key_parts: list[str], src_text: str, extra: list[str], checked: bool) -> Path:
    """Compile `src_text` into a cached shared library; return its path."""
    headers = [p.read_text() for p in sorted(HERE.glob("*.h")) + sorted(KERNELS_DIR.glob("*.cuh"))]
    key = hashlib.sha256("\0".join([*key_parts, src_text, compiler_version(), " ".join(_flags(checked)),
                                    " ".join(extra), *headers]).encode()).hexdigest()[:24]
    d = cache_dir()
    lib = d / f"{tag}-{key}{'-asan' if checked else ''}.so"
    if lib.exists():
        return lib
    fd, tmp_src = tempfile.mkstemp(suffix=".cpp", dir=d)
    with os.fdopen(fd, "w") as f:
        f.write(src_text)
    tmp_lib = f"{tmp_src[:-4]}.so"
    cmd = [*compiler(), *_flags(checked), f"-I{HERE}", f"-I{KERNELS_DIR}", *extra, tmp_src, "-o", tmp_lib]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise CompileError(_explain(res.stderr))
        os.replace(tmp_lib, lib)  # atomic: a parallel build of the same key just replaces it with its twin
    finally:
        for p in (tmp_src, tmp_lib):
            if os.path.exists(p):
                os.unlink(p)
    return lib


def _explain(stderr: str) -> str:
    """Compiler diagnostics, trimmed to the errors, with a note where a CUDA name is unknown here."""
    lines = [l for l in stderr.splitlines() if "llmc_cuda.h" not in l or "error" in l]
    msg = "\n".join(lines[:40])
    unknown = re.findall(r"'(__\w+|cuda\w+)' was not declared|use of undeclared identifier '(__\w+|cuda\w+)'", stderr)
    if unknown:
        names = sorted({a or b for a, b in unknown})
        msg += (f"\n\nnote: {', '.join(names)} is outside the CUDA subset that the CPU emulator supports "
                f"(see docs/emulator.md).")
    return "the kernel did not compile:\n" + msg


@lru_cache(maxsize=None)
def runtime(checked: bool = False) -> ctypes.CDLL:
    """The runtime library, loaded with RTLD_GLOBAL so kernel libraries resolve llmc_rt_* against it."""
    lib = _build("runtime", [RUNTIME.read_text()], f'#include "{RUNTIME}"\n', [], checked)
    rt = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    rt.llmc_rt_launch.restype = ctypes.c_int
    rt.llmc_rt_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint),
                                  ctypes.POINTER(ctypes.c_uint), ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                                  ctypes.c_size_t, ctypes.c_char_p]
    rt.llmc_rt_error.restype = ctypes.c_char_p
    rt.llmc_rt_output.restype = ctypes.c_char_p
    return rt


def thunk_symbol(name: str) -> str:
    """The entry point of kernel `name` (or of a template instantiation such as "k<float, 4>")."""
    return f"llmc_thunk_{name}" if name.isidentifier() else \
        f"llmc_thunk_t{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def _thunks(names) -> str:
    """One entry point per kernel that unpacks an array of argument addresses, as cuLaunchKernel does (the
    parameter types come from the function itself, so typedefs and template arguments need no reading here)."""
    out = ['#line 1 "<llmc_lessons thunks>"', "#include <type_traits>", "#include <utility>",
           "template <typename... P, std::size_t... I>",
           "static void llmc_call(void (*f)(P...), void **a, std::index_sequence<I...>) {",
           "    (void)a; f(*static_cast<std::remove_reference_t<P> *>(a[I])...); }",
           "template <typename... P>",
           "static void llmc_call(void (*f)(P...), void **a) { llmc_call(f, a, std::index_sequence_for<P...>{}); }"]
    for name in names:
        out.append(f'extern "C" __attribute__((visibility("default"))) void {thunk_symbol(name)}(void **a) '
                   f'{{ llmc_call(&{name}, a); }}')
    return "\n".join(out) + "\n"


class EmulatedModule:
    """One compiled kernel source: look up its kernels' entry points by name."""

    def __init__(self, code: str, filename: str, options: tuple, checked: bool, name_expressions: tuple = ()):
        names = cu_source.plain_kernel_names(code, options, filename) + list(name_expressions)
        code = cu_source.inline_headers(code, filename, options)
        cu_source.check_subset(code, filename)
        text = (f'#include "llmc_cuda.h"\n#line 1 "{filename}"\n' + cu_source.rewrite_shared(code, filename)
                + "\n" + _thunks(dict.fromkeys(names)))
        extra = [o for o in options if o.startswith(("-D", "-I", "-U"))]
        if Path(filename).is_file():   # the file's folder is on the include path, as RawKernel puts it on a GPU
            extra.append(f"-I{Path(filename).resolve().parent}")
        runtime(checked)
        self.path = _build("kernel", [filename], text, extra, checked)
        self.lib = ctypes.CDLL(str(self.path), mode=ctypes.RTLD_LOCAL)
        self.checked = checked

    def thunk(self, name: str) -> int:
        return ctypes.cast(getattr(self.lib, thunk_symbol(name)), ctypes.c_void_p).value


def launch(module: EmulatedModule, sig, grid, block, args, shared_mem: int, shared_limit: int) -> str:
    """Run one launch on the CPU; return what the kernel printed. Raises KernelError if it failed."""
    holders, ptrs = [], []
    for p, a in zip(sig.params, args):
        if p.pointer:
            h = ctypes.c_void_p(None if a is None else a.ctypes.data)
        else:
            h = ctypes.c_byte * a.dtype.itemsize
            h = h.from_buffer_copy(a.tobytes())
        holders.append(h)
        ptrs.append(ctypes.addressof(h))
    argv = (ctypes.c_void_p * max(1, len(ptrs)))(*ptrs)
    g = (ctypes.c_uint * 3)(*grid)
    b = (ctypes.c_uint * 3)(*block)
    workers = int(os.environ.get("LLMC_EMU_THREADS", os.cpu_count() or 1))
    rt = runtime(module.checked)
    with _lock:
        rc = rt.llmc_rt_launch(module.thunk(sig.name), argv, g, b, shared_mem, shared_limit, workers,
                               STACK_SIZE, sig.name.encode())
        out = rt.llmc_rt_output().decode(errors="replace")
        err = rt.llmc_rt_error().decode(errors="replace")
    if rc != 0:
        raise KernelError(err)
    return out
