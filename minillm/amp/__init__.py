"""Mixed precision: the dtype policy and loss scaling the trainer talks to.

The trainer only ever calls a *precision* object (``make_precision(train_cfg, named_params)``):

    precision.master_params          # (name, Parameter) list the optimizer updates (fp32)
    precision.master_to_model()      # before forward: copy master weights into the model's dtype
    precision.scale_loss(loss)       # loss * scale (a Tensor), for backward
    found_inf = precision.grads_to_master()   # after backward (and gradient sync): model grads ->
                                     # fp32 master grads, unscaled; True if any inf/nan
    precision.update(found_inf)      # grow / back off the loss scale
    precision.loss_scale             # current scale (None when there is none)
    precision.state_dict() / load_state_dict(d)

``FullPrecision`` (float32) does nothing: the model's parameters are the master parameters.
"""
from minillm.errors import UserError


class FullPrecision:
    """float32 training: every method is a no-op (no ``if dtype`` chains in the trainer)."""

    dtype = "float32"
    loss_scale = None

    def __init__(self, named_params):
        self.master_params = list(named_params)

    def master_to_model(self):
        pass

    def scale_loss(self, loss):
        return loss

    def grads_to_master(self):
        return False

    def update(self, found_inf):
        pass

    def state_dict(self):
        return {"dtype": self.dtype}

    def load_state_dict(self, state):
        pass


def make_precision(train_cfg, named_params):
    """The precision object for ``train.dtype``, over the (name, Parameter) pairs the model
    computes with on this process."""
    if train_cfg.dtype == "float32":
        return FullPrecision(named_params)
    raise UserError(f"train.dtype={train_cfg.dtype!r} is not available yet; use 'float32'")
