"""Checks of lesson 02 (layers): each backward inside a real Function, checked by gradcheck."""
import numpy as np

from lessonkit.exercise import exercise
from lessonkit.verify import gradcheck_op
from minillm import Tensor


def _t64(rng, *shape):
    return Tensor(rng.standard_normal(shape), requires_grad=True)  # float64


def _returns(got, n, what):
    if not (isinstance(got, tuple) and len(got) == n):
        raise AssertionError(f"return a tuple of {n}: {what}")
    return got


@exercise("02.linear_backward", broken=lambda x, W, g: (g @ W, x.T @ g, g.sum(axis=0)))
def check_linear_backward(linear_backward):
    def forward(ctx, x, W, b):
        ctx.save_for_backward(x, W)
        return x @ W.T + b

    def backward(ctx, g):
        return _returns(linear_backward(*ctx.saved_tensors, g), 3, "(dx, dW, db)")

    rng = np.random.default_rng(0)
    gradcheck_op(forward, backward, [_t64(rng, 5, 3), _t64(rng, 4, 3), _t64(rng, 4)],
                 hint="dx = g W (N, in); dW = g^T x (out, in), the shape of W; db = g summed "
                      "over the rows")


def _rms_without_projection(xhat, rstd, w, g):  # a plausible slip: treats rstd as a constant
    return g * w * rstd, (g * xhat).reshape(-1, xhat.shape[-1]).sum(axis=0)


@exercise("02.rmsnorm_backward", broken=_rms_without_projection)
def check_rmsnorm_backward(rmsnorm_backward):
    def forward(ctx, x, w):
        rstd = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + 1e-5)  # (B, T, 1)
        xhat = x * rstd
        ctx.save_for_backward(xhat, rstd, w)
        return xhat * w

    def backward(ctx, g):
        return _returns(rmsnorm_backward(*ctx.saved_tensors, g), 2, "(dx, dw)")

    rng = np.random.default_rng(1)
    gradcheck_op(forward, backward, [_t64(rng, 2, 3, 6), _t64(rng, 6)],
                 hint="with d = g * w: dx = rstd * (d - xhat * mean(d * xhat, last axis)); "
                      "dw = (g * xhat) summed over every axis but the last")


@exercise("02.softmax_backward", broken=lambda out, grad: out * (1 - out) * grad)
def check_softmax_backward(softmax_backward):
    def forward(ctx, z):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        out = e / e.sum(axis=-1, keepdims=True)
        ctx.save_for_backward(out)
        return out

    gradcheck_op(forward, lambda ctx, grad: softmax_backward(ctx.saved_tensors[0], grad),
                 [_t64(np.random.default_rng(2), 3, 5)],
                 hint="dz = p * (g - sum(g * p, last axis, keepdims=True)): every output depends "
                      "on every input of its row, not only on its own")
