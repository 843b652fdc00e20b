"""Checks for lesson 11: the learning-rate schedule and one training step."""
from __future__ import annotations

import math

import numpy as np

from llmc_lessons import device
from llmc_lessons.checks import ExerciseFailed, assert_close, passed, run_exercise
from llmc_lessons.train import learning_rate


def check_learning_rate(fn) -> None:
    """Exercise 11.1: fn(step, total, lr, warmup, final_frac) must equal llm.c's warm-up + cosine schedule."""
    ex = "Exercise 11.1"
    for total, lr, warmup, frac in [(100, 6e-4, 10, 0.1), (37, 1e-3, 5, 0.0), (500, 3e-4, 1, 0.25)]:
        steps = np.arange(total)
        got = np.array([run_exercise(ex, fn, int(s), total, lr, warmup, frac) for s in steps], dtype=np.float64)
        want = np.array([learning_rate(int(s), total, lr, warmup, frac) for s in steps])
        lr_min = lr * frac
        mistakes = {
            "the warm-up uses step / warmup, so step 0 gets a learning rate of 0: use (step + 1) / warmup":
                np.where(steps < warmup, lr * steps / warmup, want),
            "the cosine decays to 0, not to final_frac * lr: add the floor lr_min = final_frac * lr":
                np.array([lr * (s + 1) / warmup if s < warmup else
                          0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) * lr for s in steps]),
            "the cosine starts at step 0 instead of after the warm-up: use (step - warmup) / (total - warmup)":
                np.array([lr * (s + 1) / warmup if s < warmup else
                          lr_min + 0.5 * (1 + math.cos(math.pi * s / total)) * (lr - lr_min) for s in steps]),
            "the decay is linear: the schedule is a half cosine, 0.5 * (1 + cos(pi * ratio))":
                np.array([lr * (s + 1) / warmup if s < warmup else
                          lr - (lr - lr_min) * (s - warmup) / (total - warmup) for s in steps]),
        }
        assert_close(ex, "lr", got, want, atol=lr * 1e-9, rtol=1e-6, known_mistakes=mistakes,
                     hint=f"total = {total}, lr = {lr}, warmup = {warmup}, final_frac = {frac}; the index is the "
                          f"step (0-based)")
    passed(ex, "warm-up and cosine decay match llm.c's schedule")


def check_training_step(fn) -> None:
    """Exercise 11.2: fn(model, x, y, lr) -> loss runs one step: forward, zero_grad, backward, clip, AdamW.

    Two steps of the student's function on a tiny model must leave the same loss and weights as two steps of
    llmc_lessons.train.training_step (weight decay 0.1, clip at 1.0) on a twin of the model.
    """
    from llmc_lessons.model import GPT2, GPT2Config
    from llmc_lessons.train import training_step
    ex = "Exercise 11.2"
    config = GPT2Config(max_seq_len=8, vocab_size=37, padded_vocab_size=40, num_layers=1, num_heads=2, channels=8)
    gen = np.random.default_rng()
    batches = [(gen.integers(0, 37, (2, 8)).astype(np.int32), gen.integers(0, 37, (2, 8)).astype(np.int32))
               for _ in range(2)]
    seed = int(gen.integers(1000))
    ours, theirs = GPT2(config, seed=seed, backend="numpy"), GPT2(config, seed=seed, backend="numpy")
    # larger weights make the global gradient norm about 8 > 1.0, so a missing clip shows
    for m in (ours, theirs):
        m.params_memory[...] *= 4
    for i, (x, y) in enumerate(batches):
        want_loss, _ = training_step(ours, x, y, 1e-2, 0.1, 1.0, i + 1)
        got_loss = run_exercise(ex, fn, theirs, x, y, 1e-2)
        if not isinstance(got_loss, (float, np.floating)) or not math.isfinite(got_loss):
            raise ExerciseFailed(f"{ex}: your step returned {got_loss!r}; return the loss that forward gave "
                                 f"(a float)")
        if abs(got_loss - want_loss) > 1e-4 * abs(want_loss):
            raise ExerciseFailed(f"{ex}: step {i + 1} computed the loss {got_loss:.6f}, expected {want_loss:.6f}. "
                                 f"The forward must run on the weights the previous step left.")
        if theirs.step != ours.step:
            raise ExerciseFailed(f"{ex}: after step {i + 1}, AdamW's step counter is {theirs.step}, expected "
                                 f"{ours.step}: call model.update(...) exactly once per step.")
        got_p, want_p = device.to_host(theirs.params_memory), device.to_host(ours.params_memory)
        if not np.allclose(got_p, want_p, rtol=1e-4, atol=1e-6):
            grads = theirs.grads_memory
            if grads is None or not np.any(device.to_host(grads)):
                hint = ("the gradients are all zero after your step: zero_grad() must come before backward(), "
                        "which adds into the gradient buffers")
            else:
                hint = ("check the clip factor (max_norm / norm when the global norm exceeds max_norm = 1.0, passed "
                        "to update as grad_scale) and weight_decay=0.1")
            assert_close(ex, "params after the step", got_p, want_p, rtol=1e-4, atol=1e-6, hint=hint)
    passed(ex, "two steps give the same loss and weights as the package's training_step")
