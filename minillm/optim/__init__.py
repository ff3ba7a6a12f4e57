"""minillm.optim: optimizers (AdamW, SGD), learning-rate schedules, gradient clipping.

Typical use in a training step::

    opt = AdamW(model.named_parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                weight_decay=cfg.weight_decay)
    ...
    loss.backward()
    grad_norm = clip_grad_norm(opt.params, cfg.grad_clip)
    opt.step(lr=get_lr(step, cfg))
    opt.zero_grad()
"""
from minillm.optim.adamw import AdamW
from minillm.optim.clip import (clip_grad_norm, clip_grad_norm_device, global_grad_norm,
                                grad_square_sum, scale_grads)
from minillm.optim.optimizer import Optimizer
from minillm.optim.schedules import (SCHEDULES, check_schedule, constant_lr, cosine_lr, get_lr,
                                     inv_sqrt_lr, warmup_lr, wsd_lr)
from minillm.optim.sgd import SGD


def make_optimizer(train_cfg, params):
    """The optimizer ``train.optimizer`` names, over ``params``, with the ``[train]`` settings."""
    t = train_cfg
    if t.optimizer == "sgd":
        return SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return AdamW(params, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay)


__all__ = [
    "AdamW", "SGD", "Optimizer", "make_optimizer",
    "clip_grad_norm", "clip_grad_norm_device", "global_grad_norm", "grad_square_sum", "scale_grads",
    "get_lr", "check_schedule", "SCHEDULES",
    "warmup_lr", "constant_lr", "cosine_lr", "wsd_lr", "inv_sqrt_lr",
]
