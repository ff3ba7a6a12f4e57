"""Precision objects: what the trainer calls around forward, backward and the optimizer step.

``FullPrecision`` (float32) does nothing. ``MixedPrecision`` (float16 / bfloat16) splits every
parameter in two:

    model parameter   16-bit copy the forward and backward compute with (half the memory and
                      bandwidth; GPU tensor cores multiply it at many times float32's speed)
    master parameter  float32 copy the optimizer, gradient clipping and checkpoints see

Why keep float32 masters: an update lr * m / sqrt(v) is often ~1e-3 of the weight or less, and
bfloat16 (8 significant bits) or float16 (11) would round ``w - update`` back to ``w``: training
would stall. A step:

    forward, scale_loss(loss).backward()     16-bit activations and gradients
    grads_to_master(agree)   model grads -> fp32 master grads / loss scale; one inf/nan check,
                        and ``agree`` (the engine's) makes it one decision across ranks
    clip, optimizer step on the masters      (skipped if found_inf)
    master_to_model()   master (fp32) -> model (16-bit), rounded once
    update(found_inf)   the loss scale for the next step
"""
import contextlib

import numpy  # only for numpy.errstate: warnings are a host (NumPy) matter

from minillm.amp.dtypes import compute_dtype
from minillm.amp.scaler import DynamicLossScaler, NoLossScaler
from minillm.backend import xp
from minillm.nn import Parameter


class FullPrecision:
    """float32 training: every method is a no-op (no ``if dtype`` chains in the trainer)."""

    dtype = "float32"
    loss_scale = None

    def __init__(self, named_params):
        self.master_params = list(named_params)

    def quiet(self):
        """Context for forward/backward: float32 overflows are real problems, so keep warnings."""
        return contextlib.nullcontext()

    def master_to_model(self):
        pass

    def scale_loss(self, loss):
        return loss

    def grads_to_master(self, agree=bool):
        """float32 gradients are the master gradients: nothing to copy, no overflow to look for
        (a real inf in float32 is a bug the clip and the loss will show)."""
        return False

    def update(self, found_inf):
        pass

    def state_dict(self):
        return {"dtype": self.dtype}

    def load_state_dict(self, state):
        pass


class MixedPrecision:
    """16-bit compute with float32 master weights and a loss scaler.

    ``named_params``: the (name, Parameter) pairs the model computes with. Their ``.data`` is
    converted to ``dtype`` in place (the model object is otherwise untouched and knows nothing
    of precision); ``master_params`` holds float32 Parameters under the same names.
    """

    def __init__(self, named_params, dtype="float16", scaler=None):
        self.dtype = dtype
        self.compute_dtype = compute_dtype(dtype)
        self.scaler = scaler if scaler is not None else NoLossScaler()
        self.model_params = list(named_params)
        self.master_params = [(name, Parameter(p.data.astype(xp.float32)))
                              for name, p in self.model_params]
        for _, p in self.model_params:  # (already 16-bit pieces of a ZeRO shard stay views into it)
            p.data = p.data.astype(self.compute_dtype, copy=False)
        # The master gradients are views into one flat float32 buffer, so the inf/nan check
        # over all of them is a single reduction, whatever the number of tensors.
        sizes = [m.data.size for _, m in self.master_params]
        self._flat_grad = xp.zeros(sum(sizes), dtype=xp.float32)
        self._grad_views, start = [], 0
        for (_, m), n in zip(self.master_params, sizes):
            self._grad_views.append(self._flat_grad[start:start + n].reshape(m.shape))
            start += n

    @property
    def loss_scale(self):
        return self.scaler.loss_scale

    def master_to_model(self):
        """Round the float32 master weights into the model's 16-bit parameters (in place)."""
        for (_, p), (_, m) in zip(self.model_params, self.master_params):
            p.data[...] = m.data

    def scale_loss(self, loss):
        return self.scaler.scale_loss(loss)

    def grads_to_master(self, agree=bool) -> bool:
        """Model gradients -> float32 master gradients divided by the loss scale; returns True
        if any of them is inf or nan (then the optimizer step must be skipped). ``agree(flag)``
        (``Engine.agree``) turns this process's finding into the decision of all ranks: a stage
        or shard that overflowed skips the step everywhere (default: this process alone)."""
        inv = self.scaler.inv_scale
        for (_, p), (_, m), view in zip(self.model_params, self.master_params, self._grad_views):
            if p.grad is None:  # no gradient reached it: the optimizer leaves it alone
                view[...] = 0.0
                m.grad = None
                continue
            xp.multiply(p.grad, inv, out=view, dtype=xp.float32)  # upcast first: g/S may be below 16-bit range
            m.grad = view
        found_inf = not bool(xp.isfinite(self._flat_grad).all())
        return agree(found_inf)

    def quiet(self):
        """Context for forward/backward: an overflowing 16-bit step is expected (the scaler skips
        it), so NumPy's overflow warnings would only be noise in the training log."""
        return numpy.errstate(over="ignore", invalid="ignore")

    def update(self, found_inf):
        self.scaler.update(found_inf)

    def state_dict(self):
        return {"dtype": self.dtype, **self.scaler.state_dict()}

    def load_state_dict(self, state):
        self.scaler.load_state_dict(state)


def make_scaler(train_cfg, dtype):
    """float16 needs dynamic loss scaling; bfloat16 (float32's range) and float32 do not."""
    if dtype != "float16":
        return NoLossScaler()
    return DynamicLossScaler(init_scale=train_cfg.loss_scale_init,
                             growth_interval=train_cfg.loss_scale_growth_interval)


def make_precision(train_cfg, named_params):
    """The precision object for ``train.dtype``, over the (name, Parameter) pairs the model
    computes with on this process."""
    if train_cfg.dtype == "float32":
        return FullPrecision(named_params)
    compute_dtype(train_cfg.dtype)  # an unknown dtype or missing bfloat16 support fails here, clearly
    return MixedPrecision(named_params, train_cfg.dtype, make_scaler(train_cfg, train_cfg.dtype))
