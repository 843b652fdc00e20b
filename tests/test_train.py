"""The trainer: learning-rate schedule, exact resume, the NaN guard, the log and the command line."""
import json

import numpy as np
import pytest

from llmc_lessons.data import write_tokens
from llmc_lessons.train import DEFAULTS, NonFiniteError, Trainer, latest_checkpoint, learning_rate, main


@pytest.fixture
def token_files(tmp_path):
    gen = np.random.default_rng(0)
    train, val = tmp_path / "train.bin", tmp_path / "val.bin"
    # a learnable stream: a repeated random phrase of 50 tokens, so the loss falls within a few steps
    phrase = gen.integers(0, 50257, size=50)
    write_tokens(train, np.tile(phrase, 60).astype(np.uint16))
    write_tokens(val, np.tile(phrase, 10).astype(np.uint16))
    return str(train), str(val)


def make_args(token_files, out, **kw):
    args = dict(DEFAULTS, model="tiny", batch_size=2, seq_len=16, steps=6, warmup=2, eval_every=3,
                eval_batches=2, train_bin=token_files[0], val_bin=token_files[1], out=str(out))
    args.update(kw)
    return args


def test_learning_rate_schedule():
    lrs = [learning_rate(s, 100, 1e-3, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)      # linear warm-up
    assert lrs[10] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4, rel=1e-2)  # cosine down to 10%
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_exact(token_files, tmp_path, precision):
    # bf16: the bf16 weight copy is rebuilt from the master weights with the last step's rounding seeds
    whole = Trainer(make_args(token_files, tmp_path / "whole", precision=precision))
    whole.run(progress=False)
    first = Trainer(make_args(token_files, tmp_path / "split", precision=precision))
    first.run(progress=False, stop_at=3)
    ckpt = latest_checkpoint(tmp_path / "split")
    assert ckpt.name == "ckpt_000003.npz"
    second = Trainer(make_args(token_files, tmp_path / "split", precision=precision), resume_from=ckpt)
    assert second.step == 3
    second.run(progress=False)
    log = lambda d: [json.loads(l) for l in (tmp_path / d / "log.jsonl").read_text().splitlines()]
    a, b = log("whole"), log("split")
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit for bit
    assert [r.get("val_loss") for r in a] == [r.get("val_loss") for r in b]
    assert a[-1]["loss"] < a[0]["loss"]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(a[0]) and "val_loss" in a[2]


def test_nan_guard_names_step_and_tensor_and_keeps_last_checkpoint(token_files, tmp_path):
    t = Trainer(make_args(token_files, tmp_path, steps=4, checkpoint_every=1))
    t.run(progress=False, stop_at=2)
    assert latest_checkpoint(tmp_path).name == "ckpt_000002.npz"
    t.model.params["lnfw"][5] = np.nan  # a corrupted parameter poisons the next forward
    with pytest.raises(NonFiniteError, match=r"step 3: the loss is nan \(first bad tensor: parameter of lnfw\)"):
        t.run(progress=False)
    assert latest_checkpoint(tmp_path).name == "ckpt_000002.npz"


def test_command_line_train_then_resume(token_files, tmp_path, capsys):
    out = tmp_path / "cli"
    base = ["--model", "tiny", "-b", "2", "-t", "16", "--train-bin", token_files[0], "--val-bin", token_files[1],
            "--eval-every", "2", "--sample-every", "4", "--sample-tokens", "4", "--out", str(out)]
    assert main(base + ["--steps", "4", "--stop-at", "2"]) == 0
    assert main(["--resume", str(out), "--steps", "4"]) == 0
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert "sample" in log[3] and isinstance(log[3]["sample"], str)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_val_loss"] == log[3]["val_loss"]
    assert "resuming at step 2" in capsys.readouterr().out
