"""Data-parallel training (lesson 17): collectives between ranks, a launcher, and one rank's share of a step.

Every rank (one process; on GPUs one per GPU) holds the whole model and takes a slice of the global batch. After
the backward the ranks average their gradients, so every rank applies the same update (llm.c's multi-GPU
trainer). With ZeRO-1 (llm.c's `-z 1`) each rank keeps AdamW's m and v for one shard of the flat parameters only:
the gradients are reduce-scattered (each rank receives the average of its shard), each rank updates its shard,
and an all-gather hands every rank the whole updated parameters.

Collectives, one small interface with two backends:
  * `Nccl`: NCCL through CuPy (`cupy.cuda.nccl`) on GPU arrays, one process per GPU;
  * `Gloo`: torch.distributed's gloo backend on NumPy arrays, for the CPU (tests, lesson 17);
  * `Single`: one rank, nothing to communicate.
Ranks find each other through the environment variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); `launch` starts N local processes with them (`python -m llmc_lessons.train --ranks N`
on the CPU, `--gpus N` on GPUs). A rank that fails ends the run: the launcher stops the others, and a gloo
collective gives up after LLMC_DIST_TIMEOUT seconds (300 by default) instead of waiting forever.
"""
from __future__ import annotations

import ctypes
import datetime
import math
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from llmc_lessons import device
from llmc_lessons.layers.adamw import global_norm, global_norm_cuda, global_norm_squared_cuda
from llmc_lessons.layers.bf16 import float_to_bf16_cuda
from llmc_lessons.precision import from_bf16

TIMEOUT_S = float(os.environ.get("LLMC_DIST_TIMEOUT", "300"))
"""Seconds a rank waits at a collective (gloo) or for the others to start before it gives up with an error."""


# ---------------------------------------------------------------------------------------------------------
# Where this process stands: torchrun's environment variables


def environment() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from RANK, WORLD_SIZE, LOCAL_RANK; (0, 1, 0) when WORLD_SIZE is unset."""
    def number(name, default):
        text = os.environ.get(name, default)
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name}={text!r}: must be an integer") from None
    world = number("WORLD_SIZE", "1")
    rank, local = number("RANK", "0"), number("LOCAL_RANK", os.environ.get("RANK", "0"))
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: need 0 <= RANK < WORLD_SIZE")
    if world > 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise ValueError(f"WORLD_SIZE={world} needs MASTER_ADDR and MASTER_PORT (where rank 0 listens), as "
                         f"torchrun sets them; or start the ranks with --ranks N / --gpus N")
    return rank, world, local


# ---------------------------------------------------------------------------------------------------------
# Collectives


class Collectives:
    """What the ranks do together. Arrays are 1-D, C-contiguous float32 or float64, of the backend's kind
    (NumPy for gloo, CuPy for NCCL); every rank calls the same collectives in the same order."""
    rank, world_size = 0, 1

    def all_reduce(self, x, op: str = "sum"):
        """x <- the sum (op="sum") or mean (op="mean") of every rank's x, in place; returns x."""
        raise NotImplementedError

    def reduce_scatter(self, x):
        """x (world_size * S,) -> (S,): chunk `rank` of the sum of every rank's x."""
        raise NotImplementedError

    def all_gather(self, shard):
        """shard (S,) -> (world_size * S,): every rank's shard, in rank order."""
        raise NotImplementedError

    def broadcast(self, x, root: int = 0):
        """x <- root's x, in place; returns x."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Return once every rank has reached its barrier."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of the connection (the last call)."""

    def _check(self, name, x, module, divisible=False):
        kind = "NumPy" if module is np else "CuPy"
        if not isinstance(x, module.ndarray):
            raise TypeError(f"{name}: the {type(self).__name__} backend takes {kind} arrays, got "
                            f"{type(x).__module__}.{type(x).__name__}")
        if x.ndim != 1 or not x.flags.c_contiguous or x.dtype not in (np.float32, np.float64):
            raise ValueError(f"{name}: needs a 1-D C-contiguous float32 or float64 array, got {x.dtype} of shape "
                             f"{x.shape}{'' if x.flags.c_contiguous else ', not contiguous'}")
        if divisible and x.size % self.world_size:
            raise ValueError(f"{name}: {x.size} elements do not split into {self.world_size} equal chunks")

    def _check_op(self, op):
        if op not in ("sum", "mean"):
            raise ValueError(f"all_reduce: op must be 'sum' or 'mean', got {op!r}")


class Single(Collectives):
    """One rank: every collective leaves the data as it is."""

    def all_reduce(self, x, op="sum"):
        self._check_op(op)
        return x

    def reduce_scatter(self, x):
        return x

    def all_gather(self, shard):
        return shard

    def broadcast(self, x, root=0):
        return x

    def barrier(self):
        pass


class Gloo(Collectives):
    """torch.distributed's gloo backend on NumPy arrays (shared with torch, no copies): the CPU's collectives."""

    def __init__(self, rank: int, world_size: int, timeout_s: float = TIMEOUT_S):
        import torch
        import torch.distributed as dist
        self.torch, self.dist = torch, dist
        self.rank, self.world_size = rank, world_size
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        # reduce_scatter_single and all_gather_single are the newer names of the same collectives
        self._reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        self._all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def all_reduce(self, x, op="sum"):
        self._check("all_reduce", x, np)
        self._check_op(op)
        self.dist.all_reduce(self.torch.from_numpy(x))
        if op == "mean":
            x /= self.world_size
        return x

    def reduce_scatter(self, x):
        self._check("reduce_scatter", x, np, divisible=True)
        out = np.empty(x.size // self.world_size, x.dtype)
        self._reduce_scatter(self.torch.from_numpy(out), self.torch.from_numpy(x))
        return out

    def all_gather(self, shard):
        self._check("all_gather", shard, np)
        out = np.empty(shard.size * self.world_size, shard.dtype)
        self._all_gather(self.torch.from_numpy(out), self.torch.from_numpy(shard))
        return out

    def broadcast(self, x, root=0):
        self._check("broadcast", x, np)
        self.dist.broadcast(self.torch.from_numpy(x), src=root)
        return x

    def barrier(self):
        self.dist.barrier()

    def close(self):
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


class Nccl(Collectives):
    """NCCL through CuPy on the current GPU's arrays, on the current stream (in order with the kernels).

    Rank 0 makes NCCL's unique id; the launcher hands it to every rank in LLMC_NCCL_ID, and ranks started by
    torchrun read it from torch's TCPStore at MASTER_ADDR:MASTER_PORT."""

    def __init__(self, rank: int, world_size: int, timeout_s: float = TIMEOUT_S):
        from cupy.cuda import nccl
        self.nccl, self.rank, self.world_size = nccl, rank, world_size
        text = os.environ.get("LLMC_NCCL_ID")
        if text is None:
            from torch.distributed import TCPStore
            # under torchrun its agent serves the store at MASTER_PORT already: every rank is then a client
            agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                             is_master=rank == 0 and not agent, timeout=datetime.timedelta(seconds=timeout_s))
            if rank == 0:
                store.set("llmc_nccl_id", nccl_id_text())
            text = store.get("llmc_nccl_id").decode()
        self.comm = nccl.NcclCommunicator(world_size, tuple(int(s) for s in text.split(",")), rank)

    def _type(self, x):
        return self.nccl.NCCL_FLOAT32 if x.dtype == np.float32 else self.nccl.NCCL_FLOAT64

    @staticmethod
    def _stream():
        return device.xp.cuda.get_current_stream().ptr

    def all_reduce(self, x, op="sum"):
        self._check("all_reduce", x, device.xp)
        self._check_op(op)
        self.comm.allReduce(x.data.ptr, x.data.ptr, x.size, self._type(x), self.nccl.NCCL_SUM, self._stream())
        if op == "mean":
            x /= self.world_size
        return x

    def reduce_scatter(self, x):
        self._check("reduce_scatter", x, device.xp, divisible=True)
        out = device.xp.empty(x.size // self.world_size, x.dtype)
        self.comm.reduceScatter(x.data.ptr, out.data.ptr, out.size, self._type(x), self.nccl.NCCL_SUM,
                                self._stream())
        return out

    def all_gather(self, shard):
        self._check("all_gather", shard, device.xp)
        out = device.xp.empty(shard.size * self.world_size, shard.dtype)
        self.comm.allGather(shard.data.ptr, out.data.ptr, shard.size, self._type(shard), self._stream())
        return out

    def broadcast(self, x, root=0):
        self._check("broadcast", x, device.xp)
        self.comm.bcast(x.data.ptr, x.size, self._type(x), root, self._stream())
        return x

    def barrier(self):
        self.all_reduce(device.xp.zeros(1, np.float32))
        device.synchronize()

    def close(self):
        self.comm.destroy()


def nccl_id_text() -> str:
    """A fresh NCCL unique id as text (128 comma-separated integers), for LLMC_NCCL_ID."""
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        raise RuntimeError(f"--gpus needs NCCL, which this CuPy cannot load ({e}); CuPy's installation guide "
                           f"says how to add it (e.g. the nvidia-nccl-cu12 wheel)") from None
    return ",".join(str(int(b)) for b in nccl.get_unique_id())


def connect(backend: str, timeout_s: float = TIMEOUT_S) -> Collectives:
    """This process's collectives, from the environment: Single when WORLD_SIZE is 1 or unset, else the
    backend's ("gloo" for NumPy arrays, "nccl" for CuPy arrays)."""
    rank, world, _ = environment()
    if world == 1:
        return Single()
    if backend == "gloo":
        return Gloo(rank, world, timeout_s)
    if backend == "nccl":
        return Nccl(rank, world, timeout_s)
    raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")


# ---------------------------------------------------------------------------------------------------------
# The ring, on simulated ranks (lesson 17): what NCCL's ring all-reduce does, step by step
#
# chunks[r][c] is rank r's copy of chunk c (a 1-D array) of the data it reduces; N ranks cut their data into
# N chunks the same way. A step is one round of messages: each rank sends one chunk to its right neighbour
# (r + 1) % N and receives one from its left neighbour (r - 1) % N. N - 1 reduce-scatter steps leave rank r with
# the sum over all ranks of chunk (r + 1) % N; N - 1 all-gather steps then hand every sum to every rank.


def ring_reduce_scatter_step(chunks: list, step: int) -> list:
    """Step `step` (0 .. N-2) of the ring reduce-scatter: rank r sends chunk (r - step) % N to rank (r + 1) % N,
    which adds it into its own copy of that chunk. Returns the new chunks (the input is left as it is)."""
    N = len(chunks)
    new = [[c.copy() for c in rank] for rank in chunks]
    for r in range(N):
        c = (r - step) % N
        new[(r + 1) % N][c] += chunks[r][c]
    return new


def ring_all_gather_step(chunks: list, step: int) -> list:
    """Step `step` (0 .. N-2) of the ring all-gather: rank r sends chunk (r + 1 - step) % N, whose sum it holds,
    to rank (r + 1) % N, which replaces its own copy with it. Returns the new chunks."""
    N = len(chunks)
    new = [[c.copy() for c in rank] for rank in chunks]
    for r in range(N):
        c = (r + 1 - step) % N
        new[(r + 1) % N][c] = chunks[r][c].copy()
    return new


# ---------------------------------------------------------------------------------------------------------
# The launcher


def _die_with_parent():   # runs in the child before it starts: the kernel kills it when the launcher dies
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except OSError:
        pass   # not Linux: the launcher's own clean-up (below) still ends the ranks


def free_port() -> int:
    """A TCP port that is free on this host now, for rank 0 to listen on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list, nprocs: int, gpus: bool = False, grace_s: float = 10.0) -> int:
    """Run `python *command` as `nprocs` local ranks and wait for them; returns 0, or the exit code of the
    first rank that failed.

    Each rank gets RANK = LOCAL_RANK = its number, WORLD_SIZE, MASTER_ADDR/PORT, and LLMC_DEVICE (gpu with
    gpus=True, one GPU per rank, and LLMC_NCCL_ID; cpu otherwise). When a rank fails the others are stopped
    (SIGTERM, then SIGKILL after grace_s); the ranks never outlive the launcher."""
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be an integer >= 1, got {nprocs!r}")
    env = dict(os.environ, WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), LLMC_DEVICE="gpu" if gpus else "cpu")
    if gpus:
        env["LLMC_NCCL_ID"] = nccl_id_text()
    procs, exits = [], None
    try:
        for r in range(nprocs):
            procs.append(subprocess.Popen([sys.executable, *command], preexec_fn=_die_with_parent,
                                          env=dict(env, RANK=str(r), LOCAL_RANK=str(r))))
        exits = _exits(procs)
        for r, code in exits:
            if code:
                running = any(p.poll() is None for p in procs)
                print(f"rank {r} failed (exit code {code})" + (": stopping the other ranks" if running else ""),
                      file=sys.stderr)
                return code
        return 0
    finally:
        if exits is not None:
            exits.close()
        _stop(procs, grace_s)


def _exits(procs):
    """(rank, exit code) of each process as it ends, in the order they end. A rank that fails because another
    rank left (its collective loses a peer) ends a moment after it: polling every rank in turn can see both ended
    at once and name the wrong one first. On Linux each rank has a pidfd, which epoll reports in the order they
    became readable, that is, ended; elsewhere (or where pidfd_open is refused) the ranks are polled every 50 ms."""
    import select
    left, fds, poller = set(range(len(procs))), {}, None
    try:
        try:
            poller = select.epoll()
            for r, p in enumerate(procs):
                fd = os.pidfd_open(p.pid)
                fds[fd] = r
                poller.register(fd, select.EPOLLIN)
        except (AttributeError, OSError):      # not Linux, a kernel before 5.3, or pidfd_open refused (seccomp)
            if poller is not None:
                poller.close()
                poller = None
        while left:
            if poller is not None:
                ended = []
                for fd, _ in poller.poll(1.0):
                    poller.unregister(fd)       # readable from now on: reported once
                    ended.append(fds[fd])
            else:
                ended = [r for r in sorted(left) if procs[r].poll() is not None]
                if not ended:
                    time.sleep(0.05)
            for r in ended:
                left.discard(r)
                yield r, procs[r].wait()
    finally:
        if poller is not None:
            poller.close()
        for fd in fds:
            os.close(fd)


def _stop(procs, grace_s: float) -> None:
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in running:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ---------------------------------------------------------------------------------------------------------
# One rank's share of a data-parallel step


class DataParallel:
    """One rank's part in a data-parallel step over `comm`: its rows of the global batch, split into grad_accum
    micro-batches; the averaging of the gradients; the AdamW update (ZeRO-1: of its shard only).

    The flat parameters (N floats) are cut into world_size shards of S = ceil(N / world_size): rank r owns
    [r*S, min((r+1)*S, N)). With zero_stage=1 (and more than one rank) the model keeps m and v for that shard only.
    """

    MEAN_CHUNK = 1 << 24
    """bf16 gradients are averaged this many at a time through a float32 buffer of this size (64 MiB), not all at
    once: a float32 copy of every gradient would take back the memory that bf16 gradients save."""

    def __init__(self, comm: Collectives, num_parameters: int, grad_accum: int = 1, zero_stage: int = 1):
        if zero_stage not in (0, 1):
            raise ValueError(f"zero_stage must be 0 or 1, got {zero_stage!r}")
        self.comm, self.grad_accum = comm, int(grad_accum)
        R, N = comm.world_size, num_parameters
        self.num_parameters, self.shard_size = N, math.ceil(N / R)
        self.lo = min(comm.rank * self.shard_size, N)
        self.hi = min(self.lo + self.shard_size, N)
        self.sharded = zero_stage == 1 and R > 1
        self._padded = None     # (R*S,) for the reduce-scatter and all-gather: N is rarely a multiple of R
        self._chunk = None      # float32, for averaging bf16 gradients a piece at a time (_mean_bf16)

    def check_batch(self, B: int) -> None:
        """Raise ValueError unless the global batch of B rows splits into world_size * grad_accum equal pieces."""
        parts = self.comm.world_size * self.grad_accum
        if B % parts:
            raise ValueError(f"--batch-size {B}: the global batch must split evenly into {self.comm.world_size} "
                             f"rank(s) x {self.grad_accum} micro-batch(es) = {parts} pieces")

    def micro_batches(self, x, y) -> list:
        """This rank's rows of the global batch (B, T), as grad_accum (x, y) pairs of B / (world_size * grad_accum)
        rows: rank r takes the r-th of world_size equal blocks of rows."""
        self.check_batch(x.shape[0])
        rows = x.shape[0] // self.comm.world_size
        x, y = (a[self.comm.rank * rows:(self.comm.rank + 1) * rows] for a in (x, y))
        b = rows // self.grad_accum
        return [(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]) for i in range(self.grad_accum)]

    def mean(self, model, total: float, count: int) -> float:
        """The mean over every rank of `total` (this rank's sum of `count` micro-batch losses), a float."""
        if self.comm.world_size == 1:
            return total / count
        s = self.comm.all_reduce(model.xp.asarray([total], dtype=np.float64))
        return float(device.to_host(s)[0]) / (count * self.comm.world_size)

    def reduce_gradients(self, model) -> float:
        """Turn each rank's summed micro-batch gradients into the global batch's mean gradient (all of it, or
        with ZeRO-1 this rank's shard, in model.grads_memory[lo:hi]); returns the global gradient norm."""
        xp, g, R = model.xp, model.grads_memory, self.comm.world_size
        scale = np.float32(1.0 / (R * self.grad_accum))
        # The bf16 step's gradients are bf16 bits (llm.c's layout): they are summed and scaled in float32 and
        # rounded to bf16 once at the end.
        bf16 = g.dtype == np.uint16
        if not self.sharded:
            if bf16:
                if R > 1 or scale != 1:
                    self._mean_bf16(xp, g, scale)
            else:
                self.comm.all_reduce(g)
                if scale != 1:
                    g *= scale
            return self._norm(model, g, reduce=False)
        if self._padded is None:
            self._padded = xp.zeros(R * self.shard_size, dtype=np.float32)
        if bf16:
            from_bf16(g, out=self._padded[:self.num_parameters])
        else:
            self._padded[:self.num_parameters] = g
        shard = self.comm.reduce_scatter(self._padded)[:self.hi - self.lo]
        shard *= scale
        if bf16:
            float_to_bf16_cuda(shard, out=g[self.lo:self.hi])
        else:
            g[self.lo:self.hi] = shard
        return self._norm(model, g[self.lo:self.hi], reduce=True)

    def _mean_bf16(self, xp, g, scale) -> None:
        """g (bf16 bits) <- scale times the sum over ranks of g, taken in float32 and rounded to bf16 once."""
        if self._chunk is None:
            self._chunk = xp.empty(min(g.size, self.MEAN_CHUNK), dtype=np.float32)
        for lo in range(0, g.size, self._chunk.size):
            piece = g[lo:lo + self._chunk.size]
            values = from_bf16(piece, out=self._chunk[:piece.size])
            self.comm.all_reduce(values)
            values *= scale
            float_to_bf16_cuda(values, out=piece)

    def _norm(self, model, g, reduce: bool) -> float:
        if not reduce:
            return global_norm_cuda(g) if model.use_kernels else global_norm(g)
        if model.use_kernels:
            squares = global_norm_squared_cuda(g).astype(np.float64)
        else:
            squares = np.array([global_norm(g) ** 2])
        return math.sqrt(float(device.to_host(self.comm.all_reduce(squares))[0]))

    def update(self, model, lr: float, weight_decay: float, grad_scale: float) -> None:
        """AdamW on every parameter, or with ZeRO-1 on this rank's shard followed by the all-gather that gives
        every rank all of the updated parameters."""
        if not self.sharded:
            model.update(lr, weight_decay=weight_decay, grad_scale=grad_scale)
            return
        model.update(lr, weight_decay=weight_decay, grad_scale=grad_scale, shard=(self.lo, self.hi))
        self._padded[:self.hi - self.lo] = model.params_memory[self.lo:self.hi]
        full = self.comm.all_gather(self._padded[:self.shard_size])
        model.params_memory[...] = full[:self.num_parameters]
        model.sync_params()

    def full_moments(self, model) -> tuple:
        """AdamW's m and v of every parameter as host arrays (None, None before the first update); with ZeRO-1
        every rank must call it (an all-gather)."""
        if model.m_memory is None:
            return None, None
        if not self.sharded:
            return device.to_host(model.m_memory), device.to_host(model.v_memory)
        out = []
        for moment in (model.m_memory, model.v_memory):
            piece = model.xp.zeros(self.shard_size, dtype=np.float32)
            piece[:self.hi - self.lo] = moment
            out.append(device.to_host(self.comm.all_gather(piece))[:self.num_parameters])
        return tuple(out)

    def load_moments(self, model, m, v) -> None:
        """Give the model AdamW's state from full host arrays m, v (N,): all of it, or this rank's shard."""
        if m is None:
            model.m_memory = model.v_memory = None
            return
        if self.sharded:
            m, v = m[self.lo:self.hi], v[self.lo:self.hi]
        model.m_memory, model.v_memory = (model.xp.asarray(np.ascontiguousarray(a)) for a in (m, v))
        model.moments_start = self.lo if self.sharded else 0

