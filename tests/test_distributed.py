"""Data-parallel training on the CPU (gloo): the collectives, the launcher, and runs at 2 and 3 ranks that equal
the 1-rank run with the same global batch, step for step (lesson 17)."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.data import write_tokens
from llmc_lessons.distributed import Collectives, DataParallel, Single, launch
from llmc_lessons.model import GPT2, GPT2Config
from llmc_lessons.train import DEFAULTS, Trainer, read_checkpoint, training_step

pytest.importorskip("torch.distributed")
ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), LLMC_DIST_TIMEOUT="60")


def run_ranks(code: str, n: int, **env) -> int:
    """Run the Python `code` as n ranks through the launcher (in this process)."""
    saved = dict(os.environ)
    os.environ.update(ENV, **env)
    try:
        return launch(["-c", textwrap.dedent(code)], n, grace_s=2)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_collectives_equal_numpy_on_three_ranks():
    code = """
        import numpy as np, os
        from llmc_lessons.distributed import connect
        c = connect("gloo")
        R, r = c.world_size, c.rank
        mine = lambda rank: np.random.default_rng(rank).standard_normal(3 * 7).astype(np.float32)
        total = sum(mine(k) for k in range(R))
        x = mine(r)
        assert np.allclose(c.all_reduce(x.copy()), total, atol=1e-6)
        assert np.allclose(c.all_reduce(x.copy(), op="mean"), total / R, atol=1e-6)
        assert np.allclose(c.reduce_scatter(x.copy()), total[r * 7:(r + 1) * 7], atol=1e-6)
        assert np.array_equal(c.all_gather(np.full(2, r, np.float64)), np.repeat(np.arange(R), 2))
        assert np.array_equal(c.broadcast(x.copy(), root=2), mine(2))
        c.barrier()
        for bad, message in ((np.zeros(4, np.int32), "float32 or float64"), (np.zeros(5, np.float32), "3 equal")):
            try:
                c.reduce_scatter(bad)
            except ValueError as e:
                assert message in str(e), e
            else:
                raise AssertionError("no error")
        c.close()
    """
    assert run_ranks(code, 3) == 0


@pytest.mark.parametrize("pidfd", [True, False])
def test_a_failing_rank_ends_the_run_with_its_exit_code(capfd, monkeypatch, pidfd):
    if not pidfd:   # where pidfd_open is refused (an old kernel, a container's seccomp) the launcher polls
        def refused(pid, flags=0):
            raise PermissionError("pidfd_open refused")
        monkeypatch.setattr(os, "pidfd_open", refused, raising=False)
    code = """
        import os, sys, numpy as np
        from llmc_lessons.distributed import connect
        c = connect("gloo")
        if c.rank == 1:
            sys.exit(3)
        c.all_reduce(np.zeros(4, np.float32))   # rank 1 never comes: gloo fails, or the launcher ends this rank
    """
    t0 = time.monotonic()
    assert run_ranks(code, 3) == 3
    assert time.monotonic() - t0 < 30
    assert "rank 1 failed (exit code 3)" in capfd.readouterr().err


def test_ranks_do_not_outlive_the_launcher(tmp_path):
    child = f"import os, time; open(r'{tmp_path}/' + os.environ['RANK'], 'w').write(str(os.getpid())); time.sleep(600)"
    parent = subprocess.Popen([sys.executable, "-c", "import sys; from llmc_lessons.distributed import launch; "
                               f"sys.exit(launch(['-c', {child!r}], 2))"], env=ENV)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = [int(p.read_text()) for p in tmp_path.iterdir() if p.read_text()]
    assert len(pids) == 2
    parent.send_signal(signal.SIGKILL)   # no clean-up runs in the launcher: the kernel must end its ranks
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() and
                                              "zombie" not in _state(pid) for pid in pids):
        time.sleep(0.1)
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)]


def _state(pid):
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"


# ---------------------------------------------------------------------------------------------------------
# The trainer


@pytest.mark.parametrize("backend", ["numpy", "kernels"])
def test_zero1_shards_update_as_unsharded_adamw(backend):
    """AdamW on shards [lo, hi) of the flat parameters, one model per shard, equals AdamW on all of them (the
    NumPy update, and the AdamW kernel on the shard's slices)."""
    from llmc_lessons.device import to_host
    config = GPT2Config(max_seq_len=8, vocab_size=40, padded_vocab_size=48, num_layers=1, num_heads=2, channels=8)
    whole = GPT2(config, seed=1, backend=backend)
    N, R = whole.num_parameters, 3
    S = -(-N // R)
    gen = np.random.default_rng(0)
    shards = [GPT2(config, seed=1, backend=backend) for _ in range(R)]
    for t in range(1, 4):
        grads = gen.standard_normal(N).astype(np.float32)
        for m in [whole, *shards]:
            m.zero_grad()
            m.grads_memory[...] = m.xp.asarray(grads)
        whole.update(1e-2, weight_decay=0.1, grad_scale=0.5)
        for r, m in enumerate(shards):
            m.update(1e-2, weight_decay=0.1, grad_scale=0.5, shard=(r * S, min((r + 1) * S, N)))
        joined = np.concatenate([to_host(m.params_memory[r * S:(r + 1) * S]) for r, m in enumerate(shards)])
        assert np.array_equal(joined, to_host(whole.params_memory))       # elementwise: the same bits
        assert np.array_equal(np.concatenate([to_host(m.m_memory) for m in shards]), to_host(whole.m_memory))
    with pytest.raises(ValueError, match="moments are those of parameters"):
        shards[0].update(1e-2, shard=(0, N))


class _Pair(Collectives):
    """Two ranks in one process: this one, and another whose gradients are `other` (float32 values), all-reduced
    piece after piece in order (its squares for a norm are not modelled: 0)."""
    world_size = 2

    def __init__(self, rank, other):
        self.rank, self.other, self.at = rank, other, 0

    def all_reduce(self, x, op="sum"):
        if x.dtype == np.float32:
            x += device.xp.asarray(self.other[self.at:self.at + x.size])
            self.at += x.size
        return x

    def reduce_scatter(self, x):
        S = x.size // 2
        padded = np.zeros(x.size, np.float32)
        padded[:self.other.size] = self.other
        return (x + device.xp.asarray(padded))[self.rank * S:(self.rank + 1) * S]


@pytest.mark.parametrize("ranks,accum,zero", [(1, 1, 1), (1, 3, 1), (2, 1, 0), (2, 3, 0), (2, 3, 1)])
def test_bf16_gradients_are_averaged_in_float32_and_rounded_once(ranks, accum, zero, monkeypatch):
    """The bf16 step keeps bf16 gradients (llm.c's layout): the average over ranks and micro-batches is taken
    in float32 and rounded to bf16 once, whole (a few values at a time) or (ZeRO-1) on this rank's shard only.
    The other rank's gradients differ, so the sum is rarely a bf16 value: a second rounding would show."""
    from llmc_lessons.device import to_host
    from llmc_lessons.precision import from_bf16, to_bf16
    monkeypatch.setattr(DataParallel, "MEAN_CHUNK", 1000)      # several pieces
    config = GPT2Config(max_seq_len=8, vocab_size=40, padded_vocab_size=48, num_layers=1, num_heads=2, channels=32)
    N = GPT2(config, seed=1, backend="kernels").num_parameters
    gen = np.random.default_rng(ranks + accum)
    g0, g1 = (to_bf16(gen.standard_normal(N) * 3) for _ in range(2))
    for rank in range(ranks):
        model = GPT2(config, seed=1, precision="bf16")
        model.zero_grad()
        assert model.grads_memory.dtype == np.uint16 and model.gradient().dtype == np.float32
        model.grads_memory[...] = model.xp.asarray(g0)
        dp = DataParallel(Single() if ranks == 1 else _Pair(rank, from_bf16(g1)), N, accum, zero)
        norm = dp.reduce_gradients(model)
        lo, hi = (dp.lo, dp.hi) if dp.sharded else (0, N)
        total = from_bf16(g0) + (from_bf16(g1) if ranks == 2 else 0)              # float32, as the ranks add
        mean = to_bf16(total[lo:hi] * np.float32(1 / (ranks * accum)))
        if ranks == 1 and accum == 1:
            mean = g0                                                          # nothing to average: untouched
        np.testing.assert_array_equal(to_host(model.grads_memory[lo:hi]), mean)
        squares = np.sum(from_bf16(mean).astype(np.float64) ** 2)     # (a shard's: the other's count 0 here)
        assert norm == pytest.approx(np.sqrt(squares), rel=1e-5)
    if ranks == 2 and not zero:
        assert dp.comm.at == N, "every gradient went through the all-reduce once"


def test_gradient_accumulation_equals_the_large_batch():
    config = GPT2Config.from_name("tiny")
    gen = np.random.default_rng(0)
    x, y = (gen.integers(0, 50257, size=(6, 16)) for _ in range(2))
    big, accumulated = (GPT2(config, seed=3, backend="numpy") for _ in range(2))
    for step in range(1, 3):
        want = training_step(big, x, y, 1e-3, 0.1, 1.0, step)
        got = training_step(accumulated, x, y, 1e-3, 0.1, 1.0, step, DataParallel(Single(), big.num_parameters, 3))
        assert got == pytest.approx(want, rel=1e-5)
    # AdamW moves a parameter by about lr per step whatever the size of its gradient: where a gradient is at the
    # level of float32 rounding, another order of the sums moves it differently, by a fraction of lr (1e-3)
    np.testing.assert_allclose(accumulated.params_memory, big.params_memory, atol=1e-4)
    assert np.mean(np.abs(accumulated.params_memory - big.params_memory) < 1e-6) > 0.99
    with pytest.raises(ValueError, match="split evenly into 1 rank"):
        DataParallel(Single(), 10, grad_accum=4).check_batch(6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Token files, the 1-rank run, and the data-parallel runs compared with it (each launched once)."""
    tmp = tmp_path_factory.mktemp("dp")
    phrase = np.random.default_rng(0).integers(0, 50257, size=50)
    write_tokens(tmp / "train.bin", np.tile(phrase, 60).astype(np.uint16))
    write_tokens(tmp / "val.bin", np.tile(phrase, 10).astype(np.uint16))
    options = dict(model="tiny", batch_size=6, seq_len=16, steps=4, warmup=2, eval_every=2, eval_batches=2,
                   train_bin=str(tmp / "train.bin"), val_bin=str(tmp / "val.bin"), reference=True)

    def argv(out, **kw):
        flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}")
                 for k, v in {**options, **kw}.items()]
        return [sys.executable, "-m", "llmc_lessons.train", *flags, f"--out={tmp / out}"]

    def train(out, resume=False, **kw):
        command = argv(out, **kw) if not resume else \
            [sys.executable, "-m", "llmc_lessons.train", f"--resume={tmp / out}", *(f"--{k}={v}" for k, v in kw.items())]
        done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        return done

    Trainer(dict(DEFAULTS, **options, out=str(tmp / "one"))).run(progress=False)
    train("two_whole", ranks=2)                    # 2 ranks, ZeRO-1, steps 1-4
    train("two", ranks=2, stop_at=2)               # the same, stopped after step 2 with a checkpoint
    for copy in ("two_then_three", "two_then_one"):
        shutil.copytree(tmp / "two", tmp / copy)
    train("two", resume=True, ranks=2)             # resumed at 2 ranks: steps 3-4
    done = train("two_then_three", resume=True, ranks=3)   # resumed at 3 ranks
    train("three_accum_zero0", ranks=3, grad_accum=2, zero_stage=0)   # 3 ranks x 2 micro-batches of one row,
                                                                      # every rank keeps all of AdamW's state
    resumed = read_checkpoint(tmp / "two_then_one" / "ckpt_000002.npz")
    Trainer(dict(DEFAULTS, **options, out=str(tmp / "two_then_one")), resume_from=resumed).run(progress=False)
    return tmp, done


def log(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def assert_same_run(tmp, name):
    want, got = log(tmp / "one"), log(tmp / name)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "val_loss"):
        np.testing.assert_allclose([r.get(key, 0) for r in got], [r.get(key, 0) for r in want], rtol=2e-5,
                                   err_msg=f"{name}: {key}")
    a, b = read_checkpoint(tmp / "one" / "ckpt_000004.npz"), read_checkpoint(tmp / name / "ckpt_000004.npz")
    # AdamW moves a parameter by about lr (6e-4) per step however small its gradient: where a gradient is at the
    # level of float32 rounding, another order of the sums moves it differently, by a fraction of lr
    np.testing.assert_allclose(b["params"], a["params"], atol=2e-4, err_msg=f"{name}: params")
    assert np.mean(np.abs(b["params"] - a["params"]) < 1e-6) > 0.99
    for key in ("m", "v"):
        np.testing.assert_allclose(b[key], a[key], atol=1e-3 * np.abs(a[key]).max(), err_msg=f"{name}: {key}")
    assert a["meta"]["train_loader"] == b["meta"]["train_loader"] and a["meta"]["adamw_t"] == b["meta"]["adamw_t"]


@pytest.mark.parametrize("name", ["two_whole", "two_then_three", "three_accum_zero0", "two_then_one"])
def test_data_parallel_runs_equal_the_one_rank_run(runs, name):
    """2 ranks (ZeRO-1); 2 ranks resumed at 3; 3 ranks with 2 micro-batches each, without ZeRO; 2 resumed at 1."""
    assert_same_run(runs[0], name)


def test_a_resume_at_the_same_rank_count_is_exact(runs):
    tmp = runs[0]
    def records(name):   # every field but the timings, bit for bit
        return [{k: v for k, v in r.items() if k not in ("ms", "tokens_per_s")} for r in log(tmp / name)]
    assert records("two") == records("two_whole")
    a, b = (read_checkpoint(tmp / n / "ckpt_000004.npz") for n in ("two_whole", "two"))
    assert all(np.array_equal(a[k], b[k]) for k in ("params", "m", "v"))


def test_only_rank_0_prints(runs):
    out = runs[1].stdout
    assert out.count("summary:") == 1 and "ranks=3" in out and "resuming at step 2" in out


def test_the_multigpu_benchmark_runs_on_the_cpu(tmp_path):
    """tools/multigpu_bench.py's plumbing (launch, workers, record) with gloo: the course, DDP and ZeRO-1 at 2 ranks."""
    record = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "multigpu_bench.py"), "--cpu", "--model", "tiny",
                           "--ranks", "2", "--batch-size", "2", "--seq-len", "16", "--steps", "1", "--warmup", "1",
                           "--timeout", "120", "--json", str(record)], env=ENV, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(record.read_text())["rows"]
    assert [(r["system"], r["ranks"]) for r in rows] == [("course", 2), ("torch-ddp", 2), ("torch-zero1", 2)]
    assert all(r["tokens_per_s"] > 0 for r in rows) and "torch-zero1" in done.stdout


def test_the_multigpu_benchmark_times_the_benchmarks_pytorch_step():
    """Its PyTorch systems run in llmc_lessons.bench's TorchStep modes: compiled (with fused AdamW) on a GPU, eager
    on the CPU."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("multigpu_bench", ROOT / "tools" / "multigpu_bench.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    modes = {(cpu, p): tool.torch_mode(argparse.Namespace(cpu=cpu, precision=p)) for cpu in (False, True)
             for p in ("fp32", "bf16")}
    assert modes == {(False, "fp32"): "compiled-tf32", (False, "bf16"): "compiled-bf16",
                     (True, "fp32"): "eager-tf32", (True, "bf16"): "eager-tf32"}


def test_gpus_on_a_machine_without_them_is_refused(capsys):
    from llmc_lessons import device
    from llmc_lessons.train import main
    if device.on_gpu():
        pytest.skip("this machine has a GPU")
    assert main(["--gpus", "2", "--steps", "1"]) == 2
    assert "--gpus 2: this machine has 0 usable GPU(s)" in capsys.readouterr().err


def test_a_batch_that_does_not_split_is_refused_before_any_rank_starts(capsys):
    from llmc_lessons.train import main
    with pytest.raises(SystemExit):
        main(["--ranks", "3", "--batch-size", "4", "--steps", "1"])
    assert "--batch-size 4: the global batch must split evenly into 3 rank(s) x 1" in capsys.readouterr().err
