"""Benchmark a GPT-2 training step (forward + backward + AdamW) of the course against PyTorch, in one process
on one GPU: `python -m llmc_lessons.bench [--model d12 --batch-size 16 --seq-len 1024]`.

Rows: the course's kernels in float32 (TF32 matmuls through cuBLAS) and in bf16 (GPT2(precision="bf16"),
lesson 14); PyTorch eager in float32 with TF32 matmuls; PyTorch with bf16 autocast +
scaled_dot_product_attention + torch.compile + fused AdamW. Each course row is compared with the PyTorch row
of its precision.
Each: median ms per step over --steps steps after --warmup steps, tokens/s, and peak reserved GPU memory.
`--model llama-124m` (lesson 16) times the LLaMA-style model instead, with one more PyTorch row: PyTorch at its
best in fp32 too (TF32 matmuls, SDPA with enable_gqa, torch.compile, fused AdamW).
`--profile` adds a per-kernel table of one course step (PyTorch's profiler sees CuPy's kernels too).
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time

import numpy as np

from llmc_lessons import device, timing
from llmc_lessons.layers.adamw import adamw_update_bf16_cuda, global_norm_squared_cuda
from llmc_lessons.layers.attention import attention_backward_bf16_cuda, attention_forward_bf16_cuda
from llmc_lessons.layers.bf16 import float_to_bf16_cuda
from llmc_lessons.layers.crossentropy import fused_classifier_bf16_cuda
from llmc_lessons.layers.encoder import encoder_forward_bf16_cuda
from llmc_lessons.layers.flash_attention import flash_attention_backward_bf16_cuda, flash_attention_forward_bf16_cuda
from llmc_lessons.layers.gelu import gelu_bias_backward_bf16_cuda, gelu_bias_forward_bf16_cuda
from llmc_lessons.layers.layernorm import (column_sum_add_cuda, layernorm_backward_bf16_cuda,
                                           layernorm_forward_bf16_cuda, residual_layernorm_forward_bf16_cuda)
from llmc_lessons.layers.matmul import add_bias_bf16_cuda
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
    device.xp.get_default_memory_pool().free_all_blocks()
    try:
        import torch
        torch.cuda.empty_cache()
    except ImportError:
        pass


def bench_course(config: GPT2Config, B: int, T: int, steps: int, warmup: int, tf32: bool = True,
                 precision: str = "fp32", cuda_graph: bool = True) -> dict:
    """The course's training step through its kernels; ms are wall-clock per step (each step ends synchronised).
    cuda_graph: the forward and backward replayed from CUDA graphs (GPT2.cuda_graph), as the trainer runs."""
    _free_gpu_memory()
    pool = device.xp.get_default_memory_pool()
    model = model_class(config)(config, seed=0, backend="kernels", precision=precision)
    model.keep_logits = False  # as the trainer: the fused classifier overwrites the logits in place
    model.cuda_graph = cuda_graph
    times, peak = [], 0
    with tf32_mode(tf32):
        for i, (x, y) in enumerate(_batches(config, B, T, warmup + steps)):
            t0 = time.perf_counter()
            training_step(model, x, y, LR, WEIGHT_DECAY, GRAD_CLIP, i + 1)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            peak = max(peak, pool.total_bytes())
    del model
    ms = float(np.median(times)) * 1e3
    name = "course kernels, bf16" if precision == "bf16" else f"course kernels, fp32{' + TF32 matmuls' if tf32 else ''}"
    name += " + CUDA graphs" if cuda_graph else ", one launch at a time"
    return dict(name=name, precision=precision, ms=ms,
                tokens_per_s=B * T / (ms / 1e3), peak_bytes=int(peak))


def bench_torch(config: GPT2Config, B: int, T: int, steps: int, warmup: int, mode: str) -> dict:
    """PyTorch's step: mode 'eager-tf32' (float32, TF32 matmuls, plain attention), 'compiled-tf32' (the same
    precision with SDPA, torch.compile and fused AdamW) or 'compiled-bf16' (and bf16 autocast)."""
    import torch
    from llmc_lessons.torch_gpt2 import TorchGPT2
    from llmc_lessons.torch_llama import TorchLlama
    _free_gpu_memory()
    torch.cuda.reset_peak_memory_stats()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    compiled, bf16 = mode.startswith("compiled"), mode == "compiled-bf16"
    torch.manual_seed(0)
    model = (TorchLlama if isinstance(config, LlamaConfig) else TorchGPT2)(config, flash=compiled).cuda()
    opt = torch.optim.AdamW(model.decay_groups(WEIGHT_DECAY), lr=LR, betas=(0.9, 0.95), eps=1e-8,
                            fused=compiled)
    step_model = torch.compile(model) if compiled else model
    times = []
    for i, (x, y) in enumerate(_batches(config, B, T, warmup + steps)):
        x, y = torch.from_numpy(x.astype(np.int64)).cuda(), torch.from_numpy(y.astype(np.int64)).cuda()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            _, loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        loss.item()  # synchronises, as the course's step does
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_reserved()
    del model, opt, step_model
    ms = float(np.median(times)) * 1e3
    name = {"eager-tf32": "PyTorch eager, fp32 + TF32 matmuls",
            "compiled-tf32": "PyTorch fp32 + TF32 + SDPA + compile + fused AdamW",
            "compiled-bf16": "PyTorch bf16 autocast + SDPA + compile + fused AdamW"}[mode]
    return dict(name=name, precision="bf16" if bf16 else "fp32", ms=ms, tokens_per_s=B * T / (ms / 1e3),
                peak_bytes=int(peak))


def profile_course(config: GPT2Config, B: int, T: int, top: int = 25, precision: str = "fp32") -> str:
    """Per-kernel CUDA time of one course training step (after two warm-up steps), via torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    _free_gpu_memory()
    model = GPT2(config, seed=0, backend="kernels", precision=precision)
    model.keep_logits = False
    batches = _batches(config, B, T, 3)
    with tf32_mode(True):
        for i, (x, y) in enumerate(batches[:2]):
            training_step(model, x, y, LR, WEIGHT_DECAY, GRAD_CLIP, i + 1)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            training_step(model, *batches[2], LR, WEIGHT_DECAY, GRAD_CLIP, 3)
    del model
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60)


def bench_attention(B: int = 16, T: int = 1024, NH: int = 12, hs: int = 64) -> list:
    """Causal attention in bf16 at one shape, forward and backward, three ways: the course's cuBLAS path (it
    writes the T x T scores), the course's flash kernels on the tensor cores, and PyTorch's
    scaled_dot_product_attention (its flash kernel). Rows: name, forward ms, backward ms, TFLOP/s of the two
    together counting the causal half of the products (forward 2, backward 5 of size B NH T T hs), and the
    bytes each keeps between forward and backward beyond q, k, v and the output."""
    xp, gen = device.xp, np.random.default_rng(0)
    C = NH * hs
    qkv = float_to_bf16_cuda(xp.asarray(gen.standard_normal((B, T, 3 * C), dtype=np.float32)))
    qkvb = xp.asarray(0.1 * gen.standard_normal(3 * C, dtype=np.float32))
    dout = float_to_bf16_cuda(xp.asarray(gen.standard_normal((B, T, C), dtype=np.float32)))
    flops = 7 * B * NH * T * T * hs   # 2 B NH T T hs per product, half of it under the causal mask

    def row(name, fwd, bwd, kept):
        f, b = timing.time_ms(fwd, repeat=10), timing.time_ms(bwd, repeat=10)
        return dict(name=name, forward_ms=f, backward_ms=b, tflops=flops / ((f + b) * 1e-3) / 1e12, kept_bytes=kept)

    rows = []
    atty, qkvh, att = attention_forward_bf16_cuda(qkv, qkvb, NH)
    rows.append(row("course, cuBLAS + softmax (T x T scores)", lambda: attention_forward_bf16_cuda(qkv, qkvb, NH),
                    lambda: attention_backward_bf16_cuda(dout, qkvh, att), att.nbytes))
    del atty, qkvh, att
    qkv_b = add_bias_bf16_cuda(qkv, qkvb)
    out, lse = flash_attention_forward_bf16_cuda(qkv_b, NH)
    rows.append(row("course, flash attention on the tensor cores",
                    lambda: flash_attention_forward_bf16_cuda(add_bias_bf16_cuda(qkv, qkvb, out=qkv_b), NH),
                    lambda: flash_attention_backward_bf16_cuda(dout, qkv_b, out, lse, NH), lse.nbytes))
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return rows
    q, k, v = (torch.randn(B, NH, T, hs, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(B, NH, T, hs, device="cuda", dtype=torch.bfloat16)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    rows.append(row("PyTorch scaled_dot_product_attention", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                    lambda: torch.autograd.grad(y, (q, k, v), do, retain_graph=True), B * NH * T * 4))
    return rows


def attention_table(rows) -> str:
    """bench_attention's rows as a text table."""
    lines = [f"{'':<48}{'fwd ms':>8}{'bwd ms':>8}{'TFLOP/s':>9}{'kept MiB':>10}"]
    for r in rows:
        lines.append(f"{r['name']:<48}{r['forward_ms']:>8.3f}{r['backward_ms']:>8.3f}{r['tflops']:>9.1f}"
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
    qkv, qkvb = r16(B, T, 3 * C), r32(3 * C)
    mean, rstd = residual_layernorm_forward_bf16_cuda(x, x2, b, w, b)[2:]
    dres = xp.zeros((B, T, C), np.float32)
    dw, db = xp.zeros(C, np.float32), xp.zeros(C, np.float32)
    dbias = {n: xp.zeros(n * C, np.float32) for n in (1, 3, 4)}
    flash_partial = r32(B * -(-T // 64), 3 * C)      # a row a (b, 64-row tile) of the flash backward's blocks
    logits, targets = r16(B, T, Vp), g.integers(0, V, (B, T)).astype(np.int32)
    p, gr, m, v, p16 = r32(n_params), r32(n_params), r32(n_params), xp.abs(r32(n_params)), xp.empty(n_params, np.uint16)
    rows = [
        ("encoder forward", lambda: encoder_forward_bf16_cuda(ids, wte, wpe, check_ids=False),
         2 * BT * C + 2 * T * C + 2 * BT * C + 4 * BT),
        ("layernorm forward (first)", lambda: layernorm_forward_bf16_cuda(x, w, b, version=2),
         4 * BT * C + 8 * BT),
        ("residual + layernorm", lambda: residual_layernorm_forward_bf16_cuda(x, x2, b, w, b), 8 * BT * C + 8 * BT),
        ("qkv + bias (in place)", lambda: add_bias_bf16_cuda(qkv, qkvb, out=qkv), 2 * 2 * 3 * BT * C),
        ("gelu forward (+ bias)", lambda: gelu_bias_forward_bf16_cuda(h, b4), 2 * 2 * BT * 4 * C),
        ("gelu backward (+ bias, dbias)", lambda: gelu_bias_backward_bf16_cuda(dh, h, b4, dbias[4]),
         3 * 2 * BT * 4 * C),
    ]
    rows += [   # the bias gradients come with the GELU, LayerNorm and flash attention backwards
        ("qkv dbias (flash partials)", lambda: column_sum_add_cuda(
            dbias[3][:C], dbias[3][C:2 * C], dbias[3][2 * C:], flash_partial), 4 * flash_partial.size + 8 * 3 * C),
        ("layernorm backward (+ dbias)",
         lambda: layernorm_backward_bf16_cuda(dres, x, x2, w, mean, rstd, dw, db, dbias[1]), 14 * BT * C + 8 * BT),
        ("fused classifier", lambda: fused_classifier_bf16_cuda(logits, targets, V, 1 / BT), 2 * 2 * BT * Vp),
        ("global norm (124M)", lambda: global_norm_squared_cuda(gr), 4 * n_params),   # no copy to the host
        ("adamw (124M, bf16 copy)", lambda: adamw_update_bf16_cuda(p, p16, gr, m, v, 1, 1e-4), 30 * n_params),
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
    p.add_argument("--batch-size", "-b", type=int, default=16)
    p.add_argument("--seq-len", "-t", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                   help="the course rows (default both)")
    p.add_argument("--profile", action="store_true", help="print a per-kernel table of one course step")
    p.add_argument("--attention", action="store_true", help="also time causal attention alone (bf16, the model's "
                   "shape: B, T, NH, hs): the cuBLAS path, the flash kernels, PyTorch's SDPA")
    p.add_argument("--kernels", action="store_true", help="also time the bf16 step's elementwise, normalisation "
                   "and reduction kernels alone, against the copy bandwidth")
    p.add_argument("--only-kernels", action="store_true", help="time those kernels and nothing else")
    p.add_argument("--json", help="also write the results to this JSON file")
    a = p.parse_args(argv)
    if not device.on_gpu():
        print("The benchmark needs a GPU: the CPU emulator's speed says nothing about a GPU's.", file=sys.stderr)
        return 1
    llama = a.model.startswith("llama")
    if llama and (a.kernels or a.only_kernels or a.attention or a.profile):
        p.error("--kernels, --only-kernels, --attention and --profile time GPT-2's bf16 step: leave them out with "
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
    for precision in a.precision:
        rows.append(bench_course(config, B, T, a.steps, a.warmup, precision=precision))
        print(f"  {rows[-1]}", flush=True)
    if "bf16" in a.precision:   # what the graphs save: the same step, each kernel launched from Python
        rows.append(bench_course(config, B, T, a.steps, a.warmup, precision="bf16", cuda_graph=False))
        print(f"  {rows[-1]}", flush=True)
    try:
        import torch  # noqa: F401
        has_torch = not a.no_torch
    except ImportError:
        has_torch = False
        print("PyTorch is not installed: no PyTorch rows")
    if has_torch:
        compiled = ["compiled-tf32", "compiled-bf16"] if llama else ["compiled-bf16"]
        for mode in ["eager-tf32"] + ([] if a.no_compile else compiled):
            rows.append(bench_torch(config, B, T, a.steps, a.warmup, mode))
            print(f"  {rows[-1]}", flush=True)
    print(f"\n{'':<56}{'ms/step':>9}{'tokens/s':>11}{'peak GiB':>10}{'course / it':>13}")
    for r, ratio in ratio_rows(dict(rows=rows)):
        print(f"{r['name']:<56}{r['ms']:>9.1f}{r['tokens_per_s']:>11,.0f}{r['peak_bytes'] / 2**30:>10.2f}"
              + (f"{ratio:>12.2f}x" if ratio is not None else ""))
    print("(course / it: the first course row of the same precision, fp32 or bf16, against this row)")
    if a.profile and has_torch:
        for precision in a.precision:
            print(f"\nWhere one course step's GPU time goes ({precision}):\n"
                  + profile_course(config, B, T, precision=precision))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(info=info, model=a.model, B=B, T=T, rows=rows, attention=attention, kernels=kernels), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
