"""GPT-2 assembled from the course's layers, with llm.c's parameter layout and file format.

The model keeps all of its parameters in ONE contiguous float32 buffer (`params_memory`, as llm.c's
`params_memory`), with 16 named views into it (`params["wte"]`, ..., `params["lnfb"]`) in llm.c's order
(llmc_lessons/parameters.py). Gradients live in a second buffer of the same layout (`grads_memory`,
`grads[...]`; float32, or bf16 bits in bf16 as in llm.c: `gradient(name)` gives float32 values either way),
and so do AdamW's two moment buffers, so that the optimizer can run over flat memory.

The forward, backward and update are computed by one of three execution paths (llmc_lessons/paths.py):
  * the NumPy reference path (`use_kernels=False`): the layers' NumPy references, on the host;
  * the fp32 kernel path (`use_kernels=True`): the layers' `*_cuda` launchers, on backend arrays
    (`llmc_lessons.device.xp`): CUDA kernels through CuPy on a GPU, the same kernels through the CPU emulator
    otherwise;
  * the bf16 kernel path (`precision="bf16"`, lesson 14).
By default a model takes the kernel path on a GPU and the NumPy path on a CPU (where the emulator is correct
but slow); pass `backend="numpy"` or `backend="kernels"` to choose. This module holds what is common to the
three: the buffers, the checks of the token ids, the CUDA graphs of lesson 12, and llm.c's checkpoint files.
Sampling is in llmc_lessons/sampling.py, the activation-memory table in llmc_lessons/activations.py and the
gradient check of the whole model in llmc_lessons/gradcheck_gpt2.py.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import numpy as np

from llmc_lessons import device
from llmc_lessons.files import atomic_write
from llmc_lessons.parameters import (BLOCK_PARAMETER_NAMES, GPT2Config, decay_runs, gpt2_init, num_parameters,
                                     parameter_shapes, point_views)
from llmc_lessons.paths import Bf16KernelPath, Fp32KernelPath, NumpyPath
from llmc_lessons.perf import capture_graph
from llmc_lessons.precision import from_bf16, tf32_enabled

# ---------------------------------------------------------------------------------------------------------
# The model

MODEL_MAGIC, _MODEL_VERSION_FP32, _MODEL_VERSION_BF16 = 20240326, 3, 5
LLAMA_MODEL_MAGIC = 20261206   # the course's LLaMA-style model files (llmc_lessons/llama.py): not GPT-2's layout
_HEADER_INTS = 256
# a model file's magic -> what the file is, and the loader that reads it
_MODEL_FILES = {MODEL_MAGIC: ("an llm.c GPT-2 model file", "GPT2.from_llmc_checkpoint"),
                LLAMA_MODEL_MAGIC: ("a LLaMA-style model file", "llmc_lessons.llama.Llama.from_llmc_checkpoint")}


@contextmanager
def model_file(path, magic: int):
    """Open a model file whose header must start with `magic` (MODEL_MAGIC or LLAMA_MODEL_MAGIC) -> (the open
    file, just past the 256 int32 header; the header; the file's size in bytes). A file of the other model names
    the loader that reads it."""
    with open(path, "rb") as f:
        file_bytes = os.fstat(f.fileno()).st_size
        header = np.frombuffer(f.read(_HEADER_INTS * 4), dtype="<i4")
        if header.size != _HEADER_INTS:
            raise ValueError(f"{path}: too short for the 1024-byte header of a model file")
        what, loader = _MODEL_FILES[magic]
        if header[0] != magic and int(header[0]) in _MODEL_FILES:
            other, other_loader = _MODEL_FILES[int(header[0])]
            raise ValueError(f"{path}: this is {other} (magic {header[0]}): load it with {other_loader}, "
                             f"not {loader}")
        if header[0] != magic:
            raise ValueError(f"{path}: bad magic {header[0]} ({what} starts with {magic})")
        yield f, header, file_bytes


def write_model_file(path, header, params_memory):
    """Write a model file atomically (never half a file under `path`): the int32 header, then the flat parameters
    as float32; returns the path."""
    def write(f):
        f.write(header.tobytes())
        f.write(np.ascontiguousarray(device.to_host(params_memory), dtype="<f4").tobytes())
    return atomic_write(path, write)


class GPT2:
    """GPT-2 with llm.c's memory layout: forward(idx, targets) -> mean loss, backward(), update(...).

    What is GPT-2's own (its config, parameter layout, initialisation and execution paths) sits in the class
    attributes and `_path`, which the LLaMA-style model (llmc_lessons/llama.py) replaces; the rest is shared."""
    config_type = GPT2Config
    parameter_shapes = staticmethod(parameter_shapes)
    init_params = staticmethod(gpt2_init)
    decay_runs = staticmethod(decay_runs)
    block_parameter_names = BLOCK_PARAMETER_NAMES

    def __init__(self, config: GPT2Config, seed: int | None = 0, backend: str | None = None,
                 precision: str = "fp32", parts: dict | None = None):
        """Build a model with GPT-2's initialisation (seeded), or with zeros when seed is None.

        backend: "numpy" (reference layers on the host), "kernels" (the course's CUDA kernels, through CuPy
        on a GPU or the emulator on a CPU), or None for the default: kernels on a GPU, NumPy on a CPU.
        precision: "fp32", or "bf16" (lesson 14, kernels only): bf16 activations, bf16 copies of the weights
        for the forward and backward and bf16 weight gradients, float32 master weights and AdamW moments (llm.c's
        layout).
        parts: the student's parts ({key: llmc_lessons.parts.Part}, from parts.load_all()): their NumPy functions
        on the NumPy path, their kernels on the fp32 kernel path, the package's for every part not in it.
        """
        if not isinstance(config, self.config_type):
            raise TypeError(f"config must be a {self.config_type.__name__}, got {type(config).__name__}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        if precision == "bf16" and device.bf16_unsupported():
            warnings.warn(f"precision='bf16' falls back to 'fp32': {device.bf16_unsupported()}", stacklevel=2)
            precision = "fp32"
        if precision == "bf16":
            if backend == "numpy":
                raise ValueError("precision='bf16' runs the bf16 kernels: use backend='kernels' (or None)")
            backend = "kernels"
        if backend is None:
            backend = "kernels" if device.on_gpu() else "numpy"
        if backend not in ("numpy", "kernels"):
            raise ValueError(f"backend must be 'numpy' or 'kernels' (or None), got {backend!r}")
        # the execution path: forward, backward and update (llmc_lessons/paths.py)
        if parts and precision == "bf16":
            raise ValueError("the student's parts run in fp32: precision='bf16' takes no parts")
        self.path = self._path(precision, backend, parts)
        self.path.check(config)
        self.config = config
        self.precision = precision
        self.step = 0               # AdamW steps taken (t of the last update)
        self.params_bf16_memory = self.params_bf16 = None   # precision "bf16": the weights' bf16 copy
        self.param_shapes = self.parameter_shapes(config)
        self.num_parameters = sum(int(np.prod(shape)) for shape in self.param_shapes.values())
        self.matmul_version = "cublas"  # kernel path: "cublas", or 1, 2, 3 for the course's own matmul kernels
        host = np.zeros(self.num_parameters, dtype=np.float32)
        if seed is not None:
            self.init_params(point_views(host, self.param_shapes), config, seed)
        self._set_params_memory(host)
        self.grads_memory = None    # allocated by the first zero_grad() or backward(), as in llm.c
        self.grads = None
        self.m_memory = self.v_memory = None  # AdamW moments, allocated by the first update()
        self.moments_start = 0      # the parameter that m_memory[0] belongs to (ZeRO-1 keeps a shard: lesson 17)
        self.logits = None          # (B, T, Vp) from the last forward
        self.keep_logits = True     # False: on the kernel path a forward with targets lets the fused classifier
                                    # overwrite the logits with dlogits (no copy; self.logits is then None)
        self.losses = None          # (B, T) from the last forward with targets
        self.mean_loss = None       # float, or None after a forward without targets
        self._cache = None
        self._backward_ready = None   # after a forward with targets and before its backward: "launches", or
                                      # "graph" when the forward was a graph's replay
        self.recompute = 0          # kernel paths: 1 recomputes the GELU's output in the backward instead of keeping
                                    # it, 2 the LayerNorms' outputs too (llm.c's -r; paths.RECOMPUTED)
        self.cuda_graph = False     # True (on a GPU, kernel paths): record forward-with-loss and backward into
                                    # CUDA graphs at the second step of a (B, T) and replay them after that
        self._graphs = None         # those graphs and the arrays they read and write (see _graph_forward)

    @staticmethod
    def _path(precision: str, backend: str, parts: dict | None = None):
        """The execution path (llmc_lessons/paths.py) of this precision and backend, with the student's parts."""
        if precision == "bf16":
            return Bf16KernelPath()
        return Fp32KernelPath(parts) if backend == "kernels" else NumpyPath(parts)

    # -- memory ---------------------------------------------------------------------------------------------

    @property
    def xp(self):
        """The array module of this model's arrays: NumPy on the reference path, the backend's otherwise."""
        return self.path.xp

    def _asarray(self, a, dtype=np.float32):
        if self.xp is np:
            return np.ascontiguousarray(device.to_host(a), dtype=dtype)
        return device.xp.ascontiguousarray(device.xp.asarray(a, dtype=dtype))

    def _set_params_memory(self, flat):
        self._graphs = None         # a recorded graph would read the old buffer
        self.params_memory = self._asarray(flat)
        self.params = point_views(self.params_memory, self.param_shapes)
        self.sync_params()

    def sync_params(self):
        """precision "bf16": make the bf16 copy of the weights match params_memory again (call it after writing
        into params_memory in place; Bf16KernelPath.sync_params says how it rounds). A no-op in fp32."""
        self.path.sync_params(self)

    @property
    def use_kernels(self) -> bool:
        """True: forward/backward run the course's kernels. False: the NumPy references. Settable."""
        return self.path.on_backend

    @use_kernels.setter
    def use_kernels(self, value: bool):
        value = bool(value)
        if value == self.path.on_backend:
            return
        if self.precision == "bf16":
            raise ValueError("a precision='bf16' model runs the bf16 kernels only")
        self.path = self._path("fp32", "kernels" if value else "numpy", self.path.parts)
        # Move every buffer to the new path's array module (a no-op on the CPU, where both are NumPy).
        self._set_params_memory(self.params_memory)
        if self.grads_memory is not None:
            self.grads_memory = self._asarray(self.grads_memory)
            self.grads = point_views(self.grads_memory, self.param_shapes)
        if self.m_memory is not None:
            self.m_memory, self.v_memory = self._asarray(self.m_memory), self._asarray(self.v_memory)
        self.logits = self.losses = self.mean_loss = self._cache = self._backward_ready = None

    def layer_params(self, l: int, grads: bool = False) -> dict:
        """Layer l's tensors (GPT-2's 12) as the dict block_forward/block_backward take (views, no copies)."""
        source = self.grads if grads else self.params
        return {name: source[name][l] for name in self.block_parameter_names}

    # -- forward --------------------------------------------------------------------------------------------

    def _host_tokens(self, name, a):
        """Check (B, T) token ids in [0, V) on the host; return them as a C-contiguous int32 host array."""
        host = np.asarray(device.to_host(a))
        if host.ndim != 2:
            raise ValueError(f"{name} must have shape (B, T), got {host.shape}")
        if not np.issubdtype(host.dtype, np.integer):
            raise TypeError(f"{name} must hold integer token ids, got dtype {host.dtype}")
        if host.shape[1] > self.config.max_seq_len:
            raise ValueError(f"{name} has T={host.shape[1]} > max_seq_len={self.config.max_seq_len}")
        if host.size and (host.min() < 0 or host.max() >= self.config.vocab_size):
            raise ValueError(f"{name} must hold token ids in [0, {self.config.vocab_size}), "
                             f"found {host.min()}..{host.max()}")
        return np.ascontiguousarray(host, dtype=np.int32)

    def forward(self, idx, targets=None):
        """idx, targets: integer (B, T). Returns the mean cross-entropy loss (a float), or None without targets.

        Keeps what backward needs; self.logits is (B, T, Vp) (columns V..Vp-1 are real matmul outputs of the
        zero padded rows of wte; softmax and the loss never see them).
        """
        host_idx = self._host_tokens("idx", idx)
        if targets is not None:
            host_targets = self._host_tokens("targets", targets)
            if host_targets.shape != host_idx.shape:
                raise ValueError(f"targets must have the shape of idx {host_idx.shape}, got {host_targets.shape}")
        # Let go of the previous forward's activations first: holding them while the new ones are made would
        # double the peak memory (two steps' activations at once).
        self.logits = self.losses = self._cache = self.mean_loss = self._backward_ready = None
        if targets is not None and self._graph_ready(host_idx.shape):
            mean = self._graph_forward(host_idx, host_targets)
            ready = "graph"
        else:
            idx = self._asarray(host_idx, dtype=np.int32)
            self.logits, self.losses, self._cache = self.path.forward(
                self, idx, None if targets is None else self._asarray(host_targets, dtype=np.int32))
            if targets is None:
                return None
            mean, ready = self.losses.mean(), "launches"
        self.path.after_forward(self, self._cache, host_idx)
        self._backward_ready = ready
        self.mean_loss = float(mean)
        return self.mean_loss

    __call__ = forward

    # -- backward -------------------------------------------------------------------------------------------

    def zero_grad(self):
        """Set every gradient to zero (allocating the gradient buffer on first use)."""
        if self.grads_memory is None:
            self.grads_memory = self.xp.zeros(self.num_parameters, dtype=self.path.grad_dtype)
            self.grads = point_views(self.grads_memory, self.param_shapes)
        else:
            self.grads_memory[...] = 0

    def gradient(self, name: str | None = None):
        """The gradient of parameter `name` (of every parameter, flat, when None) as float32 values: a view of
        the gradient buffer, or, in bf16 (where the gradients are bf16 bits, as in llm.c), a float32 copy."""
        g = self.grads_memory if name is None else self.grads[name]
        return from_bf16(g) if g.dtype == np.uint16 else g

    def backward(self):
        """Add d(mean loss)/d(parameter) into self.grads (gradients accumulate, as in llm.c: zero_grad first).

        On the kernel paths a forward allows one backward: the backward lets go of dlogits, the largest
        activation, as soon as it has used them (the peak memory is lower by (B, T, Vp) floats)."""
        if self._cache is None or self.mean_loss is None:
            raise RuntimeError("backward() needs a forward(idx, targets) with targets first")
        if self.path.on_backend and not self._backward_ready:
            raise RuntimeError("on the kernel path each forward allows one backward (it frees the dlogits that the "
                               "fused classifier wrote): run forward(idx, targets) again first")
        ready, self._backward_ready = self._backward_ready, None
        if self.grads_memory is None:
            self.zero_grad()
        dres = self._graph_backward() if ready == "graph" else self.path.backward(self, self._cache)
        self.path.finish_backward(self, self._cache, dres)

    # -- CUDA graphs ----------------------------------------------------------------------------------------
    #
    # A training step launches about 380 kernels from Python, tens of microseconds of host work each; where
    # kernels are short the GPU waits for Python. A CUDA graph records the launches once and replays them all
    # with one call (lesson 12). The recording needs fixed addresses: the token ids are copied into the same
    # two buffers at every step, and the activations live where the recording allocated them. Replays run on
    # the current stream, in order with everything else the step does.

    def _graph_ready(self, shape) -> bool:
        """Whether this forward (with targets, ids of this shape) goes through a graph.

        What a recording depends on makes its key: the shape, the path, the TF32 switch, and the addresses of
        the parameters and gradients. The first forward at a key runs as usual (every kernel gets compiled,
        cuBLAS picks its algorithms; the first step also allocates the gradients, which changes the key once).
        The second records, every later one replays."""
        if not (self.cuda_graph and self.path.on_backend and device.on_gpu()):
            return False
        def ptr(a):
            return None if a is None else device.address(a)
        key = (shape, self.precision, self.matmul_version, tf32_enabled(), self.keep_logits, self.recompute,
               ptr(self.params_memory), ptr(self.params_bf16_memory), ptr(self.grads_memory))
        if self._graphs is None or self._graphs["key"] != key:
            self._graphs = dict(key=key, forward_graph=None)   # drops an older recording
            return False
        return True

    def _graph_forward(self, host_idx, host_targets):
        """The forward with its loss through a CUDA graph (recorded at the first call); returns the mean loss,
        a device scalar."""
        xp = device.xp
        g = self._graphs
        if g["forward_graph"] is None:
            # The recording allocates on a stream of its own, from memory that nothing else is given: free
            # what the first step left in the pool so that the step's memory is not held twice.
            xp.get_default_memory_pool().free_all_blocks()
            g["idx"], g["targets"] = xp.empty(host_idx.shape, np.int32), xp.empty(host_idx.shape, np.int32)
            run = self.path.forward

            def forward():
                logits, losses, cache = run(self, g["idx"], g["targets"])
                g["outputs"] = logits, losses, cache, losses.mean()

            g["forward_graph"], g["stream"] = capture_graph(forward)
            g["backward_graph"] = None
        g["idx"].set(host_idx)
        g["targets"].set(host_targets)
        g["forward_graph"].launch()
        logits, self.losses, cache, mean = g["outputs"]
        self.logits = logits
        # forward() adds this step's token buckets; dlogits stay with the recording, whose backward frees them
        self._cache = {name: a for name, a in cache.items() if name != "dlogits"}
        return mean

    def _graph_backward(self):
        """The backward of a recorded forward (all but the encoder's): recorded at its first call, replayed
        after. Returns the gradient of the residual stream at the encoder's output."""
        g = self._graphs
        if g["backward_graph"] is None:
            cache = g["outputs"][2]        # the recording's own activations (its dlogits are freed inside)
            run = self.path.backward

            def backward():
                g["dres"] = run(self, cache)

            g["backward_graph"], _ = capture_graph(backward, stream=g["stream"])
        g["backward_graph"].launch()
        return g["dres"]

    # -- AdamW ----------------------------------------------------------------------------------------------

    def update(self, learning_rate: float, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8,
               weight_decay: float = 0.0, t: int | None = None, grad_scale: float = 1.0, shard=None):
        """One AdamW step on every parameter (llm.c's gpt2_update); t counts from 1 (default: previous t + 1).

        Weight decay applies to DECAYED_PARAMETER_NAMES only. grad_scale multiplies every gradient first (the
        clip factor of llmc_lessons.layers.adamw.clip_grad_norm). The update runs over the flat buffers, one
        call per run of neighbouring tensors that share a weight decay (10 runs in llm.c's order).
        shard=(lo, hi): ZeRO-1 (lesson 17), update only the flat parameters lo..hi-1, whose m and v alone the
        model keeps (m_memory[0] is parameter lo).
        """
        if self.grads_memory is None:
            raise RuntimeError("update() needs gradients: call forward(idx, targets) and backward() first")
        t = self.step + 1 if t is None else int(t)
        if t < 1:
            raise ValueError(f"t counts AdamW steps from 1, got {t}")
        lo, hi = (0, self.num_parameters) if shard is None else (int(shard[0]), int(shard[1]))
        if not 0 <= lo <= hi <= self.num_parameters:
            raise ValueError(f"shard {shard}: must be (lo, hi) with 0 <= lo <= hi <= {self.num_parameters}")
        if self.m_memory is None:
            self.m_memory = self.xp.zeros(hi - lo, dtype=np.float32)
            self.v_memory = self.xp.zeros(hi - lo, dtype=np.float32)
            self.moments_start = lo
        if (self.moments_start, self.moments_start + self.m_memory.size) != (lo, hi):
            raise ValueError(f"AdamW's moments are those of parameters {self.moments_start}.."
                             f"{self.moments_start + self.m_memory.size - 1}, not of the shard {lo}..{hi - 1}")
        for start, stop, decays in self.decay_runs(self.config):
            start, stop = max(start, lo), min(stop, hi)
            if start < stop:
                wd = float(weight_decay) if decays else 0.0
                self.path.update(self, start, stop, t, learning_rate, beta1, beta2, eps, wd, grad_scale)
        self.step = t

    def moments(self, start: int, stop: int) -> tuple:
        """AdamW's m and v of the flat parameters start..stop-1 (views)."""
        s = slice(start - self.moments_start, stop - self.moments_start)
        return self.m_memory[s], self.v_memory[s]

    # -- llm.c checkpoint files -----------------------------------------------------------------------------

    @classmethod
    def from_llmc_checkpoint(cls, path, backend: str | None = None, precision: str = "fp32") -> "GPT2":
        """Load an llm.c model file (256 int32 header, magic 20240326; version 3 = fp32, 5 = bf16 widened)."""
        with model_file(path, MODEL_MAGIC) as (f, header, file_bytes):
            version = int(header[1])
            if version not in (_MODEL_VERSION_FP32, _MODEL_VERSION_BF16):
                raise ValueError(f"{path}: checkpoint version {version} is not supported (3 = fp32 and 5 = bf16 "
                                 f"are; older versions have an unpadded vocab: re-export with llm.c's train_gpt2.py)")
            maxT, V, L, NH, C, Vp = (int(x) for x in header[2:8])
            try:
                config = GPT2Config(max_seq_len=maxT, vocab_size=V, padded_vocab_size=Vp,
                                    num_layers=L, num_heads=NH, channels=C)
            except ValueError as e:
                raise ValueError(f"{path}: the header's sizes are not a GPT-2 model: {e}") from None
            n = num_parameters(config)
            # the file's size must match the header before anything of that size is allocated
            expected = _HEADER_INTS * 4 + n * (4 if version == _MODEL_VERSION_FP32 else 2)
            if file_bytes != expected:
                raise ValueError(f"{path}: the header describes {n:,} parameters (L={L}, C={C}, Vp={Vp}, maxT={maxT}): "
                                 f"{expected:,} bytes, but the file has {file_bytes:,}")
            if version == _MODEL_VERSION_FP32:
                flat = np.fromfile(f, dtype="<f4", count=n)
            else:  # bf16 is the top half of a float32: widen by shifting 16 bits up
                flat = (np.fromfile(f, dtype="<u2", count=n).astype(np.uint32) << 16).view(np.float32)
            if flat.size != n or f.read(1):
                raise ValueError(f"{path}: the header describes {n:,} parameters but the file holds a different "
                                 f"amount of data")
        model = cls(config, seed=None, backend=backend, precision=precision)
        model._set_params_memory(flat.astype(np.float32, copy=False))
        return model

    def save_llmc_checkpoint(self, path):
        """Write an llm.c model file (version 3, fp32) that llm.c's gpt2_build_from_checkpoint reads, atomically
        (never half a file under `path`); returns the path."""
        c = self.config
        header = np.zeros(_HEADER_INTS, dtype="<i4")
        header[:8] = [MODEL_MAGIC, _MODEL_VERSION_FP32, c.max_seq_len, c.vocab_size, c.num_layers,
                      c.num_heads, c.channels, c.padded_vocab_size]
        return write_model_file(path, header, self.params_memory)

    def __repr__(self):
        c = self.config
        return (f"GPT2(L={c.num_layers}, NH={c.num_heads}, C={c.channels}, maxT={c.max_seq_len}, V={c.vocab_size}, "
                f"Vp={c.padded_vocab_size}; {num_parameters(c, padded=False):,} parameters, "
                f"{self.num_parameters:,} with the padded vocab; "
                f"{'kernels' if self.path.on_backend else 'NumPy reference'} path"
                f"{', bf16' if self.precision == 'bf16' else ''})")
