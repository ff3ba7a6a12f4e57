"""Gradient check: analytic gradients from backward against float64 central differences.

For a function f of some tensors, pick a fixed random direction R of f's output shape and
check d<f, R>/dx (one backward pass) against (<f(x+eps), R> - <f(x-eps), R>) / 2 eps for every
element of every input. One backward checks the whole vector-Jacobian product, so the check
costs 2 * n_elements forward passes.
"""
from dataclasses import dataclass

import numpy

from minillm import backend
from minillm.autograd.tensor import Tensor, no_grad
from minillm.backend import xp


@dataclass
class GradcheckResult:
    ok: bool
    max_error: float       # worst |analytic - numeric| / (atol + rtol*|numeric|) (<= 1 passes)
    input_index: int       # which input holds the worst element
    element: tuple         # its index
    analytic: float
    numeric: float

    def __str__(self):
        return (f"gradcheck {'passed' if self.ok else 'FAILED'}: worst element input[{self.input_index}]"
                f"{list(self.element)}: analytic {self.analytic:.10g}, numeric {self.numeric:.10g}, "
                f"|diff| {abs(self.analytic - self.numeric):.3g}")


class GradcheckError(AssertionError):
    pass


def gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, seed=0, raise_exception=True):
    """Check ``fn(*inputs)`` (returns a Tensor) against central differences on every input that
    requires grad. Inputs should be float64 Tensors. Returns a GradcheckResult; raises
    GradcheckError on failure when ``raise_exception``."""
    for i, x in enumerate(inputs):
        if isinstance(x, Tensor) and x.requires_grad and x.dtype != xp.float64:
            raise TypeError(f"gradcheck: input {i} is {x.dtype}; use float64 tensors "
                            f"(float32 central differences are too coarse)")
    out = fn(*inputs)
    rng = numpy.random.default_rng(seed)
    direction = backend.asarray(rng.standard_normal(out.shape)).astype(out.dtype)
    for x in inputs:
        if isinstance(x, Tensor):
            x.grad = None
    out.backward(direction)

    def objective():
        with no_grad():
            return float((fn(*inputs).data * direction).sum())

    worst = GradcheckResult(True, -1.0, -1, (), 0.0, 0.0)
    for i, x in enumerate(inputs):
        if not (isinstance(x, Tensor) and x.requires_grad):
            continue
        analytic = backend.to_numpy(x.grad) if x.grad is not None else numpy.zeros(x.shape)
        if not x.data.flags.c_contiguous:
            raise ValueError("gradcheck: inputs must be contiguous; to test a non-contiguous view, "
                             "make it inside fn (e.g. lambda a: f(a.T))")
        flat = x.data.reshape(-1)  # a view: perturbing it perturbs x
        for j in range(flat.size):
            orig = float(flat[j])
            flat[j] = orig + eps
            plus = objective()
            flat[j] = orig - eps
            minus = objective()
            flat[j] = orig
            numeric = (plus - minus) / (2 * eps)
            idx = numpy.unravel_index(j, x.shape)
            a = float(analytic[idx])
            err = abs(a - numeric) / (atol + rtol * abs(numeric))
            if err > worst.max_error:
                worst = GradcheckResult(err <= 1, err, i, tuple(int(k) for k in idx), a, numeric)
    worst.ok = worst.max_error <= 1
    if not worst.ok and raise_exception:
        raise GradcheckError(str(worst))
    return worst
