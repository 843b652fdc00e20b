"""The check helpers every exercise uses: each kind of wrong answer gets a message that names it."""
import numpy as np
import pytest

from llmc_lessons.checks import ExerciseFailed, assert_close, exercise_kernel, passed, poisoned, run_exercise
from llmc_lessons.device import to_device, to_host

gen = np.random.default_rng(0)
EXPECTED = gen.standard_normal((4, 6))


def fails(got, *fragments, **kw):
    with pytest.raises(AssertionError) as e:
        assert_close("Exercise 9.9", "dx", got, EXPECTED, **kw)
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))
    return str(e.value)


def test_close_enough_passes(capsys):
    assert_close("Exercise 9.9", "dx", EXPECTED + 1e-7, EXPECTED)
    passed("Exercise 9.9")
    assert capsys.readouterr().out == "Exercise 9.9: correct\n"


def test_first_wrong_element_expected_and_got():
    got = EXPECTED.copy()
    got[2, 3] += 1.0
    msg = fails(got, "Exercise 9.9 (dx): 1 of 24 elements are wrong", "first wrong element dx[2, 3]")
    assert f"expected {EXPECTED[2, 3]:.6g}" in msg


def test_nan_means_never_written():
    got = EXPECTED.copy()
    got[:, -1] = np.nan
    msg = fails(got, "4 elements are NaN", "never written", "LLMC_CHECK")
    assert "max abs error" not in msg, "the wrong elements are all NaN: there is no error size to report"


def test_max_abs_error_counts_the_wrong_elements_that_are_not_nan():
    got = EXPECTED.copy()
    got[:, -1] = np.nan
    got[0, 0] += 0.5
    msg = fails(got, "5 of 24 elements are wrong", "max abs error 0.5 among the 1 wrong elements that are not NaN")
    assert "max abs error 0 " not in msg


def test_sign_scale_shift_zero():
    fails(-EXPECTED, "sign error")
    fails(EXPECTED * 0.5, "0.5 times the expected one")
    fails(np.zeros_like(EXPECTED), "every element is zero")
    shifted = np.roll(EXPECTED, 1, axis=1)
    fails(shifted, "shifted by 1 along axis 1", "off-by-one")


def test_known_mistakes_are_named_and_hints_added():
    wrong = EXPECTED + 3.0
    fails(wrong, "likely cause: you forgot the mean term", "hint: look at the second term",
          known_mistakes={"you forgot the mean term": wrong}, hint="look at the second term")


def test_shape_and_none():
    fails(EXPECTED.T, "expected shape (4, 6), got (6, 4)", "transposed")
    with pytest.raises(AssertionError, match="forget to `return`"):
        assert_close("Exercise 9.9", "dx", None, EXPECTED)
    with pytest.raises(ExerciseFailed, match=r"Exercise 9.9 \(dx\): expected an array of numbers, got str 'dx'"):
        assert_close("Exercise 9.9", "dx", "dx", EXPECTED)


def test_run_exercise_turns_a_stub_into_a_failure():
    def stub():
        raise NotImplementedError("Exercise 9.9: write dx")
    with pytest.raises(AssertionError, match=r"Exercise 9.9 is not done yet \(Exercise 9.9: write dx\)"):
        run_exercise("Exercise 9.9", stub)
    assert run_exercise("Exercise 9.9", lambda x: x + 1, 1) == 2


def test_poisoned():
    assert np.all(np.isnan(to_host(poisoned((3, 2)))))
    assert np.all(to_host(poisoned(4, dtype=np.int32)) == -1)


def test_a_failure_shows_in_jupyter_as_its_message_alone():
    with pytest.raises(ExerciseFailed) as e:
        assert_close("Exercise 9.9", "dx", -EXPECTED, EXPECTED)
    assert isinstance(e.value, AssertionError)          # nbval and pytest see a failure
    [shown] = e.value._render_traceback_()              # what IPython shows instead of the frames
    assert shown.endswith(str(e.value)) and "checks" not in shown and "line" not in shown


def test_an_error_in_the_students_code_names_their_line_not_the_checks():
    def answer(x):
        y = x + 1
        return y @ np.ones(7)
    with pytest.raises(ExerciseFailed) as e:
        run_exercise("Exercise 9.9", answer, np.ones((2, 3)))
    msg = str(e.value)
    assert msg.startswith("Exercise 9.9: your code raised ValueError")
    assert "of answer: return y @ np.ones(7)" in msg and "run_exercise" not in msg
    assert isinstance(e.value.__cause__, ValueError)    # a check can add a hint for a cause it knows


KERNEL = r"""
extern "C" __global__ void twice(float* out, const float* inp, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    // TODO (Exercise 9.9): write out[i]
    if (i < n) out[i] = 2.0f * inp[i];
}
"""


def test_a_kernel_with_its_todo_comment_left_in_is_checked_like_any_other():
    n = 40
    inp = np.arange(n, dtype=np.float32)
    kernel = exercise_kernel("Exercise 9.9", KERNEL, "twice")
    out = poisoned((n,))
    kernel((2,), (32,), (out, to_device(inp), np.int32(n)))
    assert_close("Exercise 9.9", "out", out, 2 * inp)    # right: passes, TODO or not
    stub = KERNEL.replace("    if (i < n) out[i] = 2.0f * inp[i];\n", "")
    kernel = exercise_kernel("Exercise 9.9", stub, "twice")
    out = poisoned((n,))
    kernel((2,), (32,), (out, to_device(inp), np.int32(n)))
    with pytest.raises(ExerciseFailed, match=r"still has its `// TODO \(Exercise 9.9\)` comment"):
        assert_close("Exercise 9.9", "out", out, 2 * inp)
    kernel = exercise_kernel("Exercise 9.9", stub.replace("TODO (Exercise 9.9)", "done"), "twice")
    with pytest.raises(ExerciseFailed) as e:
        assert_close("Exercise 9.9", "out", poisoned((n,)), 2 * inp)
    assert "TODO" not in str(e.value)


def test_a_kernel_that_does_not_compile_fails_with_the_compilers_line():
    # the line of the missing ";" (or the next one) as the host compiler (k.cu:5:) or NVRTC (k.cu(6):) writes it
    with pytest.raises(ExerciseFailed, match=r"Exercise 9.9: the kernel did not compile:(.|\n)*(:[56]:|\([56]\))") as e:
        exercise_kernel("Exercise 9.9", KERNEL.replace("2.0f * inp[i];", "2.0f * inp[i]"), "twice")
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_compile_and_kernel_errors_show_in_jupyter_as_their_message_alone():
    from llmc_lessons.cuda import CompileError, KernelError
    for error in (CompileError("k.cu:3:5: error: expected ';'"), KernelError("deadlock in k at k.cu:7")):
        assert error._render_traceback_() == [f"\x1b[0;31m{type(error).__name__}\x1b[0m: {error}"]


def test_a_kernel_with_another_name_fails_with_what_was_found():
    with pytest.raises(ExerciseFailed, match=r"Exercise 9\.9: no __global__ function named 'thrice'.*twice"):
        exercise_kernel("Exercise 9.9", KERNEL, "thrice")
