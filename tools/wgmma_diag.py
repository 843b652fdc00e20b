import numpy as np
from llmc_lessons import device
from llmc_lessons.cuda import load_kernel, SM90A
from llmc_lessons.layers.flash_attention import flash_attention_forward_bf16_cuda
from llmc_lessons.precision import to_bf16, from_bf16
xp = device.xp
import os
B, T, NH, hs = 1, int(os.environ.get("T", 200)), 2, 64
gen = np.random.default_rng(1)
qkv = xp.asarray(to_bf16(gen.standard_normal((B, T, 3 * NH * hs)).astype(np.float32)))
ref, lref = flash_attention_forward_bf16_cuda(qkv, NH, version=2)
ref = from_bf16(device.to_host(ref)).astype(np.float64)
for flag in ("", "-DFA_DIAG_ONEBUF=1", "-DFA_DIAG_ALWAYS_MASK=1", "-DFA_DIAG_ONEBUF=1 -DFA_DIAG_ALWAYS_MASK=1"):
    opts = ("-DHS=64", "-DGROUP=1", "-DFA_WGMMA=1", SM90A) + tuple(flag.split())
    for rep in range(1):
        out, lse = xp.full((B, T, NH * hs), 0x7FC0, np.uint16), xp.full((B, NH, T), np.nan, np.float32)
        load_kernel("flash_attention.cu", "flash_attention_forward_bf16_kernel", opts)(
            (-(-T // 64), NH, B), (128,), (out, lse, qkv, np.int32(B), np.int32(T), np.int32(NH), np.int32(NH)))
        got = from_bf16(device.to_host(out)).astype(np.float64)
        d = np.abs(got - ref).max(axis=(0, 2))
        print(f"{flag or 'baseline':45s} rep {rep}: max |v4 - v2| by tile:",
              " ".join(f"{d[i:i + 64].max():.1e}" for i in range(0, T, 64)),
              "lse", f"{np.nanmax(np.abs(device.to_host(lse) - device.to_host(lref))):.1e}", flush=True)
