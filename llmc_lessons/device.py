"""Pick the backend once: the GPU through CuPy when one is usable, else the CPU (NumPy + the kernel emulator).

`LLMC_DEVICE=cpu` forces the CPU; `LLMC_DEVICE=gpu` forces the GPU and fails loudly if there is none.
Everything else in the package uses `xp` (cupy or numpy) and the helpers below, never `import cupy` itself.
"""
from __future__ import annotations

import os
from functools import lru_cache

import numpy as np


def _usable_cupy():
    """Return (cupy module, None) when a CUDA device can really run work, else (None, reason)."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install raising at import
        return None, f"CuPy is not installed ({type(e).__name__}: {e})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None, "CuPy found no CUDA device"
        if os.environ.get("LOCAL_RANK"):   # one process per GPU (lesson 17): torchrun's number of this one's GPU
            cupy.cuda.Device(int(os.environ["LOCAL_RANK"])).use()
        (cupy.arange(4, dtype=cupy.float32) * 2).sum().item()  # a real launch, not only a driver query
    except Exception as e:
        return None, f"CuPy is installed but no CUDA device is usable ({type(e).__name__}: {e})"
    return cupy, None


def _choose():
    wanted = os.environ.get("LLMC_DEVICE", "").strip().lower()
    if wanted not in ("", "cpu", "gpu"):
        raise ValueError(f"LLMC_DEVICE must be 'cpu' or 'gpu' (or unset), not {wanted!r}")
    if wanted == "cpu":
        return "cpu", np, "forced by LLMC_DEVICE=cpu"
    cupy, why_not = _usable_cupy()
    if cupy is not None:
        return "gpu", cupy, "CuPy found a usable CUDA device"
    if wanted == "gpu":
        raise RuntimeError(f"LLMC_DEVICE=gpu but {why_not}. Unset LLMC_DEVICE to fall back to the CPU.")
    return "cpu", np, why_not


BACKEND, xp, REASON = _choose()
"""BACKEND is 'gpu' or 'cpu'; xp is the array module of that backend; REASON says why it was chosen."""


def on_gpu() -> bool:
    """True when kernels run on a real GPU through CuPy."""
    return BACKEND == "gpu"


BF16_MIN_COMPUTE_CAPABILITY = 80
"""sm_80 (A100, RTX 30xx and newer): the first GPUs with bf16 tensor cores."""


def compute_capability() -> int | None:
    """The GPU's compute capability as one number (75 for a T4's sm_75, 90 for an H100); None on the CPU."""
    if not on_gpu():
        return None
    return int(xp.cuda.Device().compute_capability)


def bf16_unsupported() -> str | None:
    """Why GPT2(precision="bf16") trains in fp32 here, or None: the bf16 model is there for bf16 tensor cores.

    The bf16 kernels of lessons 13-14 run on any GPU: below sm_80 they compile without the sm_80 instructions
    (LLMC_SM80 in kernels/bf16.cuh). The CPU emulator runs everything.
    """
    cc = compute_capability()
    if cc is None or cc >= BF16_MIN_COMPUTE_CAPABILITY:
        return None
    return (f"this GPU is sm_{cc}, without the bf16 tensor cores that the bf16 model is for "
            f"(sm_{BF16_MIN_COMPUTE_CAPABILITY} or newer: A100, RTX 30xx, L4, H100)")


def to_device(a, dtype=None):
    """A copy of `a` (NumPy array, list or scalar) as an array of the backend (CuPy on a GPU)."""
    return xp.asarray(a, dtype=dtype)


def to_host(a) -> np.ndarray:
    """`a` as a NumPy array on the host (a no-op for NumPy arrays)."""
    if on_gpu():
        import cupy
        return cupy.asnumpy(a)
    return np.asarray(a)


def synchronize() -> None:
    """Wait for all queued GPU work (a no-op on the CPU, where kernels run synchronously)."""
    if on_gpu():
        xp.cuda.get_current_stream().synchronize()


def address(a) -> int:
    """The address of a backend array's first element in its device's memory (for alignment checks)."""
    return a.data.ptr if on_gpu() else a.ctypes.data


@lru_cache(maxsize=None)
def _dtypes(dtype) -> tuple:
    """The allowed dtypes of require_array's `dtype` argument, as a tuple of np.dtype (made once per argument:
    the launchers call require_array several times per launch)."""
    return () if dtype is None else tuple(np.dtype(d) for d in (dtype if isinstance(dtype, tuple) else (dtype,)))


def require_array(name: str, a, shape=None, dtype=np.float32):
    """Raise a clear TypeError/ValueError unless `a` is a C-contiguous backend array of `dtype` and `shape`.

    `shape` may hold None for a free dimension; `dtype` may be a tuple of allowed dtypes. Returns `a` so a launcher can write `x = require_array(...)`.
    """
    if not isinstance(a, xp.ndarray):
        where = "a CuPy array on the GPU" if on_gpu() else "a NumPy array"
        if isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be {where}, got a NumPy array in host memory "
                            f"(move it with llmc_lessons.device.to_device)")
        raise TypeError(f"{name} must be {where}, got {type(a).__module__}.{type(a).__name__}")
    allowed = _dtypes(dtype)
    if allowed and a.dtype not in allowed:
        if len(allowed) == 1:
            raise TypeError(f"{name} must have dtype {allowed[0]}, got {a.dtype} (use .astype(np.{allowed[0]}))")
        raise TypeError(f"{name} must have one of the dtypes {', '.join(map(str, allowed))}, got {a.dtype}")
    if shape is not None:
        have = a.shape
        ok = len(have) == len(shape) and all(s is None or s == d for s, d in zip(shape, have))
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(a.shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (a kernel indexes it as one flat block); "
                         f"pass xp.ascontiguousarray({name})")
    return a


def require_int(name: str, value, lo: int = 1) -> int:
    """`value` as a Python int: a TypeError unless it is an int (a bool is not), a ValueError below `lo`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value}")
    return int(value)


def require_block_size(block_size, warps: bool = False, name: str = "block_size") -> int:
    """Threads per block as a Python int: a TypeError unless an int, a ValueError unless in 1..1024 and, with
    `warps` (kernels that give each row a warp, or reduce over whole warps), a multiple of 32."""
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(f"{name} must be an int (threads per block), got {block_size!r}")
    if not 1 <= block_size <= 1024 or (warps and block_size % 32):
        need = "a multiple of 32 (whole warps) in 32..1024" if warps else "in 1..1024"
        raise ValueError(f"{name} must be {need}, got {block_size}")
    return int(block_size)


def describe() -> str:
    """One line saying which backend is in use and why."""
    if on_gpu():
        props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return f"GPU: {name} through CuPy {xp.__version__} ({REASON})"
    return f"CPU: NumPy {np.__version__} + the kernel emulator ({REASON})"
