"""Checks of lesson 01 (autograd)."""
import numpy as np

from lessonkit.exercise import exercise
from lessonkit.verify import assert_close, gradcheck_op
from minillm import Tensor
from minillm.autograd.tensor import unbroadcast as library_unbroadcast


def _t64(rng, *shape, positive=False):
    data = rng.standard_normal(shape)
    return Tensor(1.5 + np.abs(data) if positive else data, requires_grad=True)  # float64


@exercise("01.tanh_backward", broken=lambda out, grad: grad * (1 - out))
def check_tanh_backward(tanh_backward):
    """The learner's backward inside a real Function, checked by the library's gradcheck."""

    def forward(ctx, x):
        out = np.tanh(x)
        ctx.save_for_backward(out)
        return out

    gradcheck_op(forward, lambda ctx, grad: tanh_backward(ctx.saved_tensors[0], grad),
                 [_t64(np.random.default_rng(0), 3, 4)],
                 hint="d tanh(x)/dx = 1 - tanh(x)^2, and out already is tanh(x)")


@exercise("01.div_backward", broken=lambda a, b, grad: (grad / b, grad * a / b ** 2))
def check_div_backward(div_backward):
    """y = a / b: both input gradients, gradchecked (b kept away from 0)."""

    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a / b

    def backward(ctx, grad):
        got = div_backward(*ctx.saved_tensors, grad)
        if not (isinstance(got, tuple) and len(got) == 2):
            raise AssertionError("return a pair (dL/da, dL/db)")
        return got

    rng = np.random.default_rng(1)
    gradcheck_op(forward, backward, [_t64(rng, 2, 3), _t64(rng, 2, 3, positive=True)],
                 hint="d(a/b)/da = 1/b and d(a/b)/db = -a/b^2; multiply each by grad")


def _only_leading_axes(grad, shape):  # a plausible slip: forgets the size-1 axes that were stretched
    return grad.sum(axis=tuple(range(grad.ndim - len(shape))))


@exercise("01.unbroadcast", broken=_only_leading_axes)
def check_unbroadcast(unbroadcast):
    """Against the engine's own unbroadcast, on the shapes broadcasting produces."""
    rng = np.random.default_rng(2)
    cases = [((2, 3), (2, 3)), ((2, 3), (3,)), ((4, 2, 3), (3,)), ((2, 3), (1, 3)),
             ((2, 3), (2, 1)), ((4, 2, 3), (2, 1)), ((4, 2, 3), (4, 1, 3)), ((2, 3), ())]
    for grad_shape, shape in cases:
        grad = rng.standard_normal(grad_shape)
        got = unbroadcast(grad.copy(), shape)
        assert_close(got, library_unbroadcast(grad, shape),
                     f"unbroadcast(grad of shape {grad_shape}, {shape})",
                     hint="sum over the leading axes broadcasting added, then (keepdims) over "
                          "every axis where shape has 1 and grad does not")
