"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter), the PyTorch formula exactly.

For each parameter p with gradient g, at step t (1, 2, ...)::

    p  = p * (1 - lr * weight_decay)          # decoupled decay, only for ndim >= 2
    m  = beta1 * m + (1 - beta1) * g          # running mean of gradients
    v  = beta2 * v + (1 - beta2) * g * g      # running mean of squared gradients
    m_hat = m / (1 - beta1 ** t)              # bias correction: m, v start at 0
    v_hat = v / (1 - beta2 ** t)
    p  = p - lr * m_hat / (sqrt(v_hat) + eps)

``_reference_step`` is that formula written plainly; ``AdamW.step`` computes the same thing in
place, in the parameter's dtype, with one scratch buffer and no allocations, in the order
PyTorch uses (``step_size = lr / bc1``, ``denom = sqrt(v) / sqrt(bc2) + eps``). On the GPU one
fused kernel updates every parameter (``kernels/cuda.py``: ``adamw``).
"""
import math

from minillm import kernels
from minillm.backend import xp
from minillm.errors import ConfigError
from minillm.optim.optimizer import Optimizer


def _reference_step(p, g, m, v, t, lr, betas, eps, weight_decay, decay=True):
    """One AdamW step as plain array math; returns new ``(p, m, v)`` and changes nothing."""
    beta1, beta2 = betas
    if decay:
        p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1 ** t)
    v_hat = v / (1 - beta2 ** t)
    p = p - lr * m_hat / (v_hat ** 0.5 + eps)
    return p, m, v


class AdamW(Optimizer):
    """``AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)``.

    ``params``: parameters, ``(name, parameter)`` pairs or a name -> parameter mapping.
    Weight decay applies to parameters with ``ndim >= 2`` only (not biases or norm gains).
    ``step(lr=None)`` takes an optional learning rate (from a schedule) that becomes ``self.lr``.
    Parameters whose ``grad`` is None are left untouched; bias correction uses the optimizer's
    step count (PyTorch counts per parameter; the two agree whenever every parameter has a
    gradient at every step, as in LM training).
    """

    buffers = ("m", "v")
    hyperparameters = ("lr", "betas", "eps", "weight_decay")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _configure(self, lr, betas, eps, weight_decay):
        # Plain Python floats: a NumPy float64 scalar would turn float32 updates into float64 math.
        lr, eps, weight_decay = float(lr), float(eps), float(weight_decay)
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"AdamW betas={betas} must be two numbers in [0, 1), e.g. (0.9, 0.95)")
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ConfigError(f"AdamW lr={lr}, eps={eps}, weight_decay={weight_decay} "
                              "must all be >= 0")
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay

    def step(self, lr=None):
        """Update every parameter that has a gradient, in place."""
        if lr is not None:
            self.lr = float(lr)
        self.step_count += 1
        t, lr, (beta1, beta2), eps, wd = self.step_count, self.lr, self.betas, self.eps, self.weight_decay
        step_size = lr / (1.0 - beta1 ** t)
        bc2_sqrt = math.sqrt(1.0 - beta2 ** t)
        if kernels.enabled():  # the GPU: every parameter in one launch (kernels/cuda.py)
            kernels.adamw_step(list(self._grads()), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                               weight_decay=wd, step_size=step_size, bc2_sqrt=bc2_sqrt)
            return
        for p, g, st, (buf,), decay in self._grads():
            w, m, v = p.data, st["m"], st["v"]
            if decay and wd != 0.0:
                w *= 1.0 - lr * wd
            xp.subtract(g, m, out=buf)          # m += (1 - beta1) * (g - m): PyTorch's lerp
            buf *= 1.0 - beta1
            m += buf
            v *= beta2                          # v = beta2 * v + (1 - beta2) * g^2
            xp.multiply(g, g, out=buf)
            buf *= 1.0 - beta2
            v += buf
            xp.sqrt(v, out=buf)                 # denom = sqrt(v) / sqrt(1 - beta2^t) + eps
            buf /= bc2_sqrt
            buf += eps
            xp.divide(m, buf, out=buf)          # p -= lr / (1 - beta1^t) * m / denom
            buf *= step_size
            w -= buf
