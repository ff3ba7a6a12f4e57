"""SGD with optional momentum, Nesterov momentum and weight decay (PyTorch's SGD, dampening 0).

For each parameter p with gradient g::

    g = g + weight_decay * p                  # L2 penalty folded into the gradient (ndim >= 2)
    b = momentum * b + g                      # b starts at 0, so the first step sets b = g
    g = g + momentum * b   if nesterov   else   b
    p = p - lr * g

With ``momentum=0`` there is no buffer and the update is ``p -= lr * g``.
"""
from minillm.backend import xp
from minillm.errors import ConfigError
from minillm.optim.optimizer import Optimizer


class SGD(Optimizer):
    """``SGD(params, lr, momentum=0.0, weight_decay=0.0, nesterov=False)``.

    Same protocol as AdamW: ``step(lr=None)``, ``zero_grad()``, ``state_dict()`` with the
    per-parameter ``momentum_buffer``, ``load_state_dict(d)``. As in AdamW, weight decay
    applies to parameters with ``ndim >= 2`` only, unless parameter groups say otherwise.
    """

    hyperparameters = ("lr", "momentum", "weight_decay", "nesterov")
    scratch_count = 2  # the decayed gradient, and Nesterov's look-ahead beside it

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         nesterov=nesterov)

    def _configure(self, lr, momentum, weight_decay, nesterov):
        lr, momentum, weight_decay, nesterov = float(lr), float(momentum), float(weight_decay), bool(nesterov)
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ConfigError(f"SGD lr={lr}, momentum={momentum}, weight_decay={weight_decay} "
                              "must all be >= 0")
        if nesterov and momentum == 0.0:
            raise ConfigError("SGD nesterov=True needs momentum > 0; set momentum (e.g. 0.9)")
        self.lr, self.momentum, self.weight_decay, self.nesterov = lr, momentum, weight_decay, nesterov

    def _buffers_for(self, p):
        return ("momentum_buffer",) if self.momentum != 0.0 else ()

    def step(self, lr=None):
        """Update every parameter that has a gradient, in place."""
        if lr is not None:
            self.lr = float(lr)
        self.step_count += 1
        lr, mu, wd = self.lr, self.momentum, self.weight_decay
        for p, g, st, (buf, look), decay in self._grads():
            w = p.data
            if decay and wd != 0.0:
                xp.multiply(w, wd, out=buf)    # g + wd * w, without touching p.grad
                buf += g
                g = buf
            if mu != 0.0:
                b = st["momentum_buffer"]
                b *= mu
                b += g
                if self.nesterov:
                    xp.multiply(b, mu, out=look)
                    look += g
                    g = look
                else:
                    g = b
            xp.multiply(g, lr, out=buf)
            w -= buf
