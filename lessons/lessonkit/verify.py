"""What the exercise checks share: gradcheck a learner's backward inside a real Function, and
compare arrays with a message that says where they differ.

Every helper raises ``AssertionError`` with a message a learner can act on (``run_check`` turns
it into the ✗ line); none of them prints.
"""
from __future__ import annotations

import numpy as np

from minillm.autograd import Function
from minillm.autograd.gradcheck import gradcheck


def gradcheck_op(forward, backward, inputs, hint=""):
    """Gradcheck an op made of ``forward(ctx, *arrays) -> array`` (it may save on ctx) and
    ``backward(ctx, grad) -> gradient(s)`` (which calls the learner's function), as the test
    suite does for every op of minillm. ``inputs``: float64 Tensors."""

    def checked_backward(ctx, grad):
        result = backward(ctx, grad)
        if result is None or (isinstance(result, tuple) and any(r is None for r in result)):
            raise AssertionError("your function returned None (a missing `return`?)")
        return result

    op = type("LearnerOp", (Function,), {"forward": staticmethod(forward),
                                         "backward": staticmethod(checked_backward)})
    result = gradcheck(op.apply, list(inputs), raise_exception=False)
    if not result.ok:
        raise AssertionError(f"your gradient differs from central differences: {result}"
                             + (f". Hint: {hint}" if hint else ""))


def assert_close(got, want, what, rtol=1e-6, atol=1e-9, hint=""):
    """``got`` equals ``want`` (shape and values within tolerance), or an AssertionError naming
    ``what``, the first differing element and, if given, a hint."""
    got, want = np.asarray(got), np.asarray(want)
    tail = f". Hint: {hint}" if hint else ""
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {got.shape}, expected {want.shape}{tail}")
    if got.dtype == bool or want.dtype == bool or got.dtype.kind in "iu" and want.dtype.kind in "iu":
        bad = got != want
    else:
        with np.errstate(invalid="ignore"):
            bad = ~np.isclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        i = tuple(int(k) for k in np.argwhere(bad)[0])
        where = f" at {list(i)}" if i else ""
        raise AssertionError(f"{what}: {got[i]!r}{where}, expected {want[i]!r} "
                             f"({int(bad.sum())} of {bad.size} elements differ){tail}")
