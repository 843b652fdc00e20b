"""GPT-2 assembled from the course's layers, with llm.c's parameter layout and file format.

Read top-down in the order the data moves:

    config and parameter layout -> the GPT2 class (init, forward, backward, AdamW update, checkpoint files)
    -> activation memory table -> sampling and generation.

The model keeps all of its parameters in ONE contiguous float32 buffer (`params_memory`, as llm.c's
`params_memory`), with 16 named views into it (`params["wte"]`, ..., `params["lnfb"]`) in llm.c's order.
Gradients live in a second buffer of the same layout (`grads_memory`, `grads[...]`), and so do AdamW's two
moment buffers, so that the optimizer can run over flat memory.

Two paths compute the same model:
  * the NumPy reference path (`use_kernels=False`): the layers' NumPy references, on the host;
  * the kernel path (`use_kernels=True`): the layers' `*_cuda` launchers, on backend arrays
    (`llmc_lessons.device.xp`): CUDA kernels through CuPy on a GPU, the same kernels through the CPU emulator
    otherwise.
By default a model takes the kernel path on a GPU and the NumPy path on a CPU (where the emulator is correct
but slow); pass `backend="numpy"` or `backend="kernels"` to choose.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from llmc_lessons import device
from llmc_lessons.layers.flash_attention import BF16_HEAD_SIZES

# ---------------------------------------------------------------------------------------------------------
# Configuration and parameter layout


@dataclass(frozen=True)
class GPT2Config:
    """The six numbers llm.c's checkpoint header stores (header[2..7])."""
    max_seq_len: int = 1024         # maxT: the longest context (rows of wpe)
    vocab_size: int = 50257         # V: real tokens
    padded_vocab_size: int = 50304  # Vp: V rounded up (to a multiple of 128) so the lm_head matmul is GPU-friendly
    num_layers: int = 12            # L: transformer blocks
    num_heads: int = 12             # NH: attention heads; head size hs = C / NH
    channels: int = 768             # C: width of the residual stream

    def __post_init__(self):
        for name in ("max_seq_len", "vocab_size", "padded_vocab_size", "num_layers", "num_heads", "channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"GPT2Config.{name} must be a positive int, got {value!r}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size ({self.padded_vocab_size}) must be >= vocab_size ({self.vocab_size})")
        if self.channels % self.num_heads:
            raise ValueError(f"channels ({self.channels}) must be a multiple of num_heads ({self.num_heads})")

    @classmethod
    def from_name(cls, name: str) -> "GPT2Config":
        """A preset: 'd12' (GPT-2 124M), 'd24' (350M), 'd36' (774M), 'd48' (1558M), or 'tiny' (the CPU trainer's)."""
        presets = {
            "d12": dict(num_layers=12, num_heads=12, channels=768),
            "d24": dict(num_layers=24, num_heads=16, channels=1024),
            "d36": dict(num_layers=36, num_heads=20, channels=1280),
            "d48": dict(num_layers=48, num_heads=25, channels=1600),
            "tiny": dict(num_layers=2, num_heads=4, channels=64, max_seq_len=64),
        }
        if name not in presets:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {sorted(presets)}")
        return cls(**presets[name])

    @property
    def head_size(self) -> int:
        """hs = C / NH."""
        return self.channels // self.num_heads


PARAMETER_NAMES = ("wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
                   "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb")
"""llm.c's 16 parameter tensors, in the order they sit in memory and in the checkpoint file."""

BLOCK_PARAMETER_NAMES = PARAMETER_NAMES[2:14]
"""The 12 tensors stacked over layers: params[name][l] is layer l's tensor."""

DECAYED_PARAMETER_NAMES = ("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw")
"""AdamW's weight decay applies to the matrices only (as llm.c and its PyTorch reference do); biases and
layernorm parameters are not decayed."""


def parameter_shapes(config: GPT2Config) -> dict:
    """{name: shape} for llm.c's 16 tensors, in memory order (wte is padded to Vp rows)."""
    Vp, C, maxT, L = config.padded_vocab_size, config.channels, config.max_seq_len, config.num_layers
    return {
        "wte": (Vp, C), "wpe": (maxT, C),
        "ln1w": (L, C), "ln1b": (L, C),
        "qkvw": (L, 3 * C, C), "qkvb": (L, 3 * C),
        "attprojw": (L, C, C), "attprojb": (L, C),
        "ln2w": (L, C), "ln2b": (L, C),
        "fcw": (L, 4 * C, C), "fcb": (L, 4 * C),
        "fcprojw": (L, C, 4 * C), "fcprojb": (L, C),
        "lnfw": (C,), "lnfb": (C,),
    }


def num_parameters(config: GPT2Config, padded: bool = True) -> int:
    """Total parameter count from the shapes alone (nothing allocated).

    padded=True counts wte as (Vp, C), as llm.c allocates and reports it (124,475,904 for d12);
    padded=False counts the V real rows (124,439,808 for d12, the usual "GPT-2 124M").
    The lm_head shares wte, so it adds nothing.
    """
    total = sum(math.prod(s) for s in parameter_shapes(config).values())
    if not padded:
        total -= (config.padded_vocab_size - config.vocab_size) * config.channels
    return total


def parameter_table(config: GPT2Config) -> list:
    """Rows (name, shape, count) for the 16 tensors, in memory order."""
    return [(name, shape, math.prod(shape)) for name, shape in parameter_shapes(config).items()]


def decay_runs(config: GPT2Config) -> list:
    """(start, stop, decays) offsets into the flat buffer: maximal runs of neighbouring tensors that are all
    weight-decayed or all not, so AdamW can run over a few flat slices instead of 16 tensors."""
    runs, offset = [], 0
    for name, shape in parameter_shapes(config).items():
        n, decays = math.prod(shape), name in DECAYED_PARAMETER_NAMES
        if runs and runs[-1][2] == decays:
            runs[-1][1] += n
        else:
            runs.append([offset, offset + n, decays])
        offset += n
    return [tuple(r) for r in runs]


def _point_views(memory, shapes: dict) -> dict:
    """Named views into one flat buffer, laid out back to back in `shapes` order (llm.c's malloc_and_point)."""
    views, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        views[name] = memory[offset:offset + n].reshape(shape)
        offset += n
    return views


# ---------------------------------------------------------------------------------------------------------
# The model

_MODEL_MAGIC, _MODEL_VERSION_FP32, _MODEL_VERSION_BF16 = 20240326, 3, 5
_HEADER_INTS = 256


class GPT2:
    """GPT-2 with llm.c's memory layout: forward(idx, targets) -> mean loss, backward(), update(...)."""

    def __init__(self, config: GPT2Config, seed: int | None = 0, backend: str | None = None,
                 precision: str = "fp32"):
        """Build a model with GPT-2's initialisation (seeded), or with zeros when seed is None.

        backend: "numpy" (reference layers on the host), "kernels" (the course's CUDA kernels, through CuPy
        on a GPU or the emulator on a CPU), or None for the default: kernels on a GPU, NumPy on a CPU.
        precision: "fp32", or "bf16" (lesson 14, kernels only): bf16 activations and bf16 copies of the
        weights for the forward and backward, float32 master weights, gradients and AdamW moments.
        """
        if not isinstance(config, GPT2Config):
            raise TypeError(f"config must be a GPT2Config, got {type(config).__name__}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        if precision == "bf16" and device.bf16_unsupported():
            warnings.warn(f"precision='bf16' falls back to 'fp32': {device.bf16_unsupported()}", stacklevel=2)
            precision = "fp32"
        if precision == "bf16":
            if backend == "numpy":
                raise ValueError("precision='bf16' runs the bf16 kernels: use backend='kernels' (or None)")
            if config.channels % 8 or config.padded_vocab_size % 8:
                raise ValueError(f"precision='bf16' moves 8 bf16 values at a time: C ({config.channels}) and Vp "
                                 f"({config.padded_vocab_size}) must be multiples of 8")
            if config.head_size not in BF16_HEAD_SIZES:
                raise ValueError(f"precision='bf16' runs attention on the tensor cores, for a head size in "
                                 f"{BF16_HEAD_SIZES}; this config has {config.head_size}")
            backend = "kernels"
        if backend is None:
            backend = "kernels" if device.on_gpu() else "numpy"
        if backend not in ("numpy", "kernels"):
            raise ValueError(f"backend must be 'numpy' or 'kernels' (or None), got {backend!r}")
        self.config = config
        self.precision = precision
        self.step = 0               # AdamW steps taken (t of the last update)
        self.params_bf16_memory = self.params_bf16 = None   # precision "bf16": the weights' bf16 copy
        self.param_shapes = parameter_shapes(config)
        self.num_parameters = num_parameters(config, padded=True)
        self._use_kernels = backend == "kernels"
        self.matmul_version = "cublas"  # kernel path: "cublas", or 1, 2, 3 for the course's own matmul kernels
        host = np.zeros(self.num_parameters, dtype=np.float32)
        if seed is not None:
            _gpt2_init(_point_views(host, self.param_shapes), config, seed)
        self._set_params_memory(host)
        self.grads_memory = None    # allocated by the first zero_grad() or backward(), as in llm.c
        self.grads = None
        self.m_memory = self.v_memory = None  # AdamW moments, allocated by the first update()
        self.logits = None          # (B, T, Vp) from the last forward
        self.keep_logits = True     # False: on the kernel path a forward with targets lets the fused classifier
                                    # overwrite the logits with dlogits (no copy; self.logits is then None)
        self.losses = None          # (B, T) from the last forward with targets
        self.mean_loss = None       # float, or None after a forward without targets
        self._cache = None
        self._backward_ready = None   # after a forward with targets and before its backward: "launches", or
                                      # "graph" when the forward was a graph's replay
        self.cuda_graph = False     # True (on a GPU, kernel paths): record forward-with-loss and backward into
                                    # CUDA graphs at the second step of a (B, T) and replay them after that
        self._graphs = None         # those graphs and the arrays they read and write (see _graph_forward)

    # -- memory ---------------------------------------------------------------------------------------------

    @property
    def xp(self):
        """The array module of this model's arrays: NumPy on the reference path, the backend's otherwise."""
        return device.xp if self._use_kernels else np

    def _asarray(self, a, dtype=np.float32):
        if self.xp is np:
            return np.ascontiguousarray(device.to_host(a), dtype=dtype)
        return device.xp.ascontiguousarray(device.xp.asarray(a, dtype=dtype))

    def _set_params_memory(self, flat):
        self._graphs = None         # a recorded graph would read the old buffer
        self.params_memory = self._asarray(flat)
        self.params = _point_views(self.params_memory, self.param_shapes)
        self.sync_params()

    def sync_params(self):
        """precision "bf16": make the bf16 copy of the weights match params_memory again (call it after writing
        into params_memory in place). Each tensor run is rounded as the last AdamW step rounded it
        (stochastically, with that step's seed), so a run resumed from a checkpoint continues bit for bit.
        A no-op in fp32."""
        if self.precision != "bf16":
            return
        from llmc_lessons.layers.bf16 import float_to_bf16_cuda
        if self.params_bf16_memory is None:
            self.params_bf16_memory = device.xp.empty(self.num_parameters, dtype=np.uint16)
            self.params_bf16 = _point_views(self.params_bf16_memory, self.param_shapes)
        for start, stop, _ in decay_runs(self.config):
            float_to_bf16_cuda(self.params_memory[start:stop], out=self.params_bf16_memory[start:stop],
                               stochastic=self.step > 0, seed=_rounding_seed(self.step, start))

    @property
    def use_kernels(self) -> bool:
        """True: forward/backward run the course's kernels. False: the NumPy references. Settable."""
        return self._use_kernels

    @use_kernels.setter
    def use_kernels(self, value: bool):
        value = bool(value)
        if value == self._use_kernels:
            return
        if self.precision == "bf16":
            raise ValueError("a precision='bf16' model runs the bf16 kernels only")
        self._use_kernels = value
        # Move every buffer to the new path's array module (a no-op on the CPU, where both are NumPy).
        self._set_params_memory(self.params_memory)
        if self.grads_memory is not None:
            self.grads_memory = self._asarray(self.grads_memory)
            self.grads = _point_views(self.grads_memory, self.param_shapes)
        if self.m_memory is not None:
            self.m_memory, self.v_memory = self._asarray(self.m_memory), self._asarray(self.v_memory)
        self.logits = self.losses = self.mean_loss = self._cache = self._backward_ready = None

    def layer_params(self, l: int, grads: bool = False) -> dict:
        """Layer l's 12 tensors as the dict block_forward/block_backward take (views, no copies)."""
        source = self.grads if grads else self.params
        return {name: source[name][l] for name in BLOCK_PARAMETER_NAMES}

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
            self.logits, self.losses, self._cache = self._passes()[0](
                self, idx, None if targets is None else self._asarray(host_targets, dtype=np.int32))
            if targets is None:
                return None
            mean, ready = self.losses.mean(), "launches"
        if self._use_kernels:
            # the encoder backward's token buckets, sorted here on the host so that the backward never waits
            from llmc_lessons.layers.encoder import _token_buckets
            self._cache["buckets"] = tuple(self._asarray(a, dtype=np.int32) for a in _token_buckets(host_idx))
        self._backward_ready = ready
        self.mean_loss = float(mean)
        return self.mean_loss

    __call__ = forward

    # -- backward -------------------------------------------------------------------------------------------

    def zero_grad(self):
        """Set every gradient to zero (allocating the gradient buffer on first use)."""
        if self.grads_memory is None:
            self.grads_memory = self.xp.zeros(self.num_parameters, dtype=np.float32)
            self.grads = _point_views(self.grads_memory, self.param_shapes)
        else:
            self.grads_memory[...] = 0

    def backward(self):
        """Add d(mean loss)/d(parameter) into self.grads (gradients accumulate, as in llm.c: zero_grad first).

        On the kernel paths a forward allows one backward: the backward lets go of dlogits, the largest
        activation, as soon as it has used them (the peak memory is lower by (B, T, Vp) floats)."""
        if self._cache is None or self.mean_loss is None:
            raise RuntimeError("backward() needs a forward(idx, targets) with targets first")
        if self._use_kernels and not self._backward_ready:
            raise RuntimeError("on the kernel path each forward allows one backward (it frees the dlogits that the "
                               "fused classifier wrote): run forward(idx, targets) again first")
        ready, self._backward_ready = self._backward_ready, None
        if self.grads_memory is None:
            self.zero_grad()
        if not self._use_kernels:
            return _numpy_backward(self, self._cache)
        dres = self._graph_backward() if ready == "graph" else self._passes()[1](self, self._cache)
        # The encoder's backward stays outside any graph: its token buckets change size with every batch.
        from llmc_lessons.layers.encoder import encoder_backward_cuda
        c = self.config
        encoder_backward_cuda(dres, self._cache["idx"], c.padded_vocab_size, c.max_seq_len,
                              buckets=self._cache["buckets"], dwte=self.grads["wte"], dwpe=self.grads["wpe"])

    # -- CUDA graphs ----------------------------------------------------------------------------------------
    #
    # A training step launches about 380 kernels from Python, tens of microseconds of host work each; where
    # kernels are short the GPU waits for Python. A CUDA graph records the launches once and replays them all
    # with one call (lesson 12). The recording needs fixed addresses: the token ids are copied into the same
    # two buffers at every step, and the activations live where the recording allocated them. Replays run on
    # the current stream, in order with everything else the step does.

    def _passes(self):
        """(forward, backward) of this model's path: the module functions below."""
        if self.precision == "bf16":
            return _bf16_forward, _bf16_backward
        return (_kernel_forward, _kernel_backward) if self._use_kernels else (_numpy_forward, _numpy_backward)

    def _graph_ready(self, shape) -> bool:
        """Whether this forward (with targets, ids of this shape) goes through a graph.

        What a recording depends on makes its key: the shape, the path, the TF32 switch, and the addresses of
        the parameters and gradients. The first forward at a key runs as usual (every kernel gets compiled,
        cuBLAS picks its algorithms; the first step also allocates the gradients, which changes the key once).
        The second records, every later one replays."""
        if not (self.cuda_graph and self._use_kernels and device.on_gpu()):
            return False

        from llmc_lessons.layers.matmul import tf32_enabled

        def ptr(a):
            return None if a is None else device.address(a)
        key = (shape, self.precision, self.matmul_version, tf32_enabled(), self.keep_logits,
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
            run = self._passes()[0]

            def forward():
                logits, losses, cache = run(self, g["idx"], g["targets"])
                g["outputs"] = logits, losses, cache, losses.mean()

            from llmc_lessons.perf import capture_graph
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
            run = self._passes()[1]

            def backward():
                g["dres"] = run(self, cache)

            from llmc_lessons.perf import capture_graph
            g["backward_graph"], _ = capture_graph(backward, stream=g["stream"])
        g["backward_graph"].launch()
        return g["dres"]

    # -- AdamW ----------------------------------------------------------------------------------------------

    def update(self, learning_rate: float, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8,
               weight_decay: float = 0.0, t: int | None = None, grad_scale: float = 1.0):
        """One AdamW step on every parameter (llm.c's gpt2_update); t counts from 1 (default: previous t + 1).

        Weight decay applies to DECAYED_PARAMETER_NAMES only. grad_scale multiplies every gradient first (the
        clip factor of llmc_lessons.layers.adamw.clip_grad_norm). The update runs over the flat buffers, one
        call per run of neighbouring tensors that share a weight decay (10 runs in llm.c's order).
        """
        if self.grads_memory is None:
            raise RuntimeError("update() needs gradients: call forward(idx, targets) and backward() first")
        t = self.step + 1 if t is None else int(t)
        if t < 1:
            raise ValueError(f"t counts AdamW steps from 1, got {t}")
        if self.m_memory is None:
            self.m_memory = self.xp.zeros(self.num_parameters, dtype=np.float32)
            self.v_memory = self.xp.zeros(self.num_parameters, dtype=np.float32)
        for start, stop, decays in decay_runs(self.config):
            wd = float(weight_decay) if decays else 0.0
            p, g = self.params_memory[start:stop], self.grads_memory[start:stop]
            m, v = self.m_memory[start:stop], self.v_memory[start:stop]
            if self.precision == "bf16":  # the float32 master weights, then their bf16 copy, stochastically rounded
                from llmc_lessons.layers.bf16 import adamw_update_bf16_cuda
                adamw_update_bf16_cuda(p, self.params_bf16_memory[start:stop], g, m, v, t, learning_rate, beta1,
                                       beta2, eps, wd, stochastic=True, seed=_rounding_seed(t, start),
                                       grad_scale=grad_scale)
            elif self._use_kernels:
                from llmc_lessons.layers.adamw import adamw_update_cuda
                adamw_update_cuda(p, g, m, v, t, learning_rate, beta1, beta2, eps, wd, grad_scale=grad_scale)
            else:
                from llmc_lessons.layers.adamw import adamw_update
                if grad_scale != 1.0:
                    g = g * np.float32(grad_scale)
                p[...], m[...], v[...] = adamw_update(p, g, m, v, t, learning_rate, beta1, beta2, eps, wd)
        self.step = t

    # -- llm.c checkpoint files -----------------------------------------------------------------------------

    @classmethod
    def from_llmc_checkpoint(cls, path, backend: str | None = None, precision: str = "fp32") -> "GPT2":
        """Load an llm.c model file (256 int32 header, magic 20240326; version 3 = fp32, 5 = bf16 widened)."""
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(_HEADER_INTS * 4), dtype="<i4")
            if header.size != _HEADER_INTS:
                raise ValueError(f"{path}: too short for llm.c's 1024-byte header")
            if header[0] != _MODEL_MAGIC:
                raise ValueError(f"{path}: bad magic {header[0]} (an llm.c model file starts with {_MODEL_MAGIC})")
            version = int(header[1])
            if version not in (_MODEL_VERSION_FP32, _MODEL_VERSION_BF16):
                raise ValueError(f"{path}: checkpoint version {version} is not supported (3 = fp32 and 5 = bf16 "
                                 f"are; older versions have an unpadded vocab: re-export with llm.c's train_gpt2.py)")
            maxT, V, L, NH, C, Vp = (int(x) for x in header[2:8])
            config = GPT2Config(max_seq_len=maxT, vocab_size=V, padded_vocab_size=Vp,
                                num_layers=L, num_heads=NH, channels=C)
            n = num_parameters(config)
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
        """Write an llm.c model file (version 3, fp32) that llm.c's gpt2_build_from_checkpoint reads."""
        c = self.config
        header = np.zeros(_HEADER_INTS, dtype="<i4")
        header[:8] = [_MODEL_MAGIC, _MODEL_VERSION_FP32, c.max_seq_len, c.vocab_size, c.num_layers,
                      c.num_heads, c.channels, c.padded_vocab_size]
        with open(os.fspath(path), "wb") as f:
            f.write(header.tobytes())
            f.write(np.ascontiguousarray(device.to_host(self.params_memory), dtype="<f4").tobytes())

    def __repr__(self):
        c = self.config
        return (f"GPT2(L={c.num_layers}, NH={c.num_heads}, C={c.channels}, maxT={c.max_seq_len}, V={c.vocab_size}, "
                f"Vp={c.padded_vocab_size}; {num_parameters(c, padded=False):,} parameters, "
                f"{self.num_parameters:,} with the padded vocab; "
                f"{'kernels' if self._use_kernels else 'NumPy reference'} path"
                f"{', bf16' if self.precision == 'bf16' else ''})")


def _rounding_seed(t: int, start: int) -> int:
    """The stochastic-rounding seed of AdamW step t for the tensor run starting at offset `start`."""
    return (t * 0x9E3779B1 + start) & 0xFFFFFFFF


def _gpt2_init(p: dict, config: GPT2Config, seed: int):
    """GPT-2's initialisation in place: N(0, 0.02) matrices, residual projections scaled by 1/sqrt(2L),
    zero biases, layernorm weight 1 and bias 0, padded vocab rows of wte zero."""
    rng = np.random.default_rng(seed)
    std = 0.02
    for name in ("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"):
        scale = std / math.sqrt(2 * config.num_layers) if name in ("attprojw", "fcprojw") else std
        rng.standard_normal(dtype=np.float32, out=p[name].reshape(-1))
        p[name] *= np.float32(scale)
    p["wte"][config.vocab_size:] = 0
    for name in ("ln1w", "ln2w", "lnfw"):
        p[name][...] = 1
    # biases (and layernorm biases) stay zero: the buffer starts zeroed


# ---------------------------------------------------------------------------------------------------------
# The forward and backward passes, once per path. Both mirror llm.c's gpt2_forward / gpt2_backward:
#   encoder -> L x block -> layernorm (lnf) -> matmul with wte (lm_head) -> softmax -> cross-entropy


def gpt2_forward(params: dict, config: GPT2Config, idx, targets=None):
    """The NumPy reference forward in any float dtype: -> (logits (B, T, Vp), losses (B, T) or None, cache).

    params: the 16 tensors by name (a model's `params`, or float64 copies for a gradient check).
    """
    from llmc_lessons.layers.block import block_forward
    from llmc_lessons.layers.crossentropy import crossentropy_forward, softmax_forward
    from llmc_lessons.layers.encoder import encoder_forward
    from llmc_lessons.layers.layernorm import layernorm_forward
    from llmc_lessons.layers.matmul import matmul_forward

    p = params
    encoded = encoder_forward(idx, p["wte"], p["wpe"])                  # (B, T, C)
    residual, block_caches = encoded, []
    for l in range(config.num_layers):
        layer = {name: p[name][l] for name in BLOCK_PARAMETER_NAMES}
        residual, cache = block_forward(residual, layer, config.num_heads)   # (B, T, C)
        block_caches.append(cache)
    lnf, lnf_mean, lnf_rstd = layernorm_forward(residual, p["lnfw"], p["lnfb"])  # (B, T, C), (B, T), (B, T)
    logits = matmul_forward(lnf, p["wte"])                              # (B, T, Vp): the lm_head is wte itself
    probs = softmax_forward(logits, config.vocab_size)                  # (B, T, Vp), padded columns 0
    losses = crossentropy_forward(probs, targets) if targets is not None else None  # (B, T)
    cache = dict(idx=idx, targets=targets, block_caches=block_caches, residual=residual,
                 lnf=lnf, lnf_mean=lnf_mean, lnf_rstd=lnf_rstd, probs=probs)
    return logits, losses, cache


def gpt2_backward(params: dict, config: GPT2Config, cache: dict) -> dict:
    """The NumPy reference backward of the mean loss: -> {name: gradient} for the 16 tensors (fresh arrays)."""
    from llmc_lessons.layers.block import block_backward
    from llmc_lessons.layers.crossentropy import crossentropy_softmax_backward
    from llmc_lessons.layers.encoder import encoder_backward
    from llmc_lessons.layers.layernorm import layernorm_backward
    from llmc_lessons.layers.matmul import matmul_backward

    p = params
    if cache.get("targets") is None:
        raise RuntimeError("the backward needs a forward with targets")
    B, T = cache["idx"].shape
    dtype = cache["probs"].dtype
    dlosses = np.full((B, T), 1.0 / (B * T), dtype=dtype)        # d(mean loss)/d(each position's loss)
    dlogits = crossentropy_softmax_backward(dlosses, cache["probs"], cache["targets"], config.vocab_size)
    dlnf, dwte_head, _ = matmul_backward(dlogits, cache["lnf"], p["wte"])   # the lm_head's share of dwte
    dresidual, dlnfw, dlnfb = layernorm_backward(dlnf, cache["residual"], p["lnfw"],
                                                 cache["lnf_mean"], cache["lnf_rstd"])
    grads = {name: np.zeros_like(p[name]) for name in BLOCK_PARAMETER_NAMES}
    for l in reversed(range(config.num_layers)):
        layer = {name: p[name][l] for name in BLOCK_PARAMETER_NAMES}
        dresidual, block_grads = block_backward(dresidual, cache["block_caches"][l], layer, config.num_heads)
        for name in BLOCK_PARAMETER_NAMES:
            grads[name][l] = block_grads[name]
    dwte_enc, dwpe = encoder_backward(dresidual, cache["idx"], config.padded_vocab_size, config.max_seq_len)
    grads["wte"] = dwte_head + dwte_enc      # tied weights: the lm_head's share plus the encoder's share
    grads["wpe"] = dwpe
    grads["lnfw"], grads["lnfb"] = dlnfw, dlnfb
    return {name: grads[name] for name in PARAMETER_NAMES}


def _numpy_forward(model, idx, targets):
    return gpt2_forward(model.params, model.config, idx, targets)


def _numpy_backward(model, cache):
    for name, grad in gpt2_backward(model.params, model.config, cache).items():
        model.grads[name] += grad


def _kernel_forward(model, idx, targets):
    """The forward through the course's kernels (backend arrays); the classifier is llm.c's fused kernel."""
    from llmc_lessons.layers.block import block_forward_cuda
    from llmc_lessons.layers.crossentropy import fused_classifier_cuda
    from llmc_lessons.layers.encoder import encoder_forward_cuda
    from llmc_lessons.layers.layernorm import layernorm_forward_cuda
    from llmc_lessons.layers.matmul import matmul_forward_cuda

    c, p, version = model.config, model.params, model.matmul_version
    # ids were checked on the host (_tokens): no range check that would wait for the GPU; float4 where C allows
    encoded = encoder_forward_cuda(idx, p["wte"], p["wpe"], version=2 if c.channels % 4 == 0 else 1,
                                   check_ids=False)                     # (B, T, C)
    residual, block_caches = encoded, []
    for l in range(c.num_layers):
        residual, cache = block_forward_cuda(residual, model.layer_params(l), c.num_heads, matmul_version=version)
        block_caches.append(cache)
    lnf, lnf_mean, lnf_rstd = layernorm_forward_cuda(residual, p["lnfw"], p["lnfb"])
    logits = matmul_forward_cuda(lnf, p["wte"], None, version=version)  # (B, T, Vp)
    losses = dlogits = None
    if targets is not None:
        # The fused classifier overwrites its input with dlogits (softmax - onehot) / (B T), as llm.c does;
        # it gets a copy so that model.logits survives for the caller, unless the caller does not need them
        # (the trainer: model.keep_logits = False saves a (B, T, Vp) copy, 3.3 GB at B = 16, T = 1024).
        losses, dlogits = fused_classifier_cuda(logits.copy() if model.keep_logits else logits, targets,
                                                c.vocab_size)
        if not model.keep_logits:
            logits = None
    cache = dict(idx=idx, targets=targets, block_caches=block_caches, residual=residual,
                 lnf=lnf, lnf_mean=lnf_mean, lnf_rstd=lnf_rstd, dlogits=dlogits)
    return logits, losses, cache


def _kernel_backward(model, cache):
    from llmc_lessons.layers.block import block_backward_cuda
    from llmc_lessons.layers.layernorm import layernorm_backward_cuda
    from llmc_lessons.layers.matmul import matmul_backward_cuda

    c, p, g, version = model.config, model.params, model.grads, model.matmul_version
    # dlogits came out of the fused classifier in the forward; used once, then freed
    dlnf, dwte_head, _ = matmul_backward_cuda(cache.pop("dlogits"), cache["lnf"], p["wte"], version=version,
                                              has_bias=False)
    cache["dlogits"] = None
    g["wte"] += dwte_head
    dresidual, dlnfw, dlnfb = layernorm_backward_cuda(dlnf, cache["residual"], p["lnfw"],
                                                      cache["lnf_mean"], cache["lnf_rstd"])
    g["lnfw"] += dlnfw
    g["lnfb"] += dlnfb
    for l in reversed(range(c.num_layers)):
        dresidual, block_grads = block_backward_cuda(dresidual, cache["block_caches"][l], model.layer_params(l),
                                                     c.num_heads, matmul_version=version)
        for name in BLOCK_PARAMETER_NAMES:
            g[name][l] += block_grads[name]
    return dresidual       # the encoder's dout: GPT2.backward adds the encoder's gradients into wte and wpe


def _bf16_forward(model, idx, targets):
    """The forward in bf16 (lesson 14): llm.c's train_gpt2.cu order, the biases fused into the kernels after
    each cuBLAS product, each residual add fused with the layernorm that reads it. -> (logits as float32 or
    None, losses, cache)."""
    from llmc_lessons.cublas import gemm
    from llmc_lessons.layers import bf16 as k
    from llmc_lessons.layers.bf16 import from_bf16
    from llmc_lessons.layers.flash_attention import flash_attention_forward_bf16_cuda

    c, p, w = model.config, model.params, model.params_bf16       # float32 masters, bf16 copies
    B, T = idx.shape
    T_run = -(-T // 8) * 8
    if T_run != T:
        if targets is not None:
            raise ValueError(f"precision='bf16' trains on T that is a multiple of 8 (the kernels move 8 values at "
                             f"a time), got T = {T}")
        # no targets (sampling): pad on the right; causal attention keeps the first T positions unchanged
        idx = device.xp.concatenate([idx, device.xp.zeros((B, T_run - T), dtype=np.int32)], axis=1)
    BT, C, L, NH = B * T_run, c.channels, c.num_layers, c.num_heads

    def linear(x, weight):               # (..., in) bf16 @ weight^T -> (BT, out) bf16, no bias
        return gemm(x.reshape(BT, -1), weight, trans_b=True).reshape(B, T_run, -1)

    residual = k.encoder_forward_bf16_cuda(idx, w["wte"], w["wpe"], check_ids=False)   # checked by _tokens
    ln, mean, rstd = k.layernorm_forward_bf16_cuda(residual, p["ln1w"][0], p["ln1b"][0], version=2)
    block_caches = []
    for l in range(L):
        qkv = linear(ln, w["qkvw"][l])                                           # (B, T, 3C), no bias
        k.add_bias_bf16_cuda(qkv, p["qkvb"][l], out=qkv)
        atty, lse = flash_attention_forward_bf16_cuda(qkv, NH)                   # on the tensor cores
        attproj = linear(atty, w["attprojw"][l])
        residual2, ln2, ln2_mean, ln2_rstd = k.residual_layernorm_forward_bf16_cuda(
            residual, attproj, p["attprojb"][l], p["ln2w"][l], p["ln2b"][l])
        del attproj
        fch = linear(ln2, w["fcw"][l])                                           # (B, T, 4C), no bias
        fch_gelu = k.gelu_bias_forward_bf16_cuda(fch, p["fcb"][l])
        fcproj = linear(fch_gelu, w["fcprojw"][l])
        next_w, next_b = (p["ln1w"][l + 1], p["ln1b"][l + 1]) if l + 1 < L else (p["lnfw"], p["lnfb"])
        residual3, ln_next, mean_next, rstd_next = k.residual_layernorm_forward_bf16_cuda(
            residual2, fcproj, p["fcprojb"][l], next_w, next_b)
        del fcproj
        block_caches.append(dict(x=residual, ln1=ln, ln1_mean=mean, ln1_rstd=rstd, qkv=qkv, lse=lse, atty=atty,
                                 residual2=residual2, ln2=ln2, ln2_mean=ln2_mean, ln2_rstd=ln2_rstd, fch=fch,
                                 fch_gelu=fch_gelu))
        residual, ln, mean, rstd = residual3, ln_next, mean_next, rstd_next
    logits = linear(ln, w["wte"])                                                # (B, T, Vp) bf16
    losses = dlogits = None
    if targets is not None:
        kept = from_bf16(logits) if model.keep_logits else None
        losses = k.fused_classifier_bf16_cuda(logits, targets, c.vocab_size, 1.0 / (B * T))  # logits -> dlogits
        logits, dlogits = kept, logits
    else:
        logits = from_bf16(logits[:, :T])
    cache = dict(idx=idx, targets=targets, block_caches=block_caches, residual=residual, lnf=ln, lnf_mean=mean,
                 lnf_rstd=rstd, dlogits=dlogits)
    return logits, losses, cache


def _bf16_backward(model, cache):
    """The backward in bf16: activation gradients in bf16, except the residual stream's, which accumulates in
    float32 (dres); weight gradients accumulate in float32 straight out of cuBLAS (bf16 in, float32 out)."""
    from llmc_lessons.cublas import gemm
    from llmc_lessons.layers import bf16 as k
    from llmc_lessons.layers.flash_attention import flash_attention_backward_bf16_cuda

    c, p, w, g = model.config, model.params, model.params_bf16, model.grads
    B, T = cache["idx"].shape
    BT, C, NH = B * T, c.channels, c.num_heads

    def linear_backward(dout, inp, weight, dweight):
        """out = inp @ weight^T (+ bias): returns dinp (B, T, in) bf16; dweight += its gradient (the bias
        gradients come out of the kernels that write dout, below)."""
        d2 = dout.reshape(BT, -1)
        gemm(d2, inp.reshape(BT, -1), trans_a=True, out=dweight, accumulate=True)   # float32 out
        return gemm(d2, weight).reshape(B, T, -1)

    dres = device.xp.zeros((B, T, C), dtype=np.float32)     # d loss / d residual stream, float32
    dlnf = linear_backward(cache.pop("dlogits"), cache["lnf"], w["wte"], g["wte"])   # dlogits used once, freed
    cache["dlogits"] = None
    # Each LayerNorm backward also sums its bf16 output over the rows: that is the bias gradient of the
    # projection whose output joined the residual stream there (fcproj after lnf and after ln1, attproj after
    # ln2), so those linear_backward calls take no bias.
    L = c.num_layers
    dres_bf16 = k.layernorm_backward_bf16_cuda(dres, dlnf, cache["residual"], p["lnfw"], cache["lnf_mean"],
                                               cache["lnf_rstd"], g["lnfw"], g["lnfb"], g["fcprojb"][L - 1])
    for l in reversed(range(L)):
        a = cache["block_caches"][l]
        # residual3 = residual2 + fcproj: dres is also d loss / d fcproj
        dfch_gelu = linear_backward(dres_bf16, a["fch_gelu"], w["fcprojw"][l], g["fcprojw"][l])
        # the GELU backward adds the fc bias's gradient (the column sums of dfch) on the way
        dfch = k.gelu_bias_backward_bf16_cuda(dfch_gelu, a["fch"], p["fcb"][l], g["fcb"][l], out=dfch_gelu)
        dln2 = linear_backward(dfch, a["ln2"], w["fcw"][l], g["fcw"][l])
        dres_bf16 = k.layernorm_backward_bf16_cuda(dres, dln2, a["residual2"], p["ln2w"][l], a["ln2_mean"],
                                                   a["ln2_rstd"], g["ln2w"][l], g["ln2b"][l], g["attprojb"][l])
        # residual2 = x + attproj
        datty = linear_backward(dres_bf16, a["atty"], w["attprojw"][l], g["attprojw"][l])
        # the flash backward sums the qkv bias's gradient from the dqkv it writes
        dqkv = flash_attention_backward_bf16_cuda(datty, a["qkv"], a["atty"], a["lse"], NH, g["qkvb"][l])
        dln1 = linear_backward(dqkv, a["ln1"], w["qkvw"][l], g["qkvw"][l])
        dres_bf16 = k.layernorm_backward_bf16_cuda(dres, dln1, a["x"], p["ln1w"][l], a["ln1_mean"],
                                                   a["ln1_rstd"], g["ln1w"][l], g["ln1b"][l],
                                                   g["fcprojb"][l - 1] if l > 0 else None)
    return dres            # the encoder's dout: GPT2.backward adds the encoder's gradients into wte and wpe


# ---------------------------------------------------------------------------------------------------------
# Activation memory: what a forward keeps for the backward


class ActivationRow(NamedTuple):
    name: str          # llm.c's name (ActivationTensors)
    shape: tuple       # llm.c's shape, float32
    bytes: int         # what llm.c allocates for it
    course_bytes: int  # what this course's forward keeps for it (NumPy path)
    note: str          # where the course differs, and why


def activation_bytes(config: GPT2Config, B: int, T: int) -> list:
    """The activations a forward keeps for the backward, as rows (name, shape, bytes, course_bytes, note)
    following llm.c's ActivationTensors (23 tensors, float32), with what this course keeps next to them."""
    C, NH, L, Vp = config.channels, config.num_heads, config.num_layers, config.padded_vocab_size
    same, f32 = "", 4
    rows = [
        ("encoded", (B, T, C), same),
        ("ln1", (L, B, T, C), same), ("ln1_mean", (L, B, T), same), ("ln1_rstd", (L, B, T), same),
        ("qkv", (L, B, T, 3 * C), same), ("atty", (L, B, T, C), same),
        ("preatt", (L, B, NH, T, T), "not kept: the softmax backward needs only att"),
        ("att", (L, B, NH, T, T), same),
        ("attproj", (L, B, T, C), "not kept: residual2 = residual + attproj is all that is needed later"),
        ("residual2", (L, B, T, C), same),
        ("ln2", (L, B, T, C), same), ("ln2_mean", (L, B, T), same), ("ln2_rstd", (L, B, T), same),
        ("fch", (L, B, T, 4 * C), same), ("fch_gelu", (L, B, T, 4 * C), same),
        ("fcproj", (L, B, T, C), "not kept: residual3 = residual2 + fcproj is all that is needed later"),
        ("residual3", (L, B, T, C), same),
        ("lnf", (B, T, C), same), ("lnf_mean", (B, T), same), ("lnf_rstd", (B, T), same),
        ("logits", (B, T, Vp), same),
        ("probs", (B, T, Vp), "NumPy path; the kernel path keeps the fused classifier's dlogits (same size) instead"), ("losses", (B, T), same),
    ]
    table = []
    for name, shape, note in rows:
        nbytes = math.prod(shape) * f32
        table.append(ActivationRow(name, shape, nbytes, 0 if note.startswith("not kept") else nbytes, note))
    return table


def format_activation_table(rows) -> str:
    """The rows of activation_bytes as aligned text, with totals in MiB."""
    mib = 1 / 2 ** 20
    lines = [f"{'tensor':<10} {'shape (llm.c)':<26} {'llm.c MiB':>10} {'course MiB':>11}  note"]
    for r in rows:
        lines.append(f"{r.name:<10} {str(r.shape):<26} {r.bytes * mib:>10.2f} {r.course_bytes * mib:>11.2f}  {r.note}")
    total, course = sum(r.bytes for r in rows), sum(r.course_bytes for r in rows)
    lines.append(f"{'total':<10} {'':<26} {total * mib:>10.2f} {course * mib:>11.2f}")
    return "\n".join(lines)


def held_activation_bytes(model: GPT2) -> int:
    """Bytes of the distinct float arrays the model holds from its last forward (logits, losses and the
    cache for the backward): the measured counterpart of activation_bytes' course column."""
    seen, total = set(), 0

    def walk(obj):
        nonlocal total
        if isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
        elif hasattr(obj, "nbytes") and hasattr(obj, "dtype") and np.issubdtype(obj.dtype, np.floating):
            base = obj
            while getattr(base, "base", None) is not None:
                base = base.base
            if id(base) not in seen:
                seen.add(id(base))
                total += base.nbytes

    walk([model.logits, model.losses, model._cache])
    return total


# ---------------------------------------------------------------------------------------------------------
# Sampling


def next_token_probs(logits, vocab_size: int, temperature: float = 1.0, top_k: int | None = None) -> np.ndarray:
    """(Vp,) logits of one position -> (V,) float64 probabilities of the next token.

    Only the V real columns count; logits are divided by the temperature; with top_k, all but the k largest
    logits are dropped before the softmax (ties at the k-th value are all kept).
    """
    z = np.asarray(device.to_host(logits), dtype=np.float64)[:vocab_size] / temperature
    if top_k is not None and top_k < vocab_size:
        kth_largest = np.partition(z, vocab_size - top_k)[vocab_size - top_k]
        z = np.where(z >= kth_largest, z, -np.inf)
    p = np.exp(z - z.max())
    return p / p.sum()


def generate(model: GPT2, prompt_tokens, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, seed: int | None = None) -> list:
    """Sample max_new_tokens tokens after prompt_tokens; returns the prompt followed by the new tokens.

    Each step reruns the forward on the last max_seq_len tokens (no key/value cache) and samples on the host
    with a NumPy Generator seeded by `seed`. temperature=0 picks the most likely token (greedy).
    Overwrites the model's logits and forward cache, so call it between training steps, not inside one.
    """
    tokens = [int(t) for t in prompt_tokens]
    if not tokens:
        raise ValueError("prompt_tokens is empty: start from at least one token (GPT-2's <|endoftext|> is 50256)")
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"need temperature >= 0 and top_k >= 1 or None, got {temperature}, {top_k}")
    V, maxT = model.config.vocab_size, model.config.max_seq_len
    rng = np.random.default_rng(seed)
    for _ in range(int(max_new_tokens)):
        context = np.array([tokens[-maxT:]], dtype=np.int32)   # (1, T)
        model.forward(context)
        last = device.to_host(model.logits[0, -1])              # (Vp,): the next-token logits
        if temperature == 0:
            tokens.append(int(np.argmax(last[:V])))
        else:
            tokens.append(int(rng.choice(V, p=next_token_probs(last, V, temperature, top_k))))
    return tokens


# ---------------------------------------------------------------------------------------------------------
# Gradient check of the whole model


def gradcheck_gpt2(config: GPT2Config, B: int = 2, T: int = 5, seed: int = 0, checks_per_tensor: int = 20,
                   params: dict | None = None):
    """Finite differences of the mean loss in float64 against gpt2_backward, on a few sampled elements of
    each of the 16 tensors. Returns llmc_lessons.gradcheck's report (print it; .assert_ok() raises on failure).

    params: the 16 tensors to use (default: a fresh seeded GPT-2 initialisation), copied to float64. The
    padded rows of wte and the rows of wpe past T take no part in the loss and are not sampled.
    """
    from llmc_lessons.gradcheck import gradcheck

    gen = np.random.default_rng(seed)
    if params is None:
        params = GPT2(config, seed=seed, backend="numpy").params
    p64 = {name: np.array(device.to_host(params[name]), dtype=np.float64) for name in PARAMETER_NAMES}
    # Larger than GPT-2's 0.02 init, so every path through the network carries a visible gradient.
    for name in ("qkvw", "attprojw", "fcw", "fcprojw", "wpe"):
        p64[name] += gen.standard_normal(p64[name].shape) * 0.3
    p64["wte"][:config.vocab_size] += gen.standard_normal((config.vocab_size, config.channels)) * 0.3
    for name in ("ln1w", "ln1b", "qkvb", "attprojb", "ln2w", "ln2b", "fcb", "fcprojb", "lnfw", "lnfb"):
        p64[name] += gen.standard_normal(p64[name].shape) * 0.1
    idx = gen.integers(0, config.vocab_size, size=(B, T)).astype(np.int32)
    targets = gen.integers(0, config.vocab_size, size=(B, T)).astype(np.int32)
    V = config.vocab_size

    def unpad(name, a):  # rows that take no part in the loss (padded vocab, positions >= T): not checked
        return a[:V] if name == "wte" else a[:T] if name == "wpe" else a

    def full(p):
        out = dict(p)
        out["wte"] = np.concatenate([p["wte"], p64["wte"][V:]])
        out["wpe"] = np.concatenate([p["wpe"], p64["wpe"][T:]])
        return out

    def forward(**p):
        _, losses, _ = gpt2_forward(full(p), config, idx, targets)
        return np.array(losses.mean())

    def backward(dy, **p):
        f = full(p)
        _, _, cache = gpt2_forward(f, config, idx, targets)
        grads = gpt2_backward(f, config, cache)
        return {name: dy * unpad(name, g) for name, g in grads.items()}

    inputs = {name: unpad(name, p64[name]) for name in PARAMETER_NAMES}
    return gradcheck(forward, backward, inputs, title=f"GPT-2 (L={config.num_layers}, C={config.channels}), "
                     f"mean loss over B={B}, T={T}", max_checks=checks_per_tensor, seed=seed)
