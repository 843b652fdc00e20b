"""Reading CUDA source: the kernels it defines, their parameter types, and constructs outside the subset.

Used on both backends: the parameter types let every launch be checked before it runs (on a GPU a wrong
argument type is silently misread), and the emulator needs them to marshal arguments.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

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
# Vector element types: (NumPy dtype of one lane, lanes, alignment in bytes), as CUDA's vector_types.h has them.
_VECTORS = {
    "float2": (np.float32, 2, 8), "float4": (np.float32, 4, 16), "double2": (np.float64, 2, 16),
    "int2": (np.int32, 2, 8), "int4": (np.int32, 4, 16), "uint2": (np.uint32, 2, 8), "uint4": (np.uint32, 4, 16),
    "short2": (np.int16, 2, 4), "short4": (np.int16, 4, 8), "ushort2": (np.uint16, 2, 4),
    "ushort4": (np.uint16, 4, 8), "char2": (np.int8, 2, 2), "char4": (np.int8, 4, 4), "uchar2": (np.uint8, 2, 2),
    "uchar4": (np.uint8, 4, 4), "longlong2": (np.int64, 2, 16), "ulonglong2": (np.uint64, 2, 16),
    "__nv_bfloat162": (np.uint16, 2, 4), "nv_bfloat162": (np.uint16, 2, 4),
}

# Constructs that compile on a GPU but that the emulator does not provide, with what to do instead.
UNSUPPORTED = {
    r"\bthis_grid\s*\(": "cooperative_groups::this_grid (grid-wide groups need a cooperative launch)",
    r"\b__shfl\s*\(": "__shfl without _sync (removed in CUDA 9; use __shfl_sync)",
    r"\b__shfl_(?:up|down|xor)\s*\(": "__shfl_up/down/xor without _sync (use the _sync versions)",
    r"\bwmma::": "tensor-core wmma fragments",
    r"\basm\s*(?:volatile\s*)?\(": "inline PTX (asm)",
    r"\b__constant__\b": "__constant__ memory (pass the values as a kernel argument)",
    r"\b__managed__\b": "__managed__ memory",
    r"\btexture\s*<": "textures",
    r"\b(?:__half|__half2)\b": "the half-precision types __half and __half2 (use __nv_bfloat16)",
    r"\bclock(?:64)?\s*\(": "clock()/clock64() (timing inside a kernel means nothing on the CPU)",
    r"<<<": "launching a kernel from a kernel (dynamic parallelism)",
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


_TOKENS = re.compile(r'"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'|//[^\n]*|/\*.*?(?:\*/|\Z)', re.S)


@lru_cache(maxsize=256)
def strip_comments(src: str) -> str:
    """`src` with comments replaced by spaces (newlines kept), so offsets and line numbers stay valid."""
    def blank(m):
        t = m.group(0)
        return t if t[0] in "\"'" else re.sub(r"[^\n]", " ", t)
    return _TOKENS.sub(blank, src)


def _line_of(src: str, pos: int) -> int:
    return src.count("\n", 0, pos) + 1


def _where(src: str, pos: int, filename: str) -> str:
    """"file:line" of offset `pos`, following the #line directives that inline_headers leaves."""
    last = None
    for m in re.finditer(r'^#line (\d+) "([^"]*)"$', src[:pos], re.M):
        last = m
    if last is None:
        return f"{filename}:{_line_of(src, pos)}"
    return f"{last.group(2)}:{int(last.group(1)) + src.count(chr(10), last.end() + 1, pos)}"


# ---------------------------------------------------------------------------------------------------------
# The preprocessor's part that decides types: which #if branches are compiled, what the headers define.

KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"
"""The course's kernel folder, on the include path of both backends."""

_DIRECTIVE = re.compile(r"^[ \t]*#[ \t]*(\w+)(.*)$", re.M)


def _macros_and_dirs(options) -> tuple[dict, list]:
    """The -D macros and -I folders among compiler options (as "-DX=1" or "-D", "X=1")."""
    macros, dirs, opts = {}, [], list(options)
    for i, o in enumerate(opts):
        for flag in ("-D", "-I", "--define-macro=", "--include-path="):
            if o.startswith(flag):
                val = o[len(flag):] or (opts[i + 1] if i + 1 < len(opts) else "")
                if flag in ("-D", "--define-macro="):
                    name, _, value = val.partition("=")
                    macros[name] = value or "1"
                else:
                    dirs.append(Path(val))
    return macros, dirs


def _eval_condition(expr: str, macros: dict):
    """True, False, or None when `expr` (of an #if) depends on a macro this reader cannot know (such as
    __CUDA_ARCH__, which differs between a GPU and the emulator)."""
    e = re.sub(r"\bdefined\s*\(\s*(\w+)\s*\)|\bdefined\s+(\w+)",
               lambda m: "1" if (m.group(1) or m.group(2)) in macros else "0", expr)
    e = re.sub(r"\b(\d+)[uUlL]+\b", r"\1", e)
    e = e.replace("&&", " and ").replace("||", " or ")
    e = re.sub(r"!(?!=)", " not ", e)
    try:
        tree = ast.parse(e.strip(), mode="eval")
    except SyntaxError:
        return None

    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.Name):
            v = macros.get(n.id)
            return int(v) if v is not None and re.fullmatch(r"-?\d+", v.strip()) else None
        if isinstance(n, ast.BoolOp):
            vals = [ev(v) for v in n.values]
            decided = [bool(v) for v in vals if v is not None]
            if isinstance(n.op, ast.And):
                return 0 if False in decided else (None if None in vals else 1)
            return 1 if True in decided else (None if None in vals else 0)
        if isinstance(n, ast.UnaryOp):
            v = ev(n.operand)
            if v is None:
                return None
            return {ast.Not: lambda: int(not v), ast.USub: lambda: -v, ast.UAdd: lambda: v}.get(
                type(n.op), lambda: None)()
        if isinstance(n, ast.Compare) and len(n.ops) == 1:
            a, b = ev(n.left), ev(n.comparators[0])
            if a is None or b is None:
                return None
            ops = {ast.Lt: a < b, ast.LtE: a <= b, ast.Gt: a > b, ast.GtE: a >= b, ast.Eq: a == b, ast.NotEq: a != b}
            return int(ops[type(n.ops[0])]) if type(n.ops[0]) in ops else None
        return None
    v = ev(tree)
    return None if v is None else bool(v)


def _find_include(name: str, here: Path | None, dirs: list):
    for d in ([here] if here else []) + dirs:
        p = d / name
        if p.is_file():
            return p.resolve()
    return None


def _read_types(code: str, here, dirs, macros: dict, typedefs: dict, files: list, seen: set) -> str:
    """Walk `code` as the preprocessor would (only what decides types): record typedefs of the compiled
    branches (both branches where the condition cannot be decided), follow #include of files found in
    `here` or `dirs` into `files`. Returns `code` with the lines of branches certainly not compiled blanked."""
    stack = []   # per open #if: [state of this branch (True/False/None), some earlier branch taken (True/False/None)]
    out, pos, live = [], 0, True   # live: the text at `pos` may be compiled
    for m in _DIRECTIVE.finditer(code):
        chunk = code[pos:m.start()]
        out.append(chunk if live else re.sub(r"[^\n]", "", chunk))
        pos = m.end()
        out.append(m.group(0) if live else "")
        d, rest = m.group(1), m.group(2).strip()
        if d in ("if", "ifdef", "ifndef"):
            word = (rest.split() or [""])[0]
            c = (word in macros) if d == "ifdef" else (word not in macros) if d == "ifndef" else \
                _eval_condition(rest, macros)
            stack.append([c, c])
        elif d in ("elif", "else") and stack:
            taken = stack[-1][1]
            c = True if d == "else" else _eval_condition(rest, macros)
            stack[-1][0] = False if taken is True or c is False else (None if None in (taken, c) else True)
            stack[-1][1] = True if True in (taken, c) else (None if None in (taken, c) else False)
        elif d == "endif" and stack:
            stack.pop()
        elif live and d == "define":
            dm = re.match(r"(\w+)(?![\w(])\s*(.*)", rest)
            if dm and all(s[0] is True for s in stack):   # a macro defined for certain
                macros.setdefault(dm.group(1), dm.group(2).strip())
        elif live and d == "include":
            im = re.match(r'["<]([^">]+)[">]', rest)
            p = im and _find_include(im.group(1), here if rest.startswith('"') else None, dirs)
            if p and p not in seen:
                seen.add(p)
                text = p.read_text(errors="replace")
                files.append((p, text))
                _read_types(strip_comments(text), p.parent, dirs, macros, typedefs, files, seen)
        live = all(s[0] is not False for s in stack)
    chunk = code[pos:]
    out.append(chunk if live else re.sub(r"[^\n]", "", chunk))
    text = "".join(out)
    for tm in re.finditer(r"\btypedef\s+([^;{}()]+?)\s*\b([A-Za-z_]\w*)\s*;", text):
        typedefs.setdefault(tm.group(2), set()).add(" ".join(tm.group(1).replace("*", " * ").split()))
    for um in re.finditer(r"\busing\s+([A-Za-z_]\w*)\s*=\s*([^;{}()]+);", text):
        typedefs.setdefault(um.group(1), set()).add(" ".join(um.group(2).replace("*", " * ").split()))
    return text


def inline_headers(src: str, filename: str, options: tuple = ()) -> str:
    """`src` with each #include of a header found in the file's folder (for "...") or an -I folder of `options`
    replaced by the header's text (once per header; the course's kernels/ folder is left to the compiler), so
    the emulator's rewriting of `__shared__` and its subset check reach the headers a kernel file brings.
    #line directives keep compiler messages pointing at the header's own lines."""
    _, dirs = _macros_and_dirs(options)
    done = set()

    def expand(text: str, path: str, here) -> str:
        out = []
        for i, line in enumerate(text.split("\n")):
            m = re.match(r'[ \t]*#[ \t]*include[ \t]*(["<])([^">]+)[">]', line)
            p = m and _find_include(m.group(2), here if m.group(1) == '"' else None, dirs)
            if p and p.parent != KERNELS_DIR.resolve():
                if p not in done:
                    done.add(p)
                    body = re.sub(r"^[ \t]*#[ \t]*pragma[ \t]+once.*$", "", p.read_text(errors="replace"), flags=re.M)
                    out.append(f'#line 1 "{p}"\n' + expand(body, str(p), p.parent) + f'\n#line {i + 2} "{path}"')
                    continue
                line = ""
            elif re.match(r"[ \t]*#[ \t]*pragma[ \t]+once", line):
                line = ""
            out.append(line)
        return "\n".join(out)
    here = Path(filename).resolve().parent if Path(filename).is_file() else None
    return expand(src, filename, here)


@dataclass(frozen=True)
class SourceInfo:
    code: str                  # comments removed, branches certainly not compiled blanked
    typedefs: dict             # name -> set of the types it may stand for
    files: tuple               # (path, text) of every header it includes that was found


def read_source(src: str, options: tuple = (), filename: str | None = None) -> SourceInfo:
    """What the kernels of `src` need to be read: its compiled text, typedefs and included headers. Headers are
    searched in the folder of `filename`, the -I folders of `options`, then the course's kernels/ folder."""
    macros, dirs = _macros_and_dirs(options)
    dirs.append(KERNELS_DIR)
    here = Path(filename).resolve().parent if filename and Path(filename).is_file() else None
    typedefs, files = {}, []
    code = _read_types(strip_comments(src), here, dirs, macros, typedefs, files, set())
    return SourceInfo(code, typedefs, tuple(files))


def _resolve(words: list, typedefs: dict, kernel: str, text: str) -> list:
    """Type words with every typedef name replaced by what it stands for."""
    for _ in range(10):
        hit = next((w for w in words if w in typedefs), None)
        if hit is None:
            return words
        defs = typedefs[hit]
        if len(defs) > 1:
            raise ValueError(f"kernel '{kernel}': parameter '{text.strip()}': typedef '{hit}' stands for one of "
                             f"{', '.join(sorted(defs))} depending on #if conditions this reader cannot decide; "
                             f"pass the macro that picks one in options (e.g. '-DENABLE_BF16')")
        i = words.index(hit)
        words = words[:i] + next(iter(defs)).split() + words[i + 1:]
    return words


def _parse_param(text: str, kernel: str, typedefs: dict | None = None, subst: dict | None = None) -> Param:
    t = re.sub(r"\b(?:__restrict__|__restrict|restrict)\b", " ", text.split("=")[0])
    t = " ".join(t.replace("*", " * ").split())
    m = re.fullmatch(r"(.+?)\s*([A-Za-z_]\w*)", t)
    if not m or m.group(1).strip() in ("", "const"):
        raise ValueError(f"kernel '{kernel}': cannot read the parameter '{text.strip()}'")
    ctype = m.group(1).replace(" *", "*").strip()
    if "&" in ctype or "[" in text:
        raise ValueError(f"kernel '{kernel}': parameter '{text.strip()}' is a reference or array; "
                         f"kernel parameters must be pointers or scalars")
    words = ctype.replace("*", " * ").split()
    if subst:
        words = " ".join(subst.get(w, w) for w in words).replace("*", " * ").split()
    words = _resolve(words, typedefs or {}, kernel, text)
    stars = words.count("*")
    if stars > 1:
        raise ValueError(f"kernel '{kernel}': parameter '{text.strip()}' is a pointer to a pointer, "
                         f"which cannot be passed from Python")
    before_star = words[:words.index("*")] if stars else words
    base = " ".join(w for w in words if w not in ("const", "volatile", "*"))
    if base not in _DTYPES and base not in _VECTORS and not (stars and base == "void"):
        raise ValueError(f"kernel '{kernel}': parameter type '{ctype}'"
                         f"{f' ({base})' if base != ctype.replace('const', '').replace('*', '').strip() else ''}"
                         f" is not supported (supported: {', '.join(sorted(set(_DTYPES) | set(_VECTORS)))}, "
                         f"typedefs of them, and pointers to them)")
    return Param(m.group(2), ctype, base, bool(stars), "const" in before_star)


@dataclass(frozen=True)
class _Definition:
    name: str
    params: str                # the parameter list as written
    line: int
    extern_c: bool
    template: tuple | None     # ((kind, name, default), ...) of a template kernel, kind "type" or "value"


def _template_params(code: str, pos: int):
    """The parameters of a `template <...>` that ends right before `pos`, else None."""
    j = len(code[:pos].rstrip()) - 1
    if j < 0 or code[j] != ">":
        return None
    depth, k = 0, j
    while k >= 0:
        depth += {">": 1, "<": -1}.get(code[k], 0)
        if depth == 0:
            break
        k -= 1
    head = re.search(r"\btemplate\s*$", code[:k])
    if not head:
        return None
    out = []
    for p in _split_top(code[k + 1:j]):
        pm = re.fullmatch(r"\s*(typename|class|[\w\s]+?)\s+([A-Za-z_]\w*)\s*(?:=\s*(.+?))?\s*", p)
        if not pm:
            raise ValueError(f"cannot read the template parameter '{p.strip()}'")
        out.append(("type" if pm.group(1) in ("typename", "class") else "value", pm.group(2), pm.group(3)))
    return tuple(out)


def _split_top(text: str) -> list:
    """`text` split at the commas outside <>, () and {}."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "<({":
            depth += 1
        elif ch in ">)}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur] if cur.strip() else parts


def _definitions(code: str) -> dict:
    extern_blocks = []
    for m in re.finditer(r'extern\s+"C"\s*\{', code):
        depth, j = 1, m.end()
        while j < len(code) and depth:
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            j += 1
        extern_blocks.append((m.end(), j))
    defs = {}
    pat = (r'(extern\s+"C"\s+)?__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+'
           r'(?:__launch_bounds__\s*\([^)]*\)\s*)?([A-Za-z_]\w*)\s*\(([^)]*)\)')
    for m in re.finditer(pat, code):
        is_c = bool(m.group(1)) or any(a <= m.start() < b for a, b in extern_blocks)
        defs[m.group(2)] = _Definition(m.group(2), m.group(3).strip(), _line_of(code, m.start()), is_c,
                                       _template_params(code, m.start()))
    return defs


def _signature(d: _Definition, typedefs: dict, subst: dict | None = None, name: str | None = None):
    name = name or d.name
    params = () if d.params in ("", "void") else tuple(
        _parse_param(p, name, typedefs, subst) for p in _split_top(d.params))
    return KernelSignature(name, params, d.line)


def find_kernels(src: str, options: tuple = (), filename: str | None = None) -> dict:
    """Every `extern "C" __global__` function in `src`, with its parameters (None for a kernel that is not
    extern "C" or is a template: those are launched through RawModule by name expression)."""
    info = read_source(src, tuple(options), filename)
    return {name: _signature(d, info.typedefs) if d.extern_c and d.template is None else None
            for name, d in _definitions(info.code).items()}


def is_extern_c(src: str, name: str, options: tuple = (), filename: str | None = None) -> bool:
    """Whether `name` is a kernel of `src` declared extern "C" and not a template (one RawKernel can load)."""
    d = _definitions(read_source(src, tuple(options), filename).code).get(name)
    return d is not None and d.extern_c and d.template is None


def plain_kernel_names(src: str, options: tuple = (), filename: str | None = None) -> list:
    """The kernels of `src` that are not templates (each can be called by its name from C++)."""
    info = read_source(src, tuple(options), filename)
    return [name for name, d in _definitions(info.code).items() if d.template is None]


def signature(src: str, name: str, options: tuple = (), filename: str | None = None,
              module: bool = False) -> KernelSignature:
    """The signature of kernel `name`, or a clear error saying what the source defines instead.

    `name` may instantiate a template kernel ("k<float, 4>"); a kernel that is not extern "C" or is a template
    must be loaded through RawModule (`module=True`), as with CuPy."""
    info = read_source(src, tuple(options), filename)
    defs = _definitions(info.code)
    base = name.split("<")[0].strip()
    if base not in defs:
        found = ", ".join(sorted(defs)) or "none"
        raise ValueError(f"no __global__ function named '{base}' in the source (kernels found: {found})")
    d = defs[base]
    if not module and (not d.extern_c or d.template is not None):
        if d.template is not None:
            raise ValueError(f"kernel '{base}' is a template: load it with RawModule(code, name_expressions="
                             f"['{base}<...>']) and get_function('{base}<...>'), as with CuPy")
        raise ValueError(f"kernel '{base}' must be declared extern \"C\" __global__ so RawKernel can find it by "
                         f"name, as cupy.RawKernel requires (or load it with RawModule(code).get_function(name))")
    if d.template is None:
        if "<" in name:
            raise ValueError(f"kernel '{base}' is not a template; call it '{base}'")
        return _signature(d, info.typedefs, name=name)
    m = re.fullmatch(r"\s*\w+\s*<(.*)>\s*", name, re.S)
    if not m:
        params = ", ".join(p[1] for p in d.template)
        raise ValueError(f"kernel '{base}' is a template <{params}>: name an instantiation, "
                         f"such as '{base}<{', '.join('float' if p[0] == 'type' else '4' for p in d.template)}>'")
    args = [a.strip() for a in _split_top(m.group(1))]
    if len(args) > len(d.template) or any(p[2] is None for p in d.template[len(args):]):
        raise ValueError(f"'{name}': template kernel '{base}' takes the template arguments "
                         f"<{', '.join(p[1] for p in d.template)}>, got {len(args)}")
    subst = {p[1]: (args[i] if i < len(args) else p[2]) for i, p in enumerate(d.template) if p[0] == "type"}
    return _signature(d, info.typedefs, subst, name=name)


def check_subset(src: str, filename: str) -> None:
    """Raise a clear error naming the first construct outside the emulator's CUDA subset."""
    code = strip_comments(src)
    for pattern, what in UNSUPPORTED.items():
        m = re.search(pattern, code)
        if m:
            raise NotImplementedError(
                f"{_where(code, m.start(), filename)}: '{m.group(0).strip()}': {what} is outside the CUDA "
                f"subset that the CPU emulator supports (see docs/emulator.md). On a GPU it may compile; here it "
                f"cannot run.")


CONSTANTS = Path(__file__).resolve().parent / "llmc_constants.h"
_CONSTANT_NAMES = re.compile(r"\b(?:INFINITY|NAN|HUGE_VALF|FLT_(?:MAX|MIN|EPSILON)|DBL_(?:MAX|MIN|EPSILON)|"
                             r"U?INT_(?:MAX|MIN)|M_\w+|CUDART_\w+)\b")


def with_constants(src: str, filename: str) -> str:
    """`src` with llmc_constants.h in front when it uses one of the host's math/float macros (INFINITY, FLT_MAX,
    M_PI, CUDART_INF_F...), which NVRTC does not define; a #line keeps messages pointing at `src`'s lines."""
    if not _CONSTANT_NAMES.search(strip_comments(src)):
        return src
    name = filename.replace("\\", "\\\\").replace('"', '\\"')
    return CONSTANTS.read_text() + f'#line 1 "{name}"\n' + src


_SHARED = re.compile(
    r"(?:\bstatic\s+)?(?P<ext>\bextern\s+)?\b__shared__\s+(?:static\s+)?(?:(?:__align__|alignas)\s*\(\s*\d+\s*\)\s*)?"
    r"(?P<type>(?:(?:const|volatile|unsigned|signed|long|short)\s+)*[A-Za-z_]\w*)"
    r"(?:\s+(?:__align__|alignas)\s*\(\s*\d+\s*\))?\s*(?P<decls>[^;]+);")


def rewrite_shared(src: str, filename: str) -> str:
    """Turn each `__shared__` declaration into an LLMC_SHARED macro (one copy per block, poisoned).

    `static` goes too: on a GPU it changes nothing, here it would make one copy for every block. Replacements
    stay on the declaration's line, so compiler messages keep pointing at the right line.
    """
    code = strip_comments(src)
    out, last = [], 0
    for m in _SHARED.finditer(code):
        depth = code.count("{", 0, m.start()) - code.count("}", 0, m.start())
        if depth <= 0:
            raise NotImplementedError(f"{_where(code, m.start(), filename)}: a __shared__ variable at file "
                                      f"scope is not supported by the CPU emulator: declare it inside the kernel")
        typ = m.group("type")
        pieces = []
        for d in m.group("decls").split(","):
            dm = re.fullmatch(r"\s*(\**)\s*([A-Za-z_]\w*)\s*((?:\[[^\]]*\]\s*)*)", d)
            if not dm:
                raise NotImplementedError(f"{_where(code, m.start(), filename)}: cannot read the __shared__ "
                                          f"declaration '{m.group(0).strip()}' (no initialisers are allowed)")
            stars, name, dims = dm.group(1), dm.group(2), dm.group(3).replace(" ", "")
            if m.group("ext"):
                if dims != "[]" or stars:
                    raise NotImplementedError(f"{_where(code, m.start(), filename)}: extern __shared__ must "
                                              f"be an unsized array, like `extern __shared__ float buf[];`")
                pieces.append(f"LLMC_EXTERN_SHARED({typ}, {name})")
            else:
                pieces.append(f"LLMC_SHARED({typ}{stars}, {name}, {dims})")
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
