"""llmc_lessons.cublas: row-major products with transposes, accumulation and batches, against NumPy."""
import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.cublas import gemm, gemm_batched
from llmc_lessons.precision import tf32

gen = np.random.default_rng(0)


def rand(*shape):
    return gen.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_gemm_matches_numpy(trans_a, trans_b):
    M, N, K = 37, 29, 45
    a, b = rand(*((K, M) if trans_a else (M, K))), rand(*((N, K) if trans_b else (K, N)))
    want = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    with tf32(False):
        out = device.xp.full((M, N), np.nan, dtype=np.float32)
        got = gemm(device.to_device(a), device.to_device(b), trans_a, trans_b, out=out)
        np.testing.assert_allclose(device.to_host(got), want, rtol=1e-4, atol=1e-4)
        start = rand(M, N)
        acc = gemm(device.to_device(a), device.to_device(b), trans_a, trans_b, out=device.to_device(start.copy()),
                   accumulate=True)
        np.testing.assert_allclose(device.to_host(acc), want + start, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (False, True), (True, False), (True, True)])
def test_gemm_batched_matches_numpy(trans_a, trans_b):
    L, M, N, K = 3, 13, 7, 5
    a, b = rand(L, *((K, M) if trans_a else (M, K))), rand(L, *((N, K) if trans_b else (K, N)))
    want = (a.transpose(0, 2, 1) if trans_a else a) @ (b.transpose(0, 2, 1) if trans_b else b)
    with tf32(False):
        got = gemm_batched(device.to_device(a), device.to_device(b), trans_a, trans_b)
    np.testing.assert_allclose(device.to_host(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not device.on_gpu(), reason="TF32 exists on a GPU only")
def test_tf32_switch_changes_the_arithmetic():
    a, b = device.to_device(rand(256, 512)), device.to_device(rand(512, 256))
    want = device.to_host(a).astype(np.float64) @ device.to_host(b).astype(np.float64)
    errs = {}
    for mode in (False, True):
        with tf32(mode):
            errs[mode] = np.abs(device.to_host(gemm(a, b)) - want).max() / np.abs(want).max()
    assert errs[False] < 1e-5 < 1e-4 < errs[True], errs


@pytest.mark.skipif(not device.on_gpu(), reason="CUDA graphs record GPU launches")
@pytest.mark.parametrize("M,N,K,trans_a,trans_b,accumulate", [(72, 192, 64, False, True, False),
                                                              (4096, 2304, 768, False, True, False),
                                                              (768, 3072, 4096, True, False, True)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_recorded_product_has_the_bits_of_one_launched_alone(M, N, K, trans_a, trans_b, accumulate, precision):
    # cuBLAS picks its algorithm partly by the workspace it has; the course's handle has its own on every stream,
    # so a product recorded into a CUDA graph (lesson 12) is the same computation as the product launched alone.
    from llmc_lessons.precision import to_bf16
    from llmc_lessons.perf import capture_graph
    a, b = rand(*((K, M) if trans_a else (M, K))), rand(*((N, K) if trans_b else (K, N)))
    if precision == "bf16":
        a, b = to_bf16(a), to_bf16(b)
    a, b, start = device.to_device(a), device.to_device(b), rand(M, N)

    def output():   # the sum to add into, or NaN (0xFFFF is a bf16 NaN) where every value must be written
        if accumulate:
            return device.to_device(start.copy())
        return device.xp.full((M, N), np.nan if a.dtype == np.float32 else 0xFFFF, dtype=a.dtype)

    plain, recorded = output(), output()
    gemm(a, b, trans_a, trans_b, out=plain, accumulate=accumulate)
    graph, _ = capture_graph(lambda: gemm(a, b, trans_a, trans_b, out=recorded, accumulate=accumulate))
    graph.launch()
    got, want = (device.to_host(x).view(np.uint8).reshape(M, -1) for x in (recorded, plain))   # the bits
    differ = (got != want).reshape(M, N, -1).any(-1)
    assert not differ.any(), f"the recorded product differs from the plain one in {differ.mean():.2%} of its values"


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="inner dimensions differ"):
        gemm(device.to_device(rand(3, 4)), device.to_device(rand(5, 6)))
    with pytest.raises(ValueError, match="accumulate=True needs an `out`"):
        gemm(device.to_device(rand(3, 4)), device.to_device(rand(4, 6)), accumulate=True)
    with pytest.raises(ValueError, match="batch sizes differ"):
        gemm_batched(device.to_device(rand(2, 3, 4)), device.to_device(rand(3, 4, 5)))


def test_the_handle_gets_the_workspace_of_each_products_type(monkeypatch):
    # The bf16 products run without a workspace and the float32 ones with 32 MiB (WORKSPACE_BYTES): the course's
    # one handle is told the size when the operands' type changes, and again after every change of stream (which
    # resets cuBLAS's workspace to its own pool). Checked here with a stand-in for libcublas, on any machine.
    import types
    from llmc_lessons import cublas
    calls, stream = [], types.SimpleNamespace(ptr=1)

    class FakeLib:
        def cublasSetStream_v2(self, handle, s):
            calls.append(("stream", s))
            return 0

        def cublasSetWorkspace_v2(self, handle, ptr, nbytes):
            calls.append(("workspace", nbytes))
            return 0
    fake_xp = types.SimpleNamespace(cuda=types.SimpleNamespace(get_current_stream=lambda: stream))
    monkeypatch.setattr(cublas.device, "xp", fake_xp)
    monkeypatch.setattr(cublas, "_lib", dict(lib=FakeLib(), handle=7, stream=None, workspace_bytes=None,
                                             workspace=types.SimpleNamespace(data=types.SimpleNamespace(ptr=99), nbytes=32 * 2**20)))
    bf16, fp32 = cublas.WORKSPACE_BYTES[np.dtype(np.uint16)], cublas.WORKSPACE_BYTES[np.dtype(np.float32)]
    assert (bf16, fp32) == (0, 32 * 2**20)
    for dtype in (np.uint16, np.uint16, np.float32, np.float32, np.uint16):
        assert cublas._library(dtype) == (cublas._lib["lib"], 7)
    assert calls == [("stream", 1), ("workspace", bf16), ("workspace", fp32), ("workspace", bf16)]
    calls.clear()
    stream.ptr = 2                                        # a new stream (a CUDA graph's recording): bound again
    cublas._library(np.uint16)
    assert calls == [("stream", 2), ("workspace", bf16)]


@pytest.mark.skipif(device.on_gpu(), reason="stands in for cuBLAS with NumPy operands: the CPU backend's")
def test_each_product_asks_for_the_workspace_of_its_operands_type(monkeypatch):
    # gemm and gemm_batched hand _library their operands' type, which picks the workspace (the test above)
    from llmc_lessons import cublas
    seen = []

    class Stop(Exception):
        pass

    def library(dtype=np.float32):
        seen.append(np.dtype(dtype))
        raise Stop
    monkeypatch.setattr(cublas, "_library", library)
    monkeypatch.setattr(cublas.device, "on_gpu", lambda: True)
    for dtype in (np.float32, np.uint16):
        a, b = np.zeros((4, 8), dtype), np.zeros((8, 4), dtype)
        for product in (lambda: cublas.gemm(a, b), lambda: cublas.gemm_batched(a[None], b[None]),
                        lambda: cublas.gemm(a, b, out_dtype=np.float32)):   # bf16 in, float32 out: bf16's
            with pytest.raises(Stop):
                product()
    assert seen == [np.dtype(np.float32)] * 3 + [np.dtype(np.uint16)] * 3
