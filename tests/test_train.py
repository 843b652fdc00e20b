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


def test_recompute_reaches_the_model(token_files, tmp_path):
    assert Trainer(make_args(token_files, tmp_path, recompute=2, precision="bf16")).model.recompute == 2
    with pytest.raises(ValueError, match="--recompute 5"):
        Trainer(make_args(token_files, tmp_path, recompute=5))


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


# -- a run is never destroyed ---------------------------------------------------------------------------------

def cli(token_files, out, *extra):
    """A command line for a fast run on the NumPy layers."""
    return ["--model", "tiny", "-b", "2", "-t", "16", "--train-bin", token_files[0], "--val-bin", token_files[1],
            "--reference", "--out", str(out), *extra]


def records(out):
    return [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]


def test_new_run_refuses_an_out_holding_a_run_and_overwrite_names_what_it_replaces(token_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli(token_files, out, "--steps", "2")) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(cli(token_files, out, "--steps", "3")) == 2              # a forgotten --resume
    err = capsys.readouterr().err
    assert f"--out {out} holds a run already" in err and "--resume" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before    # nothing touched
    assert main(cli(token_files, out, "--steps", "3", "--overwrite")) == 0
    err = capsys.readouterr().err
    assert "--overwrite: replacing the run in" in err and "log.jsonl" in err and "ckpt_000002.npz" in err
    assert [r["step"] for r in records(out)] == [1, 2, 3]
    assert [p.name for p in out.glob("ckpt_*.npz")] == ["ckpt_000003.npz"]


def test_a_folder_without_a_run_is_fine_and_resume_excludes_overwrite(token_files, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "README.txt").write_text("my notes")
    assert main(cli(token_files, out, "--steps", "1")) == 0
    assert (out / "README.txt").read_text() == "my notes"
    with pytest.raises(SystemExit):
        main(["--resume", str(out), "--overwrite", "--steps", "2"])
    assert "give only one of them" in capsys.readouterr().err


def test_a_resume_that_fails_at_its_first_step_keeps_the_whole_log(token_files, tmp_path):
    out = tmp_path / "run"
    Trainer(make_args(token_files, out, steps=4, checkpoint_every=2, reference=True)).run(progress=False)
    assert sorted(p.name for p in out.glob("ckpt_*.npz")) == ["ckpt_000002.npz", "ckpt_000004.npz"]  # newest two
    t = Trainer(make_args(token_files, out, steps=6, reference=True), resume_from=out / "ckpt_000002.npz")
    t.model.params["lnfw"][0] = np.nan
    with pytest.raises(NonFiniteError):
        t.run(progress=False)
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]             # steps 3, 4 are dropped only when redone


def test_resume_tolerates_a_torn_last_log_line(token_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli(token_files, out, "--steps", "4", "--stop-at", "2")) == 0
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')                                    # a disk that filled during an append
    assert main(["--resume", str(out)]) == 0
    assert "dropping its torn last line" in capsys.readouterr().err
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]


def test_a_damaged_line_inside_the_log_is_named(token_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli(token_files, out, "--steps", "4", "--stop-at", "2")) == 0
    lines = (out / "log.jsonl").read_text().splitlines()
    (out / "log.jsonl").write_text(lines[0] + "\n#garbage\n" + lines[1] + "\n")
    assert main(["--resume", str(out)]) == 2
    assert "log.jsonl, line 2: not a log record ('#garbage')" in capsys.readouterr().err
    assert (out / "log.jsonl").read_text().splitlines()[1] == "#garbage"   # left as it was


def test_a_damaged_checkpoint_is_named_and_the_previous_one_is_used(token_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli(token_files, out, "--steps", "5", "--checkpoint-every", "1", "--stop-at", "3")) == 0
    newest = out / "ckpt_000003.npz"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])     # a copy cut short
    assert main(["--resume", str(out)]) == 0
    captured = capsys.readouterr()
    assert "ckpt_000003.npz: damaged checkpoint" in captured.err and "resuming at step 2" in captured.out
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in out.glob("ckpt_*.npz")) == ["ckpt_000004.npz", "ckpt_000005.npz"]
    for p in out.glob("ckpt_*.npz"):
        p.write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["--resume", str(out), "--steps", "6"])
    err = capsys.readouterr().err
    assert "no readable checkpoint" in err and "ckpt_000004.npz" in err and "ckpt_000005.npz" in err


def test_stale_temporaries_of_the_trainer_are_removed_and_nothing_else(token_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli(token_files, out, "--steps", "3", "--stop-at", "1")) == 0
    stale = [out / ".ckpt_000002.npz.k3j4h5.tmp", out / "ckpt_000002.npzab12cd.tmp", out / ".log.jsonl.x1.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    mine = out / "mine.tmp"
    mine.write_text("not the trainer's")
    assert main(["--resume", str(out)]) == 0
    assert not any(p.exists() for p in stale) and mine.exists()
    assert "left by an interrupted write" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "-1"], "--epochs -1.0: must be a finite number > 0"),
    (["--warmup", "-5"], "--warmup -5: must be an integer >= 0"),
    (["--grad-clip", "-1"], "--grad-clip -1.0: must be a finite number >= 0"),
    (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
    (["--final-lr-frac", "2"], "--final-lr-frac 2.0: must be a finite number >= 0 and <= 1"),
    (["--weight-decay", "-0.1"], "--weight-decay -0.1"),
    (["--steps", "0"], "--steps 0: must be an integer >= 1"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--eval-every", "0"], "--eval-every 0"),
    (["--checkpoint-every", "-2"], "--checkpoint-every -2"),
    (["--seed", "-1"], "--seed -1"),
    (["--seq-len", "65"], "--seq-len 65 exceeds the model's context of 64"),
    (["--stop-at", "0"], "--stop-at 0"),
    (["--steps", "3", "--epochs", "1"], "give --steps or --epochs, not both"),
    (["--precision", "bf16", "--reference"], "cannot be combined"),
    (["--recompute", "3"], "--recompute"),
])
def test_every_argument_is_checked_by_its_own_name_before_anything_is_built(argv, message, capsys, monkeypatch):
    import llmc_lessons.train as train
    monkeypatch.setattr(train, "GPT2", None)         # building a model would fail loudly
    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny"] + argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_trainer_checks_its_arguments_before_building_the_model(token_files, tmp_path, monkeypatch):
    import llmc_lessons.train as train
    monkeypatch.setattr(train, "GPT2", None)
    with pytest.raises(ValueError, match="--grad-clip -1: must be a finite number >= 0"):
        Trainer(make_args(token_files, tmp_path, grad_clip=-1))
    with pytest.raises(ValueError, match=r"--epochs 0.0001: less than one step"):
        Trainer(make_args(token_files, tmp_path, epochs=1e-4))
    bad = tmp_path / "big_ids.bin"
    write_tokens(bad, np.full(100, 60000, dtype=np.uint16))
    with pytest.raises(ValueError, match=r"big_ids.bin: holds token id 60000, outside the model's vocabulary"):
        Trainer(make_args(token_files, tmp_path, train_bin=str(bad)))


def test_resume_with_another_model_or_fewer_steps_is_refused_and_the_summary_kept(token_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli(token_files, out, "--steps", "3")) == 0
    summary = (out / "summary.json").read_text()
    assert main(["--resume", str(out), "--model", "d12", "--steps", "5"]) == 2
    assert "--model d12: the run in" in capsys.readouterr().err
    assert main(["--resume", str(out), "--steps", "2"]) == 2
    assert "has done 3 steps already; pass a larger --steps" in capsys.readouterr().err
    assert main(["--resume", str(out), "--steps", "3"]) == 2
    with pytest.raises(SystemExit):
        main(["--resume", str(out), "--steps", "6", "--stop-at", "3"])
    assert "--stop-at 3: must be a step after 3" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == summary
    assert json.loads(summary)["final_train_loss"] is not None


@pytest.mark.parametrize("content, message", [
    (b"", "not a checkpoint"),
    (b"\x80\x04\x95 a pickle", "not a checkpoint"),
    (b"PK\x03\x04 and then nothing", "damaged checkpoint"),
])
def test_read_checkpoint_names_the_file(tmp_path, content, message):
    from llmc_lessons.train import CheckpointError, read_checkpoint
    path = tmp_path / "ckpt_000001.npz"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"ckpt_000001.npz: {message}"):
        read_checkpoint(path)


def test_read_checkpoint_refuses_an_archive_that_is_not_a_checkpoint(tmp_path):
    from llmc_lessons.train import CheckpointError, read_checkpoint
    path = tmp_path / "ckpt_000001.npz"
    np.savez(path, weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a checkpoint of this trainer"):
        read_checkpoint(path)
    np.savez(path, params=np.zeros(3, np.float32), meta=np.array(json.dumps({"step": 1})))
    with pytest.raises(CheckpointError, match="its metadata lacks"):
        read_checkpoint(path)


def test_out_that_is_a_file_and_resume_without_a_checkpoint_are_clear_errors(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "file")])
    assert "exists and is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--resume", str(tmp_path)])
    assert "no checkpoint (ckpt_<step>.npz) there to resume from" in capsys.readouterr().err


def test_tf32_holds_during_the_trainers_work_only(token_files, tmp_path, monkeypatch):
    """--tf32 1 gives the run's matmuls TF32 and leaves the setting as it found it: a notebook's later cells (and
    the next test) keep their float32 products. The switch is faked (on a CPU TF32 is always off), so what is
    checked is when the trainer turns it on and back off."""
    import llmc_lessons.precision as precision
    import llmc_lessons.train as train
    setting, seen = {"on": False}, []

    def set_tf32(enabled):
        previous, setting["on"] = setting["on"], bool(enabled)
        return previous
    monkeypatch.setattr(precision, "set_tf32", set_tf32)
    step = train.training_step
    monkeypatch.setattr(train, "training_step", lambda *a, **k: (seen.append(setting["on"]), step(*a, **k))[1])
    trainer = Trainer(make_args(token_files, tmp_path, steps=2, tf32=1, eval_every=1))
    assert not setting["on"]                                  # building the trainer changes nothing
    trainer.run(progress=False)
    assert seen == [True, True] and not setting["on"]
    Trainer(make_args(token_files, tmp_path / "off", steps=1, tf32=0)).run(progress=False)
    assert seen[-1] is False
