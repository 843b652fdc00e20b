"""The student's parts: what an exercise that implements a layer wrote, kept where later lessons load it.

When the check of such an exercise passes, it records the student's answer as their version of the layer (a
"part"): a NumPy function as its source, preceded by the lines that define what it reads from its notebook
(imports, numbers, the notebook functions it calls), or a kernel as its CUDA source. Parts live in a folder
beside the notebooks, `./llmc_parts/` (LLMC_PARTS names another), one file a part and an index, parts.json:

    {"layernorm_backward": {"exercise": "Exercise 3.2", "file": "layernorm_backward.py",
                            "function": "layernorm_backward", "sha256": "...", "time": "2026-..."}, ...}

Lesson 10 assembles GPT-2 from the parts (the reference stands in, part by part, for what is missing), and the
gradient checks of lessons 02 to 09 run the student's checker (Exercise 0.3) and backward beside the package's.
"""
from __future__ import annotations

import copy
import dis
import hashlib
import inspect
import json
import math
import os
import sys
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmc_lessons.files import atomic_write

PACKAGE = __name__.rpartition(".")[0]


@dataclass(frozen=True)
class PartSpec:
    exercise: str
    name: str          # the package's name of what it replaces: a function, or the kernel in `kernel_file`
    module: str = ""   # the package module that holds the reference function (NumPy parts)
    kernel_file: str = ""   # the file of llmc_lessons/kernels/ that holds the reference kernel (kernel parts)
    trained: bool = True    # False: no training step runs it (the classifier's softmax: the step fuses it)

    @property
    def key(self) -> str:
        """The part's name in the store: the function's name, or `file:kernel` (two files have a softmax kernel)."""
        return f"{self.kernel_file}:{self.name}" if self.kernel_file else self.name

    @property
    def is_kernel(self) -> bool:
        return bool(self.kernel_file)

    @property
    def runs_on(self) -> str:
        if not self.trained:
            return "no training step"
        return "kernel path" if self.kernel_file else "NumPy path" if self.module else "gradient checks"


SPECS = (
    PartSpec("Exercise 0.3", "gradient_checker"),
    PartSpec("Exercise 2.0", "encoder_forward", "llmc_lessons.layers.encoder"),
    PartSpec("Exercise 2.2", "encoder_backward", "llmc_lessons.layers.encoder"),
    PartSpec("Exercise 2.3", "encoder_forward_kernel1", kernel_file="encoder.cu"),
    PartSpec("Exercise 3.0", "layernorm_forward", "llmc_lessons.layers.layernorm"),
    PartSpec("Exercise 3.2", "layernorm_backward", "llmc_lessons.layers.layernorm"),
    PartSpec("Exercise 3.3", "layernorm_forward_kernel2", kernel_file="layernorm.cu"),
    PartSpec("Exercise 4.0", "matmul_forward", "llmc_lessons.layers.matmul"),
    PartSpec("Exercise 4.2", "matmul_backward", "llmc_lessons.layers.matmul"),
    PartSpec("Exercise 4.3", "matmul_kernel2", kernel_file="matmul.cu"),
    PartSpec("Exercise 5.0", "attention_forward", "llmc_lessons.layers.attention"),
    PartSpec("Exercise 5.2", "attention_backward", "llmc_lessons.layers.attention"),
    PartSpec("Exercise 5.3", "softmax_forward_kernel", kernel_file="attention.cu"),
    PartSpec("Exercise 6.0", "gelu_forward", "llmc_lessons.layers.gelu"),
    PartSpec("Exercise 6.2", "gelu_backward", "llmc_lessons.layers.gelu"),
    PartSpec("Exercise 6.3", "gelu_backward_kernel", kernel_file="gelu.cu"),
    PartSpec("Exercise 6.4", "gelu_forward_kernel1", kernel_file="gelu.cu"),
    PartSpec("Exercise 7.0", "residual_forward", "llmc_lessons.layers.residual"),
    PartSpec("Exercise 7.1", "block_backward", "llmc_lessons.layers.block"),
    PartSpec("Exercise 7.2", "mlp_backward", "llmc_lessons.layers.block"),
    PartSpec("Exercise 7.3", "residual_forward_kernel", kernel_file="residual.cu"),
    PartSpec("Exercise 8.0", "softmax_forward", "llmc_lessons.layers.crossentropy"),
    PartSpec("Exercise 8.0", "crossentropy_forward", "llmc_lessons.layers.crossentropy"),
    PartSpec("Exercise 8.2", "crossentropy_softmax_backward", "llmc_lessons.layers.crossentropy"),
    PartSpec("Exercise 8.3", "softmax_forward_kernel", kernel_file="crossentropy.cu", trained=False),
    PartSpec("Exercise 9.1", "adamw_update", "llmc_lessons.layers.adamw"),
    PartSpec("Exercise 9.2", "adamw_kernel", kernel_file="adamw.cu"),
)
"""Every exercise whose answer is a part, in course order."""

BY_EXERCISE = {e: tuple(s for s in SPECS if s.exercise == e) for e in dict.fromkeys(s.exercise for s in SPECS)}
"""The parts of each exercise: one, or two functions of one forward (Exercise 8.0: the softmax and the loss)."""
BY_KEY = {s.key: s for s in SPECS}
INDEX = "parts.json"


class PartNotKept(Exception):
    """Why an answer cannot be kept as a part (its reason is shown to the student)."""


def folder() -> Path:
    """The parts folder: $LLMC_PARTS, else ./llmc_parts beside the notebook that runs."""
    return Path(os.environ.get("LLMC_PARTS") or "llmc_parts")


def _read_index(where: Path) -> dict:
    try:
        return json.loads((where / INDEX).read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------------------
# Recording


def _global_names(code: types.CodeType) -> list[str]:
    """The global names `code` (and the functions and comprehensions inside it) reads, in first-use order."""
    names = []
    for ins in dis.get_instructions(code):
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME") and ins.argval not in names:
            names.append(ins.argval)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += [n for n in _global_names(const) if n not in names]
    return names


def portable_source(fn) -> str:
    """The source of the function `fn`, preceded by what it reads from its notebook: the modules and package
    functions it names (as imports), the numbers and strings (as assignments), the notebook's own functions
    it calls (their portable source). Raises PartNotKept for anything else (an array, a lambda...)."""
    lines, seen = [], set()

    def add(f):
        if f.__name__ == "<lambda>":
            raise PartNotKept("it is a lambda: write it as a def")
        try:
            source = inspect.getsource(f)
        except (OSError, TypeError) as e:
            raise PartNotKept(f"its source cannot be read ({e})") from None
        seen.add(f.__name__)
        reads = dict(f.__globals__)
        reads.update(zip(f.__code__.co_freevars, (c.cell_contents for c in f.__closure__ or ())))
        for name in list(f.__code__.co_freevars) + _global_names(f.__code__):
            if name in seen or name not in reads:
                continue                                           # a builtin, or defined again below
            seen.add(name)
            value = reads[name]
            if isinstance(value, types.ModuleType):
                lines.append(f"import {value.__name__}" + (f" as {name}" if name != value.__name__ else ""))
            elif isinstance(value, (bool, int, float, complex, str, type(None))):
                lines.append(f"{name} = {value!r}")
            elif inspect.isfunction(value) and value.__module__ == f.__module__:
                add(value)                                         # a helper of the same notebook
            elif inspect.isclass(value) and value.__module__ == f.__module__:
                raise PartNotKept(f"it uses {name}, a class of the notebook: only functions travel with a part")
            elif callable(value) and getattr(value, "__module__", None) and hasattr(value, "__qualname__"):
                module = value.__module__
                if sys.modules.get(module) is None or getattr(sys.modules[module], value.__qualname__, None) \
                        is not value:
                    raise PartNotKept(f"it calls {name}, which cannot be imported again")
                alias = "" if value.__qualname__ == name else f" as {name}"
                lines.append(f"from {module} import {value.__qualname__}{alias}")
            else:
                raise PartNotKept(f"it reads the notebook's variable {name} ({type(value).__name__}): pass it "
                                  f"as an argument or define it inside the function")
        lines.append("\n" + inspect.cleandoc("\n" + source) if source.startswith((" ", "\t")) else "\n" + source)

    add(fn)
    imports = [line for line in lines if line.startswith(("import ", "from "))]
    rest = [line for line in lines if not line.startswith(("import ", "from "))]
    return "\n".join(imports + rest).strip() + "\n"


def record(exercise: str, answer) -> str:
    """Keep a passing answer to `exercise` (a function, or a kernel's CUDA source) as the student's part.
    Returns the line a check prints; never raises (a part that cannot be kept is no reason to fail a check)."""
    specs = BY_EXERCISE[exercise]
    spec = specs[0] if len(specs) == 1 else next((s for s in specs if s.name == getattr(answer, "__name__", "")), None)
    if spec is None:
        return f"  (not kept as a part: {exercise}'s functions are named {' and '.join(s.name for s in specs)})"
    try:
        if spec.is_kernel:
            source, function = answer, None
        else:
            source, function = portable_source(answer), answer.__name__
        where = folder()
        file = f"{Path(spec.kernel_file).stem}__{spec.name}.cu" if spec.is_kernel else f"{spec.name}.py"
        data = source.encode()
        atomic_write(where / file, data)
        index = _read_index(where)
        index[spec.key] = dict(exercise=exercise, file=file, function=function,
                               sha256=hashlib.sha256(data).hexdigest(), time=time.strftime("%Y-%m-%d %H:%M:%S"))
        atomic_write(where / INDEX, json.dumps(index, indent=1, sort_keys=True).encode())
    except Exception as e:   # noqa: BLE001  (PartNotKept, a full disk, ...: the check has passed all the same)
        return f"  (not kept as your {spec.key}: {e})"
    use = ("the gradient checks of later lessons run it" if spec.name == "gradient_checker"
           else "lesson 10 builds GPT-2 from your parts")
    return f"  kept as your {spec.key} in {where / file}: {use}"


# ---------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class Part:
    """One part as loaded: `value` is the student's function or kernel source, or None with the reason."""
    spec: PartSpec
    value: object = None
    reason: str = ""
    namespace: dict | None = None     # where a NumPy part's function lives (its globals)

    @property
    def theirs(self) -> bool:
        return self.value is not None


def load(key: str, where: Path | None = None) -> Part:
    """The part `key` ("layernorm_backward", "gelu.cu:gelu_backward_kernel") from the store; a part not
    recorded, changed since, or failing to load comes back with value None and the reason."""
    spec = BY_KEY[key]
    where = folder() if where is None else Path(where)
    entry = _read_index(where).get(key)
    if entry is None:
        return Part(spec, reason=f"{spec.exercise} not passed yet")
    path = where / entry["file"]
    try:
        data = path.read_bytes()
    except OSError as e:
        return Part(spec, reason=f"{path} cannot be read ({e.strerror})")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return Part(spec, reason=f"{path} changed since {spec.exercise}'s check passed: run that check again")
    source = data.decode()
    if spec.is_kernel:
        return Part(spec, source)
    namespace = {"np": np, "math": math, "__name__": f"llmc_parts.{spec.name}"}
    try:
        exec(compile(source, str(path.resolve()), "exec"), namespace)
        fn = namespace[entry["function"]]
    except Exception as e:   # noqa: BLE001  (whatever the student's file raises, the reference stands in)
        return Part(spec, reason=f"{path} does not load ({type(e).__name__}: {e})")
    return Part(spec, fn, namespace=namespace)


def load_all(where: Path | None = None, kernels: bool | None = None) -> dict[str, Part]:
    """Every part by key (kernels=True: kernel parts only, False: NumPy parts only), each NumPy part's calls of
    other parts' reference functions pointed at the student's versions."""
    parts = {s.key: load(s.key, where) for s in SPECS if kernels is None or s.is_kernel == kernels}
    functions = {k: p for k, p in parts.items() if p.theirs and not p.spec.is_kernel}
    replacements = _replacements(functions.values())
    for part in functions.values():
        _rebind([part.namespace], replacements)
    return parts


# ---------------------------------------------------------------------------------------------------------
# Substituting the student's functions for the package's


def package_namespaces() -> list[dict]:
    """The globals of every module of the package loaded now."""
    return [vars(m) for k, m in list(sys.modules.items())
            if m is not None and (k == PACKAGE or k.startswith(PACKAGE + "."))]


def _replacements(parts) -> dict:
    """{id(reference function): (reference, the student's function)} for NumPy parts whose reference exists."""
    out = {}
    for part in parts:
        module = sys.modules.get(part.spec.module)
        reference = getattr(module, part.spec.name, None)
        if reference is not None and reference is not part.value:
            out[id(reference)] = (reference, part.value)
    return out


def _rebind(namespaces, replacements) -> list:
    """Point every name bound to a replaced function at its replacement; -> [(namespace, name, old value)].
    `replacements`: {id(function): (function, replacement)} (the function itself too: an id alone may be reused)."""
    changed = []
    for ns in namespaces:
        for key, value in list(ns.items()):
            if id(value) in replacements and replacements[id(value)][0] is value:
                ns[key] = replacements[id(value)][1]
                changed.append((ns, key, value))
    return changed


@contextmanager
def rebound(namespaces, replacements):
    """While inside, every name of `namespaces` (dicts: modules' globals) bound to a function of `replacements`
    ({id(function): (function, replacement)}) is bound to its replacement; on the way out, to the function again."""
    changed = _rebind(namespaces, replacements)
    try:
        yield
    finally:
        for ns, key, value in reversed(changed):
            ns[key] = value


@contextmanager
def substituted(parts, extra_namespaces=(), used: set | None = None):
    """While inside, the package's reference functions of the NumPy `parts` (Part objects) are the student's:
    in every module of the package and in `extra_namespaces` (a notebook's). `used` collects the keys of the
    parts that were called."""
    parts = [p for p in parts if p.theirs and not p.spec.is_kernel]

    def counted(part):
        def call(*args, **kwargs):
            used.add(part.spec.key)
            return part.value(*args, **kwargs)
        return call

    replacements = _replacements(parts)
    if used is not None:     # counted wherever called: by the package, and by another part (load_all bound theirs)
        replacements = {k: (ref, counted(next(p for p in parts if p.value is fn)))
                        for k, (ref, fn) in replacements.items()}
        replacements.update({id(p.value): (p.value, counted(p)) for p in parts})
    with rebound(package_namespaces() + list(extra_namespaces) + [p.namespace for p in parts], replacements):
        yield


def _arrays(result) -> list:
    """The arrays of a function's result (an array, or tuples, lists and dicts of them), in order."""
    if isinstance(result, dict):
        return [a for k in sorted(result) for a in _arrays(result[k])]
    if isinstance(result, (tuple, list)):
        return [a for r in result for a in _arrays(r)]
    return [np.asarray(result)]


def disagreement(theirs, reference, rtol: float = 1e-4) -> str | None:
    """Why the result of a student's function differs from the reference's (None when they agree to `rtol` of
    each array's largest value)."""
    a, b = _arrays(theirs), _arrays(reference)
    if len(a) != len(b):
        return f"returned {len(a)} arrays, the reference {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            return f"output {i} has shape {x.shape}, the reference's {y.shape}"
        if y.dtype.kind != "f":
            continue
        err = float(np.max(np.abs(x.astype(np.float64) - y), initial=0.0))
        scale = float(np.max(np.abs(y), initial=0.0))
        if not err <= rtol * scale + 1e-30:
            return f"output {i} differs by up to {err:.3g} (the reference's largest value is {scale:.3g})"
    return None


@contextmanager
def compared(parts, found: list):
    """While inside, each reference function of the NumPy `parts` also runs the student's version on copies of the
    same inputs; `found` collects (key, why) for every call where the two disagree, in the order the calls end
    (so a part that calls another comes after it)."""
    parts = [p for p in parts if p.theirs and not p.spec.is_kernel]

    def spy(part, reference):
        def call(*args, **kwargs):
            theirs_args, theirs_kwargs = copy.deepcopy((args, kwargs))
            result = reference(*args, **kwargs)
            try:
                why = disagreement(part.value(*theirs_args, **theirs_kwargs), result)
            except Exception as e:   # noqa: BLE001  (the student's code failing is what this looks for)
                why = f"raised {type(e).__name__}: {e}"
            if why:
                found.append((part.spec.key, why))
            return result
        return call

    replacements = {k: (ref, spy(next(p for p in parts if p.value is fn), ref))
                    for k, (ref, fn) in _replacements(parts).items()}
    with rebound(package_namespaces(), replacements):
        yield


def table(parts: dict[str, Part]) -> str:
    """One line a part: where it runs, and whose it is (yours, or the reference's and why)."""
    lines = [f"  {'part':<39} {'exercise':<13} {'runs on':<17} whose"]
    for key, part in parts.items():
        lines.append(f"  {key:<39} {part.spec.exercise:<13} {part.spec.runs_on:<17} "
                     + ("yours" if part.theirs else f"the reference's ({part.reason})"))
    return "\n".join(lines)
