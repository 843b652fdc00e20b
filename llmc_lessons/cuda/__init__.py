"""Load a CUDA kernel and launch it with the same call on a GPU (through CuPy) and on a CPU (the emulator).

    k = RawKernel(code, "layernorm_forward_kernel1")        # same constructor as cupy.RawKernel
    k = load_kernel("layernorm.cu", "layernorm_forward_kernel1")   # from llmc_lessons/kernels/
    k = load_kernel("~/llm.c/dev/cuda/my_kernels.cu", "k<float>")   # any file; its folder is on the include path
    k = RawModule(code, name_expressions=["k<float, 4>"]).get_function("k<float, 4>")   # as cupy.RawModule
    k(grid, block, args, shared_mem=0)
    t = k(grid, block, args, trace=True)      # also record every memory access: a cuda.trace.Trace

Before every launch, on both backends, the arguments are checked against the kernel's declared parameter
types: a float64 array for a `float*`, a Python int for an `int` (CuPy would pass it as 64 bits), a
non-contiguous array or a misaligned float4 pointer raise a clear TypeError/ValueError instead of
computing garbage.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np

from llmc_lessons import device
from llmc_lessons.cuda import source as cu_source
from llmc_lessons.cuda import trace as cu_trace
from llmc_lessons.cuda.emulator import KERNELS_DIR, CompileError, KernelError, built_module

__all__ = ["RawKernel", "RawModule", "load_kernel", "kernel_source", "CompileError", "KernelError", "KERNELS_DIR",
           "SM90A"]

DEFAULT_SHARED_LIMIT = 48 * 1024
"""Shared memory a block may use (static plus dynamic) unless the kernel asks for more."""

SHARED_LIMIT_OPT_IN = 227 * 1024
"""Shared memory a block may use (static plus dynamic) on an H100 or H200 once the kernel's
max_dynamic_shared_size_bytes is raised above 48 KiB; the dynamic part may not exceed that attribute."""

launch_listeners: list = []
"""Callables f(kernel_name) called before every launch (llmc_lessons.perf.count_launches uses it)."""


def _dims(name: str, value, limits) -> tuple[int, int, int]:
    if type(value) is int:
        value = (value,)
    if type(value) is not tuple or not all(type(v) is int for v in value):   # the slow path: other int types
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            value = (value,)
        if not isinstance(value, tuple) or not all(
                isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
            raise TypeError(f"{name} must be an int or a tuple of 1 to 3 ints, got {value!r}")
        value = tuple(int(v) for v in value)
    if not 1 <= len(value) <= 3:
        raise TypeError(f"{name} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    dims = value + (1,) * (3 - len(value))
    for axis, (v, lim) in enumerate(zip(dims, limits)):
        if not 1 <= v <= lim:
            raise ValueError(f"{name}[{axis}] = {v} is outside 1..{lim}")
    return dims


@lru_cache(maxsize=None)
def _plan(sig: cu_source.KernelSignature) -> tuple:
    """Per parameter: (param, the dtype its argument must have or None, (lanes, alignment) of a vector type)."""
    return tuple((p, cu_source.numpy_dtype(p.base), cu_source.vector_info(p.base)) for p in sig.params)


def _check_args(sig: cu_source.KernelSignature, args) -> list:
    """Validate `args` against the kernel's parameters; return them as NumPy/CuPy arrays and NumPy scalars.

    Runs before every launch, so the common case is kept short; messages are built only on an error."""
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple, got {type(args).__name__} (write (a, b, n) or (a,) for one)")
    if len(args) != len(sig.params):
        want = ", ".join(p.describe() for p in sig.params)
        raise TypeError(f"kernel '{sig.name}' takes {len(sig.params)} arguments ({want}), got {len(args)}")
    gpu, array = device.on_gpu(), device.xp.ndarray
    out = []
    for i, (p, want, vec) in enumerate(_plan(sig)):
        a = args[i]
        def where():
            return f"argument {i} ({p.describe()}) of kernel '{sig.name}'"
        if p.pointer:
            if a is None:                                   # a null pointer, as nullptr in C++
                out.append(np.uint64(0) if gpu else None)   # CuPy passes the 8 bytes of a uint64 as the pointer
                continue
            if not isinstance(a, array):
                if isinstance(a, np.ndarray) and gpu:
                    raise TypeError(f"{where()}: got a NumPy array, but kernels run on the GPU: move it there "
                                    f"with llmc_lessons.device.to_device")
                raise TypeError(f"{where()}: expected an array, got {type(a).__name__} (None passes a null pointer)")
            if want is not None and a.dtype != want:
                raise TypeError(f"{where()}: expected an array of {want}, got {a.dtype}")
            flags = a.flags
            if not flags.c_contiguous:
                raise ValueError(f"{where()}: the array is not C-contiguous (a kernel sees only a pointer to its "
                                 f"first element); pass xp.ascontiguousarray(...)")
            if not gpu and not p.const and not flags.writeable:
                raise ValueError(f"{where()}: the array is read-only but the parameter is not const")
            if vec:
                lanes, align = vec
                if device.address(a) % align or a.size % lanes:
                    raise ValueError(f"{where()}: a {p.base} pointer needs an array whose start is {align}-byte "
                                     f"aligned and whose size is a multiple of {lanes}")
            out.append(a)
        elif isinstance(a, np.generic) and not isinstance(a, np.bool_) and a.dtype == want:
            out.append(a)                                   # the common case: np.int32(n), np.float32(x)
        else:
            if isinstance(a, (bool, np.bool_)) and p.base != "bool":
                raise TypeError(f"{where()}: got a bool")
            if isinstance(a, (int, float)) and not isinstance(a, bool):
                if (isinstance(a, int) and want == np.int64) or (isinstance(a, float) and want == np.float64):
                    out.append(want.type(a))
                    continue
                raise TypeError(f"{where()}: got a Python {type(a).__name__}; pass np.{want.name}({a!r}). CuPy "
                                f"passes a Python int as a 64-bit integer and a float as a double, which the "
                                f"kernel would misread as its {p.base}")
            if not isinstance(a, np.generic) or a.dtype != want:
                got = a.dtype if isinstance(a, np.generic) else type(a).__name__
                raise TypeError(f"{where()}: expected np.{want.name}, got {got}")
            out.append(a)
    return out


SM90A = "-arch=sm_90a"
"""The option that compiles a kernel for Hopper's architecture-specific instructions (wgmma: lesson 13, version 4)
on an sm_90 GPU; CuPy compiles for the plain sm_90, so these kernels go through NVRTC here. Ignored on a CPU."""


def _sm90a_function(code: str, name: str, options: tuple, filename: str):
    """The kernel `name` (extern "C") compiled by NVRTC for sm_90a and loaded as a cupy Function."""
    import cupy
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError:  # pragma: no cover - an older CuPy's location
        from cupy.cuda import nvrtc
    if device.compute_capability() != 90:
        raise CompileError(f"{name}: {SM90A} kernels run on sm_90 (H100, H200) only, this GPU is "
                           f"sm_{device.compute_capability()}")
    program = nvrtc.createProgram(cu_source.with_constants(code, filename), Path(filename).name, [], [])
    try:
        flags = [o for o in _gpu_options(options, filename) if o != SM90A] + [SM90A, "-ftz=true"]  # -ftz: as CuPy
        try:
            nvrtc.compileProgram(program, flags)
        except nvrtc.NVRTCError:
            raise CompileError(f"the kernel did not compile:\n{nvrtc.getProgramLog(program)}") from None
        module = cupy.cuda.function.Module()
        module.load(nvrtc.getCUBIN(program))
    finally:
        nvrtc.destroyProgram(program)
    return module.get_function(name)   # a cupy Function, which holds its module


def _gpu_options(options: tuple, filename: str) -> tuple:
    """Compiler options for NVRTC: the course's kernels/ folder and the source file's own folder included."""
    folder = Path(filename).resolve().parent if Path(filename).is_file() else KERNELS_DIR
    return tuple(options) + (f"-I{KERNELS_DIR}",) + ((f"-I{folder}",) if folder != KERNELS_DIR else ())


class RawKernel:
    """A kernel from CUDA source; call it as k(grid, block, args, shared_mem=0), as cupy.RawKernel."""

    def __init__(self, code: str, name: str, options: tuple = (), *, filename: str | None = None,
                 _module: "RawModule | None" = None):
        if not isinstance(code, str) or not isinstance(name, str):
            raise TypeError("RawKernel(code, name): code and name must be strings")
        self.code, self.name, self.options = code, name, tuple(options)
        self.filename = filename or "<RawKernel source>"
        self.signature = cu_source.signature(code, name, self.options, filename, module=_module is not None)
        self.name_expressions = _module.name_expressions if _module is not None else ()
        self.max_dynamic_shared_size_bytes = 0  # raise it to allow more than 48 KiB of shared memory
        self._module = _module
        self._impl = None
        self._applied_shared = 0   # the limit last passed to the GPU's copy of the kernel
        self._thread_limit = None  # on a GPU: (most threads a block, registers a thread), asked once

    def _compiled(self):
        if self._impl is None:
            if device.on_gpu() and self._module is not None:
                self._impl = self._module._compiled().get_function(self.name)
            elif device.on_gpu() and SM90A in self.options:
                self._impl = _sm90a_function(self.code, self.name, self.options, self.filename)
            elif device.on_gpu():
                import cupy
                self._impl = cupy.RawKernel(cu_source.with_constants(self.code, self.filename), self.name,
                                            options=_gpu_options(self.options, self.filename))
            elif _checked():
                self._impl = "checked"  # built and run in a child process with AddressSanitizer loaded
            else:
                self._impl = built_module(self.code, self.filename, self.options, self.name_expressions)
        return self._impl

    def compile(self) -> "RawKernel":
        """Compile now (else the first launch compiles); raises CompileError with the compiler's message."""
        impl = self._compiled()
        if device.on_gpu() and SM90A not in self.options:   # CuPy compiles lazily (sm_90a kernels: already)
            import cupy
            try:
                impl.compile()
            except cupy.cuda.compiler.CompileException as e:
                raise CompileError(f"the kernel did not compile:\n{e}") from None
        return self

    def __call__(self, grid, block, args, shared_mem: int = 0, trace: bool = False):
        """Launch; with trace=True (or inside cuda.trace.recording()) the emulator also records every access to
        memory, and a trace=True launch returns that Trace (see llmc_lessons.cuda.trace)."""
        grid = _dims("grid", grid, (2**31 - 1, 65535, 65535))
        block = _dims("block", block, (1024, 1024, 64))
        threads = block[0] * block[1] * block[2]
        if threads > 1024:
            raise ValueError(f"a block has at most 1024 threads, got {threads}")
        if not isinstance(shared_mem, (int, np.integer)) or shared_mem < 0:
            raise ValueError(f"shared_mem must be a non-negative int (bytes), got {shared_mem!r}")
        limit = max(DEFAULT_SHARED_LIMIT, int(self.max_dynamic_shared_size_bytes))
        total_limit = SHARED_LIMIT_OPT_IN if limit > DEFAULT_SHARED_LIMIT else DEFAULT_SHARED_LIMIT
        if shared_mem > limit:
            raise ValueError(f"shared_mem = {shared_mem} bytes exceeds the {limit}-byte limit; set "
                             f"kernel.max_dynamic_shared_size_bytes first to use more, as on a GPU")
        args = _check_args(self.signature, args)
        traced = None
        if trace or cu_trace.recorders:   # the emulator's traced build: on a CPU the launch itself, on a GPU a
            on_cpu = not device.on_gpu()   # run on copies of the arguments before the GPU runs the launch
            if on_cpu:
                for listener in launch_listeners:
                    listener(self.name)
            traced, out = cu_trace.launch(self, grid, block, args, int(shared_mem), total_limit)
            if on_cpu:
                if out:
                    print(out, end="" if out.endswith("\n") else "\n")
                return traced if trace else None
        impl = self._compiled()
        for listener in launch_listeners:
            listener(self.name)
        if device.on_gpu():
            wanted = int(self.max_dynamic_shared_size_bytes)
            if wanted and wanted != self._applied_shared:   # a driver call (cuFuncSetAttribute): once per value
                impl.max_dynamic_shared_size_bytes = wanted
                self._applied_shared = wanted
            if self._thread_limit is None:     # its registers (and any __launch_bounds__) bound a block's threads
                self._thread_limit = _thread_limit(impl)
            most, regs = self._thread_limit
            if threads > most:
                raise ValueError(f"{self.name} takes at most {most} threads a block on this GPU (its {regs} registers "
                                 f"a thread, of a multiprocessor's 65,536, and any __launch_bounds__ set that), got "
                                 f"{threads}: launch smaller blocks")
            impl(grid, block, tuple(args), shared_mem=int(shared_mem))
            return traced if trace else None
        from llmc_lessons.cuda import emulator
        if impl == "checked":
            from llmc_lessons.cuda import checked
            out = checked.launch(self, grid, block, args, int(shared_mem), total_limit)
        else:
            out = emulator.launch(impl, self.signature, grid, block, args, int(shared_mem), total_limit)
        if out:
            print(out, end="" if out.endswith("\n") else "\n")


def _loaded_function(impl):
    """The loaded cupy.cuda.Function (with its driver handle, .ptr) of a GPU kernel's implementation: a
    cupy.RawKernel, or the Function of a RawModule or of an sm_90a build (_sm90a_function)."""
    import cupy
    return impl.kernel if isinstance(impl, cupy.RawKernel) else impl


def _thread_limit(impl) -> tuple:
    """(most threads a block, registers a thread) of a GPU kernel's implementation (_loaded_function)."""
    import cupy
    func, driver = _loaded_function(impl), cupy.cuda.driver
    return (driver.funcGetAttribute(driver.CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK, func.ptr),
            driver.funcGetAttribute(driver.CU_FUNC_ATTRIBUTE_NUM_REGS, func.ptr))


def _checked() -> bool:
    """Checked mode (AddressSanitizer): LLMC_CHECK=1."""
    return os.environ.get("LLMC_CHECK", "") not in ("", "0")


class RawModule:
    """Kernels from CUDA source, including template kernels and kernels that are not extern "C", looked up by
    name as with cupy.RawModule: list the template instantiations in `name_expressions`, then
    `get_function("k<float, 4>")`. The arguments of each launch are checked against the instantiated types."""

    def __init__(self, code: str, options: tuple = (), name_expressions=(), *, filename: str | None = None):
        if not isinstance(code, str):
            raise TypeError("RawModule(code, ...): code must be a string (CUDA source)")
        if isinstance(name_expressions, str) or not all(isinstance(n, str) for n in name_expressions):
            raise TypeError("name_expressions must be a list of strings, such as ['k<float, 4>']")
        self.code, self.options = code, tuple(options)
        self.name_expressions = tuple(name_expressions)
        self.filename = filename or "<RawModule source>"
        for n in self.name_expressions:   # a clear error now for a misspelt kernel or template arguments
            cu_source.signature(code, n, self.options, filename, module=True)
        self._impl = None

    def _compiled(self):
        if self._impl is None:
            import cupy
            self._impl = cupy.RawModule(code=cu_source.with_constants(self.code, self.filename),
                                        options=_gpu_options(self.options, self.filename),
                                        name_expressions=list(self.name_expressions) or None)
        return self._impl

    def compile(self) -> "RawModule":
        """Compile now (else the first launch compiles); raises CompileError with the compiler's message."""
        if device.on_gpu():
            self._compiled()
        elif not _checked():
            built_module(self.code, self.filename, self.options, self.name_expressions)
        return self

    def get_function(self, name: str) -> RawKernel:
        """The kernel `name`: a name listed in name_expressions, or an extern "C" kernel (as with CuPy, whose
        GPU module finds a C++ name only through name_expressions)."""
        if name not in self.name_expressions and not cu_source.is_extern_c(self.code, name, self.options,
                                                                            self.filename):
            raise ValueError(f"'{name}' is not among this module's name_expressions "
                             f"({', '.join(self.name_expressions) or 'none'}) and is not an extern \"C\" kernel: "
                             f"list it there, with the same spelling, as cupy.RawModule requires")
        return RawKernel(self.code, name, self.options, filename=self.filename, _module=self)


def kernel_source(filename: str) -> str:
    """The text of a course kernel file in llmc_lessons/kernels/."""
    path = Path(KERNELS_DIR) / filename
    if not path.is_file():
        have = ", ".join(sorted(p.name for p in Path(KERNELS_DIR).glob("*.cu")))
        raise FileNotFoundError(f"no kernel file {filename!r} in {KERNELS_DIR} (have: {have})")
    return path.read_text()


_replaced: dict = {}
"""{(file of kernels/, kernel name): (CUDA source, the name of the kernel in it)} that load_kernel compiles in place
of the package's kernel (kernels_replaced)."""


@contextmanager
def kernels_replaced(replacements: dict):
    """While inside, load_kernel(file, name) of the package's kernels gives, for each (file, name) in
    `replacements`, the kernel (source, name) there instead: the student's kernels, in the course's launchers."""
    before = dict(_replaced)
    _replaced.update(replacements)
    try:
        yield
    finally:
        _replaced.clear()
        _replaced.update(before)


def load_kernel(filename: str, name: str, options: tuple = (), include_dirs: tuple = ()) -> RawKernel:
    """A kernel from a .cu file.

    `filename` is the name of a file of the package's kernels/ folder ("layernorm.cu"; compiled once per
    process) or a path to a file anywhere ("~/llmc-dev/layernorm_forward.cu"; read again at every call, so
    edits to it and to its headers are seen; its folder and `include_dirs` go on the include path). `name`
    is an extern "C" kernel, a kernel that is not extern "C", or a template instantiation ("k<float, 4>")."""
    if (filename, name) in _replaced:
        return _replacement_kernel(*_replaced[filename, name], tuple(options))
    if (Path(KERNELS_DIR) / filename).is_file() and Path(filename).name == filename:
        return _package_kernel(filename, name, tuple(options))
    path = Path(filename).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no kernel file {filename!r}")
    options = tuple(options) + tuple(f"-I{Path(d).expanduser().resolve()}" for d in include_dirs)
    return _kernel(path.read_text(), name, options, str(path.resolve()))


@lru_cache(maxsize=None)
def _package_kernel(filename: str, name: str, options: tuple) -> RawKernel:
    return _kernel(kernel_source(filename), name, options, str(Path(KERNELS_DIR) / filename))


@lru_cache(maxsize=64)
def _replacement_kernel(code: str, name: str, options: tuple) -> RawKernel:
    return _kernel(code, name, options, "<your kernel>")


def _kernel(code: str, name: str, options: tuple, path: str) -> RawKernel:
    if cu_source.is_extern_c(code, name, options, path):
        return RawKernel(code, name, options, filename=path)
    return RawModule(code, options, name_expressions=[name], filename=path).get_function(name)
