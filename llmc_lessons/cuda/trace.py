"""Memory access traces: what every warp of a launch loads and stores, and what that costs on an NVIDIA GPU.

    t = kernel(grid, block, args, trace=True)      # a Trace (on a GPU too: the emulator records it)
    with recording() as traces:                    # or every launch inside, e.g. of a layer's launcher
        matmul_forward_cuda(...)
    print(t)                                       # per source line: requests, sectors, efficiency, bank conflicts
    t.requests, t.per_thread("global", "load"), t.element_counts("inp")

A traced launch runs in the emulator a build of the kernel in which the compiler puts a call before every load and
store (the instrumentation of -fsanitize=thread, answered by the emulator's runtime, not by ThreadSanitizer); the
runtime records each access to shared memory and to the argument arrays: which thread, which instruction, which
address, how many bytes, load, store or atomic. On a GPU the emulator runs on copies of the arguments, then the GPU
runs the launch as usual. Launches without tracing run the usual build, untouched.

From the record, as NVIDIA GPUs since Volta handle memory:
- a warp's *request* is the k-th execution of one instruction by each of its lanes; the lanes that skip it (a
  branch, a partial warp) are inactive in it.
- global memory moves 32-byte *sectors* of 128-byte *cache lines*: a request costs the distinct sectors its lanes
  touch. Its *efficiency* is the distinct bytes the lanes ask for over the bytes of those sectors.
- shared memory has 32 *banks* of 4-byte words (word w in bank w % 32). A request takes as many *wavefronts* as the
  most distinct words any bank must deliver (lanes that read the same word share it: a broadcast). An 8-byte
  access goes in two phases (half-warps, lanes 0-15 and 16-31), a 16-byte one in four (quarter-warps), each
  phase needing its own wavefronts; a request is *n-way* conflicted when one of its phases needs n wavefronts,
  and its *conflicts* are the wavefronts beyond one per phase.

Addresses are those of a virtual GPU: each argument array starts 256-byte aligned (as cudaMalloc's), a view at
its offset in the array it views; shared memory addresses are byte offsets in the block's shared memory. The blocks
run one after another, so a trace holds the same numbers on every run and machine with the same compiler. The
build is compiled at -O1 (values stay in registers, nothing is vectorised), so each access of the source is one
access, as nvcc compiles it; where the two compilers differ (a value loaded twice that nvcc loads once), the
counts follow the C++ compiler. Lanes are taken to run each instruction together, as a converged warp does.
"""
from __future__ import annotations

import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from llmc_lessons import device
from llmc_lessons.cuda import emulator

SECTOR, CACHE_LINE, BANKS, BANK_BYTES = 32, 128, 32, 4
OPS = ("load", "store", "atomic")
SPACES = ("global", "shared")

recorders: list[list] = []
"""The lists of the recording() blocks open now: every launch appends its Trace to each."""

last: "Trace | None" = None
"""The last traced launch's Trace (what a memory check of an exercise saw, for a student to look at)."""


@contextmanager
def recording():
    """Trace every kernel launch inside the block: `with recording() as traces: ...`, then traces[i] is a Trace."""
    traces: list[Trace] = []
    recorders.append(traces)
    try:
        yield traces
    finally:
        recorders.remove(traces)


@dataclass(frozen=True)
class TracedArray:
    """An argument array of a traced launch: its parameter's name, where it lies on the virtual GPU."""
    name: str
    index: int       # which argument
    address: int     # of its first byte
    nbytes: int
    itemsize: int

    def holds(self, address) -> np.ndarray:
        return (address >= self.address) & (address < self.address + self.nbytes)


@dataclass(frozen=True)
class SourceLine:
    """A line of the kernel's source that made accesses."""
    file: str        # as the compiler names it: a path, or "<RawKernel source>"
    line: int        # 0 where the line tables do not tell
    text: str

    def __str__(self) -> str:
        name = self.file if self.file.startswith("<") else Path(self.file).name
        return f"{name}:{self.line}"


class Requests:
    """The warp requests of a trace, in the order their first access was made; every attribute is an array with
    one entry a request: block (linear index), warp (in the block), line (index into Trace.lines), pc (the
    instruction), shared (bool), array (index into Trace.arrays of the array its first access is in, -1 for
    shared memory or none), op (0 load, 1 store, 2 atomic), size (bytes a lane), lanes (active lanes),
    sectors and cache_lines (global), bytes_used (global: distinct bytes asked for), wavefronts, phases and ways
    (shared)."""

    def __init__(self, **columns):
        self.__dict__.update(columns)

    def __len__(self) -> int:
        return len(self.block)


def _distinct_per_group(groups, values, ngroups, weights=None):
    """For each group, the number (or the sum of `weights`) of distinct `values` among its entries."""
    if len(groups) == 0:
        return np.zeros(ngroups, np.int64 if weights is None else np.float64)
    o = np.lexsort((values, groups))
    g, v = groups[o], values[o]
    new = np.ones(len(o), bool)
    new[1:] = (g[1:] != g[:-1]) | (v[1:] != v[:-1])
    return np.bincount(g[new], weights=None if weights is None else weights[o][new], minlength=ngroups)


def _spread(groups, lo, hi, unit):
    """(group, unit index) for every `unit`-byte unit that the byte ranges [lo, hi) touch."""
    first, last = lo // unit, (hi - 1) // unit
    span = last - first + 1
    starts = np.cumsum(span) - span
    within = np.arange(int(span.sum())) - np.repeat(starts, span)
    return np.repeat(groups, span), np.repeat(first, span) + within


class Trace:
    """The memory accesses of one launch and what they cost (see the module's docstring); print it for a view
    per source line, like a profiler's source view."""

    def __init__(self, kernel: str, grid: tuple, block: tuple, arrays: list[TracedArray], records: np.ndarray,
                 lines: list[SourceLine], line_of_pc: dict[int, int]):
        self.kernel, self.grid, self.block = kernel, tuple(grid), tuple(block)
        self.arrays = arrays
        self.records = records                  # emulator.TRACE_RECORD, in the order they were made
        self.lines = lines
        self._line_of_pc = line_of_pc
        self.threads_per_block = int(np.prod(block))
        self.nblocks = int(np.prod(grid))

    # ------------------------------------------------------------------------------------------------------
    # Per record
    @cached_property
    def _columns(self):
        r = self.records
        flags = r["flags"]
        op = np.where(flags & emulator.TRACE_ATOMIC, 2, flags & emulator.TRACE_STORE).astype(np.int8)
        pcs = r["pc"].astype(np.int64)
        uniq, inv = np.unique(pcs, return_inverse=True)
        line = np.array([self._line_of_pc[int(p)] for p in uniq], np.int64)[inv] if len(uniq) else pcs
        return dict(addr=r["addr"].astype(np.int64), size=r["size"].astype(np.int64), pc=pcs,
                    block=r["block"].astype(np.int64), tid=r["tid"].astype(np.int64), op=op,
                    shared=(flags & emulator.TRACE_SHARED) != 0, line=line)

    @cached_property
    def request_of_record(self) -> np.ndarray:
        """For each record, the request (index into `requests`) it belongs to."""
        c = self._columns
        n = len(self.records)
        if n == 0:
            return np.zeros(0, np.int64)
        block, tid, pc = c["block"], c["tid"], c["pc"]
        # k: how many times the thread ran this instruction before
        o = np.lexsort((np.arange(n), pc, tid, block))
        new = np.ones(n, bool)
        new[1:] = (block[o][1:] != block[o][:-1]) | (tid[o][1:] != tid[o][:-1]) | (pc[o][1:] != pc[o][:-1])
        start = np.maximum.accumulate(np.where(new, np.arange(n), 0))
        k = np.empty(n, np.int64)
        k[o] = np.arange(n) - start
        # a request: the k-th run of one instruction by each lane of a warp
        warp = tid >> 5
        o = np.lexsort((tid & 31, k, pc, warp, block))
        key = (block[o], warp[o], pc[o], k[o])
        new = np.ones(n, bool)
        new[1:] = np.any([a[1:] != a[:-1] for a in key], axis=0)
        group = np.cumsum(new) - 1
        first = np.minimum.reduceat(o, np.flatnonzero(new))      # each group's earliest record
        number = np.empty(len(first), np.int64)
        number[np.argsort(first, kind="stable")] = np.arange(len(first))
        rid = np.empty(n, np.int64)
        rid[o] = number[group]
        return rid

    @cached_property
    def _by_request(self) -> tuple[np.ndarray, np.ndarray]:
        """Record indices sorted by (request, lane), and where each request's records start in them."""
        rid = self.request_of_record
        o = np.lexsort((self._columns["tid"] & 31, rid))
        starts = np.searchsorted(rid[o], np.arange(int(rid.max(initial=-1)) + 2))
        return o, starts

    @cached_property
    def requests(self) -> Requests:
        c = self._columns
        rid = self.request_of_record
        n = int(rid.max(initial=-1)) + 1
        o, starts = self._by_request
        head = o[starts[:-1]]                                   # a record of each request
        lanes = np.diff(starts)
        size = np.zeros(n, np.int64)
        np.maximum.at(size, rid, c["size"])
        req = dict(block=c["block"][head], warp=c["tid"][head] >> 5, line=c["line"][head], pc=c["pc"][head],
                   shared=c["shared"][head], op=c["op"][head], size=size, lanes=lanes,
                   array=np.full(n, -1, np.int64))
        for i, a in enumerate(self.arrays):
            req["array"][a.holds(c["addr"][head]) & ~c["shared"][head]] = i
        # global memory: distinct sectors and cache lines, distinct bytes asked for
        g = ~c["shared"]
        q, lo, sz = rid[g], c["addr"][g], c["size"][g]
        req["sectors"] = _distinct_per_group(*_spread(q, lo, lo + sz, SECTOR), n)
        req["cache_lines"] = _distinct_per_group(*_spread(q, lo, lo + sz, CACHE_LINE), n)
        req["bytes_used"] = _distinct_per_group(q, lo * 256 + sz, n, weights=sz.astype(np.float64)).astype(np.int64)
        # shared memory: phases of 32, 16 or 8 lanes; the words each bank must deliver in each phase
        s = c["shared"]
        q, lo, sz, lane = rid[s], c["addr"][s], c["size"][s], c["tid"][s] & 31
        phase = lane // (32 // np.where(sz <= 4, 1, np.where(sz <= 8, 2, 4)))
        qp, word = _spread(q * 4 + phase, lo, lo + sz, BANK_BYTES)
        pairs = np.unique(np.stack([qp, word]), axis=1) if len(qp) else np.zeros((2, 0), np.int64)
        banks, per_bank = np.unique(pairs[0] * BANKS + pairs[1] % BANKS, return_counts=True)
        wave = np.zeros(4 * n, np.int64)
        np.maximum.at(wave, banks // BANKS, per_bank)            # per (request, phase): its wavefronts
        used = wave > 0
        req["wavefronts"] = np.bincount(np.flatnonzero(used) // 4, weights=wave[used], minlength=n).astype(np.int64)
        req["phases"] = np.bincount(np.flatnonzero(used) // 4, minlength=n)
        req["ways"] = wave.reshape(n, 4).max(axis=1)
        return Requests(**req)

    # ------------------------------------------------------------------------------------------------------
    # Questions a check or a lesson asks
    def _mask(self, space: str, op: str) -> np.ndarray:
        if space not in SPACES or op not in OPS:
            raise ValueError(f"space must be one of {SPACES} and op one of {OPS}, got {space!r}, {op!r}")
        c = self._columns
        return (c["shared"] == (space == "shared")) & (c["op"] == OPS.index(op))

    def coordinates(self, block: int, thread: int) -> tuple[tuple, tuple]:
        """(blockIdx, threadIdx) of a linear block and thread index."""
        (gx, gy, _), (bx, by, _) = self.grid, self.block
        block, thread = int(block), int(thread)
        return ((block % gx, block // gx % gy, block // (gx * gy)),
                (thread % bx, thread // bx % by, thread // (bx * by)))

    def per_thread(self, space: str, op: str) -> np.ndarray:
        """(blocks, threads per block): how many accesses of `space` ("global", "shared") and `op` ("load",
        "store", "atomic") each thread made (blocks and threads in linear order, x fastest)."""
        c = self._columns
        m = self._mask(space, op)
        flat = np.bincount(c["block"][m] * self.threads_per_block + c["tid"][m],
                           minlength=self.nblocks * self.threads_per_block)
        return flat.reshape(self.nblocks, self.threads_per_block)

    def array(self, name: str) -> TracedArray:
        for a in self.arrays:
            if a.name == name:
                return a
        raise KeyError(f"kernel '{self.kernel}' has no array argument {name!r} "
                       f"(its arrays: {', '.join(a.name for a in self.arrays)})")

    def element_counts(self, name: str, op: str = "load", per_block: bool = False) -> np.ndarray:
        """How many times each element of argument array `name` was accessed by `op`: an array of its number of
        elements, or (blocks, elements) with per_block=True. A wider access (a float4) counts for each element."""
        a = self.array(name)
        c = self._columns
        m = self._mask("global", op) & a.holds(c["addr"])
        block, first = _spread(c["block"][m], c["addr"][m] - a.address, c["addr"][m] - a.address + c["size"][m],
                               a.itemsize)
        n = a.nbytes // a.itemsize
        keep = first < n
        if per_block:
            return np.bincount(block[keep] * n + first[keep], minlength=self.nblocks * n).reshape(self.nblocks, n)
        return np.bincount(first[keep], minlength=n)

    def traffic(self, name: str, op: str | None = None) -> dict:
        """The global requests to argument array `name` (of `op`, or all): their number, the sectors they move and
        the distinct bytes they ask for."""
        q = self.requests
        m = (q.array == self.arrays.index(self.array(name))) & (True if op is None else q.op == OPS.index(op))
        return dict(requests=int(m.sum()), sectors=int(q.sectors[m].sum()), bytes_used=int(q.bytes_used[m].sum()))

    def where(self, address: int, shared: bool) -> str:
        """An address as the kernel names it: `inp[37]`, `inp[37] + 2 bytes`, or `shared byte 128`."""
        if shared:
            return f"shared byte {address}"
        for a in self.arrays:
            if a.address <= address < a.address + a.nbytes:
                i, rest = divmod(address - a.address, a.itemsize)
                return f"{a.name}[{i}]" + (f" + {rest} bytes" if rest else "")
        near = min(self.arrays, key=lambda a: abs(address - a.address))
        return f"{near.name} {address - near.address:+d} bytes (outside it)"

    def accesses(self, request: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lanes, addresses, sizes) of one request, by lane."""
        o, starts = self._by_request
        idx = o[starts[request]:starts[request + 1]]
        c = self._columns
        return c["tid"][idx] & 31, c["addr"][idx], c["size"][idx]

    # ------------------------------------------------------------------------------------------------------
    # The source view
    def summary(self) -> list[dict]:
        """One row per (source line, memory, op): instructions, requests, accesses, sectors, bytes used, shared
        wavefronts, phases and the worst ways, in the order of the source."""
        q = self.requests
        rows = {}
        for key in sorted(set(zip(q.line.tolist(), q.shared.tolist(), q.op.tolist())),
                          key=lambda k: (self.lines[k[0]].file, self.lines[k[0]].line, k[1], k[2])):
            m = (q.line == key[0]) & (q.shared == key[1]) & (q.op == key[2])
            rows[key] = dict(line=self.lines[key[0]], memory=SPACES[key[1]], op=OPS[key[2]],
                             instructions=len(np.unique(q.pc[m])), requests=int(m.sum()),
                             accesses=int(q.lanes[m].sum()), sectors=int(q.sectors[m].sum()),
                             bytes_used=int(q.bytes_used[m].sum()), wavefronts=int(q.wavefronts[m].sum()),
                             phases=int(q.phases[m].sum()), ways=int(q.ways[m].max()))
        return list(rows.values())

    def report(self, width: int = 52) -> str:
        """The source view as text: per line and kind of access, requests, lanes per request, sectors per request
        and efficiency (global), wavefronts per request and the worst n-way bank conflict (shared)."""
        rows = self.summary()
        head = (f"kernel '{self.kernel}', grid {self.grid}, block {self.block}: {len(self.records):,} accesses in "
                f"{len(self.requests):,} warp requests")
        if not rows:
            return head + " (none to global or shared memory)"
        w = max(len(str(r["line"])) for r in rows)
        out = [head, f"{'line':>{w}}  {'memory':6} {'op':6} {'requests':>8} {'lanes/req':>9} {'sectors/req':>11} "
                     f"{'efficiency':>10} {'wavefr/req':>10} {'ways':>4}  source"]
        last = None
        for r in rows:
            n = r["requests"]
            glob = r["memory"] == "global"
            text = r["line"].text.strip()
            text = text if len(text) <= width else text[:width - 3] + "..."
            out.append(f"{str(r['line']) if r['line'] != last else '':>{w}}  {r['memory']:6} {r['op']:6} {n:>8,} "
                       f"{r['accesses'] / n:>9.1f} "
                       + (f"{r['sectors'] / n:>11.2f} {r['bytes_used'] / (SECTOR * r['sectors']):>10.0%} "
                          f"{'':>10} {'':>4}" if glob else
                          f"{'':>11} {'':>10} {r['wavefronts'] / n:>10.2f} {r['ways']:>4}")
                       + (f"  {text}" if r["line"] != last else ""))
            last = r["line"]
        out.append(self._totals())
        return "\n".join(out)

    def _totals(self) -> str:
        q = self.requests
        g, s = ~q.shared, q.shared
        parts = []
        if g.any():
            parts.append(f"global: {int(g.sum()):,} requests, {int(q.sectors[g].sum()):,} sectors, "
                         f"efficiency {q.bytes_used[g].sum() / max(1, SECTOR * q.sectors[g].sum()):.0%}")
        if s.any():
            extra = int((q.wavefronts[s] - q.phases[s]).sum())
            parts.append(f"shared: {int(s.sum()):,} requests, {int(q.wavefronts[s].sum()):,} wavefronts "
                         f"({extra:,} from bank conflicts)")
        return "total " + "; ".join(parts)

    def __str__(self) -> str:
        return self.report()

    def __repr__(self) -> str:
        return f"<Trace of kernel '{self.kernel}': {len(self.records):,} accesses>"

    def _repr_pretty_(self, p, cycle) -> None:   # IPython shows the source view
        p.text(self.report())


# ---------------------------------------------------------------------------------------------------------
# Tracing a launch


def _root(a) -> tuple[object, int]:
    """The array `a` is a view of (itself if none), and `a`'s byte offset in it."""
    if device.on_gpu() and not isinstance(a, np.ndarray):
        return a.data.mem, a.data.ptr - a.data.mem.ptr
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    return root, a.ctypes.data - root.ctypes.data


def _virtual_addresses(args) -> list[int]:
    """Per argument, the address of its first byte on a virtual GPU (0 for scalars and null pointers): each
    distinct array at its own multiple of 2**36, a view at its offset in the array it views."""
    bases, out = {}, []
    for a in args:
        if a is None or isinstance(a, np.generic):
            out.append(0)
            continue
        root, offset = _root(a)
        base = bases.setdefault(id(root), (len(bases) + 1) << 36)
        out.append(base + offset)
    return out


@lru_cache(maxsize=64)
def _source_lines(lib: str, pcs: tuple) -> list:
    """For each pc, the (file, line) of the kernel's source it belongs to, from the library's line tables: the
    innermost frame outside the emulator's own headers; ("?", 0) where they do not tell."""
    tool = shutil.which("addr2line") or shutil.which("llvm-addr2line")
    found = {}
    if tool and pcs:
        res = subprocess.run([tool, "-e", lib, "-i", "-a", *[hex(p - 1) for p in pcs]], capture_output=True, text=True)
        current = None
        for text in res.stdout.splitlines():
            if text.startswith("0x"):
                current = int(text, 16) + 1
                continue
            file, _, line = text.split(" (discriminator")[0].rpartition(":")
            if current in found or not line.isdigit() or line == "0":
                continue
            file = file[file.index("<"):] if "<" in file else file
            if not file.startswith(str(emulator.HERE)) and "thunks>" not in file:
                found[current] = (file, int(line))
    return [found.get(p, ("?", 0)) for p in pcs]


def launch(kernel, grid, block, args, shared_mem: int, shared_limit: int) -> tuple[Trace, str]:
    """Run `kernel` (a RawKernel) in the emulator with tracing; return its Trace and what it printed. On a GPU it
    runs on host copies of the arguments, which it leaves as they were."""
    module = emulator.built_module(kernel.code, kernel.filename, kernel.options, kernel.name_expressions, traced=True)
    vaddr = _virtual_addresses(args)
    if device.on_gpu():
        args = [a if a is None or isinstance(a, np.generic) else device.to_host(a) for a in args]
    out, records = emulator.launch_traced(module, kernel.signature, grid, block, args, shared_mem, shared_limit,
                                          vaddr)
    arrays = [TracedArray(p.name, i, v, a.nbytes, a.itemsize)
              for i, (p, a, v) in enumerate(zip(kernel.signature.params, args, vaddr))
              if p.pointer and a is not None]
    pcs = tuple(int(p) for p in np.unique(records["pc"]))
    places = _source_lines(str(module.path), pcs)
    texts = {kernel.filename: kernel.code.split("\n")}
    lines, index, line_of_pc = [], {}, {}
    for pc, (file, number) in zip(pcs, places):
        if file not in texts:
            texts[file] = Path(file).read_text(errors="replace").split("\n") if Path(file).is_file() else []
        key = (file, number or -pc)                       # an instruction of no known line stands alone
        if key not in index:
            body = texts[file][number - 1] if 0 < number <= len(texts[file]) else f"(instruction {pc:#x})"
            index[key] = len(lines)
            lines.append(SourceLine(file, number, body))
        line_of_pc[pc] = index[key]
    global last
    trace = last = Trace(kernel.name, grid, block, arrays, records, lines, line_of_pc)
    for r in recorders:
        r.append(trace)
    return trace, out
