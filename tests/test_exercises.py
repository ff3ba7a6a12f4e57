"""Every lesson exercise's check passes on its reference solution and rejects its known-wrong
answer, and every lesson notebook calls ``check`` for each exercise registered for it.

(The notebooks themselves run in test_notebooks.py with the stubs unfilled: ``check`` then prints
"not attempted" and the lesson goes on.)
"""
import importlib
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LESSONS = REPO / "lessons"
sys.path.insert(0, str(LESSONS))

from lessonkit.exercise import exercises_of, run_check  # noqa: E402

NOTEBOOKS = sorted(LESSONS.glob("*.ipynb"))
CHECK_CALL = re.compile(r"""check\(\s*["'](\w+\.\w+)["']""")


def lesson_of(path: Path) -> str:
    return path.name.split("_", 1)[0]                       # "01_autograd.ipynb" -> "01"


def lessons_with_checks() -> list[str]:
    return sorted(p.stem[1:] for p in (LESSONS / "lessonkit" / "checks").glob("l*.py"))


ALL = [e for lesson in lessons_with_checks() for e in exercises_of(lesson)]


@pytest.mark.parametrize("ex", ALL, ids=[e.id for e in ALL])
def test_reference_solution_passes(ex):
    solutions = importlib.import_module(f"solutions.l{ex.lesson}")
    fn = getattr(solutions, ex.name, None)
    assert fn is not None, f"lessons/solutions/l{ex.lesson}.py has no function {ex.name}"
    status, message = run_check(ex.id, fn)
    assert status == "passed", f"{ex.id} on the reference solution: {message}"


@pytest.mark.parametrize("ex", ALL, ids=[e.id for e in ALL])
def test_check_rejects_a_wrong_answer(ex):
    assert ex.broken is not None, f"{ex.id} registers no broken= answer to prove its check can fail"
    status, _ = run_check(ex.id, ex.broken)
    assert status == "failed", f"{ex.id}'s check accepted its known-wrong answer"


def test_a_stub_is_reported_as_not_attempted():
    def stub(*args):
        raise NotImplementedError
    assert all(run_check(e.id, stub)[0] == "not attempted" for e in ALL)


def test_every_lesson_with_checks_has_its_notebook():
    lessons = {lesson_of(p) for p in NOTEBOOKS}
    orphans = [f"lessonkit/checks/l{lesson}.py" for lesson in lessons_with_checks() if lesson not in lessons]
    assert not orphans, f"checks without a lesson notebook (lessons/NN_*.ipynb): {orphans}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_calls_every_check_of_its_lesson(path):
    source = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"]
                       if c["cell_type"] == "code")
    called = set(CHECK_CALL.findall(source))
    lesson = lesson_of(path)
    registered = {e.id for e in exercises_of(lesson)} if lesson in lessons_with_checks() else set()
    assert registered <= called, f"{path.name} never checks {sorted(registered - called)}"
    assert called <= registered, f"{path.name} checks unregistered exercises {sorted(called - registered)}"
