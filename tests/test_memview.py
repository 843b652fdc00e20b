"""The memory visualiser (llmc_lessons.memview) draws traced requests: checked on the Agg backend, no display."""
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from llmc_lessons import device, memview  # noqa: E402
from llmc_lessons.cuda import RawKernel  # noqa: E402

SRC = r'''
extern "C" __global__ void k(const float* x, float* y, int stride) {
    __shared__ float s[32 * 32];
    int t = threadIdx.x;
    s[t * stride % 1024] = x[t * stride % 1024];
    __syncthreads();
    y[t] = s[(t * 2) % 1024];
}
'''


@pytest.fixture(scope="module")
def trace():
    x = device.to_device(np.arange(1024, dtype=np.float32))
    y = device.to_device(np.zeros(64, np.float32))
    return RawKernel(SRC, "k")(1, 64, (x, y, np.int32(32)), trace=True)


def test_requests_of_a_warp_in_order(trace):
    q = trace.requests
    first = memview.requests_of(trace, 0, 1)
    assert len(first) == 4 and (q.warp[first] == 1).all() and (np.diff(first) > 0).all()
    line = q.line[first[0]]
    assert (q.line[memview.requests_of(trace, 0, 1, line)] == line).all()


def test_a_global_request_is_drawn_as_its_cache_lines(trace):
    i = int(memview.requests_of(trace, 0, 0)[0])          # x[t * 32]: 32 lanes in 32 different cache lines
    assert "global load" in memview.describe(trace, i) and "32 sectors in 32 cache lines" in memview.describe(trace, i)
    fig = memview.draw_request(trace, i)
    ax, = fig.axes
    assert len(ax.patches) >= 32 * 5 + 32           # 32 lanes' bars, 32 lines of 4 sectors and a frame each
    assert "efficiency 12%" in fig._suptitle.get_text()


def test_a_shared_request_is_drawn_as_banks(trace):
    store, load = (int(i) for i in memview.requests_of(trace, 0, 0)[1:3])
    table, = memview.bank_table(trace, store)
    assert list(table) == [0] and len(table[0]) == 32                  # stride 32 words: all lanes in bank 0
    assert "32-way bank conflict" in memview.describe(trace, store)
    table, = memview.bank_table(trace, load)                           # stride 2 words: lanes l and l + 16
    assert all(len(words) == 2 for words in table.values()) and table[0] == {0: [0], 32: [16]}
    fig = memview.draw_request(trace, load)
    assert len(fig.axes) == 1 and "2-way bank conflict, 1 extra" in fig._suptitle.get_text()


def test_each_lane_address_is_named(trace):
    first, store = (int(i) for i in memview.requests_of(trace, 0, 0)[:2])
    text = memview.lane_addresses(trace, first)
    assert text.splitlines()[0].split() == "lane 0: x[0] lane 1: x[32] lane 2: x[64] lane 3: x[96]".split()
    assert "lane 31: x[992]" in text and len(text.splitlines()) == 8
    assert "lane  1: shared byte 128, bank 0" in memview.lane_addresses(trace, store)


def test_the_explorer_steps_through_requests(trace):
    box = memview.show(trace)
    (block, warp), line, step, out = box.children[0].children, box.children[1], box.children[2], box.children[3]
    assert list(warp.options) == [0, 1] and line.options[0] == ("every line", -1)
    assert step.max == 3
    warp.value = 1
    line.value = line.options[1][1]
    assert step.max == 0 or step.max == 1


def test_show_without_a_trace_says_what_to_do(monkeypatch):
    from llmc_lessons.cuda import trace as cu_trace
    monkeypatch.setattr(cu_trace, "last", None)
    with pytest.raises(ValueError, match="launch a kernel with trace=True first"):
        memview.show()
