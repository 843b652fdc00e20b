"""The benchmark's record helpers (the benchmark itself needs a GPU: its records are under results/)."""
import json

from llmc_lessons.bench import attention_table, kernel_table, latest_kernel_record, latest_record, main, ratio_rows


def row(name, precision, tokens_per_s):
    return dict(name=name, precision=precision, ms=1.0, tokens_per_s=tokens_per_s, peak_bytes=0)


def write(tmp_path, name, date, rows, profile=True):
    (tmp_path / f"{name}.json").write_text(json.dumps(dict(info=dict(date=date, device="GPU"), model="d12", B=1,
                                                           T=8, rows=rows)))
    (tmp_path / f"{name}.log").write_text("Where one course step's GPU time goes" if profile else "")


FULL = [row("course kernels, fp32", "fp32", 130.0), row("course kernels, bf16", "bf16", 320.0),
        row("PyTorch eager", "fp32", 86.0), row("PyTorch bf16 ... compile ...", "bf16", 400.0)]


def test_latest_record_is_the_newest_complete_one(tmp_path):
    assert latest_record(tmp_path) is None
    write(tmp_path, "bench-a", "2026-11-23 10:00 UTC", FULL)
    write(tmp_path, "bench-z", "2026-11-23 09:00 UTC", FULL)                   # older, though it sorts last
    write(tmp_path, "bench-b", "2026-11-24 10:00 UTC", FULL[:3])                # no compiled row
    write(tmp_path, "bench-c", "2026-11-24 11:00 UTC", FULL, profile=False)    # no profile
    path, rec = latest_record(tmp_path)
    assert path.name == "bench-a.json" and rec["rows"] == FULL


def test_each_row_is_compared_with_the_course_row_of_its_precision():
    ratios = [round(r, 3) if r is not None else None for _, r in ratio_rows(dict(rows=FULL))]
    assert ratios == [1.0, 1.0, round(130 / 86, 3), 0.8]
    old = [dict(name="course kernels, fp32", tokens_per_s=100.0), dict(name="PyTorch", tokens_per_s=50.0)]
    assert [r for _, r in ratio_rows(dict(rows=old))] == [1.0, 2.0]      # records from before the bf16 path
    assert ratio_rows(dict(rows=FULL[2:]))[0][1] is None                 # no course row of that precision


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



def test_latest_kernel_record_and_its_table(tmp_path):
    row = dict(name="gelu forward (+ bias)", us=56.0, gbps=3600.0, of_copy=0.86, same_size_copy_gbps=3900.0,
               of_same_size_copy=0.92)
    old = dict(info=dict(date="2026-12-01 10:00 UTC"), kernels=dict(copy_gbps=4100.0, rows=[row]))
    new = dict(info=dict(date="2026-12-02 10:00 UTC"), kernels=dict(copy_gbps=4200.0, rows=[row]))
    (tmp_path / "kernels-a.json").write_text(json.dumps(new))
    (tmp_path / "kernels-b.json").write_text(json.dumps(old))
    (tmp_path / "bench-c.json").write_text(json.dumps(dict(info=dict(date="2026-12-03 10:00 UTC"), rows=[],
                                                           kernels=None)))   # a benchmark run without --kernels
    path, result = latest_kernel_record(tmp_path)
    assert path.name == "kernels-a.json" and result["copy_gbps"] == 4200.0
    table = kernel_table(result).splitlines()
    assert "4,200 GB/s" in table[0] and "gelu forward (+ bias)" in table[2] and "92%" in table[2]
    assert latest_kernel_record(tmp_path / "missing") is None
