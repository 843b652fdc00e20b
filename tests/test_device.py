"""The backend choice (llmc_lessons.device): GPU when usable, else CPU; LLMC_DEVICE; input validation."""
from __future__ import annotations

import os
import subprocess
import sys
import types

import numpy as np
import pytest

from llmc_lessons import device


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    full.pop("LLMC_DEVICE", None)
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


# ---------------------------------------------------------------------------------------------------------
# The choice

def test_backend_is_consistent():
    assert device.BACKEND in ("cpu", "gpu")
    assert device.on_gpu() == (device.BACKEND == "gpu")
    assert (device.xp is np) == (device.BACKEND == "cpu")
    assert device.REASON
    assert device.describe().startswith("GPU: " if device.on_gpu() else "CPU: ")
    assert device.REASON in device.describe()


def test_backend_follows_the_environment_only():
    wanted = os.environ.get("LLMC_DEVICE", "").strip().lower()
    if wanted == "cpu":
        assert device.BACKEND == "cpu" and device.REASON == "forced by LLMC_DEVICE=cpu"
    elif wanted == "gpu":
        assert device.BACKEND == "gpu"


def test_llmc_device_cpu_forces_the_cpu():
    res = run_python("from llmc_lessons import device; print(device.BACKEND, device.xp.__name__, '|', device.REASON)",
                     LLMC_DEVICE=" CPU ")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "cpu numpy | forced by LLMC_DEVICE=cpu"


def test_invalid_llmc_device_is_a_clear_error_at_import():
    res = run_python("import llmc_lessons.device", LLMC_DEVICE="tpu")
    assert res.returncode != 0
    assert "LLMC_DEVICE must be 'cpu' or 'gpu' (or unset), not 'tpu'" in res.stderr


def test_choose_falls_back_to_the_cpu_and_says_why(monkeypatch):
    monkeypatch.delenv("LLMC_DEVICE", raising=False)
    monkeypatch.setattr(device, "_usable_cupy", lambda: (None, "CuPy is not installed (ImportError: x)"))
    backend, xp, reason = device._choose()
    assert (backend, xp, reason) == ("cpu", np, "CuPy is not installed (ImportError: x)")


def test_choose_takes_a_usable_gpu(monkeypatch):
    fake = types.SimpleNamespace(__name__="cupy")
    monkeypatch.delenv("LLMC_DEVICE", raising=False)
    monkeypatch.setattr(device, "_usable_cupy", lambda: (fake, None))
    assert device._choose() == ("gpu", fake, "CuPy found a usable CUDA device")


def test_forcing_the_gpu_without_one_fails_loudly(monkeypatch):
    monkeypatch.setenv("LLMC_DEVICE", "gpu")
    monkeypatch.setattr(device, "_usable_cupy", lambda: (None, "CuPy found no CUDA device"))
    with pytest.raises(RuntimeError, match="LLMC_DEVICE=gpu but CuPy found no CUDA device. Unset LLMC_DEVICE"):
        device._choose()


def test_forcing_the_cpu_never_touches_cupy(monkeypatch):
    monkeypatch.setenv("LLMC_DEVICE", "cpu")
    monkeypatch.setattr(device, "_usable_cupy", lambda: pytest.fail("CuPy was probed despite LLMC_DEVICE=cpu"))
    assert device._choose()[0] == "cpu"


@pytest.mark.skipif(device.on_gpu(), reason="on a GPU machine CuPy is usable")
def test_without_a_gpu_the_probe_explains_why():
    cupy, why = device._usable_cupy()
    assert cupy is None and why.startswith("CuPy ")


# ---------------------------------------------------------------------------------------------------------
# Moving arrays

def test_to_device_and_to_host_round_trip():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    d = device.to_device(a)
    assert isinstance(d, device.xp.ndarray)
    h = device.to_host(d)
    assert isinstance(h, np.ndarray) and h.dtype == np.float32 and np.array_equal(h, a)
    assert device.to_device([1, 2], dtype=np.int32).dtype == np.int32
    device.synchronize()


# ---------------------------------------------------------------------------------------------------------
# require_array: every launcher's input validation

def arr(shape, dtype=np.float32):
    return device.xp.zeros(shape, dtype=dtype)


def test_require_array_accepts_and_returns_a_good_array():
    a = arr((2, 3, 4))
    assert device.require_array("inp", a, shape=(2, 3, 4)) is a
    assert device.require_array("inp", a, shape=(None, 3, None)) is a
    assert device.require_array("ids", arr((5,), np.int32), shape=(5,), dtype=np.int32) is not None
    assert device.require_array("any", arr((1,), np.float64), dtype=None) is not None


def test_require_array_rejects_a_list():
    with pytest.raises(TypeError, match=r"inp must be a (NumPy array|CuPy array on the GPU), got builtins.list"):
        device.require_array("inp", [1.0, 2.0])


@pytest.mark.skipif(not device.on_gpu(), reason="a NumPy array is the right kind on the CPU backend")
def test_require_array_rejects_a_numpy_array_on_the_gpu_with_a_hint():
    with pytest.raises(TypeError, match="to_device"):
        device.require_array("inp", np.zeros(3, dtype=np.float32))


def test_require_array_rejects_the_wrong_dtype_and_says_how_to_fix_it():
    with pytest.raises(TypeError, match=r"weight must have dtype float32, got float64 \(use .astype\(np.float32\)\)"):
        device.require_array("weight", arr((4,), np.float64), shape=(4,))


def test_require_array_rejects_the_wrong_shape():
    with pytest.raises(ValueError, match=r"inp must have shape \(2, \*, 4\), got \(2, 3, 5\)"):
        device.require_array("inp", arr((2, 3, 5)), shape=(2, None, 4))
    with pytest.raises(ValueError, match=r"must have shape \(6,\)|must have shape \(6\)"):
        device.require_array("bias", arr((2, 3)), shape=(6,))


def test_require_array_rejects_a_non_contiguous_view():
    a = arr((4, 6))[:, ::2]
    with pytest.raises(ValueError, match=r"inp must be C-contiguous.*ascontiguousarray"):
        device.require_array("inp", a, shape=(4, 3))
    with pytest.raises(ValueError, match="C-contiguous"):
        device.require_array("inp", arr((3, 4)).T, shape=(4, 3))


@pytest.mark.parametrize("value, warps, err, message", [
    (64.0, False, TypeError, "block_size must be an int"), (True, False, TypeError, "must be an int"),
    ("256", True, TypeError, "must be an int"), (0, False, ValueError, "in 1..1024"),
    (1025, False, ValueError, "in 1..1024"), (48, True, ValueError, "multiple of 32"),
    (2048, True, ValueError, "multiple of 32"),
])
def test_require_block_size_raises_type_error_for_a_non_int_and_value_error_for_a_bad_value(value, warps, err, message):
    with pytest.raises(err, match=message):
        device.require_block_size(value, warps=warps)


def test_require_block_size_and_require_int_return_python_ints():
    assert device.require_block_size(np.int64(48)) == 48 and type(device.require_block_size(np.int64(48))) is int
    assert device.require_block_size(96, warps=True, name="param_block_size") == 96
    with pytest.raises(ValueError, match="param_block_size must be a multiple of 32"):
        device.require_block_size(100, warps=True, name="param_block_size")
    assert device.require_int("NH", np.int32(3)) == 3
    with pytest.raises(TypeError, match="NH must be an int"):
        device.require_int("NH", 3.0)
    with pytest.raises(ValueError, match="grid_rows must be an int >= 1, got 0"):
        device.require_int("grid_rows", 0)
