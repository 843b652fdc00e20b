"""Lesson 12's tools and checks: launch counting, CUDA-graph capture, the roofline plot, the exercises."""

import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.checks.perf import check_fused_residual_layernorm_kernel, check_layernorm_bytes
from llmc_lessons.cuda import kernel_source
from llmc_lessons.perf import capture_graph, count_launches, roofline

KERNEL = 'extern "C" __global__ void fused_residual_layernorm_forward_kernel'
_LN = kernel_source("layernorm.cu")
SRC = '#include "common.cuh"\n\n' + _LN[_LN.index(KERNEL):_LN.index("\n}\n", _LN.index(KERNEL)) + 3]
"""The fused kernel as lesson 12 shows it: layernorm.cu's fused_residual_layernorm_forward_kernel alone."""
LOOP = """    for (int c = lane; c < C; c += 32) {
        float v = a[c] + b[c];
        r[c] = v;
        sum += v;
    }"""


def test_count_launches_of_a_training_step():
    from llmc_lessons.model import GPT2, GPT2Config
    from llmc_lessons.train import training_step
    config = GPT2Config(max_seq_len=8, vocab_size=37, padded_vocab_size=40, num_layers=2, num_heads=2, channels=8)
    model = GPT2(config, seed=0, backend="kernels")
    x = np.random.default_rng(0).integers(0, 37, (2, 8)).astype(np.int32)
    with count_launches() as counts:
        training_step(model, x, x, 1e-3, 0.1, 1.0, 1)
    assert counts["layernorm_forward_kernel3"] == 2 * 2 + 1          # ln1, ln2 per layer, lnf
    assert counts["cublas gemm"] == 3 * (4 * 2 + 1)                   # 4 linear layers per block + lm_head, x3
    assert counts["adamw_kernel"] >= 1 and sum(counts.values()) > 60
    with count_launches() as none:
        pass
    assert not none


def test_capture_graph_needs_a_gpu():
    if device.on_gpu():
        pytest.skip("on a GPU capture works: the notebook replays a graph")
    with pytest.raises(RuntimeError, match="CUDA graphs need a GPU"):
        capture_graph(lambda: None)


def test_roofline_draws_points_under_the_roofs():
    ax = roofline([("a", 1e9, 1e8, 1.0), ("b", 1e6, 1e10, 0.5)], bandwidth_gbps=3000, peak_tflops=50)
    assert len(ax.lines) >= 3 and "ridge" in ax.get_title()


def test_layernorm_bytes_check(capsys):
    check_layernorm_bytes(lambda N, C: 4 * (2 * N * C + 2 * C + 2 * N))
    assert "Exercise 12.1: correct" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, cause", [
    (lambda N, C: 4 * (2 * N * C + 2 * C), "mean and rstd"),
    (lambda N, C: 4 * (4 * N * C + 2 * N), "once, not once per row"),
    (lambda N, C: 32 * (2 * N * C + 2 * C + 2 * N), "bits"),
    (lambda N, C: 2 * N * C + 2 * C + 2 * N, "elements"),
    (lambda N, C: 4 * (3 * N * C + 2 * C + 2 * N), "read once and the output written once"),
    (lambda N, C: 0, "expected"),
])
def test_layernorm_bytes_wrong_answers(wrong, cause):
    with pytest.raises(AssertionError, match=cause):
        check_layernorm_bytes(wrong)


def test_layernorm_bytes_stub():
    def stub(N, C):
        raise NotImplementedError("Exercise 12.1: count")
    with pytest.raises(AssertionError, match="Exercise 12.1 is not done yet"):
        check_layernorm_bytes(stub)


def test_fused_kernel_check_passes_on_the_package_kernel(capsys):
    assert LOOP in SRC
    check_fused_residual_layernorm_kernel(SRC)
    assert "Exercise 12.2: correct" in capsys.readouterr().out


@pytest.mark.parametrize("loop, message", [
    ("    // TODO (Exercise 12.2): the residual and the row sum", "Exercise 12.2 is not done yet"),
    ("    // the loop is missing", r"residual\)[\s\S]*NaN"),
    (LOOP.replace("a[c] + b[c]", "a[c]"), "add inp2"),
    (LOOP.replace("sum += v;", ""), r"\(mean\)"),
    (LOOP.replace("c += 32", "c += 64"), r"\(residual\)"),
    (LOOP.replace("int c = lane", "int c = lane + 1"), r"\(residual\)"),
    (LOOP.replace("a[c] + b[c]", "a[c] - b[c]"), r"\(residual\)"),
])
def test_fused_kernel_check_catches_wrong_loops(loop, message):
    with pytest.raises(AssertionError, match=message):
        check_fused_residual_layernorm_kernel(SRC.replace(LOOP, loop))


def test_the_notebook_kernel_is_the_package_kernel():
    from conftest import notebook_cuda_source
    body = notebook_cuda_source("12_kernel_performance.ipynb", "fused_src")
    assert body[body.index(KERNEL):].strip() == SRC[SRC.index(KERNEL):].strip()


def test_time_ms_refuses_the_cpu_and_hide_host_hides_python():
    import time

    from llmc_lessons import device, timing
    if not device.on_gpu():
        with pytest.raises(RuntimeError, match="needs a GPU"):
            timing.time_ms(lambda: None, hide_host=True)
        return
    a = device.xp.ones(1 << 20, np.float32)

    def slow_python():          # 0.5 ms of Python (less than the 1 ms hold), then a kernel of a few microseconds
        time.sleep(0.0005)
        a.fill(1.0)

    shown = timing.time_ms(slow_python, warmup=1, repeat=5)
    hidden = timing.time_ms(slow_python, warmup=1, repeat=5, hide_host=True)
    assert shown > 0.45, f"without hide_host the events span Python's 0.5 ms, got {shown:.3f} ms"
    assert hidden < 0.2, f"with hide_host the events time the kernel alone, got {hidden:.3f} ms"
