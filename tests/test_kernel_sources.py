"""Every course kernel file is valid CUDA (nvcc, when installed) and compiles in the CPU emulator."""
import shutil
import subprocess

import pytest

from llmc_lessons import device
from llmc_lessons.cuda import KERNELS_DIR, RawKernel
from llmc_lessons.cuda.source import find_kernels

CU_FILES = sorted(p.name for p in KERNELS_DIR.glob("*.cu"))


@pytest.mark.parametrize("name", CU_FILES)
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_nvcc_compiles(name, tmp_path):
    res = subprocess.run(["nvcc", "-c", "-arch=sm_90", f"-I{KERNELS_DIR}", str(KERNELS_DIR / name),
                          "-o", str(tmp_path / "k.o")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("name", CU_FILES)
def test_every_kernel_is_extern_c_and_compiles_on_this_backend(name):
    src = (KERNELS_DIR / name).read_text()
    kernels = find_kernels(src)
    assert kernels, f"{name} defines no __global__ function"
    assert all(sig is not None for sig in kernels.values()), f"{name}: every kernel must be extern \"C\""
    if not device.on_gpu():
        RawKernel(src, next(iter(kernels)), filename=str(KERNELS_DIR / name)).compile()
