"""lessonkit: what the lesson notebooks share (exercise checks, small drawing helpers).

It lives beside the notebooks, not inside the minillm package: lessons import the package, the
package never imports lessons. A notebook started in ``lessons/`` imports it as ``lessonkit``;
the tests put ``lessons/`` on ``sys.path``.
"""
from lessonkit.exercise import check, exercise, exercises_of, run_check

__all__ = ["check", "exercise", "exercises_of", "run_check"]
