"""An answer that calls the package's own version of what an exercise asks for fails the exercise's check, and
says so (llmc_lessons.checks.REFERENCES). A copy of the same code, which calls nothing, still passes: the check
refuses the call, not the answer."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
import types

import pytest

import llmc_lessons.checks as checks
import llmc_lessons.gradcheck  # noqa: F401  (Exercise 0.3's references live there; no check imports it)
from llmc_lessons.checks import REFERENCES, ExerciseFailed


@pytest.fixture(autouse=True)
def reference_answers_allowed():
    """Overrides the fixture of conftest.py that turns the refusal off: here it stays on."""


def check_of(exercise: str):
    """The check function of `exercise`: the one whose docstring starts with 'Exercise N.k:'."""
    for info in pkgutil.iter_modules(checks.__path__):
        module = importlib.import_module(f"{checks.__name__}.{info.name}")
        for name, f in vars(module).items():
            if name.startswith("check_") and inspect.isfunction(f) and (f.__doc__ or "").startswith(exercise + ":"):
                return f
    raise LookupError(f"no check for {exercise}")


def reference(name: str):
    """The package function called `name`, found where the package keeps it (the check imported it)."""
    for key, module in list(sys.modules.items()):
        f = vars(module).get(name) if module is not None and key.startswith("llmc_lessons.") else None
        if inspect.isfunction(f) and f.__module__.startswith("llmc_lessons"):
            return f
    raise LookupError(name)


def delegating_answers(name: str):
    """The two ways a notebook reaches the reference: through its module, and by a name it imported."""
    f = reference(name)
    home = importlib.import_module(f.__module__)

    def through_the_module(*args, **kwargs):        # return llmc_lessons.layers.x.name(...)
        return getattr(home, name)(*args, **kwargs)

    namespace = {name: f}                              # from llmc_lessons.layers.x import name
    exec(f"def by_imported_name(*args, **kwargs):\n    return {name}(*args, **kwargs)\n", namespace)
    return {"through its module": through_the_module, "by an imported name": namespace["by_imported_name"]}


CASES = [(exercise, how) for exercise in sorted(REFERENCES) for how in ("through its module", "by an imported name")]


@pytest.mark.parametrize("exercise,how", CASES)
def test_calling_the_reference_fails_the_check(exercise, how):
    name = REFERENCES[exercise][0]
    check = check_of(exercise)
    answer = delegating_answers(name)[how]
    with pytest.raises(ExerciseFailed, match=f"{exercise}: your answer calls the package's own {name}"):
        check(answer)
    assert reference(name) is getattr(importlib.import_module(reference(name).__module__), name), \
        "the reference must be back in its module after the check"
    assert answer.__globals__.get(name, reference(name)) is reference(name)


# Exercise 11.2's function takes (model, x, y, lr); the package's training_step takes the optimizer's settings too.
# A derivation exercise (tests/test_derivations.py) asks for a piece of a backward (a Jacobian, one term), whose
# function is not the package's backward: a call to the backward is refused, and a copy of it is no answer.
# Exercise 0.3's checker scores one direction; numerical_grad and gradcheck, which it may not call, do other jobs.
# Exercise 5.0 asks for the causal softmax too: the package's attention_forward calls causal_softmax, refused there.
DERIVATIONS = {"Exercise 2.1", "Exercise 3.1", "Exercise 4.1", "Exercise 5.1", "Exercise 6.1", "Exercise 8.1"}
SAME_SIGNATURE = sorted(set(REFERENCES) - {"Exercise 11.2", "Exercise 0.3", "Exercise 5.0"} - DERIVATIONS)


@pytest.mark.parametrize("exercise", SAME_SIGNATURE)
def test_a_copy_of_the_reference_code_passes(exercise, capsys):
    name = REFERENCES[exercise][0]
    f = reference(name)
    copy = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    copy.__kwdefaults__ = f.__kwdefaults__
    check_of(exercise)(copy)
    assert f"{exercise}: correct" in capsys.readouterr().out


def test_every_reference_is_found_and_every_exercise_has_a_check():
    for exercise, names in REFERENCES.items():
        check_of(exercise)
        for name in names:
            assert inspect.isfunction(reference(name)), name
