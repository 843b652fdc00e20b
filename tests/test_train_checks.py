"""Lesson 11's checks pass on the solution and fail, naming the mistake, on the stub and on wrong answers."""
import math

import pytest

from llmc_lessons.checks.train import check_learning_rate, check_training_step
from llmc_lessons.layers.adamw import global_norm
from llmc_lessons.train import learning_rate


def stub(*args):
    raise NotImplementedError("Exercise 11.x: write it")


def test_learning_rate_solution_and_stub(capsys):
    check_learning_rate(learning_rate)
    assert "Exercise 11.1: correct" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="Exercise 11.1 is not done yet"):
        check_learning_rate(stub)


def _warm(step, lr, warmup):
    return lr * (step + 1) / warmup


@pytest.mark.parametrize("wrong, cause", [
    (lambda s, S, lr, W, f: lr * s / W if s < W else learning_rate(s, S, lr, W, f), "step 0 gets a learning rate of 0"),
    (lambda s, S, lr, W, f: _warm(s, lr, W) if s < W else 0.5 * (1 + math.cos(math.pi * (s - W) / (S - W))) * lr,
     "decays to 0"),
    (lambda s, S, lr, W, f: _warm(s, lr, W) if s < W else
     lr * f + 0.5 * (1 + math.cos(math.pi * s / S)) * (lr - lr * f), "starts at step 0"),
    (lambda s, S, lr, W, f: _warm(s, lr, W) if s < W else lr - (lr - lr * f) * (s - W) / (S - W), "linear"),
    (lambda s, S, lr, W, f: -learning_rate(s, S, lr, W, f), "sign error"),
])
def test_learning_rate_wrong_answers(wrong, cause):
    with pytest.raises(AssertionError, match=cause):
        check_learning_rate(wrong)


def good_step(model, x, y, lr, weight_decay=0.1, grad_clip=1.0):
    loss = model.forward(x, y)
    model.zero_grad()
    model.backward()
    norm = global_norm(model.grads_memory)
    model.update(lr, weight_decay=weight_decay, grad_scale=grad_clip / norm if norm > grad_clip else 1.0)
    return loss


def test_training_step_solution_and_stub(capsys):
    check_training_step(good_step)
    assert "Exercise 11.2: correct" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="Exercise 11.2 is not done yet"):
        check_training_step(stub)


def no_clip(model, x, y, lr):
    loss = model.forward(x, y)
    model.zero_grad()
    model.backward()
    model.update(lr, weight_decay=0.1)
    return loss


def zero_after_backward(model, x, y, lr):
    loss = model.forward(x, y)
    model.backward()
    model.zero_grad()
    model.update(lr, weight_decay=0.1)
    return loss


def no_zero_grad(model, x, y, lr):  # gradients of step 1 leak into step 2
    loss = model.forward(x, y)
    model.backward()
    norm = global_norm(model.grads_memory)
    model.update(lr, weight_decay=0.1, grad_scale=1.0 / norm if norm > 1.0 else 1.0)
    return loss


def no_weight_decay(model, x, y, lr):
    return good_step(model, x, y, lr, weight_decay=0.0)


def no_return(model, x, y, lr):
    good_step(model, x, y, lr)


def two_updates(model, x, y, lr):
    loss = good_step(model, x, y, lr)
    model.update(lr, weight_decay=0.1)
    return loss


@pytest.mark.parametrize("wrong, message", [
    (no_clip, "clip factor"),
    (zero_after_backward, "zero_grad\\(\\) must come before backward"),
    (no_zero_grad, "params after the step"),
    (no_weight_decay, "weight_decay=0.1"),
    (no_return, "return the loss"),
    (two_updates, "exactly once per step"),
])
@pytest.mark.parametrize("repeat", range(2))  # fresh random models each time: the check must not be lucky
def test_training_step_wrong_answers(wrong, message, repeat):
    with pytest.raises(AssertionError, match=message):
        check_training_step(wrong)
