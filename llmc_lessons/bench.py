"""Benchmark a GPT-2 training step (forward + backward + AdamW) of the course against PyTorch, in one process
on one GPU: `python -m llmc_lessons.bench [--model d12 --batch-size 16 --seq-len 1024]`.

Rows: the course's kernels in float32 (TF32 matmuls through cuBLAS) and in bf16 (GPT2(precision="bf16"),
lesson 14); PyTorch (TorchStep) eager in float32 with TF32 matmuls, with the plain vocabulary (V = 50257) and
padded to Vp = 50304 as nanoGPT and llm.c do; PyTorch fp32 + TF32 + torch.compile + fused AdamW; PyTorch with
bf16 autocast + scaled_dot_product_attention + torch.compile + fused AdamW, plain and padded, the padded one
in each compile mode of --compile-modes. Each course row is compared with every PyTorch row of its precision,
and the last lines give the course against the strongest (fastest) PyTorch row of each precision.
Each: median ms per step over --steps steps after --warmup steps, tokens/s, and peak reserved GPU memory.
`--model llama-124m` (lesson 16) times the LLaMA-style model instead, against the same PyTorch rows (TorchLlama,
its attention through SDPA with enable_gqa wherever the GPT-2 rows use SDPA).
`--profile` adds a per-kernel table of one course step (PyTorch's profiler sees CuPy's kernels too).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import time

import numpy as np

from llmc_lessons import device, timing
from llmc_lessons.cublas import algorithm_report, gemm
from llmc_lessons.files import atomic_write
from llmc_lessons.layers.adamw import adamw_update_bf16_cuda, global_norm_squared_cuda
from llmc_lessons.layers.attention import (attention_backward_bf16_cuda, attention_backward_cuda,
                                           attention_forward_bf16_cuda, attention_forward_cuda)
from llmc_lessons.layers.bf16 import float_to_bf16_cuda
from llmc_lessons.layers.crossentropy import fused_classifier_bf16_cuda
from llmc_lessons.layers.encoder import encoder_forward_bf16_cuda
from llmc_lessons.layers.flash_attention import (flash_attention_backward_bf16_cuda, flash_attention_backward_tf32_cuda,
                                                 flash_attention_forward_bf16_cuda, flash_attention_forward_tf32_cuda,
                                                 flash_version)
from llmc_lessons.layers.gelu import gelu_bias_backward_bf16_cuda, gelu_bias_forward_bf16_cuda
from llmc_lessons.layers.layernorm import (column_sum_add_cuda, layernorm_backward_bf16_cuda,
                                           layernorm_forward_bf16_cuda, residual_layernorm_forward_bf16_cuda)
from llmc_lessons.llama import LlamaConfig, config_from_name, model_class
from llmc_lessons.model import GPT2, GPT2Config
from llmc_lessons.parameters import num_parameters
from llmc_lessons.precision import tf32 as tf32_mode
from llmc_lessons.train import training_step

LR, WEIGHT_DECAY, GRAD_CLIP = 6e-4, 0.1, 1.0


def _batches(config: GPT2Config, B: int, T: int, n: int, seed: int = 0):
    gen = np.random.default_rng(seed)
    return [(gen.integers(0, config.vocab_size, (B, T), dtype=np.int32),
             gen.integers(0, config.vocab_size, (B, T), dtype=np.int32)) for _ in range(n)]


def _free_gpu_memory():
    gc.collect()
    if not device.on_gpu():
        return
    device.xp.get_default_memory_pool().free_all_blocks()
    try:
        import torch
        torch.cuda.empty_cache()
    except ImportError:
        pass


def bench_course(config: GPT2Config, B: int, T: int, steps: int, warmup: int, tf32: bool = True,
                 precision: str = "fp32", cuda_graph: bool = True, recompute: int = 0, model=None) -> dict:
    """The course's training step through its kernels; ms are wall-clock per step (each step ends synchronised).
    cuda_graph: the forward and backward replayed from CUDA graphs (GPT2.cuda_graph), as the trainer runs.
    recompute: model.recompute (llm.c's -r). model: a GPT2 of this config and precision to time (kept; its
    graphs are dropped afterwards) instead of a fresh one."""
    _free_gpu_memory()
    pool = device.xp.get_default_memory_pool()
    if model is None:
        model = model_class(config)(config, seed=0, backend="kernels", precision=precision)
    model.keep_logits = False  # as the trainer: the fused classifier overwrites the logits in place
    model.cuda_graph, model.recompute = cuda_graph, recompute
    times, peak, chosen = [], 0, algorithm_report()
    try:
        with tf32_mode(tf32):
            flash = precision != "bf16" and model.path.flash_tf32(model)   # the fp32 path's attention (paths.py)
            for i, (x, y) in enumerate(_batches(config, B, T, warmup + steps)):
                t0 = time.perf_counter()
                training_step(model, x, y, LR, WEIGHT_DECAY, GRAD_CLIP, i + 1)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
                peak = max(peak, pool.total_bytes())
    finally:
        model.cuda_graph, model._graphs, model._cache = False, None, None   # the graphs' memory goes back
        del model
    ms = float(np.median(times)) * 1e3
    name = "course kernels, bf16" if precision == "bf16" else f"course kernels, fp32{' + TF32 matmuls' if tf32 else ''}"
    name += " + TF32 flash attention" if flash else ""
    name += " + CUDA graphs" if cuda_graph else ", one launch at a time"
    name += f", recompute {recompute}" if recompute else ""
    row = dict(name=name, precision=precision, ms=ms, tokens_per_s=B * T / (ms / 1e3), peak_bytes=int(peak))
    if precision == "bf16":   # how this row's new product shapes got their algorithms: measured, read, heuristic's
        report = algorithm_report()
        row["gemm_algorithms"] = {k: v - chosen.get(k, 0) if isinstance(v, int) else v for k, v in report.items()}
    return row


TORCH_MODES = {"eager-tf32": "PyTorch eager, fp32 + TF32 matmuls",
               "compiled-tf32": "PyTorch fp32 + TF32 + compile + fused AdamW",
               "compiled-bf16": "PyTorch bf16 autocast + SDPA + compile + fused AdamW"}
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune")


class TorchStep:
    """PyTorch's training step, the baseline: mode 'eager-tf32' (float32, TF32 matmuls, plain attention and
    AdamW), 'compiled-tf32' (the same through torch.compile, SDPA, fused AdamW) or 'compiled-bf16' (bf16
    autocast on top). padded: the vocabulary padded to Vp (TorchGPT2 or TorchLlama, padded=True). compile_mode: torch.compile's
    mode; compile_scope 'model' compiles the whole model, 'blocks' each transformer block (the same code for
    every block: compiled once, whatever the depth) and the head. For data parallelism (tools/multigpu_bench.py):
    wrap(model) gives the module the step calls (DistributedDataParallel), and optimizer_class stands in for AdamW,
    called as AdamW is (ZeroRedundancyOptimizer around AdamW)."""

    def __init__(self, config: GPT2Config, mode: str, padded: bool = True, compile_mode: str = "default",
                 compile_scope: str = "model", torch_device: str = "cuda", wrap=None, optimizer_class=None):
        import torch
        from llmc_lessons.torch_gpt2 import TorchGPT2
        from llmc_lessons.torch_llama import TorchLlama
        if mode not in TORCH_MODES:
            raise ValueError(f"mode must be one of {sorted(TORCH_MODES)}, got {mode!r}")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        self.compiled, self.bf16 = mode != "eager-tf32", mode == "compiled-bf16"
        torch.manual_seed(0)
        torch._dynamo.reset()         # no compiled code of an earlier row (another mode) is reused
        self.device = torch.device(torch_device)
        with self.device:             # initialised where it runs (the host would take seconds for 1.5B weights)
            self.model = (TorchLlama if isinstance(config, LlamaConfig) else TorchGPT2)(config, self.compiled, padded)
        self.opt = (optimizer_class or torch.optim.AdamW)(self.model.decay_groups(WEIGHT_DECAY), lr=LR,
                                                          betas=(0.9, 0.95), eps=1e-8, fused=self.compiled)
        self.step_model = self.model if wrap is None else wrap(self.model)
        if self.compiled and (compile_scope == "model" or isinstance(config, LlamaConfig)):
            self.step_model = torch.compile(self.step_model, mode=compile_mode)
        elif self.compiled:        # each block, and the head (layernorm, lm_head, loss) as a region of its own
            for block in self.model.h:
                block.compile(mode=compile_mode)
            self.model.head = torch.compile(self.model.head, mode=compile_mode)
        V = (self.model.output if isinstance(config, LlamaConfig) else self.model.lm_head).weight.shape[0]
        self.name = TORCH_MODES[mode] + (f" ({compile_mode}{', per block' if compile_scope == 'blocks' else ''})"
                                         if self.compiled else "") + f", vocabulary {V}"
        self.precision = "bf16" if self.bf16 else "fp32"

    def __call__(self, x, y) -> float:
        """One step on host token arrays; returns the loss (the .item() synchronises, as the course's step)."""
        import torch
        x, y = (torch.from_numpy(a.astype(np.int64)).to(self.device) for a in (x, y))
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            _, loss = self.step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP, foreach=True)
        self.opt.step()
        return loss.item()


def bench_torch(config: GPT2Config, B: int, T: int, steps: int, warmup: int, mode: str, padded: bool = True,
                compile_mode: str = "default", compile_scope: str = "model", step=None) -> dict:
    """PyTorch's step (TorchStep) timed as bench_course times the course's; peak: the most memory reserved.
    step: a TorchStep to time (kept) instead of a fresh one."""
    import torch
    _free_gpu_memory()
    torch.cuda.reset_peak_memory_stats()
    step = step or TorchStep(config, mode, padded, compile_mode, compile_scope)
    times = []
    t_start = time.perf_counter()
    for i, (x, y) in enumerate(_batches(config, B, T, warmup + steps)):
        t0 = time.perf_counter()
        step(x, y)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if i == 0:
            first_s = time.perf_counter() - t_start    # with the compilation
    peak = torch.cuda.max_memory_reserved()
    name, precision = step.name, step.precision
    ms = float(np.median(times)) * 1e3
    return dict(name=name, precision=precision, ms=ms, tokens_per_s=B * T / (ms / 1e3), peak_bytes=int(peak),
                first_step_s=first_s)


def strongest(rows) -> dict:
    """{precision: the fastest PyTorch row of that precision} (rows that ran out of memory left out)."""
    best = {}
    for r in rows:
        if not r["name"].startswith("course") and r.get("tokens_per_s"):
            p = r.get("precision", "fp32")
            if p not in best or r["tokens_per_s"] > best[p]["tokens_per_s"]:
                best[p] = r
    return best


# ---------------------------------------------------------------------------------------------------------
# Every GPT-2 size (--sizes): the course against PyTorch's strongest step, the largest batch each fits, MFU

SIZE_BATCH = {"d12": 16, "d24": 16, "d36": 16, "d48": 8}
"""The batch each size is timed at (--batch-size overrides): llm.c's d12 setting, halved for 1.5B."""


def is_out_of_memory(e: BaseException) -> bool:
    """Whether an exception says the GPU ran out of memory (CuPy's and PyTorch's errors, cuBLAS's workspace)."""
    text = f"{type(e).__name__}: {e}".lower().replace("_", " ")
    return "outofmemory" in text.replace(" ", "") or "alloc failed" in text


def _attempt(fn) -> dict | None:
    """Run fn(); None when it ran, else {"oom": the error's first line} when the GPU ran out of memory, or
    {"error": ...} for any other error (a --sizes run goes on to its next configuration either way); the
    memory is freed once the exception is gone."""
    try:
        fn()
        return None
    except Exception as e:          # noqa: BLE001 - recorded, and the run goes on
        text = str(e).splitlines()[0][:300] if str(e) else ""
        failure = {"oom" if is_out_of_memory(e) else "error": f"{type(e).__name__}: {text}"}
    _free_gpu_memory()
    return failure


def matmul_peaks(n: int = 8192) -> dict:
    """The measured matmul ceilings of this GPU: an n x n x n product in bf16 (float32 accumulation, bf16 out, as
    the bf16 step's gemm) and in float32 with TF32 (timing.matmul_tflops_tf32). The bf16 peak is the faster of the
    course's gemm (the algorithm cublas.AlgorithmChoices chose) and, where PyTorch is installed, torch.matmul: a
    choice that is slower at this shape must not lower the peak, and so raise every MFU measured against it."""
    gen = np.random.default_rng(0)
    a, b = (float_to_bf16_cuda(device.xp.asarray(gen.standard_normal((n, n), dtype=np.float32))) for _ in range(2))
    ms = timing.time_ms(lambda: gemm(a, b, trans_b=True), warmup=3, repeat=10)
    peaks = dict(n=n, bf16_tflops_course=timing.tflops(2 * n ** 3, ms))
    try:
        import torch
    except ImportError:
        pass
    else:
        ta, tb = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        peaks["bf16_tflops_torch"] = timing.tflops(2 * n ** 3, timing.time_ms(lambda: ta @ tb.T, warmup=3, repeat=10))
    return dict(peaks, bf16_tflops=max(v for k, v in peaks.items() if k.startswith("bf16_")),
                tf32_tflops=timing.matmul_tflops_tf32(n))


def flops_per_token(config: GPT2Config, T: int) -> int:
    """A training step's FLOPs per token as llm.c's gpt2_estimate_mfu counts them: 6N (N the padded parameter
    count) + 6LTC (attention's two products, forward and backward, the causal half)."""
    return 6 * num_parameters(config) + 6 * config.num_layers * T * config.channels


def largest_batch(fits, start: int, cap: int = 1024) -> int:
    """The largest B <= cap with fits(B) true, assuming fitting is monotone: doubling from `start`, then
    bisection between the last B that fitted and the first that did not (0 when not even B = 1 fits)."""
    lo, hi, B = 0, None, start
    while B <= cap:
        if not fits(B):
            hi = B
            break
        lo, B = B, 2 * B
    if hi is None:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def course_fits(model, T: int, recompute: int):
    """fits(B) for largest_batch: one training step of the course's `model` at B (launched one kernel at a time,
    with model.recompute = recompute); False when it runs out of memory."""
    def fits(B: int) -> bool:
        model.keep_logits, model.cuda_graph, model.recompute = False, False, recompute
        model._cache = model.logits = None
        _free_gpu_memory()
        x, y = _batches(model.config, B, T, 1)[0]
        failure = _attempt(lambda: training_step(model, x, y, LR, WEIGHT_DECAY, GRAD_CLIP, 1))
        model._cache = model.logits = None
        print(f"    course (recompute {recompute}) B={B}: {failure or 'fits'}", flush=True)
        return failure is None
    return fits


def torch_fits(step: "TorchStep", T: int):
    """fits(B) for largest_batch: one PyTorch training step of `step` at B (a new B may recompile once; dynamo
    then makes B dynamic); False when it runs out of memory."""
    def fits(B: int) -> bool:
        step.opt.zero_grad(set_to_none=True)
        _free_gpu_memory()
        failure = _attempt(lambda: step(*_batches(step.model.config, B, T, 1)[0]))
        print(f"    PyTorch B={B}: {failure or 'fits'}", flush=True)
        return failure is None
    return fits


def bench_size(name: str, B: int, T: int, steps: int, warmup: int, precision: str = "bf16",
               compile_mode: str = "default", compile_scope: str = "blocks", max_batch: bool = True,
               cap: int = 1024) -> dict:
    """One GPT-2 size, course against PyTorch (its compiled step, padded vocabulary) at the same B, T and
    precision: each one's tokens/s and peak memory ({"oom": message} where it ran out of memory, {"error": ...}
    where it failed otherwise; the course also with recompute 1, llm.c's default; in fp32 PyTorch eager too), then
    the largest B each fits (the course with and without recompute 2; a B that fails for another reason counts as
    not fitting, and its log line says why). One framework's model at a time is alive."""
    config = GPT2Config.from_name(name)
    out = dict(model=name, B=B, T=T, precision=precision, parameters=num_parameters(config),
               flops_per_token=flops_per_token(config, T))
    _free_gpu_memory()
    model = GPT2(config, seed=0, backend="kernels", precision=precision)
    row = {}
    failure = _attempt(lambda: row.update(bench_course(config, B, T, steps, warmup, precision=precision,
                                                       model=model)))
    out["course"] = row if failure is None else dict(name="course", **failure)
    print(f"  {out['course']}", flush=True)
    row = {}   # llm.c's default, -r 1: the GELU's output recomputed in the backward
    failure = _attempt(lambda: row.update(bench_course(config, B, T, steps, warmup, precision=precision,
                                                       recompute=1, model=model)))
    out["course_r1"] = row if failure is None else dict(name="course, recompute 1", **failure)
    print(f"  {out['course_r1']}", flush=True)
    sizes = {}
    if max_batch:
        for r in (0, 2):
            sizes[f"course, recompute {r}" if r else "course"] = largest_batch(course_fits(model, T, r), B, cap)
    del model
    _free_gpu_memory()
    mode = "compiled-bf16" if precision == "bf16" else "compiled-tf32"
    made, row = {}, {}
    failure = _attempt(lambda: made.update(step=TorchStep(config, mode, True, compile_mode, compile_scope))) or \
        _attempt(lambda: row.update(bench_torch(config, B, T, steps, warmup, mode, step=made["step"])))
    out["torch"] = row if failure is None else dict(name=TORCH_MODES[mode], **failure)
    print(f"  {out['torch']}", flush=True)
    if max_batch:
        if "step" in made:
            sizes["PyTorch"] = largest_batch(torch_fits(made["step"], T), B, cap)
        out["max_batch"] = sizes
        print(f"  largest B: {sizes}", flush=True)
    made.clear()
    _free_gpu_memory()
    if precision == "fp32":   # the fp32 target is against PyTorch eager (TF32 matmuls, padded vocabulary)
        row = {}
        failure = _attempt(lambda: row.update(bench_torch(config, B, T, steps, warmup, "eager-tf32")))
        out["torch_eager"] = row if failure is None else dict(name=TORCH_MODES["eager-tf32"], **failure)
        print(f"  {out['torch_eager']}", flush=True)
        _free_gpu_memory()
    return out


def add_mfu(size: dict, peaks: dict) -> dict:
    """Each row's MFU (its FLOP/s by flops_per_token over the measured matmul peak of its precision) and the
    course / PyTorch ratios (compiled; for fp32 also eager), in place."""
    peak = peaks["bf16_tflops" if size["precision"] == "bf16" else "tf32_tflops"] * 1e12
    for key in ("course", "course_r1", "torch", "torch_eager"):
        r = size.get(key, {})
        if "tokens_per_s" in r:
            r["mfu"] = r["tokens_per_s"] * size["flops_per_token"] / peak
    for key, ratio in (("torch", "ratio"), ("torch_eager", "ratio_eager")):
        if "tokens_per_s" in size["course"] and "tokens_per_s" in size.get(key, {}):
            size[ratio] = size["course"]["tokens_per_s"] / size[key]["tokens_per_s"]
    return size


def sizes_table(rec: dict) -> str:
    """A --sizes record as a text table."""
    p = rec["peaks"]
    lines = [f"measured matmul peaks ({p['n']}^3): bf16 {p['bf16_tflops']:.0f} TFLOP/s (the faster of the course's "
             f"gemm and torch.matmul), TF32 "
             f"{p['tf32_tflops']:.0f} TFLOP/s; T = {rec['T']}; PyTorch compiled ({rec['compile_mode']}, "
             f"scope {rec['compile_scope']}), vocabulary padded",
             f"{'size':<5}{'prec':>5}{'B':>4}{'course tok/s':>14}{'GiB':>6}{'MFU':>6}{'PyTorch tok/s':>15}{'GiB':>6}"
             f"{'MFU':>6}{'ratio':>7}{'-r 1 tok/s':>14}{'GiB':>6}{'x eager':>9}"
             "   largest B: course, course -r 2, PyTorch"]

    def failed(r):
        return "OOM" if "oom" in r else "error"

    def cells(r, mfu=True):
        if "tokens_per_s" not in r:
            return f"{failed(r):>14}{'':>{12 if mfu else 6}}"
        return f"{r['tokens_per_s']:>14,.0f}{r['peak_bytes'] / 2**30:>6.1f}" + (f"{r['mfu']:>6.0%}" if mfu else "")
    for z in rec["sizes"]:
        ratio = f"{z['ratio']:>6.2f}x" if "ratio" in z else f"{'':>7}"
        line = f"{z['model']:<5}{z['precision']:>5}{z['B']:>4}{cells(z['course'])} {cells(z['torch'])}{ratio}"
        # recompute 1 (records before it was measured have none); fp32 rows: the course against PyTorch eager,
        # blank where only the course failed
        line += cells(z["course_r1"], mfu=False) if "course_r1" in z else f"{'-':>14}{'':>6}"
        eager = z.get("torch_eager")
        line += (f"{z['ratio_eager']:>8.2f}x" if "ratio_eager" in z else f"{'-':>9}" if eager is None
                 else f"{'':>9}" if "tokens_per_s" in eager else f"{failed(eager):>9}")
        mb = z.get("max_batch")
        if mb:
            line += "   " + ", ".join(str(mb.get(k, "-")) for k in ("course", "course, recompute 2", "PyTorch"))
        lines.append(line)
    return "\n".join(lines)


def bench_sizes(sizes, T: int, steps: int, warmup: int, precisions=("bf16",), batch_size: int | None = None,
                compile_mode: str = "default", compile_scope: str = "blocks", max_batch: bool = True,
                json_path=None) -> dict:
    """bench_size for each size and precision, after the matmul peaks; the record is written to json_path
    (atomically) after every size, so that a run stopped early keeps what it measured."""
    rec = dict(info=versions(), T=T, steps=steps, warmup=warmup, compile_mode=compile_mode,
               compile_scope=compile_scope, peaks=matmul_peaks(), sizes=[])
    print(f"{rec['info']}\nmatmul peaks: {rec['peaks']}", flush=True)
    for name in sizes:
        for precision in precisions:
            B = batch_size or SIZE_BATCH.get(name, 8)
            print(f"GPT-2 {name} {precision} B={B} T={T}", flush=True)
            rec["sizes"].append(add_mfu(bench_size(name, B, T, steps, warmup, precision, compile_mode,
                                                   compile_scope, max_batch), rec["peaks"]))
            if json_path:
                atomic_write(json_path, json.dumps(rec, indent=1).encode())
    return rec


def profile_course(config: GPT2Config, B: int, T: int, top: int = 25, precision: str = "fp32") -> str:
    """Per-kernel CUDA time of one course training step (after two warm-up steps), via torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    _free_gpu_memory()
    model = model_class(config)(config, seed=0, backend="kernels", precision=precision)
    model.keep_logits = False
    batches = _batches(config, B, T, 3)
    with tf32_mode(True):
        for i, (x, y) in enumerate(batches[:2]):
            training_step(model, x, y, LR, WEIGHT_DECAY, GRAD_CLIP, i + 1)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            training_step(model, *batches[2], LR, WEIGHT_DECAY, GRAD_CLIP, 3)
    del model
    events = prof.key_averages()
    total, shares = kernel_shares([(e.key, e.self_device_time_total) for e in events
                                   if e.device_type == DeviceType.CUDA])
    return (events.table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60)
            + f"\n{total / 1e3:.1f} ms of GPU time: "
            + ", ".join(f"{group} {share:.0%}" for group, share in shares.items()))


KERNEL_GROUPS = {"matmuls (cuBLAS)": ("gemm", "nvjet", "xmma", "cutlass", "splitkreduce"),
                 "attention": ("flash", "attention", "softmax", "permute", "heads")}
"""Kernel groups by a lower-case part of the name. With the flash kernels (both course precisions today) attention
is all its own kernels; on lesson 05's path its T x T products are cuBLAS's and count as matmuls."""


def kernel_shares(kernels) -> tuple:
    """(kernel name, GPU time) pairs -> (their total time, {group: its share of that}), the groups of KERNEL_GROUPS
    and 'other' for every kernel none of them names."""
    total, shares = sum(t for _, t in kernels), dict.fromkeys([*KERNEL_GROUPS, "other"], 0.0)
    for name, t in kernels:
        group = next((g for g, parts in KERNEL_GROUPS.items() if any(p in name.lower() for p in parts)), "other")
        shares[group] += t / total if total else 0.0
    return total, shares


SDPA_BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")   # torch.nn.attention.SDPBackend


def bench_attention(B: int = 16, T: int = 1024, NH: int = 12, hs: int = 64, precision: str = "bf16") -> list:
    """Causal attention alone at one shape, forward and backward: the course's cuBLAS path (it writes the T x T
    scores), the course's flash kernels, and PyTorch's scaled_dot_product_attention, first as PyTorch picks its
    kernel, then restricted to each of its backends that runs this case (cuDNN's, FlashAttention-2's, the
    memory-efficient one), so the table says which kernel the course is up against. precision 'bf16', or
    'fp32' (TF32 products: the fp32 model's attention). The course rows time the attention kernels only (the
    bias add and its gradient belong to the qkv matmul around them). Rows: name, forward ms, backward ms,
    TFLOP/s of the two together counting the causal half of the products (forward 2, backward 5 of size
    B NH T T hs), and the bytes each keeps between forward and backward beyond q, k, v and the output. Every row
    times the GPU's work alone (time_ms's hide_host): inside the model's step the kernels run in a CUDA graph,
    and the Python of a call (the course's argument checks, PyTorch's dispatch) is not part of it."""
    xp, gen = device.xp, np.random.default_rng(0)
    C = NH * hs
    qkv = xp.asarray(gen.standard_normal((B, T, 3 * C), dtype=np.float32))
    dout = xp.asarray(gen.standard_normal((B, T, C), dtype=np.float32))
    flops = 7 * B * NH * T * T * hs   # 2 B NH T T hs per product, half of it under the causal mask

    def row(name, fwd, bwd, kept):
        f, b = timing.time_ms(fwd, repeat=10, hide_host=True), timing.time_ms(bwd, repeat=10, hide_host=True)
        return dict(name=name, forward_ms=f, backward_ms=b, tflops=flops / ((f + b) * 1e-3) / 1e12, kept_bytes=kept)

    rows = []
    with tf32_mode(True):
        if precision == "bf16":
            qkv, dout = float_to_bf16_cuda(qkv), float_to_bf16_cuda(dout)
            qkvb = xp.zeros(3 * C, np.float32)
            atty, qkvh, att = attention_forward_bf16_cuda(qkv, qkvb, NH)
            rows.append(row("course, cuBLAS + softmax (T x T scores)", lambda: attention_forward_bf16_cuda(qkv, qkvb, NH),
                            lambda: attention_backward_bf16_cuda(dout, qkvh, att), att.nbytes))
            del atty, qkvh, att
            names = {2: "course, flash attention on the tensor cores (mma.sync, version 2)",
                     4: "course, flash attention on the tensor cores (wgmma, version 4)"}
            for v in sorted({flash_version(hs), 2}, reverse=True):   # the version the model runs first
                out, lse = flash_attention_forward_bf16_cuda(qkv, NH, version=v)
                rows.append(row(names[v], lambda: flash_attention_forward_bf16_cuda(qkv, NH, version=v),
                                lambda: flash_attention_backward_bf16_cuda(dout, qkv, out, lse, NH, version=v),
                                lse.nbytes))
        else:
            atty, att = attention_forward_cuda(qkv, NH)
            rows.append(row("course, cuBLAS (TF32) + softmax (T x T scores)", lambda: attention_forward_cuda(qkv, NH),
                            lambda: attention_backward_cuda(dout, qkv, att, NH), att.nbytes))
            del atty, att
            out, lse = flash_attention_forward_tf32_cuda(qkv, NH)
            rows.append(row("course, flash attention on the tensor cores (TF32)",
                            lambda: flash_attention_forward_tf32_cuda(qkv, NH),
                            lambda: flash_attention_backward_tf32_cuda(dout, qkv, out, lse, NH), lse.nbytes))
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return rows
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # as the course's fp32 rows
    try:
        q, k, v = (torch.randn(B, NH, T, hs, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn(B, NH, T, hs, device="cuda", dtype=dtype)
        for backend in (None,) + SDPA_BACKENDS:
            def fwd():
                with sdpa_kernel(getattr(SDPBackend, backend)) if backend else contextlib.nullcontext():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            name = f"PyTorch SDPA, {backend.split('_')[0].lower() + ' backend only' if backend else 'its own choice'}"
            try:
                y = fwd()
                rows.append(row(name, fwd, lambda: torch.autograd.grad(y, (q, k, v), do, retain_graph=True),
                                B * NH * T * 4))
            except RuntimeError as e:   # a backend that does not run this case (dtype, head size, device) is left
                if backend is None:     # out, and says so; PyTorch's own choice, the baseline, must run
                    raise
                print(f"  {name}: skipped ({str(e).splitlines()[0][:120]})", flush=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    return rows


def attention_table(rows) -> str:
    """bench_attention's rows as a text table."""
    width = max([48] + [len(r["name"]) + 1 for r in rows])
    lines = [f"{'':<{width}}{'fwd ms':>8}{'bwd ms':>8}{'TFLOP/s':>9}{'kept MiB':>10}"]
    for r in rows:
        lines.append(f"{r['name']:<{width}}{r['forward_ms']:>8.3f}{r['backward_ms']:>8.3f}{r['tflops']:>9.1f}"
                     f"{r['kept_bytes'] / 2**20:>10.1f}")
    return "\n".join(lines)


def bf16_step_kernels(B: int = 16, T: int = 1024, C: int = 768, V: int = 50257, Vp: int = 50304,
                      n_params: int = 124_475_904) -> list:
    """The elementwise, normalisation and reduction kernels of the bf16 training step, at its shapes, on fresh
    random inputs: (name, callable, bytes) with the fewest bytes each must move (every input read once, every
    output written once), as GPT2(precision="bf16") calls them."""
    xp, g = device.xp, device.xp.random.default_rng(2)
    r32 = lambda *s: g.standard_normal(s, dtype=np.float32)
    r16 = lambda *s: float_to_bf16_cuda(r32(*s))
    BT = B * T
    x, x2, h, dh = r16(B, T, C), r16(B, T, C), r16(B, T, 4 * C), r16(B, T, 4 * C)
    w, b, b4 = 1 + r32(C), r32(C), r32(4 * C)
    ids = g.integers(0, V, (B, T)).astype(np.int32)
    wte, wpe = r16(Vp, C), r16(T, C)
    mean, rstd = residual_layernorm_forward_bf16_cuda(x, x2, b, w, b)[2:]
    dres = xp.zeros((B, T, C), np.float32)
    dw, db = xp.zeros(C, np.uint16), xp.zeros(C, np.uint16)           # the step's gradients are bf16
    dbias = {n: xp.zeros(n * C, np.uint16) for n in (1, 3, 4)}
    flash_partial = r32(B * -(-T // 64), 3 * C)      # a row a (b, 64-row tile) of the flash backward's blocks
    logits, targets = r16(B, T, Vp), g.integers(0, V, (B, T)).astype(np.int32)
    p, gr, m, v, p16 = r32(n_params), r16(n_params), r32(n_params), xp.abs(r32(n_params)), xp.empty(n_params, np.uint16)
    rows = [
        ("encoder forward", lambda: encoder_forward_bf16_cuda(ids, wte, wpe, check_ids=False),
         2 * BT * C + 2 * T * C + 2 * BT * C + 4 * BT),
        ("layernorm forward (first)", lambda: layernorm_forward_bf16_cuda(x, w, b, version=2),
         4 * BT * C + 8 * BT),
        ("residual + layernorm", lambda: residual_layernorm_forward_bf16_cuda(x, x2, b, w, b), 8 * BT * C + 8 * BT),
        ("gelu forward (+ bias)", lambda: gelu_bias_forward_bf16_cuda(h, b4), 2 * 2 * BT * 4 * C),
        ("gelu backward (+ bias, dbias)", lambda: gelu_bias_backward_bf16_cuda(dh, h, b4, dbias[4]),
         3 * 2 * BT * 4 * C),
    ]
    rows += [   # the bias gradients come with the GELU, LayerNorm and flash attention backwards
        ("qkv dbias (flash partials)", lambda: column_sum_add_cuda(
            dbias[3][:C], dbias[3][C:2 * C], dbias[3][2 * C:], flash_partial), 4 * flash_partial.size + 4 * 3 * C),
        ("layernorm backward (+ dbias)",
         lambda: layernorm_backward_bf16_cuda(dres, x, x2, w, mean, rstd, dw, db, dbias[1]), 14 * BT * C + 8 * BT),
        ("fused classifier", lambda: fused_classifier_bf16_cuda(logits, targets, V, 1 / BT), 2 * 2 * BT * Vp),
        ("global norm (124M)", lambda: global_norm_squared_cuda(gr), 2 * n_params),   # no copy to the host
        ("adamw (124M, bf16 copy)", lambda: adamw_update_bf16_cuda(p, p16, gr, m, v, 1, 1e-4), 28 * n_params),
    ]
    return rows


def bench_kernels(rows=None, repeat: int = 10) -> dict:
    """Each kernel of bf16_step_kernels() timed alone on the GPU (L2 flushed, Python's enqueue hidden: the
    kernel's own time, as in the step's CUDA graph) against two copies (timing.copy_bandwidth_gbps): a 1 GiB
    copy, and a copy that moves the same bytes as the kernel (a short kernel pays the same start and finish
    as a short copy). -> {copy_gbps, rows: [{name, us, gbps, of_copy, same_size_copy_gbps,
    of_same_size_copy}]}."""
    copy = timing.copy_bandwidth_gbps()
    out = []
    for name, fn, nbytes in rows if rows is not None else bf16_step_kernels():
        ms = timing.time_ms(fn, warmup=2, repeat=repeat, flush_l2=True, hide_host=True)
        same = timing.copy_bandwidth_gbps(nbytes // 8 * 4)   # reads and writes nbytes in all
        bw = timing.gbps(nbytes, ms)
        out.append(dict(name=name, us=ms * 1e3, gbps=bw, of_copy=bw / copy, same_size_copy_gbps=same,
                        of_same_size_copy=bw / same))
    return dict(copy_gbps=copy, rows=out)


def kernel_table(result: dict) -> str:
    """bench_kernels' result as a text table."""
    lines = [f"copy bandwidth {result['copy_gbps']:,.0f} GB/s (1 GiB); 'same-size copy': a copy moving the "
             f"kernel's bytes",
             f"{'kernel':<28}{'us':>9}{'GB/s':>8}{'of copy':>9}{'same-size copy':>16}{'of it':>7}"]
    for r in result["rows"]:
        lines.append(f"{r['name']:<28}{r['us']:>9.1f}{r['gbps']:>8.0f}{r['of_copy']:>9.0%}"
                     f"{r['same_size_copy_gbps']:>16.0f}{r['of_same_size_copy']:>7.0%}")
    return "\n".join(lines)


def read_record(name: str, results_dir=None):
    """A committed record by its path under results/ (`results/README.md` lists them), e.g.
    `read_record("bench/bench-h100-2026-12-06.json")`: (path, the JSON it holds). Lessons name the record they
    show, so what they print does not depend on which other records are there."""
    from pathlib import Path
    root = Path(results_dir) if results_dir is not None else Path(__file__).resolve().parent.parent / "results"
    path = root / name
    if not path.is_file():
        raise FileNotFoundError(f"no record {name} under {root} (results/README.md lists the committed ones)")
    return path, json.loads(path.read_text())


def ratio_rows(rec: dict) -> list:
    """(row, course tokens/s / its tokens/s) for each row of a record: each row against the first course row of
    its precision, None without one (records older than the bf16 path have one course row, in fp32)."""
    course = {}
    for r in rec["rows"]:
        if r["name"].startswith("course"):
            course.setdefault(r.get("precision", "fp32"), r["tokens_per_s"])
    return [(r, course[p] / r["tokens_per_s"] if (p := r.get("precision", "fp32")) in course else None)
            for r in rec["rows"]]


def versions() -> dict:
    out = dict(python=platform.python_version(), numpy=np.__version__, device=device.describe(),
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if device.on_gpu():
        out["cupy"] = device.xp.__version__
        out["cuda_runtime"] = device.xp.cuda.runtime.runtimeGetVersion()
    try:
        import torch
        out["torch"] = torch.__version__
    except ImportError:
        pass
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmc_lessons.bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="d12", help="GPT-2 preset (default d12 = 124M), or llama-124m (lesson 16)")
    p.add_argument("--batch-size", "-b", type=int, help="B (default 16; with --sizes, SIZE_BATCH's)")
    p.add_argument("--seq-len", "-t", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--padded-only", action="store_true", help="skip the PyTorch rows with the plain vocabulary "
                   "(the padded ones are the stronger: what the course is measured against)")
    p.add_argument("--compile-modes", nargs="+", choices=COMPILE_MODES, default=["default"],
                   help=f"torch.compile modes of the padded bf16 rows, of {', '.join(COMPILE_MODES)} (default: "
                   "default; max-autotune takes minutes to compile); the first also for the compiled fp32 and "
                   "the plain-vocabulary bf16 rows, and for --sizes")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"],
                   help="the course rows (default both; with --sizes and --only-attention, bf16)")
    p.add_argument("--profile", action="store_true", help="print a per-kernel table of one course step")
    p.add_argument("--attention", action="store_true", help="also time causal attention alone (bf16, the model's "
                   "shape: B, T, NH, hs): the cuBLAS path, the flash kernels, PyTorch's SDPA and each of its backends")
    p.add_argument("--only-attention", action="store_true", help="time attention alone and nothing else, at each "
                   "T of --attention-seq-lens, in each --precision (default bf16)")
    p.add_argument("--attention-seq-lens", type=int, nargs="+", help="--only-attention: the T to time "
                   "(default: --seq-len)")
    p.add_argument("--kernels", action="store_true", help="also time the bf16 step's elementwise, normalisation "
                   "and reduction kernels alone, against the copy bandwidth")
    p.add_argument("--only-kernels", action="store_true", help="time those kernels and nothing else")
    p.add_argument("--sizes", help="instead: every GPT-2 size of this comma-separated list (e.g. "
                   "d12,d24,d36,d48), the course against PyTorch's compiled step at the same B, T and precision "
                   "(--precision, default bf16 here; fp32 also against PyTorch eager): tokens/s, peak memory, MFU "
                   "against the measured matmul peak, the largest batch each fits; B per size from SIZE_BATCH "
                   "unless --batch-size is given")
    p.add_argument("--compile-scope", choices=["model", "blocks"], default="blocks",
                   help="--sizes: torch.compile the whole model or each block (default: blocks, compiled once "
                   "whatever the depth)")
    p.add_argument("--no-max-batch", action="store_true", help="--sizes: skip the search for the largest batch")
    p.add_argument("--json", help="also write the results to this JSON file")
    a = p.parse_args(argv)
    if not device.on_gpu():
        print("The benchmark needs a GPU: the CPU emulator's speed says nothing about a GPU's.", file=sys.stderr)
        return 1
    if a.only_attention:
        c, B = GPT2Config.from_name(a.model), a.batch_size or 16
        attention = {}
        for precision in a.precision or ["bf16"]:
            for T in a.attention_seq_lens or [a.seq_len]:
                key = f"{precision}, T={T}"
                attention[key] = bench_attention(B, T, c.num_heads, c.head_size, precision)
                print(f"Causal attention, {precision}, B={B}, T={T}, NH={c.num_heads}, hs={c.head_size}:\n"
                      f"{attention_table(attention[key])}\n", flush=True)
                if a.json:
                    atomic_write(a.json, json.dumps(dict(info=versions(), model=a.model, B=B, attention=attention),
                                                    indent=1).encode())
        return 0
    if a.sizes:
        for name in a.sizes.split(","):
            GPT2Config.from_name(name)          # an unknown size is refused before anything runs
        rec = bench_sizes(a.sizes.split(","), a.seq_len, a.steps, a.warmup, precisions=a.precision or ["bf16"],
                          batch_size=a.batch_size, compile_mode=a.compile_modes[0], compile_scope=a.compile_scope,
                          max_batch=not a.no_max_batch, json_path=a.json)
        print("\n" + sizes_table(rec))
        return 0
    a.batch_size = a.batch_size or 16
    a.precision = a.precision or ["fp32", "bf16"]
    llama = a.model.startswith("llama")
    if llama and (a.kernels or a.only_kernels or a.attention):
        p.error("--kernels, --only-kernels and --attention time GPT-2's bf16 step: leave them out with "
                f"--model {a.model}")
    kernels = None
    if a.kernels or a.only_kernels:
        c = GPT2Config.from_name(a.model)
        kernels = bench_kernels(bf16_step_kernels(a.batch_size, a.seq_len, c.channels, c.vocab_size,
                                                  c.padded_vocab_size, num_parameters(c)))
        print(f"The bf16 step's kernels alone (GPT-2 {a.model}, B={a.batch_size}, T={a.seq_len}):\n"
              f"{kernel_table(kernels)}\n", flush=True)
        if a.only_kernels:
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(dict(info=versions(), kernels=kernels), f, indent=1)
            return 0
    attention = []
    if a.attention:
        c = GPT2Config.from_name(a.model)
        attention = bench_attention(a.batch_size, a.seq_len, c.num_heads, c.head_size)
        print(f"\nCausal attention, bf16, B={a.batch_size}, T={a.seq_len}, NH={c.num_heads}, hs={c.head_size}:\n"
              f"{attention_table(attention)}\n", flush=True)
    config = config_from_name(a.model)
    B, T = a.batch_size, a.seq_len
    info = versions()
    print(f"{info}\n{'' if llama else 'GPT-2 '}{a.model}, B={B}, T={T}: {B * T} tokens per step; median of {a.steps} steps after "
          f"{a.warmup} warm-up steps", flush=True)
    rows = []

    def save():       # after every row: a run stopped early keeps what it measured
        if a.json:
            atomic_write(a.json, json.dumps(dict(info=info, model=a.model, B=B, T=T, rows=rows, attention=attention,
                                                 kernels=kernels), indent=1).encode())
    for precision in a.precision:
        rows.append(bench_course(config, B, T, a.steps, a.warmup, precision=precision))
        print(f"  {rows[-1]}", flush=True)
        save()
    if "bf16" in a.precision:   # what the graphs save: the same step, each kernel launched from Python
        rows.append(bench_course(config, B, T, a.steps, a.warmup, precision="bf16", cuda_graph=False))
        print(f"  {rows[-1]}", flush=True)
    try:
        import torch  # noqa: F401
        has_torch = True
    except ImportError:
        has_torch = False
        print("PyTorch is not installed: no PyTorch rows" + (" and no profile" if a.profile else ""))
    if has_torch and not a.no_torch:
        # the plain vocabulary (V) once per precision, then the padded one (Vp, as nanoGPT and llm.c) in every
        # configuration: the strongest PyTorch row of each precision is what the course is measured against
        # (the order puts the rows a run cut short needs most first)
        configs = [("eager-tf32", False, "default"), ("eager-tf32", True, "default")]
        if not a.no_compile:
            first = a.compile_modes[0]
            configs += [("compiled-bf16", True, first), ("compiled-bf16", False, first), ("compiled-tf32", True, first)]
            configs += [("compiled-bf16", True, m) for m in a.compile_modes[1:]]
        if a.padded_only:
            configs = [c for c in configs if c[1]]
        for mode, padded, compile_mode in configs:
            rows.append(bench_torch(config, B, T, a.steps, a.warmup, mode, padded, compile_mode))
            print(f"  {rows[-1]}", flush=True)
            save()
    print(f"\n{'':<76}{'ms/step':>9}{'tokens/s':>11}{'peak GiB':>10}{'course / it':>13}")
    for r, ratio in ratio_rows(dict(rows=rows)):
        print(f"{r['name']:<76}{r['ms']:>9.1f}{r['tokens_per_s']:>11,.0f}{r['peak_bytes'] / 2**30:>10.2f}"
              + (f"{ratio:>12.2f}x" if ratio is not None else ""))
    print("(course / it: the first course row of the same precision, fp32 or bf16, against this row)")
    course = {}
    for r in rows:
        if r["name"].startswith("course"):
            course.setdefault(r["precision"], r)
    for precision, best in strongest(rows).items():
        if precision in course:
            print(f"{precision}: course {course[precision]['tokens_per_s']:,.0f} tokens/s against the strongest "
                  f"PyTorch row ({best['name']}) {best['tokens_per_s']:,.0f}: "
                  f"{course[precision]['tokens_per_s'] / best['tokens_per_s']:.2f}x")
    if a.profile and has_torch:   # the profiler is PyTorch's, also under --no-torch (which drops its rows only)
        for precision in a.precision:
            print(f"\nWhere one course step's GPU time goes ({precision}):\n"
                  + profile_course(config, B, T, precision=precision))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
