"""Lesson 00's checks pass on the solution and fail, with a teaching message, on the stub and wrong answers."""
import pytest

from llmc_lessons.checks.welcome import check_num_blocks, check_saxpy_kernel
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
