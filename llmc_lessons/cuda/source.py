"""Reading CUDA source: the kernels it defines, their parameter types, and constructs outside the subset.

Used on both backends: the parameter types let every launch be checked before it runs (on a GPU a wrong
argument type is silently misread), and the emulator needs them to marshal arguments.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# Scalar and element types a kernel parameter may have, with the NumPy dtype that matches them.
_DTYPES = {
    "float": np.float32, "double": np.float64,
    "int": np.int32, "int32_t": np.int32, "signed int": np.int32,
    "unsigned": np.uint32, "unsigned int": np.uint32, "uint32_t": np.uint32,
    "long long": np.int64, "long long int": np.int64, "int64_t": np.int64, "long": np.int64,
    "unsigned long long": np.uint64, "unsigned long long int": np.uint64, "uint64_t": np.uint64,
    "size_t": np.uint64, "unsigned long": np.uint64,
    "short": np.int16, "int16_t": np.int16, "unsigned short": np.uint16, "uint16_t": np.uint16,
    "char": np.int8, "signed char": np.int8, "int8_t": np.int8,
    "unsigned char": np.uint8, "uint8_t": np.uint8, "bool": np.bool_,
    "bf16": np.uint16, "__nv_bfloat16": np.uint16, "nv_bfloat16": np.uint16,  # bf16 arrays hold uint16 bits
}
# Vector element types: (NumPy dtype of one lane, lanes, alignment in bytes).
_VECTORS = {"float2": (np.float32, 2, 8), "float4": (np.float32, 4, 16), "int2": (np.int32, 2, 8),
            "int4": (np.int32, 4, 16)}

# Constructs that compile on a GPU but that the emulator does not provide, with what to do instead.
UNSUPPORTED = {
    r"\bcooperative_groups\b": "cooperative_groups",
    r"\b__shfl\s*\(": "__shfl without _sync (removed in CUDA 9; use __shfl_sync)",
    r"\b__shfl_(?:up|down|xor)\s*\(": "__shfl_up/down/xor without _sync (use the _sync versions)",
    r"\bwmma::": "tensor-core wmma fragments",
    r"\basm\s*(?:volatile\s*)?\(": "inline PTX (asm)",
    r"\b__constant__\b": "__constant__ memory (pass the values as a kernel argument)",
    r"\b__managed__\b": "__managed__ memory",
    r"\btexture\s*<": "textures",
    r"\b(?:__half|__half2|__nv_bfloat162)\b": "half-precision types other than __nv_bfloat16 (__half, __half2, __nv_bfloat162)",
    r"\bclock(?:64)?\s*\(": "clock()/clock64() (timing inside a kernel means nothing on the CPU)",
    r"<<<": "launching a kernel from a kernel (dynamic parallelism)",
    r"\b__(?:ldcs|ldcg|ldca|ldlu|ldcv|stcs|stcg|stwb|stwt)\s*\(": "cache-hinted loads/stores (use a plain access)",
    r"\b(?:INFINITY|NAN|HUGE_VALF?|FLT_MAX|FLT_MIN|M_PI)\b": "the host's <math.h>/<float.h> macros (NVRTC, which "
        "compiles the kernels on a GPU, has none: use NEG_INF from common.cuh or write the number)",
}


@dataclass(frozen=True)
class Param:
    name: str
    ctype: str          # the type as written, without __restrict__ (e.g. "const float*")
    base: str           # element or scalar type (e.g. "float", "float4")
    pointer: bool
    const: bool

    def describe(self) -> str:
        return f"{self.ctype} {self.name}"


@dataclass(frozen=True)
class KernelSignature:
    name: str
    params: tuple[Param, ...]
    line: int


def strip_comments(src: str) -> str:
    """`src` with comments replaced by spaces (newlines kept), so offsets and line numbers stay valid."""
    out = list(src)
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if c == '"' or c == "'":
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            i = j + 1
        elif src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out[i:j] = " " * (j - i)
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out[i:j] = [ch if ch == "\n" else " " for ch in src[i:j]]
            i = j
        else:
            i += 1
    return "".join(out)


def _line_of(src: str, pos: int) -> int:
    return src.count("\n", 0, pos) + 1


def _parse_param(text: str, kernel: str) -> Param:
    t = re.sub(r"\b(?:__restrict__|__restrict|restrict)\b", " ", text.split("=")[0])
    t = " ".join(t.replace("*", " * ").split())
    m = re.fullmatch(r"(.+?)\s*([A-Za-z_]\w*)", t)
    if not m or m.group(1).strip() in ("", "const"):
        raise ValueError(f"kernel '{kernel}': cannot read the parameter '{text.strip()}'")
    ctype = m.group(1).replace(" *", "*").strip()
    if "&" in ctype or "[" in text:
        raise ValueError(f"kernel '{kernel}': parameter '{text.strip()}' is a reference or array; "
                         f"kernel parameters must be pointers or scalars")
    stars = ctype.count("*")
    if stars > 1:
        raise ValueError(f"kernel '{kernel}': parameter '{text.strip()}' is a pointer to a pointer, "
                         f"which cannot be passed from Python")
    words = [w for w in ctype.replace("*", " ").split() if w not in ("const", "volatile")]
    base = " ".join(words)
    if base not in _DTYPES and base not in _VECTORS and not (stars and base == "void"):
        raise ValueError(f"kernel '{kernel}': parameter type '{ctype}' is not supported "
                         f"(supported: {', '.join(sorted(set(_DTYPES) | set(_VECTORS)))}, and pointers to them)")
    return Param(m.group(2), ctype, base, bool(stars), "const" in ctype.split("*")[0].split())


def find_kernels(src: str) -> dict[str, KernelSignature]:
    """Every `extern "C" __global__` function in `src`, with its parameters."""
    code = strip_comments(src)
    extern_blocks = []
    for m in re.finditer(r'extern\s+"C"\s*\{', code):
        depth, j = 1, m.end()
        while j < len(code) and depth:
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            j += 1
        extern_blocks.append((m.end(), j))
    kernels = {}
    pat = (r'(extern\s+"C"\s+)?__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+'
           r'(?:__launch_bounds__\s*\([^)]*\)\s*)?([A-Za-z_]\w*)\s*\(([^)]*)\)')
    for m in re.finditer(pat, code):
        name = m.group(2)
        is_c = bool(m.group(1)) or any(a <= m.start() < b for a, b in extern_blocks)
        if not is_c:
            kernels[name] = None  # found, but C++ name mangling would hide it from cupy.RawKernel
            continue
        plist = m.group(3).strip()
        params = () if plist in ("", "void") else tuple(_parse_param(p, name) for p in plist.split(","))
        kernels[name] = KernelSignature(name, params, _line_of(code, m.start()))
    return kernels


def signature(src: str, name: str) -> KernelSignature:
    """The signature of kernel `name`, or a clear error saying what the source defines instead."""
    kernels = find_kernels(src)
    if name not in kernels:
        found = ", ".join(sorted(kernels)) or "none"
        raise ValueError(f"no __global__ function named '{name}' in the source (kernels found: {found})")
    if kernels[name] is None:
        raise ValueError(f"kernel '{name}' must be declared extern \"C\" __global__ so it can be found by name, "
                         f"as cupy.RawKernel requires")
    return kernels[name]


def check_subset(src: str, filename: str) -> None:
    """Raise a clear error naming the first construct outside the emulator's CUDA subset."""
    code = strip_comments(src)
    for pattern, what in UNSUPPORTED.items():
        m = re.search(pattern, code)
        if m:
            raise NotImplementedError(
                f"{filename}:{_line_of(code, m.start())}: {what} is outside the CUDA subset that the CPU "
                f"emulator supports (see docs/emulator.md). On a GPU it may compile; here it cannot run.")


_SHARED = re.compile(
    r"(?P<ext>\bextern\s+)?\b__shared__\s+(?:(?:__align__|alignas)\s*\(\s*\d+\s*\)\s*)?"
    r"(?P<type>(?:(?:const|volatile|unsigned|signed|long|short)\s+)*[A-Za-z_]\w*)"
    r"(?:\s+(?:__align__|alignas)\s*\(\s*\d+\s*\))?\s*(?P<decls>[^;]+);")


def rewrite_shared(src: str, filename: str) -> str:
    """Turn each `__shared__` declaration into an LLMC_SHARED macro (one copy per block, poisoned).

    Replacements stay on the declaration's line, so compiler messages keep pointing at the right line.
    """
    code = strip_comments(src)
    out, last, slot = [], 0, 0
    for m in _SHARED.finditer(code):
        depth = code.count("{", 0, m.start()) - code.count("}", 0, m.start())
        if depth <= 0:
            raise NotImplementedError(f"{filename}:{_line_of(code, m.start())}: a __shared__ variable at file "
                                      f"scope is not supported by the CPU emulator: declare it inside the kernel")
        typ = m.group("type")
        pieces = []
        for d in m.group("decls").split(","):
            dm = re.fullmatch(r"\s*(\**)\s*([A-Za-z_]\w*)\s*((?:\[[^\]]*\]\s*)*)", d)
            if not dm:
                raise NotImplementedError(f"{filename}:{_line_of(code, m.start())}: cannot read the __shared__ "
                                          f"declaration '{m.group(0).strip()}' (no initialisers are allowed)")
            stars, name, dims = dm.group(1), dm.group(2), dm.group(3).replace(" ", "")
            if m.group("ext"):
                if dims != "[]" or stars:
                    raise NotImplementedError(f"{filename}:{_line_of(code, m.start())}: extern __shared__ must "
                                              f"be an unsized array, like `extern __shared__ float buf[];`")
                pieces.append(f"LLMC_EXTERN_SHARED({typ}, {name})")
            else:
                pieces.append(f"LLMC_SHARED({typ}{stars}, {name}, {dims}, {slot})")
                slot += 1
        out.append(src[last:m.start()])
        out.append("; ".join(pieces) + ";" + "\n" * m.group(0).count("\n"))
        last = m.end()
    out.append(src[last:])
    return "".join(out)


_VOLATILE_PTR = re.compile(r"\bvolatile\s+((?:(?:unsigned|signed|long|short)\s+)*[A-Za-z_]\w*)\s*\*"
                           r"(?:\s*(?:__restrict__|__restrict)\b)?")


def rewrite_volatile(src: str) -> str:
    """Turn `volatile T*` into llmc_volatile<T> (llmc_cuda.h), whose accesses let the other threads take a step."""
    return _VOLATILE_PTR.sub(lambda m: f"llmc_volatile<{m.group(1)}> ", src)


def numpy_dtype(base: str):
    """The NumPy dtype an argument for a parameter of element type `base` must have (None: any)."""
    if base in _DTYPES:
        return np.dtype(_DTYPES[base])
    if base in _VECTORS:
        return np.dtype(_VECTORS[base][0])
    return None


def vector_info(base: str):
    """(lanes, alignment) for float2/float4/int2/int4, else None."""
    v = _VECTORS.get(base)
    return None if v is None else (v[1], v[2])
