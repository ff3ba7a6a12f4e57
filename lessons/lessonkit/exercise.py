"""Exercises: a function stub the learner fills in, and a check that says what is wrong with it.

In a lesson notebook an exercise is two cells' worth of code::

    def tanh_backward(out, grad):
        \"\"\"dL/dx of y = tanh(x), given y (``out``) and dL/dy (``grad``).\"\"\"
        raise NotImplementedError   # your code here

    check("01.tanh_backward", tanh_backward)

``check`` runs the exercise's test on the learner's function and prints one line:

    ✓ 01.tanh_backward: passed
    ✗ 01.tanh_backward: <what is wrong, e.g. which element differs and by how much>
    · 01.tanh_backward: not attempted yet (the stub still raises NotImplementedError)

It never raises, so "Run all" always reaches the end of a lesson, and later cells never depend on
the learner's answer.

Where things live:
- the tests: ``lessonkit/checks/lNN.py`` (NN = the lesson's number, e.g. ``l01``, ``l03b``),
  each a function decorated ``@exercise("NN.name", broken=...)`` that takes the learner's
  function and raises ``AssertionError`` with a message a learner can act on. They use the
  library's own test helpers (``gradcheck``, the pipeline simulator, ...). ``broken`` is a
  plausible wrong answer: the suite checks that the test rejects it (no check can pass everything);
- the reference solutions: ``lessons/solutions/lNN.py``, one function per exercise, named as the
  part of the id after the dot;
- ``tests/test_exercises.py`` runs every check against its solution (it must pass) and against its
  ``broken`` answer (it must fail), and checks that each lesson notebook calls ``check`` for every
  exercise registered for its lesson.
"""
from __future__ import annotations

import importlib
import traceback
from dataclasses import dataclass
from typing import Callable


@dataclass
class Exercise:
    id: str                     # "NN.name": lesson number and the function's name
    test: Callable              # test(fn): raises AssertionError (or any error) when fn is wrong
    broken: Callable | None     # a plausible wrong answer the test must reject

    @property
    def lesson(self) -> str:
        return self.id.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.id.split(".", 1)[1]


_REGISTRY: dict[str, Exercise] = {}


def exercise(exercise_id: str, broken: Callable | None = None):
    """Register ``test`` as the check of exercise ``exercise_id`` ("NN.name")."""
    if "." not in exercise_id:
        raise ValueError(f"exercise id {exercise_id!r} must look like 'NN.name'")

    def register(test):
        _REGISTRY[exercise_id] = Exercise(exercise_id, test, broken)
        return test

    return register


def _load(lesson: str) -> None:
    importlib.import_module(f"lessonkit.checks.l{lesson}")


def exercises_of(lesson: str) -> list[Exercise]:
    """The exercises registered for one lesson ("01", "03b", ...), in definition order."""
    _load(lesson)
    return [e for e in _REGISTRY.values() if e.lesson == lesson]


def get(exercise_id: str) -> Exercise:
    lesson = exercise_id.split(".", 1)[0]
    _load(lesson)
    if exercise_id not in _REGISTRY:
        known = ", ".join(e.id for e in exercises_of(lesson)) or "none"
        raise KeyError(f"no exercise {exercise_id!r}; lesson {lesson} has: {known}")
    return _REGISTRY[exercise_id]


def run_check(exercise_id: str, fn) -> tuple[str, str]:
    """("passed" | "failed" | "not attempted", message) for ``fn`` as exercise ``exercise_id``."""
    ex = get(exercise_id)
    try:
        ex.test(fn)
    except NotImplementedError:
        return "not attempted", "not attempted yet (the stub still raises NotImplementedError)"
    except AssertionError as e:
        return "failed", str(e) or "the result is wrong"
    except Exception as e:  # the learner's code crashed: show where, briefly
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return "failed", f"{type(e).__name__}: {e} (line {tb.lineno}: {tb.line})"
    return "passed", "passed"


def check(exercise_id: str, fn) -> None:
    """Run exercise ``exercise_id``'s check on ``fn`` and print one line. It returns nothing, so
    a notebook cell that ends with ``check(...)`` shows that line and no stray value
    (``run_check`` gives the status to code that needs it)."""
    status, message = run_check(exercise_id, fn)
    mark = {"passed": "✓", "failed": "✗", "not attempted": "·"}[status]
    print(f"{mark} {exercise_id}: {message}")
