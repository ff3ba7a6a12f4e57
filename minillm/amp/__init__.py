"""Mixed precision: the dtype policy and loss scaling the trainer talks to.

The trainer only ever calls a *precision* object (``make_precision(train_cfg, named_params)``):

    precision.master_params          # (name, Parameter) list the optimizer updates (fp32)
    with precision.quiet():          # forward/backward without NumPy overflow warnings in 16 bits
    precision.scale_loss(loss)       # loss * scale (a Tensor), for backward
    found_inf = precision.grads_to_master(agree=engine.agree)
                                     # after backward and gradient sync: model grads -> fp32
                                     # master grads, unscaled; True if any rank found an inf/nan
    precision.master_to_model()      # after an optimizer step or a checkpoint load: master
                                     # weights -> the model's dtype
    precision.update(found_inf)      # grow / back off the loss scale (LossDivergedError below
                                     # min_scale: the trainer saves the last good state, exits 2)
    precision.loss_scale             # current scale (None when there is none)
    precision.state_dict() / load_state_dict(d)

``train.dtype``: float32 -> ``FullPrecision`` (does nothing: the model's parameters are the master
parameters); float16 -> ``MixedPrecision`` with a ``DynamicLossScaler``; bfloat16 ->
``MixedPrecision`` with ``NoLossScaler`` (bfloat16 has float32's range). The model never knows:
the ops compute softmax, normalisation statistics and the loss in float32 and multiply 16-bit
matrices with float32 accumulation whatever dtype their inputs have.
"""
from minillm.amp.dtypes import DTYPE_NAMES, FormatInfo, compute_dtype, format_info, is_half
from minillm.amp.precision import FullPrecision, MixedPrecision, make_precision, make_scaler
from minillm.amp.scaler import DynamicLossScaler, LossDivergedError, NoLossScaler

__all__ = [
    "DTYPE_NAMES", "DynamicLossScaler", "FormatInfo", "FullPrecision", "LossDivergedError",
    "MixedPrecision", "NoLossScaler", "compute_dtype", "format_info", "is_half", "make_precision",
    "make_scaler",
]
