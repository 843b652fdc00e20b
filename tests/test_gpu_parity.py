"""GPU parity: the course's kernels give the same results through CuPy on a GPU and through the CPU emulator.

On a GPU, the test runs every case here on the GPU, runs the same file as a script with LLMC_DEVICE=cpu (the
emulator, in a child process) on the same inputs, and compares. Results are not bitwise equal (a different
expf, fused multiply-adds, another order of atomic additions): tolerances are float32-sized.
"""
import os
import subprocess
import sys

import numpy as np
import pytest


def cases():
    """{name: list of host arrays} from running each launcher once on seeded inputs, on the active backend."""
    from llmc_lessons.device import to_device, to_host
    from llmc_lessons.layers import adamw, attention, crossentropy, encoder, gelu, layernorm, matmul, residual
    from llmc_lessons.layers import rmsnorm, rope, swiglu
    gen = np.random.default_rng(1234)
    d = lambda *shape, scale=1.0: to_device((gen.standard_normal(shape) * scale).astype(np.float32))
    B, T, C, NH, V, Vp = 3, 37, 40, 4, 101, 128
    out = {}
    ids = to_device(gen.integers(0, V, (B, T)).astype(np.int32))
    wte, wpe = d(Vp, C), d(T + 5, C)
    out["encoder_forward"] = encoder.encoder_forward_cuda(ids, wte, wpe)
    out["encoder_backward"] = encoder.encoder_backward_cuda(d(B, T, C), ids, Vp, T + 5)
    x, w, b = d(B, T, C), d(C), d(C)
    for v in (1, 2, 3):
        out[f"layernorm_forward{v}"] = layernorm.layernorm_forward_cuda(x, w, b, version=v)
    _, mean, rstd = out["layernorm_forward2"]
    out["layernorm_backward"] = layernorm.layernorm_backward_cuda(d(B, T, C), x, w, mean, rstd)
    wm, bm = d(3 * C, C), d(3 * C)
    for v in (1, 2, 3, "cublas"):
        out[f"matmul_forward_{v}"] = matmul.matmul_forward_cuda(x, wm, bm, version=v)
        out[f"matmul_backward_{v}"] = matmul.matmul_backward_cuda(d(B, T, 3 * C), x, wm, version=v)
    qkv = d(B, T, 3 * C)
    for v in ("naive", "cublas"):
        out[f"attention_forward_{v}"] = attention.attention_forward_cuda(qkv, NH, version=v)
    out["attention_backward"] = attention.attention_backward_cuda(d(B, T, C), qkv, out["attention_forward_cublas"][1], NH)
    h = d(B, T, 4 * C)
    out["gelu_forward"] = gelu.gelu_forward_cuda(h)
    out["gelu_forward_float4"] = gelu.gelu_forward_cuda(h, version=2)
    out["gelu_backward"] = gelu.gelu_backward_cuda(d(B, T, 4 * C), h)
    out["residual_forward"] = residual.residual_forward_cuda(x, d(B, T, C))
    out["rmsnorm_forward"] = rmsnorm.rmsnorm_forward_cuda(x, w)
    out["rmsnorm_backward"] = rmsnorm.rmsnorm_backward_cuda(d(B, T, C), x, w, out["rmsnorm_forward"][1])
    freqs_cis = to_device(rope.precompute_freqs_cis(C // NH, T))
    out["rope_forward"] = rope.rope_forward_cuda(x.reshape(B, T, NH, C // NH), freqs_cis)
    out["rope_backward"] = rope.rope_backward_cuda(x.reshape(B, T, NH, C // NH), freqs_cis)
    out["swiglu_forward"] = swiglu.swiglu_forward_cuda(h)
    out["swiglu_backward"] = swiglu.swiglu_backward_cuda(d(B, T, 2 * C), h)
    logits, targets = d(B, T, Vp, scale=3.0), to_device(gen.integers(0, V, (B, T)).astype(np.int32))
    out["softmax_forward"] = crossentropy.softmax_forward_cuda(logits, V)
    out["fused_classifier"] = crossentropy.fused_classifier_cuda(logits.copy(), targets, V)
    p, g, m, v = d(1000), d(1000), d(1000, scale=0.1), to_device(np.abs(gen.standard_normal(1000)).astype(np.float32))
    adamw.adamw_update_cuda(p, g, m, v, 3, 1e-3, weight_decay=0.1, grad_scale=0.5)
    out["adamw_update"] = (p, m, v)
    out["global_norm"] = np.float32(adamw.global_norm_cuda(g))
    flat = {}
    for name, value in out.items():
        parts = value if isinstance(value, tuple) else (value,)
        for i, part in enumerate(parts):
            flat[f"{name}.{i}"] = np.asarray(to_host(part))
    return flat


def test_gpu_and_emulator_agree(tmp_path):
    from llmc_lessons import device
    if not device.on_gpu():
        pytest.skip("parity needs a GPU (the emulator side runs in a child process)")
    gpu = cases()
    path = tmp_path / "cpu.npz"
    env = dict(os.environ, LLMC_DEVICE="cpu")
    subprocess.run([sys.executable, __file__, str(path)], env=env, check=True, cwd=os.path.dirname(__file__))
    cpu = dict(np.load(path))
    assert sorted(cpu) == sorted(gpu)
    worst = []
    for name in sorted(gpu):
        a, b = gpu[name].astype(np.float64), cpu[name].astype(np.float64)
        assert a.shape == b.shape, name
        scale = max(np.abs(b).max(), 1e-30)
        rel = float(np.abs(a - b).max() / scale)
        worst.append((rel, name))
        print(f"{name:<28} max |gpu - emulator| / max |emulator| = {rel:.1e}")
        tol = 2e-3 if "cublas" in name else 1e-5  # cuBLAS on the GPU uses TF32 tensor cores when enabled
        assert rel <= tol, f"{name}: GPU and emulator differ by {rel:.1e} (tolerance {tol:.0e})"
    print(f"worst: {max(worst)}")


if __name__ == "__main__":
    np.savez(sys.argv[1], **cases())
