"""Checked mode (LLMC_CHECK=1): run a launch under AddressSanitizer, so an out-of-bounds access becomes an error
naming the kernel, file and line instead of silently reading garbage or corrupting memory. On Linux x86-64 the
runtime also watches shared memory and the argument arrays for data races between the threads of a block, and
shared memory for out-of-bounds accesses (runtime.cpp, see Word; LLMC_CHECK_RACES=0 turns that off).

AddressSanitizer must be loaded before anything else in a process, so the launch runs in a child Python
process started with the sanitizer preloaded. Arguments travel as .npy files; written arrays come back.
Slow (a process start and an instrumented build), and meant for debugging a kernel, not for routine runs.
The child never outlives this process, and errors it reports (a compile error, a refused construct, a
kernel error) are raised here as the default mode raises them.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from llmc_lessons.cuda.emulator import CompileError, KernelError, compiler

ASAN_OPTIONS = "detect_leaks=0:halt_on_error=1:abort_on_error=0:symbolize=1:print_summary=1"
# Errors the child reports as the default mode would, raised again here with the same type and message.
_ERRORS = {e.__name__: e for e in (KernelError, CompileError, NotImplementedError, ValueError, TypeError)}


@lru_cache(maxsize=None)
def _libasan() -> str:
    out = subprocess.run([*compiler(), "-print-file-name=libasan.so"], capture_output=True, text=True)
    path = out.stdout.strip()
    if out.returncode or not os.path.isabs(path) or not os.path.exists(path):
        raise RuntimeError("checked mode (LLMC_CHECK=1) needs AddressSanitizer's runtime (libasan), which the C++ "
                           "compiler does not provide here; on Debian/Ubuntu: sudo apt install libasan8")
    return os.path.realpath(path)


def launch(kernel, grid, block, args, shared_mem: int, shared_limit: int) -> str:
    """Run `kernel` under AddressSanitizer in a child process; copy written arrays back; return its printf output."""
    if os.environ.get("LLMC_CHECK_RACES", "1") not in ("0", "1"):
        raise ValueError(f"LLMC_CHECK_RACES={os.environ['LLMC_CHECK_RACES']!r}: use 1 (watch shared memory for data "
                         f"races and out-of-bounds accesses, the default) or 0 (do not)")
    with tempfile.TemporaryDirectory(prefix="llmc-check-") as tmp:
        d = Path(tmp)
        spec = {"code": kernel.code, "name": kernel.name, "filename": kernel.filename,
                "options": list(kernel.options), "grid": grid, "block": block, "shared_mem": shared_mem,
                "shared_limit": shared_limit, "args": [], "name_expressions": list(kernel.name_expressions)}
        for i, a in enumerate(args):
            if isinstance(a, np.ndarray):
                np.save(d / f"arg{i}.npy", a)
                spec["args"].append({"array": f"arg{i}.npy"})
            elif a is None:
                spec["args"].append({"null": True})
            else:
                spec["args"].append({"scalar": a.item(), "dtype": a.dtype.name})
        (d / "spec.json").write_text(json.dumps(spec))
        env = dict(os.environ, LD_PRELOAD=_libasan(), ASAN_OPTIONS=ASAN_OPTIONS, LLMC_DEVICE="cpu",
                   LLMC_CHECK="1")
        # The child's stdin is a pipe that this process never writes: the child ends when it reads end-of-file,
        # that is when this process dies. Ctrl-C here kills it. Its launch has the same time limit as ours.
        with open(d / "stdout.txt", "w") as out, open(d / "stderr.txt", "w") as err:
            child = subprocess.Popen([sys.executable, "-m", "llmc_lessons.cuda.checked", str(d)], env=env,
                                     stdin=subprocess.PIPE, stdout=out, stderr=err)
            try:
                returncode = child.wait()
            except BaseException:
                child.kill()
                child.wait()
                raise
            finally:
                child.stdin.close()
        if returncode != 0:
            if (d / "error.json").exists():
                e = json.loads((d / "error.json").read_text())
                raise _ERRORS[e["type"]](e["message"])
            stderr = (d / "stderr.txt").read_text(errors="replace")
            raise KernelError(explain_asan(stderr, kernel.name, kernel.signature))
        for i, (a, p) in enumerate(zip(args, kernel.signature.params)):
            if isinstance(a, np.ndarray) and not p.const:
                np.copyto(a, np.load(d / f"arg{i}.npy"))
        return (d / "output.txt").read_text()


def explain_asan(stderr: str, name: str, sig) -> str:
    """Turn an AddressSanitizer report into a short message: what access, which kernel, file and line."""
    kind = re.search(r"ERROR: AddressSanitizer: ([\w-]+)", stderr)
    access = re.search(r"(READ|WRITE) of size (\d+)", stderr)
    frame = re.search(r"#\d+ 0x[0-9a-f]+ in (\w+) (\S*?(?:<[^>]+>|\.cuh?)):(\d+)", stderr)
    region = re.search(r"is located (\d+) bytes (to the right|to the left|inside) of (\d+)-byte region", stderr)
    if not kind:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        return f"kernel '{name}' crashed in checked mode:\n{tail}"
    msg = f"kernel '{name}': {kind.group(1)}"
    if access:
        msg += f": a {access.group(1).lower()} of {access.group(2)} bytes"
    if frame:
        path = frame.group(2)
        path = path[path.index("<"):] if "<" in path else path
        msg += f" in {frame.group(1)} at {path}:{frame.group(3)}"
    if region:
        side = {"to the right": "past the end", "to the left": "before the start", "inside": "inside"}[region.group(2)]
        msg += (f", {region.group(1)} bytes {side} of a {region.group(3)}-byte array "
                f"(an argument of {int(region.group(3)) // 4} floats or ints?)")
    msg += ".\nCheck the index arithmetic and the bounds check (`if (i < n)`) of that line."
    return msg


def _exit_with_parent() -> None:
    """End this process when the parent dies (its end of our stdin closes), whatever the launch is doing."""
    def watch():
        while os.read(0, 4096):  # the raw descriptor: no lock that would hold up the interpreter's exit
            pass
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _child(d: Path) -> int:
    from llmc_lessons.cuda import emulator, source
    _exit_with_parent()
    spec = json.loads((d / "spec.json").read_text())
    args = []
    for a in spec["args"]:
        args.append(np.load(d / a["array"]) if "array" in a else None if "null" in a else
                    np.dtype(a["dtype"]).type(a["scalar"]))
    try:
        module = emulator.EmulatedModule(spec["code"], spec["filename"], tuple(spec["options"]), checked=True,
                                         name_expressions=tuple(spec["name_expressions"]))
        sig = source.signature(spec["code"], spec["name"], tuple(spec["options"]), spec["filename"], module=True)
        out = emulator.launch(module, sig, tuple(spec["grid"]), tuple(spec["block"]), args, spec["shared_mem"],
                              spec["shared_limit"])
    except tuple(_ERRORS.values()) as e:
        def element(m):  # the runtime names an element of an argument array by its byte offset
            i, byte = int(m.group(1)), int(m.group(2))
            return f"{sig.params[i].name}[{byte // args[i].itemsize}]"
        message = re.sub(r"\{arg (\d+) byte (\d+)\}", element, str(e))
        (d / "error.json").write_text(json.dumps({"type": type(e).__name__, "message": message}))
        return 3
    for a, p in zip(args, spec["args"]):
        if "array" in p:
            np.save(d / p["array"], a)
    (d / "output.txt").write_text(out)
    return 0


if __name__ == "__main__":
    sys.exit(_child(Path(sys.argv[1])))
