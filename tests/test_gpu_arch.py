"""Every GPU a student may have. On the CPU, with the compute capability faked: what the doctor reports and
where the bf16 model falls back. On a GPU (marker gpu): every kernel file compiles with NVRTC for sm_75, sm_80,
sm_86, sm_89 and sm_90, and the kernels built without the sm_80 instructions (what a T4 runs) agree with the
ones built with them."""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest

from llmc_lessons import __main__ as doctor_cli
from llmc_lessons import device
from llmc_lessons.model import GPT2, GPT2Config

KERNELS = Path(device.__file__).resolve().parent / "kernels"
ARCHS = (75, 80, 86, 89, 90)
SMALL = GPT2Config(max_seq_len=16, vocab_size=37, padded_vocab_size=40, num_layers=1, num_heads=1, channels=64)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend the GPU has compute capability `cc` (the backend stays the CPU's)."""
    def fake(cc):
        monkeypatch.setattr(device, "compute_capability", lambda: cc)
    return fake


@pytest.mark.parametrize("cc, supported", [(75, False), (80, True), (86, True), (89, True), (90, True)])
def test_bf16_unsupported_below_sm80_only(fake_gpu, cc, supported):
    fake_gpu(cc)
    why = device.bf16_unsupported()
    assert (why is None) == supported
    if not supported:
        assert f"sm_{cc}" in why and "sm_80" in why


def test_cpu_runs_bf16_in_the_emulator():
    if device.on_gpu():
        pytest.skip("the CPU backend's answer")
    assert device.compute_capability() is None and device.bf16_unsupported() is None


def test_bf16_model_falls_back_to_fp32_below_sm80(fake_gpu):
    fake_gpu(75)
    with pytest.warns(UserWarning, match=r"precision='bf16' falls back to 'fp32': this GPU is sm_75"):
        model = GPT2(SMALL, precision="bf16")
    assert model.precision == "fp32"


def test_bf16_model_keeps_bf16_from_sm80(fake_gpu, recwarn):
    fake_gpu(80)
    assert GPT2(SMALL, precision="bf16").precision == "bf16"
    assert not [w for w in recwarn if "falls back" in str(w.message)]


@pytest.mark.parametrize("cc", [75, 90])
def test_doctor_reports_the_architecture_and_what_runs(fake_gpu, cc):
    fake_gpu(cc)
    out = io.StringIO()
    doctor_cli.doctor(out=out, run_kernel=False)
    text = out.getvalue()
    assert re.search(rf"GPU architecture:\s+sm_{cc} \(compute capability {cc // 10}\.{cc % 10}\)", text)
    if cc < 80:
        assert "without the tensor cores" in text and "train in fp32 here: this GPU is sm_75" in text
    else:
        assert "bf16 tensor-core parts (lessons 13-14, --precision bf16) included" in text


# ---------------------------------------------------------------------------------------------------------
# On a GPU: NVRTC for every architecture, and the pre-sm_80 build against the sm_80 one


def kernel_names(source: str) -> list[str]:
    return re.findall(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)\(', source)


def nvrtc_compile(source: str, name: str, options: tuple) -> tuple[bytes | None, str]:
    """(cubin or None, NVRTC's log) of `source` compiled as CuPy does, for the architecture in `options`."""
    from cupy_backends.cuda.libs import nvrtc
    prog = nvrtc.createProgram(source, name, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError:
            return None, nvrtc.getProgramLog(prog)
        return nvrtc.getCUBIN(prog), nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


@pytest.mark.gpu
def test_every_kernel_compiles_for_every_student_gpu():
    if not device.on_gpu():
        pytest.skip("NVRTC comes with CuPy on a GPU machine")
    from cupy_backends.cuda.libs import nvrtc
    extra = ("--device-as-default-execution-space",) if nvrtc.getVersion()[0] >= 12 else ()  # as CuPy passes
    files = sorted(KERNELS.glob("*.cu"))
    table, failures = [], []
    for path in files:
        source = path.read_text()
        names = kernel_names(source)
        assert names, f"{path.name} has no kernel"
        for cc in ARCHS:
            cubin, log = nvrtc_compile(source, path.name, (f"--gpu-architecture=sm_{cc}", f"-I{KERNELS}", *extra))
            missing = [n for n in names if cubin is None or n.encode() not in cubin]
            table.append(f"{path.name:<22} sm_{cc}  {'ok' if not missing else 'FAILED'}  {len(names)} kernels")
            if missing:
                failures.append(f"{path.name} for sm_{cc}: {', '.join(missing)}\n{log[-2000:]}")
    print("\n" + "\n".join(table))
    assert not failures, "\n\n".join(failures)


@pytest.mark.gpu
def test_kernels_without_the_sm80_instructions_agree():
    """What a T4 runs (-DLLMC_NO_SM80: integer bf16 rounding, mma/ldmatrix by shuffles, plain copies for
    cp.async) against the sm_80 build, on this GPU: the bf16 rounding bit for bit, flash attention closely."""
    if not device.on_gpu():
        pytest.skip("needs a GPU")
    from llmc_lessons.cuda import RawKernel, kernel_source
    from llmc_lessons.layers.flash_attention import FA_THREADS, tile_grid
    xp = device.xp
    gen = np.random.default_rng(0)

    x = device.to_device(np.concatenate([gen.standard_normal(1000).astype(np.float32) * 100,
                                         np.float32([np.nan, np.inf, -np.inf, 0.0, -0.0, 3.4e38])]))
    rounded = []
    for opts in ((), ("-DLLMC_NO_SM80",)):
        out = xp.full(x.size, 0xFFFF, dtype=np.uint16)
        RawKernel(kernel_source("bf16.cu"), "float_to_bf16_kernel", opts)(
            (-(-x.size // 128),), (128,), (out, x, np.int32(x.size), np.int32(0), np.uint32(0)))
        rounded.append(device.to_host(out))
    np.testing.assert_array_equal(rounded[1], rounded[0])

    B, T, NH, hs = 2, 77, 3, 64
    qkv = device.to_device(gen.standard_normal((B, T, 3 * NH * hs)).astype(np.float32))
    from llmc_lessons.layers.bf16 import float_to_bf16_cuda
    qkv16 = float_to_bf16_cuda(qkv)
    outs = []
    for opts in ((f"-DHS={hs}",), (f"-DHS={hs}", "-DLLMC_NO_SM80")):
        out = xp.full((B, T, NH * hs), 0xFFFF, dtype=np.uint16)
        lse = xp.full((B, NH, T), np.nan, dtype=np.float32)
        RawKernel(kernel_source("flash_attention.cu"), "flash_attention_forward_bf16_kernel", opts)(
            tile_grid(T, NH, B), (FA_THREADS,), (out, lse, qkv16, np.int32(B), np.int32(T), np.int32(NH), np.int32(NH)))
        outs.append((device.to_host(out), device.to_host(lse)))
    (o80, l80), (o75, l75) = outs
    assert np.isfinite(l75).all()
    np.testing.assert_allclose(l75, l80, rtol=1e-4, atol=1e-4)
    as_float = lambda h: (h.astype(np.uint32) << 16).view(np.float32)  # noqa: E731
    np.testing.assert_allclose(as_float(o75), as_float(o80), rtol=1e-2, atol=1e-2)
