"""Check the course's GPT-2 against an llm.c debug-state file, as llm.c's test_gpt2 does.

    python -m llmc_lessons.verify MODEL.bin STATE.bin [--backend numpy|kernels] [--llmc-tolerances]

MODEL.bin is an llm.c model file (GPT2.from_llmc_checkpoint); STATE.bin is an llm.c debug-state file as
llm.c's train_gpt2.py writes it (write_state), or as `write_debug_state` below writes it:

    int32 header[256]: [0] = 20240327 (magic), [1] = 2 (version: padded vocab), [2] = B, [3] = T
    int32 x[B*T]                      the input tokens
    int32 y[B*T]                      the targets
    float logits[B*T*V]               the expected logits, V real columns only (not Vp)
    float loss                        the expected mean loss
    float grads[num_parameters]       the expected gradients of all 16 tensors, llm.c's order, dwte (Vp, C)

The model runs one forward and backward on (x, y); each tensor is compared with the file. A tensor passes
when max |ours - expected| <= atol + rtol * max |expected| (default rtol = 1e-3, atol = 1e-5: float32 sums
in a different order agree to about 1e-5 relative; a wrong formula is off by order 1). With
--llmc-tolerances the test is llm.c's own: absolute 1e-2 for logits and loss, 2e-2 for every gradient.
Prints one line per tensor and exits 0 when all pass, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np

from llmc_lessons import device
from llmc_lessons.files import atomic_write
from llmc_lessons.model import GPT2
from llmc_lessons.parameters import PARAMETER_NAMES, GPT2Config, num_parameters, parameter_shapes, point_views

STATE_MAGIC, STATE_VERSION = 20240327, 2
_HEADER_INTS = 256


def write_debug_state(path, model: GPT2, x, y) -> float:
    """Run forward(x, y) and backward on `model` and write llm.c's debug-state file; returns the loss."""
    loss = model.forward(x, y)
    model.zero_grad()
    model.backward()
    V = model.config.vocab_size
    write_debug_state_arrays(path, x, y, device.to_host(model.logits)[..., :V], loss,
                             device.to_host(model.gradient()))
    return loss


def write_debug_state_arrays(path, x, y, logits, loss, grads) -> None:
    """Write llm.c's debug-state file from arrays computed anywhere (PyTorch, say): x, y (B, T) ints,
    logits (B, T, V), loss a float, grads the flat float32 gradient buffer in llm.c's order (dwte (Vp, C))."""
    x = np.ascontiguousarray(device.to_host(x), dtype="<i4")
    y = np.ascontiguousarray(device.to_host(y), dtype="<i4")
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must both have shape (B, T), got {x.shape} and {y.shape}")
    logits = np.ascontiguousarray(logits, dtype="<f4")
    if logits.ndim != 3 or logits.shape[:2] != x.shape:
        raise ValueError(f"logits must have shape (B, T, V) = {x.shape} + (V,), got {logits.shape}")
    header = np.zeros(_HEADER_INTS, dtype="<i4")
    header[:4] = [STATE_MAGIC, STATE_VERSION, x.shape[0], x.shape[1]]
    parts = (header, x, y, logits, np.array([loss], dtype="<f4"), np.ascontiguousarray(np.ravel(grads), dtype="<f4"))
    atomic_write(os.fspath(path), lambda f: [f.write(a.tobytes()) for a in parts])


def read_debug_state(path, config: GPT2Config) -> dict:
    """Read llm.c's debug-state file: {x (B, T) int32, y, logits (B, T, V), loss float, grads {name: array}}.

    The header's B and T are checked against the file's size (for this model's V and parameter count) before
    anything is allocated; every error names the file.
    """
    size = os.path.getsize(path)
    if size < _HEADER_INTS * 4:
        raise ValueError(f"{path}: {size} bytes is too short for the 1024-byte header of a debug state")
    V, n = config.vocab_size, num_parameters(config)
    with open(os.fspath(path), "rb") as f:
        header = np.frombuffer(f.read(_HEADER_INTS * 4), dtype="<i4")
        if header[0] != STATE_MAGIC:
            raise ValueError(f"{path}: bad magic {header[0]} (an llm.c debug-state file starts with {STATE_MAGIC})")
        if header[1] != STATE_VERSION:
            raise ValueError(f"{path}: state version {header[1]}, expected {STATE_VERSION} (the padded-vocab format)")
        B, T = int(header[2]), int(header[3])
        if B < 1 or T < 1:
            raise ValueError(f"{path}: the header says B = {B}, T = {T}; a debug state holds a batch of at least "
                             f"one token (B, T >= 1): the header is damaged")
        if T > config.max_seq_len:
            raise ValueError(f"{path}: the header says T = {T}, longer than the model's context of "
                             f"{config.max_seq_len}: the header is damaged, or the state belongs to another model")
        expected = _HEADER_INTS * 4 + 4 * (2 * B * T + B * T * V + 1 + n)
        if size != expected:
            if size > expected:
                why = "it belongs to a larger model, or has data appended"
            else:
                end, part = _HEADER_INTS * 4, None
                for part, count in (("x", B * T), ("y", B * T), ("the logits", B * T * V), ("the loss", 1),
                                    ("the gradients", n)):
                    end += 4 * count
                    if size < end:
                        break
                why = f"it ends inside {part}: cut short, or it belongs to a smaller model"
            raise ValueError(f"{path}: with B = {B}, T = {T} (its header) and this model's V = {V} and {n:,} "
                             f"parameters the file should be {expected:,} bytes, but it is {size:,}: {why}")
        x = np.fromfile(f, dtype="<i4", count=B * T).reshape(B, T)
        y = np.fromfile(f, dtype="<i4", count=B * T).reshape(B, T)
        logits = np.fromfile(f, dtype="<f4", count=B * T * V).reshape(B, T, V)
        loss = float(np.fromfile(f, dtype="<f4", count=1)[0])
        grads = np.fromfile(f, dtype="<f4", count=n)
    return dict(B=B, T=T, x=x, y=y, logits=logits, loss=loss,
                grads=point_views(grads, parameter_shapes(config)))


@dataclass
class Comparison:
    name: str
    max_diff: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_diff) and self.max_diff <= self.tol)


def compare(model: GPT2, state: dict, rtol: float = 1e-3, atol: float = 1e-5,
            llmc_tolerances: bool = False) -> list:
    """One forward/backward of `model` on the state's batch; a Comparison per tensor (logits, loss, 16 grads)."""
    loss = model.forward(state["x"], state["y"])
    model.zero_grad()
    model.backward()
    V = model.config.vocab_size

    def row(name, ours, expected, llmc_tol):
        ours, expected = np.asarray(ours, np.float64), np.asarray(expected, np.float64)
        diff = float(np.max(np.abs(ours - expected))) if ours.size else 0.0
        if np.isnan(ours).any():
            diff = float("nan")
        tol = llmc_tol if llmc_tolerances else atol + rtol * float(np.max(np.abs(expected), initial=0.0))
        return Comparison(name, diff, tol)

    rows = [row("logits", device.to_host(model.logits)[..., :V], state["logits"], 1e-2),
            row("loss", loss, state["loss"], 1e-2)]
    for name in PARAMETER_NAMES:
        rows.append(row("d" + name, device.to_host(model.gradient(name)), state["grads"][name], 2e-2))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmc_lessons.verify", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="llm.c model file (e.g. gpt2_124M.bin)")
    parser.add_argument("state", help="llm.c debug-state file (e.g. gpt2_124M_debug_state.bin)")
    parser.add_argument("--backend", choices=("numpy", "kernels"), default=None,
                        help="NumPy references or the course's kernels (default: kernels on a GPU, NumPy on a CPU)")
    parser.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance (of the tensor's max |value|)")
    parser.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance added to it")
    parser.add_argument("--llmc-tolerances", action="store_true",
                        help="llm.c's test_gpt2 tolerances instead: 1e-2 (logits, loss), 2e-2 (gradients), absolute")
    args = parser.parse_args(argv)

    model = GPT2.from_llmc_checkpoint(args.model, backend=args.backend)
    c = model.config
    print(f"[GPT-2] max_seq_len {c.max_seq_len}, vocab_size {c.vocab_size}, padded_vocab_size "
          f"{c.padded_vocab_size}, num_layers {c.num_layers}, num_heads {c.num_heads}, channels {c.channels}; "
          f"{model.num_parameters:,} parameters; {'kernels' if model.use_kernels else 'NumPy'} path")
    state = read_debug_state(args.state, c)
    print(f"[State] batch_size {state['B']}, seq_len {state['T']}, expected loss {state['loss']:.6f}")
    tol_text = ("llm.c's absolute tolerances" if args.llmc_tolerances
                else f"tolerance = {args.atol:g} + {args.rtol:g} * max|expected|")
    print(f"{'tensor':<10} {'max |diff|':>12} {'tolerance':>12}  result   ({tol_text})")
    rows = compare(model, state, args.rtol, args.atol, args.llmc_tolerances)
    for r in rows:
        print(f"{r.name:<10} {r.max_diff:>12.3e} {r.tol:>12.3e}  {'OK' if r.ok else 'NOT OK'}")
    allok = all(r.ok for r in rows)
    print(f"overall okay: {int(allok)}")
    return 0 if allok else 1


if __name__ == "__main__":
    sys.exit(main())
