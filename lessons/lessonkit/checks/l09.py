"""Checks of lesson 09 (pipeline parallelism)."""
import numpy as np

import minillm.functional as F
from lessonkit.exercise import exercise
from minillm import Tensor
from minillm.distributed.pipeline_schedule import bubble_of, bubble_theory, simulate_plans


def _gpipe(p, s, m):
    return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]


@exercise("09.one_f_one_b", broken=_gpipe)
def check_one_f_one_b(one_f_one_b):
    """The learner's 1F1B step lists, played by the library's pipeline simulator."""
    for p, m in ((2, 1), (2, 4), (3, 5), (4, 8)):
        plans = [[tuple(step) for step in one_f_one_b(p, s, m)] for s in range(p)]
        for s, plan in enumerate(plans):
            want = sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
            assert sorted(plan) == want, (f"p={p}, m={m}: stage {s} must run F0..F{m - 1} and B0..B{m - 1} "
                                          f"once each, got {plan}")
            live = peak = 0
            for kind, _ in plan:
                live += 1 if kind == "F" else -1
                peak = max(peak, live)
            assert peak <= p - s, (f"p={p}, m={m}: stage {s} holds {peak} micro-batches at once; 1F1B "
                                   f"holds at most p - s = {p - s} (start a backward as soon as you can)")
        try:
            events = simulate_plans(plans, {"F": 1.0, "B": 2.0})
        except RuntimeError as e:
            raise AssertionError(f"p={p}, m={m}: {e}") from None
        got, want = bubble_of(events), bubble_theory(p, m)
        assert abs(got - want) < 1e-9, f"p={p}, m={m}: bubble {got:.3f}, expected (p-1)/(m+p-1) = {want:.3f}"


def _transposed(x, w, g):
    return g @ w, (lambda: x.T @ g)


@exercise("09.split_linear_backward", broken=_transposed)
def check_split_linear_backward(split_linear_backward):
    """dX now, dW later: compared with the autograd engine's full backward of F.linear."""
    rng = np.random.default_rng(0)
    x, w, g = rng.standard_normal((6, 4)), rng.standard_normal((3, 4)), rng.standard_normal((6, 3))
    tx, tw = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
    F.linear(tx, tw).backward(g)
    dx, later = split_linear_backward(x, w, g)
    assert callable(later), "return (dx, f) where f() computes dW later, when the schedule runs W"
    assert np.shape(dx) == x.shape, f"dx has shape {np.shape(dx)}, the input's is {x.shape}"
    assert np.allclose(dx, tx.grad), "dx is wrong: y = x W^T, so dL/dx = g W"
    dw = later()
    assert np.shape(dw) == w.shape, (f"dW has shape {np.shape(dw)}, but W is (out, in) = {w.shape}: "
                                     "dL/dW = g^T x")
    assert np.allclose(dw, tw.grad), "dW is wrong: dL/dW = g^T x"
