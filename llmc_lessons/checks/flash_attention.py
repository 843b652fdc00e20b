"""Checks for lesson 13: the online-softmax update, the rescaling step of the flash attention kernel, and where
the tensor core's accumulator fragment lives."""
from __future__ import annotations

import math

import numpy as np

from llmc_lessons.checks import ExerciseFailed, assert_close, exercise_kernel, passed, rng, run_exercise
from llmc_lessons.device import to_device, to_host
from llmc_lessons.layers.attention import attention_forward
from llmc_lessons.precision import to_bf16
from llmc_lessons.layers.flash_attention import (flash_attention_forward, flash_attention_forward_cuda,
                                                 mma_bf16_16816_cuda)


def check_online_softmax_update(fn) -> None:
    """Exercise 13.1: fn(m, l, o, s, v) -> (m, l, o) for one tile; folded over all tiles, o / l must be softmax(s) v."""
    ex = "Exercise 13.1"
    gen = rng()
    R, hs = 5, 3
    for n_tiles, n in [(4, 6), (3, 1), (2, 7)]:
        tiles = [(gen.standard_normal((R, n)) * 4, gen.standard_normal((n, hs))) for _ in range(n_tiles)]
        tiles[1][0][0] += 20.0                       # a much larger score later on: the maximum must move
        m, l, o = np.full(R, -np.inf), np.zeros(R), np.zeros((R, hs))
        for s, v in tiles:
            res = run_exercise(ex, fn, m.copy(), l.copy(), o.copy(), s, v)
            if not (isinstance(res, tuple) and len(res) == 3):
                raise ExerciseFailed(f"{ex}: return the tuple (m_new, l_new, o_new), got {type(res).__name__}")
            m, l, o = (np.asarray(x, dtype=np.float64) for x in res)
        s_all = np.concatenate([s for s, _ in tiles], axis=1)
        v_all = np.concatenate([v for _, v in tiles], axis=0)
        p = np.exp(s_all - s_all.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        assert_close(ex, "m (running max)", m, s_all.max(1), atol=1e-9,
                     hint="m_new is the larger of the old running maximum and this tile's maximum")
        assert_close(ex, "o / l (the attention output)", o / l[:, None], p @ v_all, atol=1e-9, rtol=1e-7,
                     hint="when the maximum grows from m to m_new, what was summed against exp(. - m) must be "
                          "multiplied by exp(m - m_new): both l and o")
        assert_close(ex, "l (running sum)", l, np.exp(s_all - m[:, None]).sum(1), atol=1e-9, rtol=1e-7,
                     hint="l is a sum of exp(s - m): when m moves, the old part must move with it, then the "
                          "tile's own terms are added")
    passed(ex, "folding the tiles gives softmax(s) @ v exactly, with the maximum moving between tiles")


def check_flash_forward_kernel(src: str) -> None:
    """Exercise 13.2: the student's flash_attention_forward_kernel against lesson 05's attention, at awkward T."""
    ex = "Exercise 13.2"
    kernel = exercise_kernel(ex, src, "flash_attention_forward_kernel")
    gen = rng()
    for (B, T, NH, hs), block in [((2, 13, 3, 8), 16), ((1, 37, 2, 5), 8), ((1, 70, 1, 16), 32)]:
        C = NH * hs
        qkv = (gen.standard_normal((B, T, 3 * C)) * 2).astype(np.float32)
        out, L = flash_attention_forward_cuda(to_device(qkv), NH, block_size=block, kernel=kernel)
        want_out = attention_forward(qkv.astype(np.float64), NH)[0]
        want_L = flash_attention_forward(qkv.astype(np.float64), NH, Bc=block)[1]
        hint = (f"B={B}, T={T}, NH={NH}, hs={hs}, {block} query rows per block and {block} keys per tile: "
                f"{math.ceil(T / block)} tiles, the maximum can grow from one tile to the next")
        assert_close(ex, "out", out, want_out, atol=2e-5, rtol=1e-4, hint=hint)
        assert_close(ex, "L (log of the softmax denominator)", L, want_L, atol=2e-5, rtol=1e-5, hint=hint)
    passed(ex, "the kernel matches lesson 05's attention at T = 13, 37 and 70 with 16, 8 and 32 rows per block")


def check_d_fragment(fn) -> None:
    """Exercise 13.3: fn(lane, i) -> (row, col) of the 16 x 8 accumulator D that register i (0..3) of `lane`
    (0..31) holds after mma.sync m16n8k16. Checked against the instruction itself (on a CPU, its emulation):
    with A = the identity, D = B, and B[k][n] = 8k + n says where each register's value came from."""
    ex = "Exercise 13.3"
    A = to_bf16(np.eye(16, dtype=np.float32))
    B = to_bf16(np.arange(128, dtype=np.float32).reshape(16, 8))   # integers below 256 are exact in bf16
    _, regs = mma_bf16_16816_cuda(to_device(A), to_device(B), to_device(np.zeros((16, 8), np.float32)))
    regs = to_host(regs).astype(int)
    for lane in range(32):
        for i in range(4):
            got = run_exercise(ex, fn, lane, i)
            want = divmod(int(regs[lane, i]), 8)
            if not (isinstance(got, tuple) and len(got) == 2):
                raise ExerciseFailed(f"{ex}: return a tuple (row, col), got {got!r} for lane {lane}, register {i}")
            if tuple(int(v) for v in got) != want:
                g, t = lane // 4, lane % 4
                hints = []
                if got[0] != want[0]:
                    hints.append(f"the row: lane {lane} is in group g = lane // 4 = {g}; registers 0, 1 hold row g, "
                                 f"registers 2, 3 row g + 8")
                if got[1] != want[1]:
                    hints.append(f"the column: t = lane % 4 = {t}; each lane holds two neighbouring columns, "
                                 f"2t and 2t + 1 (register i holds column 2t + i % 2)")
                raise ExerciseFailed(f"{ex}: lane {lane}, register {i}: you said D[{got[0]}][{got[1]}], the tensor "
                                     f"core puts D[{want[0]}][{want[1]}] there. Check " + "; and ".join(hints))
    passed(ex, "all 128 accumulator registers of the warp are where the tensor core puts them")
