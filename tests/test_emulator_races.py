"""Checked mode (LLMC_CHECK=1) finds data races and out-of-bounds accesses on shared memory, naming both lines;
correct kernels, the course's own among them, report nothing."""
import sys

import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.cuda import RawKernel
from llmc_lessons.cuda.emulator import KernelError

pytestmark = [
    pytest.mark.skipif(device.on_gpu(), reason="emulator tests run on the CPU backend"),
    pytest.mark.skipif(not (sys.platform.startswith("linux") and __import__("platform").machine() == "x86_64"),
                       reason="shared-memory watching in checked mode needs Linux on x86-64"),
]


@pytest.fixture(autouse=True)
def checked(monkeypatch):
    monkeypatch.setenv("LLMC_DEVICE", "cpu")
    monkeypatch.setenv("LLMC_CHECK", "1")


def launch(src, threads=64, shared_mem=0, blocks=1):
    out = np.full(threads, np.nan, np.float32)
    RawKernel(src, "k")((blocks,), (threads,), (out,), shared_mem=shared_mem)
    return out


NEIGHBOUR = r'''extern "C" __global__ void k(float* out) {
    __shared__ float buf[64];
    int t = threadIdx.x;
    buf[t] = t;
    out[t] = buf[(t + 1) % 64];
}'''


def test_neighbour_read_without_barrier():
    with pytest.raises(KernelError, match=r"data race on shared memory in kernel 'k', block \(0, 0, 0\): "
                                          r"thread \(0, 0, 0\) read buf\[1\] at <RawKernel source>:5 and thread "
                                          r"\(1, 0, 0\) wrote it at <RawKernel source>:4 with no __syncthreads "
                                          r"between them \(nor a __syncwarp"):
        launch(NEIGHBOUR)
    fixed = NEIGHBOUR.replace("buf[t] = t;", "buf[t] = t; __syncthreads();")
    assert np.array_equal(launch(fixed), (np.arange(64) + 1) % 64)


def test_increment_from_64_threads():
    src = r'''extern "C" __global__ void k(float* out) {
    __shared__ int c[1];
    if (threadIdx.x == 0) c[0] = 0;
    __syncthreads();
    c[0] = c[0] + 1;
    __syncthreads();
    out[threadIdx.x] = c[0];
}'''
    with pytest.raises(KernelError, match=r"data race on shared memory in kernel 'k', block \(0, 0, 0\): thread "
                                          r"\(63, 0, 0\) wrote c\[0\] at <RawKernel source>:5 and thread \(0, 0, 0\) "
                                          r"(read|wrote) it at <RawKernel source>:5 with no __syncthreads"):
        launch(src)
    fixed = src.replace("c[0] = c[0] + 1;", "atomicAdd(&c[0], 1);")
    assert np.array_equal(launch(fixed), np.full(64, 64))


def test_write_write_race_across_warps_names_2d_element():
    src = r'''extern "C" __global__ void k(float* out) {
    __shared__ float s[2][33];
    int t = threadIdx.x;
    if (t == 0) s[1][5] = 1.0f;
    __syncthreads();
    if (t == 20) s[1][5] = 2.0f;
    if (t == 50) s[1][5] = 3.0f;
    out[t] = 0.0f;
}'''
    with pytest.raises(KernelError, match=r"thread \(20, 0, 0\) wrote s\[1\]\[5\] at <RawKernel source>:6 and thread "
                                          r"\(50, 0, 0\) wrote it at <RawKernel source>:7 with no __syncthreads "
                                          r"between them\.\n"):
        launch(src)


def test_syncwarp_orders_lanes_of_one_warp_only():
    src = r'''extern "C" __global__ void k(float* out) {
    __shared__ float buf[64];
    int t = threadIdx.x;
    buf[t] = t;
    __syncwarp();
    out[t] = buf[t ^ SRC];
}'''
    assert np.array_equal(launch(src.replace("SRC", "1")), np.arange(64) ^ 1)  # a lane of the same warp
    # lane 31 completes warp 0's __syncwarp and reads on before warp 1 has run
    with pytest.raises(KernelError, match=r"thread \(31, 0, 0\) read buf\[63\] at <RawKernel source>:6 and thread "
                                          r"\(63, 0, 0\) wrote it at <RawKernel source>:4 with no __syncthreads "
                                          r"between them\.\n"):
        launch(src.replace("SRC", "32"))  # a lane of the other warp: __syncwarp does not order it


GLOBAL = r'''extern "C" __global__ void k(float* c, const float* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) c[i + 1] = 2.0f * x[i];
    c[0] = c[0] + 1;
}'''


def test_increment_of_global_memory_from_64_threads():
    x, c = np.arange(128, dtype=np.float32), np.zeros(129, np.float32)
    with pytest.raises(KernelError, match=r"data race on global memory in kernel 'k', block \(0, 0, 0\): thread "
                                          r"\(0, 0, 0\) wrote c\[0\] at <RawKernel source>:4 and thread \(1, 0, 0\) "
                                          r"(read|wrote) it at <RawKernel source>:4 with no __syncthreads"):
        RawKernel(GLOBAL, "k")((2,), (64,), (c, x, np.int32(128)))
    fixed = GLOBAL.replace("c[0] = c[0] + 1;", "atomicAdd(&c[0], 1.0f);")
    RawKernel(fixed, "k")((2,), (64,), (c, x, np.int32(128)))
    assert c[0] == 128 and np.array_equal(c[1:], 2 * x)


def test_neighbour_read_of_global_memory():
    src = r'''extern "C" __global__ void k(float* y, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    y[i] = i;
    if (i + 1 < n) out[i] = y[i + 1];
}'''
    y, out = np.zeros(64, np.float32), np.zeros(64, np.float32)
    with pytest.raises(KernelError, match=r"data race on global memory in kernel 'k', block \(0, 0, 0\): thread "
                                          r"\(0, 0, 0\) read y\[1\] at <RawKernel source>:4 and thread \(1, 0, 0\) "
                                          r"wrote it at <RawKernel source>:3"):
        RawKernel(src, "k")((1,), (64,), (y, out, np.int32(64)))
    RawKernel(src.replace("y[i] = i;", "y[i] = i; __syncthreads();"), "k")((1,), (64,), (y, out, np.int32(64)))
    assert np.array_equal(out[:63], np.arange(1, 64))


def test_neighbouring_16_bit_elements_are_not_one_word():
    src = r'''extern "C" __global__ void k(uint16_t* y) {
    __shared__ uint16_t s[64];
    int t = threadIdx.x;
    s[t] = t;
    y[t] = s[t] + 1;
}'''
    y = np.zeros(64, np.uint16)
    RawKernel(src, "k")((1,), (64,), (y,))
    assert np.array_equal(y, np.arange(1, 65))


def test_shared_out_of_bounds_names_array_and_line():
    src = r'''extern "C" __global__ void k(float* out) {
    __shared__ float tile[64];
    tile[threadIdx.x + 1] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = tile[threadIdx.x];
}'''
    with pytest.raises(KernelError, match=r"shared memory out of bounds in kernel 'k', block \(0, 0, 0\), thread "
                                          r"\(63, 0, 0\): it wrote just past the end of the __shared__ array 'tile' "
                                          r"\(256 bytes, declared at <RawKernel source>:2\) at <RawKernel source>:3"):
        launch(src)


def test_dynamic_shared_out_of_bounds():
    src = r'''extern "C" __global__ void k(float* out) {
    extern __shared__ float dyn[];
    dyn[threadIdx.x] = threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = dyn[threadIdx.x];
}'''
    assert np.array_equal(launch(src, shared_mem=256), np.arange(64))
    with pytest.raises(KernelError, match=r"thread \(32, 0, 0\): it wrote just past the end of the dynamic shared "
                                          r"memory 'dyn' \(128 bytes: the launch's shared_mem\) at <RawKernel "
                                          r"source>:3"):
        launch(src, shared_mem=128)


def test_correct_kernels_report_nothing():
    src = r'''extern "C" __global__ void k(float* out) {
    __shared__ float buf[64];
    __shared__ int count;
    __shared__ float fcount;
    int t = threadIdx.x;
    buf[t] = t;
    if (t == 0) count = 0;
    if (t == 1) fcount = 0.0f;
    __syncthreads();
    for (int s = 32; s > 0; s >>= 1) {
        if (t < s) buf[t] += buf[t + s];
        __syncthreads();
    }
    atomicAdd(&count, 1);
    atomicAdd(&fcount, 0.5f);
    float v = t;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    __syncthreads();
    out[t] = buf[0] + count + fcount + v;
}'''
    warp_sums = np.where(np.arange(64) % 32 == 0, np.where(np.arange(64) < 32, 496, 1520), 0)
    got = launch(src, blocks=3)
    assert np.array_equal(got[[0, 32]], 2016 + 64 + 32 + warp_sums[[0, 32]])


def test_volatile_warp_synchronous_reduction_is_not_a_race():
    src = r'''extern "C" __global__ void k(float* out) {
    __shared__ float buf[64];
    int t = threadIdx.x;
    buf[t] = t;
    __syncthreads();
    if (t < 32) {
        volatile float* v = buf;
        v[t] += v[t + 32]; v[t] += v[t + 16]; v[t] += v[t + 8];
        v[t] += v[t + 4]; v[t] += v[t + 2]; v[t] += v[t + 1];
    }
    __syncthreads();
    out[t] = buf[0];
}'''
    assert np.array_equal(launch(src), np.full(64, 2016))


@pytest.mark.slow
def test_course_kernels_report_nothing():  # about 15 s on one core
    from llmc_lessons.layers.attention import attention_forward, attention_forward_cuda
    from llmc_lessons.layers.bf16 import float_to_bf16_cuda
    from llmc_lessons.layers.crossentropy import softmax_forward_cuda
    from llmc_lessons.layers.flash_attention import flash_attention_forward_cuda
    from llmc_lessons.layers.layernorm import layernorm_forward, layernorm_forward_cuda
    from llmc_lessons.layers.matmul import matmul_forward_cuda

    rng = np.random.default_rng(0)
    B, T, C = 2, 5, 37
    x = rng.standard_normal((B, T, C), dtype=np.float32)
    w, b = rng.standard_normal(C, dtype=np.float32), rng.standard_normal(C, dtype=np.float32)
    out = layernorm_forward_cuda(x, w, b, block_size=64)
    assert np.allclose(out[0], layernorm_forward(x, w, b)[0], atol=1e-4)
    weight = rng.standard_normal((11, C), dtype=np.float32)
    assert np.allclose(matmul_forward_cuda(x, weight, version=2, tile=8), x @ weight.T, atol=1e-4)
    logits = rng.standard_normal((B, T, 19), dtype=np.float32)
    probs = softmax_forward_cuda(logits, 19, block_size=64)
    assert np.allclose(probs.sum(-1), 1, atol=1e-5)
    assert float_to_bf16_cuda(x.ravel()[:67]).dtype == np.uint16
    NH = 2
    qkv = rng.standard_normal((B, 7, 3 * 16), dtype=np.float32)
    flash = flash_attention_forward_cuda(qkv, NH, block_size=4)
    assert np.allclose(flash[0], attention_forward(qkv, NH)[0], atol=1e-4)
    out, att = attention_forward_cuda(qkv, NH, version="cublas", block_size=64)  # its softmax: a warp per row
    assert np.allclose(out, attention_forward(qkv, NH)[0], atol=1e-4)


def test_races_can_be_left_unwatched(monkeypatch):
    monkeypatch.setenv("LLMC_CHECK_RACES", "0")
    out = launch(NEIGHBOUR)  # the poison of the slot the neighbour has not written yet, and no message
    assert np.isnan(out[:63]).all() and out[63] == 0
    monkeypatch.setenv("LLMC_CHECK_RACES", "yes")
    with pytest.raises(ValueError, match="LLMC_CHECK_RACES='yes': use 1"):
        launch(NEIGHBOUR)


def test_tiled_matmul_without_its_second_barrier():
    from pathlib import Path

    from llmc_lessons.layers.matmul import gemm_cuda

    src = (Path(__file__).parents[1] / "llmc_lessons" / "kernels" / "matmul.cu").read_text()
    tail = "            acc += As[ty * TILE + kk] * Bs[tx * (TILE + 1) + kk];\n        }\n        __syncthreads();\n"
    assert tail in src
    racy = src.replace(tail, tail.replace("__syncthreads();", ""))
    kernel = RawKernel(racy, "matmul_kernel2")
    a, b = np.ones((9, 20), np.float32), np.ones((20, 7), np.float32)
    # thread 0 runs on into the next tile and overwrites As (the start of smem) before thread 1 has read it
    with pytest.raises(KernelError, match=r"data race on shared memory in kernel 'matmul_kernel2', block "
                                          r"\(0, 0, 0\): thread \(0, 0, 0\) wrote smem\[0\] at <RawKernel source>:91 "
                                          r"and thread \(1, 0, 0\) read it at <RawKernel source>:95 with no "
                                          r"__syncthreads between them"):
        gemm_cuda(a, b, version=2, tile=8, kernel=kernel)
