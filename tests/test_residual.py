"""Exercise 7.3, the residual kernel: its check passes on the package's kernel and on a solution, and fails on the
stub and on plausible wrong kernels, naming the likely cause."""
import re

import pytest

from llmc_lessons.checks.residual import check_residual_forward_kernel
from llmc_lessons.cuda import kernel_source

_BODY = re.compile(r"(residual_forward_kernel\(.*?\{)(.*?)(\n\}\n)", re.S)


def _kernel_with_body(body: str) -> str:
    src = kernel_source("residual.cu")
    m = _BODY.search(src)
    assert m, "residual_forward_kernel not found in residual.cu"
    return src[:m.start(2)] + "\n" + body + src[m.end(2):]


GOOD = """
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < N) {
        out[i] = inp1[i] + inp2[i];
    }"""


def test_check_passes_on_solution_and_package_source(capsys):
    check_residual_forward_kernel(kernel_source("residual.cu"))
    check_residual_forward_kernel(_kernel_with_body(GOOD))
    assert capsys.readouterr().out.count("Exercise 7.3: correct") == 2


def test_check_fails_on_stub():
    stub = _kernel_with_body("    // TODO (Exercise 7.3): residual_forward_kernel, one thread per element")
    with pytest.raises(AssertionError, match="Exercise 7.3 is not done yet"):
        check_residual_forward_kernel(stub)
    with pytest.raises(AssertionError, match="never written"):
        check_residual_forward_kernel(_kernel_with_body("    // nothing"))


@pytest.mark.parametrize("old,new,cause", [
    ("if (i < N) {", "{", "wrote past the end"),
    ("if (i < N) {", "if (i <= N) {", "wrote past the end"),
    ("blockIdx.x * blockDim.x + threadIdx.x", "threadIdx.x", "never written"),
    ("blockIdx.x * blockDim.x + threadIdx.x", "blockIdx.x * blockDim.x + threadIdx.x + 1", "Exercise 7.3"),
    ("inp1[i] + inp2[i]", "inp1[i]", "inp2 was never added"),
    ("inp1[i] + inp2[i]", "inp2[i]", "inp1 was never added"),
    ("inp1[i] + inp2[i]", "inp1[i] - inp2[i]", "adds the branch's output"),
    ("inp1[i] + inp2[i]", "inp1[i] + inp1[i]", "the second input is inp2"),
])
def test_check_catches_mistakes(old, new, cause):
    assert old in GOOD
    with pytest.raises(AssertionError, match=cause):
        check_residual_forward_kernel(_kernel_with_body(GOOD.replace(old, new)))
