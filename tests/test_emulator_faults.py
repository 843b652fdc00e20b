"""The emulator survives a student's faulting kernel: every fault becomes a KernelError, the next launch works.

Also: interrupting a launch (Ctrl-C), the time limit, checked mode's child process, warp code that CUDA allows
or forbids, and the emulator's settings. CPU backend only.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from llmc_lessons import device
from llmc_lessons.cuda import CompileError, KernelError, RawKernel
from llmc_lessons.cuda import emulator

pytestmark = pytest.mark.skipif(device.on_gpu(), reason="emulator tests run on the CPU backend")

ROOT = Path(__file__).resolve().parents[1]
COPY = r'''
extern "C" __global__ void copy(float* out, const float* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = x[i];
}'''
RERUN = r"[\s\S]*Rerun with LLMC_CHECK=1"


def still_works():
    """A correct launch right after a failed one: the process and the runtime are intact."""
    x = np.random.default_rng(1).standard_normal(100).astype(np.float32)
    out = np.full(100, np.nan, np.float32)
    RawKernel(COPY, "copy")((4,), (32,), (out, x, np.int32(100)))
    assert np.array_equal(out, x)


def fails(src, name, grid, block, args, match):
    with pytest.raises(KernelError, match=match):
        RawKernel(src, name)(grid, block, args)
    still_works()


# ---------------------------------------------------------------------------------------------------------
# Faults

def test_far_out_of_bounds_write():
    src = 'extern "C" __global__ void far(float* o) {\n  o[threadIdx.x + (1 << 28)] = 1.0f;\n}'
    fails(src, "far", (2,), (32,), (np.zeros(64, np.float32),),
          r"<RawKernel source>:2: kernel 'far', block \(0, 0, 0\), thread \(0, 0, 0\): an invalid memory access"
          + RERUN)


def test_null_pointer():
    src = ('extern "C" __global__ void nul(float* o, int zero) {\n  float* p = (float*)(size_t)zero;\n'
           '  p[threadIdx.x] = 1.0f;\n}')
    fails(src, "nul", (1,), (32,), (np.zeros(32, np.float32), np.int32(0)),
          r"<RawKernel source>:3: kernel 'nul', .*: a null pointer was dereferenced" + RERUN)


def test_integer_division_by_zero():
    src = 'extern "C" __global__ void divide(int* o, int d) {\n  o[threadIdx.x] = 100 / (d + (int)threadIdx.x - 3);\n}'
    fails(src, "divide", (1,), (32,), (np.zeros(32, np.int32), np.int32(0)),
          r"<RawKernel source>:2: kernel 'divide', block \(0, 0, 0\), thread \(3, 0, 0\): integer division or "
          r"remainder by zero")


def test_local_array_larger_than_the_fiber_stack():
    src = r'''
    extern "C" __global__ void big(float* o, int z) {
        float buf[200000];   // 800 KB: more than the 256 KiB fiber stack
        for (int i = 0; i < 200000; i++) buf[i] = i * z;
        o[threadIdx.x] = buf[threadIdx.x * 1000 + z];
    }'''
    fails(src, "big", (1,), (32,), (np.zeros(32, np.float32), np.int32(1)),
          r"kernel 'big', block \(0, 0, 0\), thread \(0, 0, 0\): stack overflow: the thread needs more than its "
          r"262144 bytes of stack.*LLMC_FIBER_STACK")


def test_deep_recursion():
    src = r'''
    __device__ int depth(int n) { volatile char pad[512]; pad[0] = (char)n; return n == 0 ? 0 : depth(n - 1) + pad[0]; }
    extern "C" __global__ void deep(int* o, int n) { o[threadIdx.x] = depth(n); }'''
    fails(src, "deep", (1,), (32,), (np.zeros(32, np.int32), np.int32(100000)), "stack overflow")


@pytest.mark.parametrize("extra", [1, 2, 3, 20, 1000, 2000])
def test_n_larger_than_the_arrays(extra):
    """A write past an argument's end is caught: after the launch (the page after it), or at once (further off)."""
    out, x = np.zeros(50, np.float32), np.zeros(50 + extra, np.float32)
    fails(COPY, "copy", (80,), (32,), (out, x, np.int32(50 + extra)),
          r"kernel 'copy'.* (just|\d+ bytes) past the end of argument 0 \(float\* out, an array of 200 bytes\)"
          r"[\s\S]*bounds test" + RERUN)


def test_reads_past_the_end_of_an_input():
    """Near the end they give garbage, as on a GPU; further off they fault."""
    out, x = np.zeros(64, np.float32), np.ones(48, np.float32)
    RawKernel(COPY, "copy")((2,), (32,), (out, x, np.int32(64)))
    assert np.all(out[:48] == 1) and np.all(np.abs(out[48:]) < 1e-15)  # the pattern 0xA5A5A5A5
    far = COPY.replace("out[i] = x[i];", "out[i] = x[i + 2000 * (i >= 40)];")
    fails(far, "copy", (2,), (32,), (out, x, np.int32(64)),
          r"<RawKernel source>:4: kernel 'copy', block \(1, 0, 0\), thread \(8, 0, 0\): an access 7968 bytes past "
          r"the end of argument 1 \(const float\* x, an array of 192 bytes\)")


def test_overlapping_arguments_share_one_copy():
    """In-place kernels (the same array, or views of it, as several arguments) see each other's writes."""
    src = r'''
    extern "C" __global__ void shift_add(float* out, const float* a, const float* b, int n) {
        int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i < n) out[i] = a[i] + b[i];
    }'''
    buf = np.arange(120, dtype=np.float32)
    ref = buf[:100] + buf[20:]
    RawKernel(src, "shift_add")((4,), (32,), (buf[:100], buf[:100], buf[20:], np.int32(100)))
    assert np.array_equal(buf[:100], ref) and np.array_equal(buf[100:], np.arange(100, 120))
    RawKernel(src, "shift_add")((4,), (32,), (buf[:100], buf[:100], buf[20:], np.int32(110)))  # inside buf
    with pytest.raises(KernelError, match=r"wrote \d+ bytes past the end of argument 0 \(float\* out, an array of "
                                          r"400 bytes\)"):
        RawKernel(src, "shift_add")((10,), (32,), (buf[:100], buf[:100], buf[20:], np.int32(300)))


def test_results_of_a_correct_launch_are_unchanged_by_staging():
    x = np.random.default_rng(2).standard_normal(1000).astype(np.float32)
    out = np.full(1003, 7.0, np.float32)
    RawKernel(COPY, "copy")((8,), (128,), (out[1:1001], x, np.int32(1000)))
    assert np.array_equal(out[1:1001], x) and out[0] == 7 and np.all(out[1001:] == 7)


# ---------------------------------------------------------------------------------------------------------
# Interrupting and time limits

SPIN = r'''
extern "C" __global__ void spin(int* flag) {
    if (threadIdx.x == 0) { while (atomicAdd(flag, 0) == 0) { } }   // waits for thread 1, which never runs
    else flag[0] = 1;
}'''


def test_time_limit(monkeypatch):
    k = RawKernel(SPIN, "spin").compile()
    monkeypatch.setenv("LLMC_KERNEL_TIMEOUT", "0.5")
    t = time.perf_counter()
    with pytest.raises(KernelError, match=r"<RawKernel source>:3: kernel 'spin' did not finish within the time "
                                          r"limit of 0.5 s \(LLMC_KERNEL_TIMEOUT\); it was stopped in block "
                                          r"\(\d, 0, 0\), thread \(0, 0, 0\)[\s\S]*spins waiting for a value "
                                          r"another thread[\s\S]*since Volta[\s\S]*never pre-empts"):
        k((2,), (32,), (np.zeros(1, np.int32),))
    assert time.perf_counter() - t < 5
    still_works()


def test_a_stop_inside_the_emulators_header_names_the_kernels_line():
    """Stopped inside llmc_cuda.h (the spin's atomicAdd), the message names the kernel's line, also when the module
    came from the shared build cache after another checkout of the course built it (its line tables then name that
    checkout's headers)."""
    from llmc_lessons.cuda.emulator import HERE, _emulator_header
    assert _emulator_header(str(HERE / "llmc_cuda.h"))
    assert _emulator_header(f"/elsewhere/course/{HERE.parent.name}/{HERE.name}/llmc_cuda.h")
    assert not _emulator_header("<RawKernel source>")
    assert not _emulator_header(str(HERE.parent / "kernels" / "mma.cuh"))   # the course's kernels: the student's view
    assert not _emulator_header(f"/elsewhere/{HERE.name}/llmc_cuda.h")


def test_ctrl_c_interrupts_a_spinning_kernel():
    code = textwrap.dedent(f'''
        import numpy as np
        from llmc_lessons.cuda import RawKernel
        k = RawKernel({SPIN!r}, "spin").compile()
        print("launching", flush=True)
        try:
            k((2,), (32,), (np.zeros(1, np.int32),))
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        o = np.zeros(32, np.float32)
        RawKernel('extern "C" __global__ void ok(float* o) {{ o[threadIdx.x] = 1; }}', "ok")(1, 32, (o,))
        print("next launch", o.sum(), flush=True)
    ''')
    env = dict(os.environ, LLMC_DEVICE="cpu", PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline() == "launching\n"
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert out == "interrupted\nnext launch 32.0\n"


def test_volatile_spin_wait_on_another_thread_ends():
    src = SPIN.replace("int* flag", "volatile int* flag").replace("atomicAdd(flag, 0)", "flag[0]")
    flag = np.zeros(1, np.int32)
    RawKernel(src, "spin")((2,), (32,), (flag,))
    assert flag[0] == 1


# ---------------------------------------------------------------------------------------------------------
# Warp code: what CUDA allows runs, what it leaves undefined is an error

def test_half_warps_reduce_with_their_own_masks():
    src = r'''
    extern "C" __global__ void halves(float* out, const float* x) {
        int t = threadIdx.x;
        unsigned mask = t < 16 ? 0x0000ffffu : 0xffff0000u;
        float v = x[blockIdx.x * 32 + t];
        for (int o = 8; o > 0; o /= 2) v += __shfl_xor_sync(mask, v, o, 16);
        if (t % 16 == 0) out[blockIdx.x * 2 + t / 16] = v;
    }'''
    x = np.random.default_rng(3).standard_normal(96).astype(np.float32)
    out = np.full(6, np.nan, np.float32)
    RawKernel(src, "halves")((3,), (32,), (out, x))
    assert np.allclose(out, x.reshape(6, 16).sum(1), rtol=1e-5, atol=1e-5)


def test_shuffle_from_a_lane_outside_the_mask_is_an_error():
    src = r'''
    extern "C" __global__ void outside(float* out) {
        if (threadIdx.x < 16) out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, 1.0f, 8);
    }'''
    fails(src, "outside", (1,), (32,), (np.zeros(32, np.float32),),
          r"<RawKernel source>:3: kernel 'outside', block \(0, 0, 0\), thread \(8, 0, 0\): lane 8 reads lane 16 "
          r"in a shuffle with mask 0x0000ffff, which does not include lane 16: the value is undefined")


def test_lane_that_exits_before_a_collective_naming_it_is_an_error():
    src = r'''
    extern "C" __global__ void gone(float* out) {
        if (threadIdx.x == 31) return;
        out[threadIdx.x] = __shfl_sync(0xffffffff, 1.0f, 0);
    }'''
    fails(src, "gone", (1,), (32,), (np.zeros(32, np.float32),),
          r"thread \(31, 0, 0\): this lane returned from the kernel while lanes 0x7fffffff of warp 0 wait for it")


def test_warp_synchronous_volatile_reduction_runs_in_lockstep():
    """The classic last-warp unroll: volatile shared memory, no __syncwarp; lanes step together as on a GPU."""
    src = r'''
    __device__ void warp_reduce(volatile float* s, int t) {
        s[t] += s[t + 32]; s[t] += s[t + 16]; s[t] += s[t + 8];
        s[t] += s[t + 4]; s[t] += s[t + 2]; s[t] += s[t + 1];
    }
    extern "C" __global__ void block_sum(float* out, const float* x) {
        __shared__ float s[128];
        int t = threadIdx.x;
        s[t] = x[blockIdx.x * 128 + t];
        __syncthreads();
        if (t < 64) s[t] += s[t + 64];
        __syncthreads();
        if (t < 32) warp_reduce(s, t);
        if (t == 0) out[blockIdx.x] = s[0];
    }'''
    x = np.random.default_rng(4).standard_normal(5 * 128).astype(np.float32)
    out = np.full(5, np.nan, np.float32)
    RawKernel(src, "block_sum")((5,), (128,), (out, x))
    assert np.allclose(out, x.reshape(5, 128).sum(1), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Output, settings, the cache, the compiler

def test_long_printf_lines_are_whole_and_a_full_buffer_says_so(capsys):
    src = r'''
    extern "C" __global__ void talk(int n) {
        if (threadIdx.x == 0 && n == 1)
            printf("%s|\n", "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                            "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
        if (n > 1) for (int i = 0; i < n; i++) printf("%d %d\n", threadIdx.x, i);
    }'''
    k = RawKernel(src, "talk")
    k((1,), (1,), (np.int32(1),))
    assert capsys.readouterr().out == "x" * 198 + "|\n"
    k((1,), (64,), (np.int32(100000),))
    out = capsys.readouterr().out
    assert len(out) < (4 << 20) + 1000 and out.endswith("printf output stopped after 4 MiB: later lines were "
                                                        "dropped, as a GPU drops them when its printf buffer is full]\n")


@pytest.mark.parametrize("name, value, msg", [
    ("LLMC_FIBER_STACK", "lots", "LLMC_FIBER_STACK='lots' is not valid: it must be a whole number of bytes"),
    ("LLMC_FIBER_STACK", "1000", "at least 16384"),
    ("LLMC_EMU_THREADS", "0", "LLMC_EMU_THREADS='0' is not valid: it must be a whole number of threads"),
    ("LLMC_KERNEL_TIMEOUT", "soon", "LLMC_KERNEL_TIMEOUT='soon' is not valid: it must be a number of seconds"),
])
def test_bad_settings_are_named(monkeypatch, name, value, msg):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=msg):
        RawKernel(COPY, "copy")((1,), (32,), (np.zeros(4, np.float32), np.zeros(4, np.float32), np.int32(4)))


def test_small_fiber_stack_overflow_is_caught(monkeypatch):
    monkeypatch.setenv("LLMC_FIBER_STACK", "16384")
    src = r'''
    extern "C" __global__ void local(float* o, int z) {
        float buf[8192];    // 32 KB
        for (int i = 0; i < 8192; i++) buf[i] = i * z;
        o[threadIdx.x] = buf[threadIdx.x * 100 + z];
    }'''
    fails(src, "local", (1,), (32,), (np.zeros(32, np.float32), np.int32(1)), "16384 bytes of stack")


def test_damaged_cached_library_is_rebuilt(tmp_path):
    src = COPY.replace("x[i]", "x[i] * 1.0f")  # a source no other test compiled
    code = textwrap.dedent(f'''
        import numpy as np
        from llmc_lessons.cuda import RawKernel
        x, out = np.ones(10, np.float32), np.zeros(10, np.float32)
        RawKernel({src!r}, "copy")((1,), (32,), (out, x, np.int32(10)))
        assert np.all(out == 1)
    ''')
    env = dict(os.environ, LLMC_DEVICE="cpu", LLMC_CACHE=str(tmp_path), PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    libs = list((tmp_path / "emulator").glob("*.so"))
    assert len(libs) == 2  # the runtime and the kernel
    for lib in libs:
        lib.write_bytes(lib.read_bytes()[:100])  # as a full disk or a killed copy might leave them
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def test_unknown_cuda_name_hint_under_a_utf8_locale():
    gcc = "x.cu:3:5: error: \u2018__nanosleep\u2019 was not declared in this scope"
    clang = "x.cu:3:5: error: use of undeclared identifier '__nanosleep'"
    for stderr in (gcc, clang):
        assert "__nanosleep is outside the CUDA subset" in emulator._explain(stderr)


def test_compiler_that_does_not_run_is_reported():
    env = dict(os.environ, CXX="/bin/false", PYTHONPATH=str(ROOT), LLMC_DEVICE="cpu")
    res = subprocess.run([sys.executable, "-m", "llmc_lessons", "doctor"], env=env, capture_output=True, text=True)
    assert res.returncode != 0
    assert "MISSING" in res.stdout and "'/bin/false'" in res.stdout


# ---------------------------------------------------------------------------------------------------------
# Checked mode: the same errors as the default mode; the child never outlives its parent

def test_checked_mode_reports_refusals_and_compile_errors_as_default_mode(monkeypatch):
    monkeypatch.setenv("LLMC_CHECK", "1")
    with pytest.raises(NotImplementedError, match="__constant__ memory"):
        RawKernel('__constant__ float c[4];\nextern "C" __global__ void k(float* o) { o[0] = 1; }', "k")(
            1, 1, (np.zeros(1, np.float32),))
    with pytest.raises(CompileError, match=r"<RawKernel source>:2"):
        RawKernel('extern "C" __global__ void k(float* o) {\n  o[0] = 1.0f\n}', "k")(1, 1, (np.zeros(1, np.float32),))


def test_checked_mode_time_limit(monkeypatch):
    monkeypatch.setenv("LLMC_CHECK", "1")
    monkeypatch.setenv("LLMC_KERNEL_TIMEOUT", "1")
    with pytest.raises(KernelError, match="kernel 'spin' did not finish within the time limit of 1 s"):
        RawKernel(SPIN, "spin")((1,), (32,), (np.zeros(1, np.int32),))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the child process through /proc")
def test_checked_mode_child_dies_with_its_parent():
    code = textwrap.dedent(f'''
        import numpy as np
        from llmc_lessons.cuda import RawKernel
        RawKernel({SPIN!r}, "spin")((1,), (32,), (np.zeros(1, np.int32),))
    ''')
    env = dict(os.environ, LLMC_DEVICE="cpu", LLMC_CHECK="1", PYTHONPATH=str(ROOT))
    parent = subprocess.Popen([sys.executable, "-c", code], env=env)

    def children():
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent.pid:
                found.append(int(stat.parent.name))
        return found

    try:
        deadline = time.time() + 60
        while not children() and time.time() < deadline:
            time.sleep(0.2)
        (child,) = children()
        time.sleep(1.0)  # let it reach the launch
        parent.kill()
        parent.wait()
        deadline = time.time() + 20
        while Path(f"/proc/{child}").exists() and time.time() < deadline:
            try:
                os.waitpid(child, os.WNOHANG)
            except ChildProcessError:
                pass
            if (Path(f"/proc/{child}/stat").exists()
                    and Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"):
                break
            time.sleep(0.2)
        state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] if Path(
            f"/proc/{child}").exists() else "gone"
        assert state in ("gone", "Z"), state
    finally:
        parent.kill()


def test_a_fault_stops_the_other_workers(monkeypatch):
    """Block 1 faults while block 0, on another worker thread, spins: the launch still ends at once."""
    monkeypatch.setenv("LLMC_EMU_THREADS", "2")
    src = r'''
    extern "C" __global__ void one_spins(int* flag, int zero) {
        if (blockIdx.x == 0) { while (atomicAdd(flag, 0) == 0) { } }
        else if (threadIdx.x == 0) flag[1 << 28] = 100 / zero;
    }'''
    t = time.perf_counter()
    fails(src, "one_spins", (2,), (32,), (np.zeros(1, np.int32), np.int32(0)), r"block \(1, 0, 0\)")
    assert time.perf_counter() - t < 20


def test_a_view_may_touch_the_rest_of_its_array():
    """CUDA allows touching the allocation around a pointer: a view's neighbours are there, as on a GPU."""
    buf = np.arange(80, dtype=np.float32)
    out = np.full(64, np.nan, np.float32)
    RawKernel(COPY, "copy")((2,), (32,), (out, buf[10:50], np.int32(64)))  # reads 24 elements past the view
    assert np.array_equal(out, np.arange(10, 74, dtype=np.float32))
    with pytest.raises(KernelError, match=r"past the end of argument 1 \(const float\* x, an array of 160 bytes\)"):
        RawKernel(COPY, "copy")((40,), (32,), (np.zeros(1280, np.float32), buf[10:50], np.int32(1280)))
    still_works()
