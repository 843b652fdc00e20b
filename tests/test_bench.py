"""The benchmark's record helpers (the benchmark itself needs a GPU: its records are under results/)."""
import json

import numpy as np

import pytest

from llmc_lessons.bench import (attention_table, flops_per_token, is_out_of_memory, kernel_shares, kernel_table,
                                largest_batch, main, ratio_rows, read_record, strongest)
from llmc_lessons.parameters import GPT2Config


def row(name, precision, tokens_per_s):
    return dict(name=name, precision=precision, ms=1.0, tokens_per_s=tokens_per_s, peak_bytes=0)


FULL = [row("course kernels, fp32", "fp32", 130.0), row("course kernels, bf16", "bf16", 320.0),
        row("PyTorch eager", "fp32", 86.0), row("PyTorch bf16 ... compile ...", "bf16", 400.0)]


def test_a_record_is_read_by_its_name(tmp_path):
    (tmp_path / "bench").mkdir()
    rec = dict(info=dict(date="2026-11-23 10:00 UTC", device="GPU"), model="d12", B=1, T=8, rows=FULL)
    (tmp_path / "bench" / "bench-h100-2026-11-23.json").write_text(json.dumps(rec))
    path, got = read_record("bench/bench-h100-2026-11-23.json", tmp_path)
    assert path == tmp_path / "bench" / "bench-h100-2026-11-23.json" and got == rec
    with pytest.raises(FileNotFoundError, match="no record bench/bench-h100-2026-11-24.json"):
        read_record("bench/bench-h100-2026-11-24.json", tmp_path)


def test_the_records_the_lessons_show_are_committed():
    _, rec = read_record("bench/bench-h100-2026-12-06.json")
    assert any("compile" in r["name"] for r in rec["rows"]) and any(r.get("precision") == "bf16" for r in rec["rows"])
    _, rec = read_record("bench/bench-h200-2026-12-02-flash.json")
    assert rec["attention"]
    _, rec = read_record("kernels/kernels-h100-2026-12-06.json")
    assert rec["kernels"]["rows"]


def test_each_row_is_compared_with_the_course_row_of_its_precision():
    ratios = [round(r, 3) if r is not None else None for _, r in ratio_rows(dict(rows=FULL))]
    assert ratios == [1.0, 1.0, round(130 / 86, 3), 0.8]
    old = [dict(name="course kernels, fp32", tokens_per_s=100.0), dict(name="PyTorch", tokens_per_s=50.0)]
    assert [r for _, r in ratio_rows(dict(rows=old))] == [1.0, 2.0]      # records from before the bf16 path
    assert ratio_rows(dict(rows=FULL[2:]))[0][1] is None                 # no course row of that precision


def test_the_strongest_pytorch_row_of_each_precision():
    rows = FULL + [row("PyTorch eager, vocabulary 50304", "fp32", 97.0), dict(name="PyTorch OOM", precision="bf16")]
    best = strongest(rows)
    assert {p: r["tokens_per_s"] for p, r in best.items()} == {"fp32": 97.0, "bf16": 400.0}


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_the_pytorch_step_runs_on_the_cpu(model):
    pytest.importorskip("torch")
    from llmc_lessons.bench import TorchStep, _batches
    from llmc_lessons.llama import LlamaConfig
    if model == "gpt2":
        c = GPT2Config(max_seq_len=16, vocab_size=100, padded_vocab_size=128, num_layers=1, num_heads=2, channels=16)
    else:
        c = LlamaConfig(max_seq_len=16, vocab_size=100, padded_vocab_size=128, num_layers=1, num_heads=2,
                        num_kv_heads=1, channels=16, ffn_hidden=24)
    step = TorchStep(c, "eager-tf32", padded=True, torch_device="cpu")
    heads = [step.model.lm_head] if model == "gpt2" else [step.model.tok_embeddings, step.model.output]
    assert all(h.weight.shape[0] == 128 for h in heads) and "vocabulary 128" in step.name
    losses = [step(x, y) for x, y in _batches(c, 2, 8, 3)]
    assert all(np.isfinite(losses)) and losses[0] != losses[-1]
    assert all(not h.weight[100:].any() for h in heads)         # the padded rows stay zero: no gradient, no decay
    assert "vocabulary 100" in TorchStep(c, "eager-tf32", padded=False, torch_device="cpu").name
    with pytest.raises(ValueError, match="mode"):
        TorchStep(c, "compiled", torch_device="cpu")


def test_the_pytorch_step_takes_a_wrapper_and_an_optimizer_class():
    # tools/multigpu_bench.py: DistributedDataParallel around the model, ZeroRedundancyOptimizer for AdamW
    torch = pytest.importorskip("torch")
    from llmc_lessons.bench import TorchStep, _batches
    c = GPT2Config(max_seq_len=16, vocab_size=100, padded_vocab_size=128, num_layers=1, num_heads=2, channels=16)
    seen = []

    class Wrapper(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.inner = model
            seen.append("wrap")

        def forward(self, *args):
            seen.append("call")
            return self.inner(*args)

    def optimizer_class(groups, **options):
        seen.append(options)
        return torch.optim.AdamW(groups, **options)
    step = TorchStep(c, "eager-tf32", torch_device="cpu", wrap=Wrapper, optimizer_class=optimizer_class)
    losses = [step(x, y) for x, y in _batches(c, 2, 8, 2)]
    assert seen == [dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=False), "wrap", "call", "call"]
    assert losses[0] != losses[1] and step.model.wte.weight.shape[0] == 128


def test_the_benchmark_refuses_to_time_the_emulator(capsys):
    from llmc_lessons import device
    if not device.on_gpu():
        assert main(["--steps", "1"]) == 1
        assert "needs a GPU" in capsys.readouterr().err


def test_attention_table_has_a_line_per_row():
    rows = [dict(name="course, flash attention on the tensor cores", forward_ms=0.219, backward_ms=0.518,
                 tflops=122.4, kept_bytes=786432), dict(name="PyTorch", forward_ms=0.1, backward_ms=0.4, tflops=190.0,
                                                        kept_bytes=786432)]
    lines = attention_table(rows).splitlines()
    assert len(lines) == 3 and "TFLOP/s" in lines[0]
    assert lines[1].split()[-4:] == ["0.219", "0.518", "122.4", "0.8"]


def test_kernel_table():
    row = dict(name="gelu forward (+ bias)", us=56.0, gbps=3600.0, of_copy=0.86, same_size_copy_gbps=3900.0,
               of_same_size_copy=0.92)
    table = kernel_table(dict(copy_gbps=4200.0, rows=[row])).splitlines()
    assert "4,200 GB/s" in table[0] and "gelu forward (+ bias)" in table[2] and "92%" in table[2]


# ---------------------------------------------------------------------------------------------------------
# --sizes: the search for the largest batch, out-of-memory handling and the record, with stand-ins for the GPU


class OutOfMemoryError(RuntimeError):
    """Named as CuPy's and PyTorch's errors are."""


def test_kernel_shares_group_a_profile_by_kernel_name():
    # names as torch.profiler reports them on an H200 (results/bench/bench-h200-2026-12-02-graphs.log)
    kernels = [("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 50.0),
               ("sm90_xmma_gemm_f32f32_tf32f32_f32_tn_n_tilesize128x128x32...", 10.0),
               ("void cublasLt::splitKreduce_kernel<32, 16, int, float, fl...", 5.0),
               ("flash_attention_backward_dkdv_bf16_kernel", 20.0), ("softmax_forward_kernel", 5.0),
               ("layernorm_backward_bf16_kernel", 7.0), ("Memset (Device)", 3.0)]
    total, shares = kernel_shares(kernels)
    assert total == 100.0 and list(shares) == ["matmuls (cuBLAS)", "attention", "other"]
    assert shares == pytest.approx({"matmuls (cuBLAS)": 0.65, "attention": 0.25, "other": 0.10})
    assert kernel_shares([("split_heads_bf16_kernel", 1.0)])[1]["attention"] == 1.0
    assert kernel_shares([]) == (0, {"matmuls (cuBLAS)": 0.0, "attention": 0.0, "other": 0.0})


def test_largest_batch_doubles_then_bisects():
    for limit in (0, 1, 5, 16, 17, 100, 1024, 5000):
        tried = []

        def fits(B):
            tried.append(B)
            return B <= limit
        assert largest_batch(fits, 16, cap=1024) == min(limit, 1024)
        assert len(tried) <= 2 * 11


def test_out_of_memory_is_recognised():
    assert is_out_of_memory(OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED"))
    assert is_out_of_memory(RuntimeError("cudaErrorMemoryAllocation: CUDA_ERROR_OUT_OF_MEMORY: out of memory"))
    assert not is_out_of_memory(ValueError("C must be a multiple of 8"))


def test_flops_per_token_is_llmc_count():
    d12 = GPT2Config.from_name("d12")
    assert flops_per_token(d12, 1024) == 6 * 124_475_904 + 6 * 12 * 1024 * 768


def test_sizes_run_reports_out_of_memory_and_writes_its_record(monkeypatch, tmp_path, capsys):
    import llmc_lessons.bench as bench
    limits = {1: (24, 40, 20), 2: (4, 6, 8)}     # by L (d12, d48): largest B of course, course -r 2, PyTorch

    class Model:
        def __init__(self, config, **kw):
            self.config, self.recompute = config, 0

    def course_step(model, x, y, *args):
        if x.shape[0] > limits[model.config.num_layers][1 if model.recompute else 0]:
            raise OutOfMemoryError("out of memory")

    def bench_course(config, B, T, steps, warmup, precision, model, recompute=0):
        model.recompute = recompute
        course_step(model, np.zeros((B, T)), None)
        return dict(name="course kernels, bf16", precision=precision, ms=1.0,
                    tokens_per_s=(950.0 if recompute else 1000.0) * B, peak_bytes=2**30 // (1 + recompute))

    class Step:
        def __init__(self, config, mode, padded, compile_mode, compile_scope):
            self.name, self.model = "PyTorch", type("M", (), {"config": config})()
            self.opt = type("O", (), {"zero_grad": lambda self, set_to_none: None})()

        def __call__(self, x, y):
            if x.shape[0] > limits[self.model.config.num_layers][2]:
                raise OutOfMemoryError("CUDA out of memory")

    def bench_torch(config, B, T, steps, warmup, mode, step=None):
        if mode == "eager-tf32":          # fp32's other baseline: eager runs out of memory at d48
            if config.num_layers == 2:
                raise OutOfMemoryError("CUDA out of memory")
            return dict(name="PyTorch eager", precision="fp32", ms=1.0, tokens_per_s=400.0 * B, peak_bytes=2**31)
        step(np.zeros((B, T)), None)
        return dict(name="PyTorch", precision="bf16", ms=1.0, tokens_per_s=800.0 * B, peak_bytes=2 * 2**30)

    configs = {n: GPT2Config(max_seq_len=8, vocab_size=100, padded_vocab_size=128, num_layers=L, num_heads=1,
                             channels=8) for n, L in (("d12", 1), ("d48", 2))}
    monkeypatch.setattr(bench.GPT2Config, "from_name", classmethod(lambda cls, n: configs[n]))
    for name, value in dict(GPT2=Model, training_step=course_step, bench_course=bench_course, TorchStep=Step,
                            bench_torch=bench_torch, _free_gpu_memory=lambda: None,
                            matmul_peaks=lambda: dict(n=8192, bf16_tflops=800.0, tf32_tflops=400.0)).items():
        monkeypatch.setattr(bench, name, value)
    rec = bench.bench_sizes(["d12", "d48"], 8, 2, 1, json_path=tmp_path / "scale.json")
    d12, d48 = rec["sizes"]
    assert d12["max_batch"] == {"course": 24, "course, recompute 2": 40, "PyTorch": 20}
    assert d12["ratio"] == 1000 / 800 and d12["course"]["mfu"] == 16000 * d12["flops_per_token"] / 800e12
    assert d48["course"]["oom"].startswith("OutOfMemoryError") and "ratio" not in d48   # B = 8 > 4: reported
    assert d48["max_batch"] == {"course": 4, "course, recompute 2": 6, "PyTorch": 8}
    assert json.loads((tmp_path / "scale.json").read_text())["sizes"][1]["course"]["oom"]
    table = bench.sizes_table(rec)
    assert "OOM" in table.splitlines()[3] and "1.25x" in table.splitlines()[2]
    assert d12["course_r1"]["tokens_per_s"] == 950.0 * 16 and d12["course_r1"]["mfu"] < d12["course"]["mfu"]
    assert "15,200   0.5" in table.splitlines()[2]           # -r 1 (llm.c's default): its tokens/s and GiB
    assert table.splitlines()[3].count("OOM") == 2           # d48: the course out of memory, at -r 1 too
    assert "torch_eager" not in d12                          # bf16 is measured against compiled PyTorch only
    fp32 = bench.bench_sizes(["d12", "d48"], 8, 2, 1, precisions=("fp32",), batch_size=8)
    d12, d48 = fp32["sizes"]
    assert d12["ratio_eager"] == 1000 / 400 and d48["torch_eager"]["oom"] and "ratio_eager" not in d48
    lines = bench.sizes_table(fp32).splitlines()
    assert "2.50x" in lines[2] and "OOM" in lines[3].split("   ")[-2]


def test_the_bf16_peak_is_the_faster_of_the_courses_product_and_pytorchs(monkeypatch):
    # a cuBLASLt algorithm chosen for the step can be the slower one at the peak's 8192-cube shape
    # (results/profile/peak-h100-2026-12-07.log): that must not lower the peak and raise every MFU
    import sys
    import types
    import llmc_lessons.bench as bench
    n = 8192
    ms = {"course": 2 * n ** 3 / 600e9, "torch": 2 * n ** 3 / 700e9}     # 600 and 700 TFLOP/s
    timed = []

    def time_ms(fn, warmup, repeat):
        timed.append(fn())
        return ms[timed[-1]]
    monkeypatch.setattr(bench.timing, "time_ms", time_ms)
    monkeypatch.setattr(bench.timing, "matmul_tflops_tf32", lambda n: 400.0)
    monkeypatch.setattr(bench, "float_to_bf16_cuda", lambda x: x)
    monkeypatch.setattr(bench.device, "xp", types.SimpleNamespace(asarray=lambda x: None))
    monkeypatch.setattr(bench, "gemm", lambda a, b, trans_b: "course")

    class Tensor:
        T = None

        def __matmul__(self, other):
            return "torch"
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(randn=lambda *a, **k: Tensor(), bfloat16=None))
    peaks = bench.matmul_peaks(n)
    assert timed == ["course", "torch"]
    assert peaks["bf16_tflops"] == pytest.approx(700) and peaks["bf16_tflops_course"] == pytest.approx(600)
    ms.update(course=2 * n ** 3 / 800e9)
    assert bench.matmul_peaks(n)["bf16_tflops"] == pytest.approx(800)
    monkeypatch.setitem(sys.modules, "torch", None)                        # no PyTorch: the course's product
    peaks = bench.matmul_peaks(n)
    assert peaks["bf16_tflops"] == pytest.approx(800) and "bf16_tflops_torch" not in peaks
    assert peaks["tf32_tflops"] == 400.0


def test_a_failed_configuration_is_recorded_not_raised():
    import llmc_lessons.bench as bench
    assert bench._attempt(lambda: None) is None
    assert bench._attempt(lambda: 1 / 0) == {"error": "ZeroDivisionError: division by zero"}


def test_main_writes_every_row_and_the_course_against_the_strongest(monkeypatch, tmp_path, capsys):
    import llmc_lessons.bench as bench
    pytest.importorskip("torch")
    speed = {("eager-tf32", False): 86.0, ("eager-tf32", True): 97.0, ("compiled-bf16", True): 440.0,
             ("compiled-bf16", False): 410.0, ("compiled-tf32", True): 120.0}
    calls = []

    def bench_torch(config, B, T, steps, warmup, mode, padded, compile_mode):
        calls.append((mode, padded, compile_mode))
        name = f"PyTorch {mode} {compile_mode}, vocabulary {config.padded_vocab_size if padded else config.vocab_size}"
        return dict(name=name, precision="bf16" if "bf16" in mode else "fp32", ms=1.0,
                    tokens_per_s=speed[mode, padded] + (5.0 if compile_mode == "max-autotune" else 0.0), peak_bytes=0)

    def bench_course(config, B, T, steps, warmup, precision="fp32", cuda_graph=True):
        return dict(name=f"course kernels, {precision}" + ("" if cuda_graph else ", one launch at a time"),
                    precision=precision, ms=1.0, tokens_per_s=150.0 if precision == "fp32" else 480.0, peak_bytes=0)
    monkeypatch.setattr(bench.device, "on_gpu", lambda: True)
    for name, value in dict(bench_torch=bench_torch, bench_course=bench_course,
                            versions=lambda: dict(device="GPU")).items():
        monkeypatch.setattr(bench, name, value)
    out = tmp_path / "bench.json"
    assert main(["--compile-modes", "default", "max-autotune", "--json", str(out)]) == 0
    assert calls == [("eager-tf32", False, "default"), ("eager-tf32", True, "default"),
                     ("compiled-bf16", True, "default"), ("compiled-bf16", False, "default"),
                     ("compiled-tf32", True, "default"), ("compiled-bf16", True, "max-autotune")]
    rec = json.loads(out.read_text())
    assert len(rec["rows"]) == 3 + len(calls)
    text = capsys.readouterr().out
    assert "fp32: course 150 tokens/s against the strongest PyTorch row" in text and "1.25x" in text   # 150 / 120
    assert "bf16: course 480" in text and f"{480 / 445:.2f}x" in text                                 # max-autotune


def test_the_llama_benchmark_has_the_gpt2_rows(monkeypatch, capsys):
    # the LLaMA-style model is measured against the same PyTorch rows as GPT-2: plain and padded vocabulary
    import llmc_lessons.bench as bench
    pytest.importorskip("torch")
    calls = {}

    def bench_torch(config, B, T, steps, warmup, mode, padded, compile_mode):
        calls.setdefault(type(config).__name__, []).append((mode, padded, compile_mode))
        return dict(name=f"PyTorch {mode}", precision="bf16" if "bf16" in mode else "fp32", ms=1.0,
                    tokens_per_s=100.0 + padded, peak_bytes=0)

    def bench_course(config, B, T, steps, warmup, precision="fp32", cuda_graph=True):
        return dict(name=f"course kernels, {precision}", precision=precision, ms=1.0, tokens_per_s=150.0, peak_bytes=0)
    monkeypatch.setattr(bench.device, "on_gpu", lambda: True)
    for name, value in dict(bench_torch=bench_torch, bench_course=bench_course,
                            versions=lambda: dict(device="GPU")).items():
        monkeypatch.setattr(bench, name, value)
    for model in ("d12", "llama-124m"):
        assert main(["--model", model, "--compile-modes", "default", "max-autotune"]) == 0
    assert calls["LlamaConfig"] == calls["GPT2Config"]
    assert {("eager-tf32", False, "default"), ("compiled-bf16", True, "default")} <= set(calls["LlamaConfig"])
    calls.clear()                      # --padded-only: the padded rows alone, the strongest
    assert main(["--model", "d12", "--padded-only"]) == 0
    assert {mode for mode, _, _ in calls["GPT2Config"]} == {"eager-tf32", "compiled-bf16", "compiled-tf32"}
    assert all(padded for _, padded, _ in calls["GPT2Config"])
