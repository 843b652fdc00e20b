"""The check helpers every exercise uses: each kind of wrong answer gets a message that names it."""
import numpy as np
import pytest

from llmc_lessons.checks import assert_close, passed, poisoned, run_exercise
from llmc_lessons.device import to_host

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
    fails(got, "4 elements are NaN", "never written")


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


def test_run_exercise_turns_a_stub_into_a_failure():
    def stub():
        raise NotImplementedError("Exercise 9.9: write dx")
    with pytest.raises(AssertionError, match=r"Exercise 9.9 is not done yet \(Exercise 9.9: write dx\)"):
        run_exercise("Exercise 9.9", stub)
    assert run_exercise("Exercise 9.9", lambda x: x + 1, 1) == 2


def test_poisoned():
    assert np.all(np.isnan(to_host(poisoned((3, 2)))))
    assert np.all(to_host(poisoned(4, dtype=np.int32)) == -1)
