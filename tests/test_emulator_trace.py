"""Access tracing (llmc_lessons.cuda.trace): what each warp request touches, checked against numbers worked out by
hand from the rules of NVIDIA GPUs (32-byte sectors, 128-byte lines, 32 banks of 4 bytes, 8- and 16-byte accesses
in half- and quarter-warp phases). On a GPU the emulator records the trace and the GPU runs the launch."""
import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.cuda import RawKernel, trace
from llmc_lessons.cuda.emulator import KernelError

GLOBAL = r'''
extern "C" __global__ void copy(const float* x, float* y, int n, int stride) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i * stride];
}
extern "C" __global__ void broadcast(const float* x, float* y) {
    y[threadIdx.x] = __ldg(&x[0]);
}
extern "C" __global__ void copy4(const float4* x, float4* y) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    y[i] = x[i];
}
extern "C" __global__ void branch(const float* x, const float* z, float* y) {
    int i = threadIdx.x;
    if (i % 2 == 0) y[i] = x[i];
    else y[i] = z[i];
    atomicAdd(&y[0], 1.0f);
}
'''

SHARED = r'''
extern "C" __global__ void words(float* y, int stride) {
    __shared__ float s[32 * 33];
    int t = threadIdx.x;
    s[t] = t;
    __syncthreads();
    y[t] = s[(t * stride) % (32 * 33)];
}
extern "C" __global__ void vectors(float* y, int stride) {
    __shared__ float4 s4[64];
    __shared__ float2 s2[64];
    int t = threadIdx.x;
    s4[t] = make_float4(t, t, t, t);
    s2[t] = make_float2(t, t);
    __syncthreads();
    float4 a = s4[(t * stride) % 64];
    float2 b = s2[(t * stride) % 64];
    y[t] = a.x + b.y;
}
'''


def _launch(src, name, grid, block, *args, **kw):
    args = tuple(device.to_device(a) if isinstance(a, np.ndarray) else a for a in args)
    return RawKernel(src, name)(grid, block, args, trace=True, **kw)


def _only(t, memory, op):
    q = t.requests
    m = (q.shared == (memory == "shared")) & (q.op == trace.OPS.index(op))
    assert m.any(), f"no {memory} {op} in\n{t}"
    return {k: getattr(q, k)[m] for k in ("lanes", "sectors", "cache_lines", "bytes_used", "wavefronts", "phases",
                                           "ways", "size")}


def test_coalesced_float_copy_moves_4_sectors_a_request():
    x = np.arange(256, dtype=np.float32)
    y = np.zeros(256, np.float32)
    t = _launch(GLOBAL, "copy", 2, 128, x, y, np.int32(256), np.int32(1))
    ld, st = _only(t, "global", "load"), _only(t, "global", "store")
    assert len(ld["lanes"]) == 8 and len(st["lanes"]) == 8            # 2 blocks x 4 warps
    assert (ld["sectors"] == 4).all() and (ld["cache_lines"] == 1).all() and (ld["bytes_used"] == 128).all()
    assert (st["sectors"] == 4).all()
    assert (t.per_thread("global", "load") == 1).all() and (t.per_thread("global", "store") == 1).all()
    assert (t.per_thread("shared", "load") == 0).all()
    assert t.per_thread("global", "load").shape == (2, 128)


@pytest.mark.parametrize("stride, sectors, lines", [(2, 8, 2), (8, 32, 8), (32, 32, 32)])
def test_strided_loads_touch_more_sectors(stride, sectors, lines):
    x = np.arange(32 * 32, dtype=np.float32)
    t = _launch(GLOBAL, "copy", 1, 32, x, np.zeros(32, np.float32), np.int32(32), np.int32(stride))
    ld = _only(t, "global", "load")
    assert ld["sectors"].tolist() == [sectors] and ld["cache_lines"].tolist() == [lines]
    assert ld["bytes_used"].tolist() == [128]                          # efficiency 128 / (32 * sectors)
    assert f"{128 / (32 * sectors):.0%}" in str(t)


def test_a_partial_warp_and_a_misaligned_view():
    x = np.arange(64, dtype=np.float32)
    t = _launch(GLOBAL, "copy", 1, 32, x[1:], np.zeros(20, np.float32), np.int32(20), np.int32(1))
    ld = _only(t, "global", "load")
    # 20 lanes read floats 1..20 of x: bytes 4..83 span sectors 0, 1, 2 (the view starts 4 bytes into x)
    assert ld["lanes"].tolist() == [20] and ld["sectors"].tolist() == [3] and ld["bytes_used"].tolist() == [80]


def test_broadcast_is_one_sector():
    t = _launch(GLOBAL, "broadcast", 1, 32, np.ones(4, np.float32), np.zeros(32, np.float32))
    ld = _only(t, "global", "load")
    assert ld["sectors"].tolist() == [1] and ld["bytes_used"].tolist() == [4] and ld["lanes"].tolist() == [32]
    assert "y[threadIdx.x] = __ldg(&x[0]);" in str(t)     # attributed to the kernel's line, not llmc_cuda.h's


def test_float4_loads_are_16_sectors_and_4_lines():
    x = np.arange(512, dtype=np.float32)
    t = _launch(GLOBAL, "copy4", 2, 64, x, np.zeros(512, np.float32))
    ld = _only(t, "global", "load")
    assert (ld["size"] == 16).all() and (ld["sectors"] == 16).all() and (ld["cache_lines"] == 4).all()
    assert (ld["bytes_used"] == 512).all() and len(ld["sectors"]) == 4
    assert t.element_counts("x").tolist() == [1] * 512


def test_divergent_lanes_make_separate_requests_and_atomics_are_recorded():
    n = 32
    t = _launch(GLOBAL, "branch", 1, n, np.ones(n, np.float32), np.ones(n, np.float32), np.zeros(n, np.float32))
    ld = _only(t, "global", "load")
    assert sorted(ld["lanes"].tolist()) == [16, 16] and (ld["sectors"] == 4).all()   # even lanes: x, odd: z
    at = _only(t, "global", "atomic")
    assert at["lanes"].tolist() == [32] and at["sectors"].tolist() == [1]
    assert t.per_thread("global", "atomic").tolist() == [[1] * n]


@pytest.mark.parametrize("stride, ways", [(1, 1), (2, 2), (4, 4), (32, 32), (33, 1), (0, 1)])
def test_bank_conflicts_of_4_byte_words(stride, ways):
    t = _launch(SHARED, "words", 1, 32, np.zeros(32, np.float32), np.int32(stride))
    ld = _only(t, "shared", "load")
    assert ld["ways"].tolist() == [ways] and ld["wavefronts"].tolist() == [ways] and ld["phases"].tolist() == [1]
    st = _only(t, "shared", "store")
    assert st["ways"].tolist() == [1]


@pytest.mark.parametrize("stride, ways4, waves4, ways2, waves2", [
    (1, 1, 4, 1, 2),     # consecutive: each quarter-warp (float4) / half-warp (float2) phase covers the 32 banks
    (2, 2, 8, 2, 4),     # every other vector: lanes 4 apart (float4) or 8 apart (float2) share a bank
    (0, 1, 4, 1, 2),     # every lane the same vector: a broadcast in each phase
])
def test_bank_conflicts_of_8_and_16_byte_accesses(stride, ways4, waves4, ways2, waves2):
    t = _launch(SHARED, "vectors", 1, 32, np.zeros(32, np.float32), np.int32(stride))
    q = t.requests
    loads = np.flatnonzero(q.shared & (q.op == 0))
    by_size = {int(q.size[i]): i for i in loads}
    assert (q.ways[by_size[16]], q.wavefronts[by_size[16]], q.phases[by_size[16]]) == (ways4, waves4, 4)
    assert (q.ways[by_size[8]], q.wavefronts[by_size[8]], q.phases[by_size[8]]) == (ways2, waves2, 2)


def test_report_reads_like_a_source_view():
    t = _launch(SHARED, "words", 1, 64, np.zeros(64, np.float32), np.int32(32))
    text = str(t)
    assert "kernel 'words', grid (1, 1, 1), block (64, 1, 1)" in text
    assert "<RawKernel source>:7" in text and "y[t] = s[(t * stride) % (32 * 33)];" in text
    assert "32.00   32" in text                                    # wavefronts per request, ways
    assert "62 from bank conflicts" in text                        # 2 warps x (32 - 1)
    rows = t.summary()
    assert {(r["memory"], r["op"]) for r in rows} >= {("shared", "load"), ("shared", "store"), ("global", "store")}


def test_the_same_numbers_on_every_run(monkeypatch):
    x = np.arange(4096, dtype=np.float32)
    runs = []
    for threads in ("1", "2"):
        monkeypatch.setenv("LLMC_EMU_THREADS", threads)
        t = _launch(GLOBAL, "copy", 8, 64, x, np.zeros(512, np.float32), np.int32(512), np.int32(3))
        runs.append(t)
    a, b = runs
    assert np.array_equal(a.records, b.records) and a.report() == b.report()


def test_recording_collects_the_launches_of_a_launcher_and_computes_the_same_values():
    from llmc_lessons.layers.encoder import encoder_forward, encoder_forward_cuda
    rng = np.random.default_rng(1)
    inp = rng.integers(0, 7, (2, 5)).astype(np.int32)
    wte, wpe = rng.standard_normal((7, 12)).astype(np.float32), rng.standard_normal((5, 12)).astype(np.float32)
    with trace.recording() as traces:
        out = encoder_forward_cuda(device.to_device(inp), device.to_device(wte), device.to_device(wpe), version=2)
    assert [t.kernel for t in traces] == ["encoder_forward_kernel2"]
    np.testing.assert_allclose(device.to_host(out), encoder_forward(inp, wte, wpe), rtol=1e-6)
    assert trace.recorders == []


def test_a_launch_without_tracing_returns_nothing():
    x = np.arange(32, dtype=np.float32)
    k = RawKernel(GLOBAL, "copy")
    assert k(1, 32, (device.to_device(x), device.to_device(x * 0), np.int32(32), np.int32(1))) is None


def test_element_counts_and_where():
    t = _launch(GLOBAL, "copy", 1, 32, np.arange(64, dtype=np.float32), np.zeros(32, np.float32), np.int32(32),
                np.int32(2))
    assert t.element_counts("x").tolist() == [1, 0] * 32
    lanes, addresses, sizes = t.accesses(0)
    assert lanes.tolist() == list(range(32)) and (sizes == 4).all()
    assert t.where(int(addresses[3]), shared=False) == "x[6]"
    with pytest.raises(KeyError, match="no array argument 'w'"):
        t.element_counts("w")


@pytest.mark.skipif(device.on_gpu(), reason="the limit is the emulator's; tested on the CPU backend")
def test_a_trace_too_long_is_a_clear_error(monkeypatch):
    from llmc_lessons.cuda import emulator
    monkeypatch.setattr(emulator, "TRACE_LIMIT", 100)
    with pytest.raises(KernelError, match="made more than 100 accesses to memory; trace a smaller launch"):
        _launch(GLOBAL, "copy", 4, 64, np.arange(256, dtype=np.float32), np.zeros(256, np.float32),
                np.int32(256), np.int32(1))


def test_a_memory_check_is_skipped_where_no_compiler_can_trace(monkeypatch):
    from llmc_lessons.checks import trace_of
    from llmc_lessons.cuda import emulator

    def missing():
        raise RuntimeError("The CPU kernel emulator needs a C++ compiler and none was found.")
    monkeypatch.setattr(emulator, "compiler", missing)
    assert trace_of(lambda: None) is None


def test_the_gpu_check_of_memory_predicts_the_hand_computed_numbers():
    """tools/memory_check.py (tools/gpu_check.sh's memory stage) sets these beside the GPU's counters."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "tools" / "memory_check.py"
    spec = importlib.util.spec_from_file_location("memory_check", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    p = tool.predict("copy, stride 2")
    assert (p["global_ld_requests"], p["global_ld_sectors"], p["global_st_sectors"]) == (128, 1024, 512)
    p = tool.predict("shared, stride 32 (32-way)")
    assert (p["shared_ld_wavefronts"], p["shared_ld_conflicts"]) == (4 * 32 * 32, 4 * 32 * 31)
    assert "| copy, misaligned by 4 bytes | 5.00 | 4.00 |" in tool._table(
        [{"case": "copy, misaligned by 4 bytes", "emulator": tool.predict("copy, misaligned by 4 bytes")}], "emulator")
