"""The CPU emulator: compile CUDA C with the host C++ compiler against llmc_cuda.h and run it with fibers.

The runtime (runtime.cpp) is built once; each kernel source is built into its own shared library. Both are
cached on disk by a hash of everything that goes into them, written atomically (temp file + rename) so
parallel test runs can share the cache.

Ctrl-C (Jupyter's "interrupt kernel") stops a running launch and raises KeyboardInterrupt; the optional
time limit LLMC_KERNEL_TIMEOUT stops it with a KernelError. Settings from the environment: LLMC_EMU_THREADS (worker threads), LLMC_FIBER_STACK (bytes of stack per CUDA thread),
LLMC_KERNEL_TIMEOUT (seconds).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from llmc_lessons import files
from llmc_lessons.cuda import source as cu_source

HERE = Path(__file__).resolve().parent
KERNELS_DIR = cu_source.KERNELS_DIR
HEADER = HERE / "llmc_cuda.h"
RUNTIME = HERE / "runtime.cpp"
MIN_STACK = 16 * 1024
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
    """Where compiled kernels are kept: files.cache_dir()'s emulator/."""
    d = files.cache_dir() / "emulator"
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
    """The compiler's first line of `--version`; RuntimeError if it does not run as a compiler."""
    cmd = compiler()
    try:
        out = subprocess.run([*cmd, "--version"], capture_output=True, text=True)
    except OSError as e:
        raise RuntimeError(f"the C++ compiler {' '.join(cmd)!r} cannot be run: {e}") from None
    text = (out.stdout or out.stderr).strip()
    if out.returncode != 0 or not text:
        raise RuntimeError(f"the C++ compiler {' '.join(cmd)!r} does not work: `{' '.join(cmd)} --version` "
                           f"failed (exit status {out.returncode}); fix or unset $CXX")
    return text.splitlines()[0]


def _flags(checked: bool, traced: bool = False) -> list[str]:
    flags = ["-std=c++17", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing"]
    if checked:
        flags += ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-DLLMC_UCONTEXT"]
    elif traced:
        # A call before every load and store (runtime.cpp records them). -O1: values stay in registers, as on a
        # GPU, and nothing is vectorised, so each access of the source is one access of its own size.
        flags += ["-O1", "-g1", "-gdwarf-4", "-fsanitize=thread", "-fno-tree-sra"]
    else:
        flags += ["-O2", "-g1", "-gdwarf-4"]  # line tables only (DWARF 4: read right by every addr2line)
    return flags


# Probes each page of a large stack frame in order, so a local array bigger than the fiber stack faults in the
# guard region under it instead of landing in another thread's stack. Dropped where the compiler lacks it.
_STACK_PROBES = "-fstack-clash-protection"


def _build(tag: str, key_parts: list[str], src_text: str, extra: list[str], checked: bool,
           traced: bool = False) -> Path:
    """Compile `src_text` into a cached shared library; return its path."""
    headers = [p.read_text() for p in sorted(HERE.glob("*.h")) + sorted(KERNELS_DIR.glob("*.cuh"))]
    flags = _flags(checked, traced)
    key = hashlib.sha256("\0".join([*key_parts, src_text, compiler_version(), " ".join(flags),
                                    " ".join(extra), *headers]).encode()).hexdigest()[:24]
    d = cache_dir()
    lib = d / f"{tag}-{key}{'-asan' if checked else '-trace' if traced else ''}.so"
    if lib.exists():
        return lib
    fd, tmp_src = tempfile.mkstemp(suffix=".cpp", dir=d)
    with os.fdopen(fd, "w") as f:
        f.write(src_text)
    tmp_lib = f"{tmp_src[:-4]}.so"
    tmp_obj = f"{tmp_src[:-4]}.o"
    probes = [] if checked else [_STACK_PROBES]
    # A traced build is compiled and linked apart, so that ThreadSanitizer's own runtime is not linked in: the
    # emulator's runtime provides the functions its instrumentation calls.
    target = ["-c", tmp_src, "-o", tmp_obj] if traced else [tmp_src, "-o", tmp_lib]
    cmd = [*compiler(), *flags, *probes, f"-I{HERE}", f"-I{KERNELS_DIR}", *extra, *target]
    env = dict(os.environ, LC_ALL="C")  # plain quotes in diagnostics, whatever the locale
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0 and probes and _STACK_PROBES in res.stderr:
            cmd.remove(_STACK_PROBES)
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode == 0 and traced:
            res = subprocess.run([*compiler(), "-shared", "-pthread", tmp_obj, "-o", tmp_lib], capture_output=True,
                                 text=True, env=env)
        if res.returncode != 0:
            if traced and "sanitize" in res.stderr and "thread" in res.stderr:
                raise CompileError(f"tracing memory accesses needs a C++ compiler with -fsanitize=thread (g++ or "
                                   f"clang++ on Linux or macOS); {' '.join(compiler())} refused it:\n{res.stderr}")
            raise CompileError(_explain(res.stderr))
        os.replace(tmp_lib, lib)  # atomic: a parallel build of the same key just replaces it with its twin
    finally:
        for p in (tmp_src, tmp_lib, tmp_obj):
            if os.path.exists(p):
                os.unlink(p)
    return lib


def _explain(stderr: str) -> str:
    """Compiler diagnostics, trimmed to the errors, with a note where a CUDA name is unknown here."""
    lines = [l for l in stderr.splitlines() if "llmc_cuda.h" not in l or "error" in l]
    msg = "\n".join(lines[:40])
    unknown = re.findall(r"['\u2018](__\w+|cuda\w+)['\u2019] was not declared|"
                         r"use of undeclared identifier ['\u2018](__\w+|cuda\w+)['\u2019]", stderr)
    if unknown:
        names = sorted({a or b for a, b in unknown})
        msg += (f"\n\nnote: {', '.join(names)} is outside the CUDA subset that the CPU emulator supports "
                f"(see docs/emulator.md).")
    return "the kernel did not compile:\n" + msg


def _load(build, mode: int) -> tuple[Path, ctypes.CDLL]:
    """Build (or find in the cache) a library and load it; a cached file that does not load is rebuilt once."""
    lib = build()
    try:
        return lib, ctypes.CDLL(str(lib), mode=mode)
    except OSError:  # a truncated or otherwise damaged cache entry
        lib.unlink(missing_ok=True)
        lib = build()
        return lib, ctypes.CDLL(str(lib), mode=mode)


@lru_cache(maxsize=None)
def runtime(checked: bool = False) -> ctypes.CDLL:
    """The runtime library, loaded with RTLD_GLOBAL so kernel libraries resolve llmc_rt_* against it."""
    _, rt = _load(lambda: _build("runtime", [RUNTIME.read_text()], f'#include "{RUNTIME}"\n', [], checked),
                  ctypes.RTLD_GLOBAL)
    c = ctypes
    rt.llmc_rt_launch.restype = c.c_int
    rt.llmc_rt_launch.argtypes = [c.c_void_p, c.c_void_p, c.c_int, c.POINTER(c.c_longlong),
                                  c.POINTER(c.c_longlong), c.POINTER(c.c_longlong), c.POINTER(c.c_int),
                                  c.POINTER(c.c_char_p), c.POINTER(c.c_uint), c.POINTER(c.c_uint), c.c_size_t,
                                  c.c_size_t, c.c_int, c.c_size_t, c.c_char_p, c.c_double]
    rt.llmc_rt_error.restype = c.c_char_p
    rt.llmc_rt_output.restype = c.c_char_p
    rt.llmc_rt_fault_offset.restype = c.c_longlong
    rt.llmc_rt_fault_lib.restype = c.c_char_p
    rt.llmc_rt_interrupted.restype = c.c_int
    rt.llmc_rt_trace_next.restype = None
    rt.llmc_rt_trace_next.argtypes = [c.POINTER(c.c_longlong), c.c_int, c.c_size_t]
    rt.llmc_rt_trace_records.restype = c.c_void_p
    rt.llmc_rt_trace_size.restype = c.c_size_t
    rt.llmc_rt_trace_clear.restype = None
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

    def __init__(self, code: str, filename: str, options: tuple, checked: bool, name_expressions: tuple = (),
                 traced: bool = False):
        names = cu_source.plain_kernel_names(code, options, filename) + list(name_expressions)
        code = cu_source.inline_headers(code, filename, options)
        cu_source.check_subset(code, filename)
        body = cu_source.rewrite_volatile(cu_source.rewrite_shared(code, filename))
        text = f'#include "llmc_cuda.h"\n#line 1 "{filename}"\n' + body + "\n" + _thunks(dict.fromkeys(names))
        extra = [o for o in options if o.startswith(("-D", "-I", "-U"))]
        if Path(filename).is_file():   # the file's folder is on the include path, as RawKernel puts it on a GPU
            extra.append(f"-I{Path(filename).resolve().parent}")
        runtime(checked)
        self.path, self.lib = _load(lambda: _build("kernel", [filename], text, extra, checked, traced),
                                    ctypes.RTLD_LOCAL)
        self.checked = checked
        self.traced = traced

    def thunk(self, name: str) -> int:
        return ctypes.cast(getattr(self.lib, thunk_symbol(name)), ctypes.c_void_p).value



def built_module(code: str, filename: str, options: tuple, name_expressions: tuple = (),
                 traced: bool = False) -> EmulatedModule:
    """The EmulatedModule of a source (traced: the build that records memory accesses), built once: the texts of
    the files it includes are part of the key, so an edited header gives a new module."""
    headers = tuple(text for _, text in cu_source.read_source(code, options, filename).files)
    return _built_module(code, filename, tuple(options), tuple(name_expressions), headers, traced)


@lru_cache(maxsize=256)
def _built_module(code: str, filename: str, options: tuple, name_expressions: tuple, headers: tuple, traced: bool):
    return EmulatedModule(code, filename, options, checked=False, name_expressions=name_expressions, traced=traced)

def _env_number(name: str, text: str, default, minimum, kind=int, what: str = ""):
    """The value `text` of environment variable `name` (default when empty); ValueError naming it if bad."""
    text = text.strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value != value or value < minimum:
        raise ValueError(f"{name}={text!r} is not valid: it must be {what} (or unset it)")
    return value


def settings() -> tuple[int, int, float | None]:
    """(worker threads, fiber stack bytes, time limit in seconds or None) from the environment."""
    env = os.environ
    return _settings(env.get("LLMC_EMU_THREADS", ""), env.get("LLMC_FIBER_STACK", ""),
                     env.get("LLMC_KERNEL_TIMEOUT", ""))


@lru_cache(maxsize=16)
def _settings(threads: str, stack: str, timeout: str) -> tuple[int, int, float | None]:
    workers = _env_number("LLMC_EMU_THREADS", threads, os.cpu_count() or 1, 1, what="a whole number of threads, 1 or more")
    size = _env_number("LLMC_FIBER_STACK", stack, 256 * 1024, MIN_STACK,
                       what=f"a whole number of bytes per CUDA thread, at least {MIN_STACK}")
    limit = _env_number("LLMC_KERNEL_TIMEOUT", timeout, 0.0, 0.0, float, what="a number of seconds (0: no limit)")
    return workers, (size + 4095) // 4096 * 4096, (limit or None)


@lru_cache(maxsize=None)
def _param_info(sig) -> tuple:
    """Per kernel signature: (which arguments are copied back, their descriptions), as C arrays."""
    n = max(1, len(sig.params))
    writable = (ctypes.c_int * n)(*[int(p.pointer and not p.const) for p in sig.params])
    names = (ctypes.c_char_p * n)(*[p.describe().encode() for p in sig.params])
    return writable, names


def _fault_line(rt, module: "EmulatedModule") -> str:
    """'file:line: ' of the kernel code where the launch faulted or was stopped, when the line tables tell."""
    offset = rt.llmc_rt_fault_offset()
    if offset < 0 or Path(rt.llmc_rt_fault_lib().decode(errors="replace")).resolve() != module.path.resolve():
        return ""
    tool = shutil.which("addr2line") or shutil.which("llvm-addr2line")
    if tool is None:
        return ""
    res = subprocess.run([tool, "-e", str(module.path), "-i", hex(offset)], capture_output=True, text=True)
    for line in res.stdout.splitlines():  # innermost first: the first frame outside the emulator's headers
        m = re.match(r"(.*):(\d+)", line.split(" (discriminator")[0])
        path = m.group(1) if m else ""
        path = path[path.index("<"):] if "<" in path else path  # "<RawKernel source>", not under a directory
        if m and m.group(2) != "0" and not _emulator_header(path) and "thunks>" not in path:
            return f"{path}:{m.group(2)}: "
    return ""


def _emulator_header(path: str) -> bool:
    """Whether a line table's file is one of the emulator's own headers (llmc_cuda.h, ...), in this package or in
    another copy of it: a module built by another checkout, found in the shared build cache, names that one's."""
    p = Path(path)
    return path.startswith(str(HERE)) or (p.parent.name == HERE.name and p.parent.parent.name == HERE.parent.name
                                          and (HERE / p.name).is_file())


NEIGHBOURS = 64 * 1024
"""Bytes of an array around a view of it that a launch given the view may touch, as CUDA allows (see runtime.cpp)."""


def _neighbours(a) -> tuple[int, int]:
    """Bytes of the array that `a` is a view of, up to NEIGHBOURS, before and after `a`'s own bytes."""
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    if root is a or not root.flags.c_contiguous:
        return 0, 0
    lo = root.ctypes.data
    start = a.ctypes.data
    end = start + a.nbytes
    return max(0, min(NEIGHBOURS, start - lo)), max(0, min(NEIGHBOURS, lo + root.nbytes - end))


TRACE_RECORD = np.dtype([("addr", "<u8"), ("pc", "<u8"), ("block", "<u4"), ("tid", "<u2"), ("size", "u1"),
                         ("flags", "u1")])
"""One access of a traced launch (runtime.cpp's TraceRecord)."""
TRACE_STORE, TRACE_ATOMIC, TRACE_SHARED = 1, 2, 4
TRACE_LIMIT = 1 << 23
"""Accesses a traced launch may make (24 bytes each)."""


def launch(module: EmulatedModule, sig, grid, block, args, shared_mem: int, shared_limit: int) -> str:
    """Run one launch on the CPU; return what the kernel printed. Raises KernelError if it failed."""
    return _launch(module, sig, grid, block, args, shared_mem, shared_limit, None)[0]


def launch_traced(module: EmulatedModule, sig, grid, block, args, shared_mem: int, shared_limit: int,
                  vaddr: list[int]) -> tuple[str, np.ndarray]:
    """Run one launch of a module built with traced=True; return what it printed and its accesses (TRACE_RECORD,
    in the order the threads made them, block after block). vaddr[i]: argument i's address on a virtual GPU."""
    return _launch(module, sig, grid, block, args, shared_mem, shared_limit, vaddr)


def _launch(module, sig, grid, block, args, shared_mem, shared_limit, vaddr):
    workers, stack, timeout = settings()
    holders, ptrs, sizes, before, after = [], [], [], [], []
    for p, a in zip(sig.params, args):
        if p.pointer and a is not None:
            h = ctypes.c_void_p(a.ctypes.data)
            sizes.append(a.nbytes)
            lo, hi = _neighbours(a)
            before.append(lo)
            after.append(hi)
        else:
            if p.pointer:
                h = ctypes.c_void_p(None)
            else:
                h = ctypes.c_byte * a.dtype.itemsize
                h = h.from_buffer_copy(a.tobytes())
            sizes.append(-1)
            before.append(0)
            after.append(0)
        holders.append(h)
        ptrs.append(ctypes.addressof(h))
    n = max(1, len(ptrs))
    argv = (ctypes.c_void_p * n)(*ptrs)
    c_sizes, c_before, c_after = ((ctypes.c_longlong * n)(*v) for v in (sizes, before, after))
    c_writable, c_names = _param_info(sig)
    g = (ctypes.c_uint * 3)(*grid)
    b = (ctypes.c_uint * 3)(*block)
    rt = runtime(module.checked)
    records = None
    with _lock:
        if vaddr is not None:
            rt.llmc_rt_trace_next((ctypes.c_longlong * n)(*vaddr, *[0] * (n - len(vaddr))), n, TRACE_LIMIT)
        rc = rt.llmc_rt_launch(module.thunk(sig.name), argv, len(ptrs), c_sizes, c_before, c_after, c_writable,
                               c_names, g, b,
                               shared_mem, shared_limit, workers, stack, sig.name.encode(), timeout or 0.0)
        out = rt.llmc_rt_output().decode(errors="replace")
        err = rt.llmc_rt_error().decode(errors="replace")
        interrupted = rt.llmc_rt_interrupted()
        line = _fault_line(rt, module) if rc and not interrupted else ""
        if vaddr is not None:
            records = np.empty(rt.llmc_rt_trace_size(), TRACE_RECORD)
            if len(records):
                ctypes.memmove(records.ctypes.data, rt.llmc_rt_trace_records(), records.nbytes)
            rt.llmc_rt_trace_clear()
    if interrupted:  # the runtime took the Ctrl-C to stop the launch: hand it on to Python's handler
        signal.raise_signal(signal.SIGINT)
    if rc != 0:
        raise KernelError(line + err)
    return out, records
