"""Lesson 00's checks pass on the solution and fail, with a teaching message, on the stub and wrong answers."""
import numpy as np
import pytest

from llmc_lessons.checks.welcome import check_gradient_checker, check_num_blocks, check_saxpy_kernel
from llmc_lessons.cuda import kernel_source

GOOD = kernel_source("saxpy.cu")
BODY = """    int i = blockIdx.x * blockDim.x + threadIdx.x;  // my element: skip the blocks before mine, then my place in it
    if (i < n) {
        out[i] = a * x[i] + y[i];
    }"""


def kernel_with(body):
    assert BODY in GOOD
    return GOOD.replace(BODY, body)


def test_solution_passes(capsys):
    check_num_blocks(lambda n, bs: (n + bs - 1) // bs)
    check_saxpy_kernel(GOOD)
    assert capsys.readouterr().out.count("correct") == 2


@pytest.mark.parametrize("wrong, msg", [
    (lambda n, bs: n // bs, "rounds down"),
    (lambda n, bs: n // bs + 1, "useless extra block"),
    (lambda n, bs: n / bs, "must be an int"),
])
def test_num_blocks_wrong_answers(wrong, msg):
    with pytest.raises(AssertionError, match=msg):
        check_num_blocks(wrong)


def test_num_blocks_stub():
    def stub(n, bs):
        raise NotImplementedError("Exercise 0.1: return the number of blocks")
    with pytest.raises(AssertionError, match="Exercise 0.1 is not done yet"):
        check_num_blocks(stub)


@pytest.mark.parametrize("body, msg", [
    ("    // TODO (Exercise 0.2): write the body", r"Exercise 0.2 is not done yet"),
    ("    // the body is missing", r"Exercise 0.2 \(out\)[\s\S]*elements are NaN"),
    ("    int i = blockIdx.x * blockDim.x + threadIdx.x;\n    out[i] = a * x[i] + y[i];", "wrote past the end of out"),
    ("    int i = threadIdx.x;\n    if (i < n) out[i] = a * x[i] + y[i];", "add blockIdx.x \\* blockDim.x"),
    ("    int i = blockIdx.x * blockDim.x + threadIdx.x;\n    if (i < n) out[i] = a * (x[i] + y[i]);", r"a \* \(x \+ y\)"),
    ("    int i = blockIdx.x * blockDim.x + threadIdx.x;\n    if (i < n - 1) out[i] = a * x[i] + y[i];", "never written"),
])
def test_saxpy_kernel_wrong_answers(body, msg):
    with pytest.raises(AssertionError, match=msg):
        check_saxpy_kernel(kernel_with(body))


def grad_check(loss, x, grad, seed=0, eps=1e-6, central=True, dtype=np.float64, relative=True, random=True):
    """Exercise 0.3's answer, and with one argument changed, a plausible wrong one."""
    x = np.asarray(x, dtype=dtype)
    v = np.random.default_rng(seed).standard_normal(x.shape).astype(dtype) if random else np.ones(x.shape, dtype)
    if central:
        numeric = (loss(x + eps * v) - loss(x - eps * v)) / (2 * eps)
    else:
        numeric = (loss(x + eps * v) - loss(x)) / eps
    analytic = float(np.sum(np.asarray(grad, dtype=np.float64) * v))
    return abs(analytic - numeric) / (max(abs(analytic), abs(numeric), 1e-300) if relative else 1.0)


def test_gradient_checker_solution_passes(capsys):
    check_gradient_checker(grad_check)
    assert "Exercise 0.3: correct" in capsys.readouterr().out


def test_gradient_checker_tries_two_more_directions_before_failing(capsys):
    """A right checker whose random direction is nearly at right angles to the gradient reports a large error
    once; two more seeds decide. Wrong at two of the three seeds, it fails."""
    def unlucky(bad_seeds):
        return lambda loss, x, grad, seed=0: 1e-3 if seed in bad_seeds else grad_check(loss, x, grad, seed)
    check_gradient_checker(unlucky({0}))
    assert "Exercise 0.3: correct" in capsys.readouterr().out
    for bad in ({0, 100}, {3, 203}):
        with pytest.raises(AssertionError, match="CORRECT gradient"):
            check_gradient_checker(unlucky(bad))


def test_gradient_checker_stub():
    def stub(loss, x, grad, seed=0):
        raise NotImplementedError("Exercise 0.3: return the relative error")
    with pytest.raises(AssertionError, match="Exercise 0.3 is not done yet"):
        check_gradient_checker(stub)


@pytest.mark.parametrize("wrong, msg", [
    (dict(central=False), "(?s)CORRECT gradient.*one-sided"),
    (dict(relative=False), "grows with the loss's scale|divide by the size"),
    (dict(dtype=np.float32), "(?s)CORRECT gradient.*float32"),
    (dict(eps=1e-2), "(?s)CORRECT gradient.*eps = 1e-2"),
    (dict(eps=1e-12), "(?s)CORRECT gradient.*eps = 1e-12"),
    (dict(random=False), "(?s)WRONG gradient.*draw v at random"),
])
def test_gradient_checker_wrong_answers(wrong, msg):
    with pytest.raises(AssertionError, match=msg):
        check_gradient_checker(lambda loss, x, grad, seed=0: grad_check(loss, x, grad, seed, **wrong))


def test_gradient_checker_must_return_a_number():
    with pytest.raises(AssertionError, match="one number"):
        check_gradient_checker(lambda loss, x, grad, seed=0: "ok")
