"""The end of an optimizer step, shared by pretraining (train/trainer.py) and fine-tuning
(finetune/loop.py, finetune/grpo.py)."""
from minillm.optim import clip_grad_norm_device


def apply_update(precision, optimizer, lr, grad_clip, found_inf, reduce=None):
    """The end of every optimizer step (training and fine-tuning alike), once the gradients are
    in the master weights: clip, step unless they overflowed, copy the masters to the model (so
    evaluation and samples see this step's weights), update the loss scale, clear the optimizer's
    gradients. Returns the gradient norm before clipping as a 0-d device array (nothing read)."""
    grad_norm = clip_grad_norm_device([p for _, p in precision.master_params], grad_clip, reduce=reduce)
    if not found_inf:
        optimizer.step(lr=lr)
        precision.master_to_model()
    precision.update(found_inf)
    optimizer.zero_grad()
    return grad_norm
