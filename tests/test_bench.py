"""The benchmark's record helpers (the benchmark itself needs a GPU: its records are under results/)."""
import json

import numpy as np

import pytest

from llmc_lessons.bench import attention_table, kernel_table, main, ratio_rows, read_record, strongest


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


def test_the_pytorch_step_runs_on_the_cpu():
    pytest.importorskip("torch")
    from llmc_lessons.bench import TorchStep, _batches
    from llmc_lessons.parameters import GPT2Config
    c = GPT2Config(max_seq_len=16, vocab_size=100, padded_vocab_size=128, num_layers=1, num_heads=2, channels=16)
    step = TorchStep(c, "eager-tf32", padded=True, torch_device="cpu")
    assert step.model.wte.weight.shape[0] == 128 and "vocabulary 128" in step.name
    losses = [step(x, y) for x, y in _batches(c, 2, 8, 3)]
    assert all(np.isfinite(losses)) and losses[0] != losses[-1]
    with pytest.raises(ValueError, match="mode"):
        TorchStep(c, "compiled", torch_device="cpu")


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
