"""See the memory: draw what each lane of a warp touches in one request of a traced launch (llmc_lessons.cuda.trace).

    t = kernel(grid, block, args, trace=True)
    show(t)                    # pick a block, a warp and a source line, step through their requests
    draw_request(t, 0)         # one request as a matplotlib figure
    print(lane_addresses(t, 0))   # each lane's address in it

A global request is drawn as the 128-byte cache lines it touches, side by side, each cut into its four 32-byte
sectors: a row per lane, a bar where the lane's bytes lie, the sectors that move shaded. A shared request is drawn
as the 32 banks of each of its phases: a column per bank, a cell per distinct 4-byte word the bank must deliver,
labelled with the lanes that want it; a column of n cells is an n-way bank conflict, served in n wavefronts.
Works for any kernel on the CPU backend; on a GPU the trace comes from the emulator all the same.
"""
from __future__ import annotations

import numpy as np

from llmc_lessons.cuda import trace as cu_trace

SECTOR, CACHE_LINE, BANKS = cu_trace.SECTOR, cu_trace.CACHE_LINE, cu_trace.BANKS


def requests_of(t: cu_trace.Trace, block: int, warp: int, line: int | None = None) -> np.ndarray:
    """The requests of warp `warp` of linear block `block` (of source line `line`, an index into t.lines, or of
    every line), in the order the warp made them."""
    q = t.requests
    m = (q.block == block) & (q.warp == warp)
    if line is not None:
        m &= q.line == line
    return np.flatnonzero(m)


def describe(t: cu_trace.Trace, request: int) -> str:
    """One line about a request: what, where, and what it costs."""
    q = t.requests
    i = request
    what = (f"{cu_trace.SPACES[int(q.shared[i])]} {cu_trace.OPS[q.op[i]]} of {q.size[i]} bytes at {t.lines[q.line[i]]}"
            f", block {t.coordinates(q.block[i], 0)[0]}, warp {q.warp[i]}: {q.lanes[i]} lanes")
    if q.shared[i]:
        extra = q.wavefronts[i] - q.phases[i]
        return (f"{what}, {q.phases[i]} phase{'s' if q.phases[i] > 1 else ''}, {q.wavefronts[i]} wavefronts"
                f" ({q.ways[i]}-way bank conflict, {extra} extra)" if extra else
                f"{what}, {q.phases[i]} phase{'s' if q.phases[i] > 1 else ''}, {q.wavefronts[i]} wavefronts"
                f" (no bank conflict)")
    return (f"{what}, {q.sectors[i]} sectors in {q.cache_lines[i]} cache line{'s' if q.cache_lines[i] > 1 else ''}, "
            f"efficiency {q.bytes_used[i] / (SECTOR * max(1, q.sectors[i])):.0%}")


def lane_addresses(t: cu_trace.Trace, request: int) -> str:
    """Each active lane's address in a request, as the kernel names it (x[37]; shared byte 128, bank 0), 4 a row."""
    lanes, addr, _ = t.accesses(request)
    shared = bool(t.requests.shared[request])
    cells = [f"lane {lane:>2}: {t.where(int(a), shared)}" + (f", bank {int(a) // 4 % BANKS}" if shared else "")
             for lane, a in zip(lanes.tolist(), addr.tolist())]
    return "\n".join("   ".join(f"{c:<30}" for c in cells[i:i + 4]).rstrip() for i in range(0, len(cells), 4))


def draw_request(t: cu_trace.Trace, request: int, fig=None):
    """Draw one request (an index into t.requests) on `fig` (a new matplotlib Figure if None); return the figure."""
    import matplotlib.pyplot as plt
    if fig is None:
        fig = plt.figure(figsize=(11, 4.5))
    fig.clear()
    if t.requests.shared[request]:
        _draw_shared(t, request, fig)
    else:
        _draw_global(t, request, fig)
    fig.suptitle(describe(t, request), fontsize=9)
    return fig


def _draw_global(t, request, fig) -> None:
    lanes, addr, size = t.accesses(request)
    lines = np.unique(np.concatenate([addr // CACHE_LINE, (addr + size - 1) // CACHE_LINE]))
    gap = 24
    x0 = {int(line): k * (CACHE_LINE + gap) for k, line in enumerate(lines)}   # the cache lines side by side
    ax = fig.add_subplot(1, 1, 1)
    touched = set()
    for lane, a, s in zip(lanes.tolist(), addr.tolist(), size.tolist()):
        for b in (a, a + s - 1):
            touched.add(b // SECTOR)
        line = a // CACHE_LINE
        ax.barh(lane, s, left=x0[line] + a - line * CACHE_LINE, height=0.7, color="tab:blue", zorder=3)
    for line, x in x0.items():
        for k in range(CACHE_LINE // SECTOR):
            sector = line * (CACHE_LINE // SECTOR) + k
            ax.add_patch(_rectangle(x + k * SECTOR, -0.8, SECTOR, 32.6,
                                       "tab:orange" if sector in touched else "white"))
        ax.add_patch(_rectangle(x, -0.8, CACHE_LINE, 32.6, "none", edge="black", lw=1.2))
        ax.text(x + CACHE_LINE / 2, 32.4, t.where(line * CACHE_LINE, shared=False), ha="center", va="bottom",
                fontsize=7)
    ax.set_xlim(-4, len(x0) * (CACHE_LINE + gap))
    ax.set_ylim(32.2 + 2, -1.2)
    ax.set_yticks(range(0, 32, 4))
    ax.set_ylabel("lane")
    ax.set_xticks([])
    ax.set_xlabel("cache lines of 128 bytes touched (4 sectors of 32 bytes each; shaded: moved), each labelled "
                  "with the element it starts at")


def _rectangle(x, y, w, h, colour, edge="grey", lw=0.5):
    """A rectangle patch: shaded cells (grey edge) see-through, framed ones opaque."""
    from matplotlib.patches import Rectangle
    return Rectangle((x, y), w, h, facecolor=colour, edgecolor=edge, linewidth=lw, alpha=0.35 if edge == "grey" else 1)


def bank_table(t: cu_trace.Trace, request: int) -> list[dict]:
    """For each phase of a shared request: {bank: {word: [lanes]}} of the 4-byte words each bank must deliver."""
    lanes, addr, size = t.accesses(request)
    n = 1 if size.max() <= 4 else 2 if size.max() <= 8 else 4
    phases = [{} for _ in range(n)]
    for lane, a, s in zip(lanes.tolist(), addr.tolist(), size.tolist()):
        for word in range(a // 4, (a + s - 1) // 4 + 1):
            phases[lane // (32 // n)].setdefault(word % BANKS, {}).setdefault(word, []).append(lane)
    return [p for p in phases if p]


def _draw_shared(t, request, fig) -> None:
    phases = bank_table(t, request)
    for k, banks in enumerate(phases):
        ax = fig.add_subplot(len(phases), 1, k + 1)
        depth = max(len(words) for words in banks.values())
        for bank, words in banks.items():
            for row, (word, lanes) in enumerate(sorted(words.items())):
                colour = "tab:red" if len(words) > 1 else "tab:green"
                ax.add_patch(_rectangle(bank, row, 1, 1, colour, edge="black", lw=0.5))
                label = ",".join(str(lane) for lane in lanes[:3]) + ("…" if len(lanes) > 3 else "")
                ax.text(bank + 0.5, row + 0.5, label, ha="center", va="center", fontsize=6)
        ax.set_xlim(0, BANKS)
        ax.set_ylim(max(depth, 1), 0)
        ax.set_xticks(np.arange(BANKS) + 0.5, [str(b) for b in range(BANKS)], fontsize=6)
        ax.set_yticks([])
        ax.set_ylabel(f"phase {k}" if len(phases) > 1 else "words", fontsize=8)
        if k == len(phases) - 1:
            ax.set_xlabel("bank (a cell: one 4-byte word the bank delivers, labelled with the lanes that want it; "
                          "red: a column of several words, served one wavefront each)", fontsize=8)


def show(t: cu_trace.Trace | None = None):
    """An explorer for a trace (by default cuda.trace.last, the last traced launch, such as an exercise check's):
    choose a block, a warp and a source line, and step through their requests."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    t = cu_trace.last if t is None else t
    if t is None or len(t.requests) == 0:
        raise ValueError("no traced launch with memory accesses to show: launch a kernel with trace=True first")
    q = t.requests
    blocks = sorted(set(q.block.tolist()))
    block_w = widgets.Dropdown(options=[(str(t.coordinates(b, 0)[0]), b) for b in blocks], description="block")
    warp_w = widgets.Dropdown(description="warp")
    line_w = widgets.Dropdown(description="line", layout=widgets.Layout(width="60%"))
    step_w = widgets.IntSlider(description="request", min=0, max=0)
    out = widgets.Output()

    def chosen():
        return requests_of(t, block_w.value, warp_w.value, None if line_w.value in (-1, None) else line_w.value)

    busy = [False]

    def update(change=None):
        # a new block lists its warps, a new warp its lines, a new line its requests; then draw the chosen one
        owner = change["owner"] if change else None
        if busy[0]:
            return
        busy[0] = True
        try:
            if owner in (None, block_w):
                warp_w.options = sorted(set(q.warp[q.block == block_w.value].tolist()))
                warp_w.value = warp_w.options[0]
            if owner in (None, block_w, warp_w):
                here = requests_of(t, block_w.value, warp_w.value)
                used = sorted(set(q.line[here].tolist()), key=lambda i: (t.lines[i].file, t.lines[i].line))
                line_w.options = [("every line", -1)] + [(f"{t.lines[i]}  {t.lines[i].text.strip()[:60]}", i)
                                                        for i in used]
                line_w.value = -1
            if owner in (None, block_w, warp_w, line_w):
                step_w.value = 0
                step_w.max = max(0, len(chosen()) - 1)
        finally:
            busy[0] = False
        requests = chosen()
        out.clear_output(wait=True)
        with out:
            if len(requests):
                i = int(requests[min(step_w.value, len(requests) - 1)])
                draw_request(t, i)
                plt.show()
                print(lane_addresses(t, i))

    for w in (block_w, warp_w, line_w, step_w):
        w.observe(update, names="value")
    update()
    return widgets.VBox([widgets.HBox([block_w, warp_w]), line_w, step_w, out])
