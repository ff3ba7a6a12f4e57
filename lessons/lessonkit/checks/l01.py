"""Checks of lesson 01 (autograd)."""
import numpy as np

from lessonkit.exercise import exercise
from minillm import Tensor
from minillm.autograd import Function
from minillm.autograd.gradcheck import gradcheck


@exercise("01.tanh_backward", broken=lambda out, grad: grad * (1 - out))
def check_tanh_backward(tanh_backward):
    """The learner's backward inside a real Function, checked by the library's gradcheck."""

    class LearnerTanh(Function):
        @staticmethod
        def forward(ctx, x):
            out = np.tanh(x)
            ctx.save_for_backward(out)
            return out

        @staticmethod
        def backward(ctx, grad):
            (out,) = ctx.saved_tensors
            return tanh_backward(out, grad)

    x = Tensor(np.random.default_rng(0).standard_normal((3, 4)), requires_grad=True)  # float64
    result = gradcheck(LearnerTanh.apply, [x], raise_exception=False)
    assert result.ok, (f"your gradient differs from central differences: {result}. "
                       "Hint: d tanh(x)/dx = 1 - tanh(x)^2, and out already is tanh(x)")
