"""Activation recomputation for a GPT: ``train.recompute = "none" | "full" | "selective"``.

What a training step keeps for backward (its activations) grows with batch x context x layers;
recomputation trades some of it for compute (the ``checkpoint`` Function in
``autograd/checkpoint.py``). Two standard choices (Korthikanti et al., "Reducing Activation
Recomputation in Large Transformer Models", 2022):

    full       keep each block's input (B, T, C) and nothing inside the block; the whole block's
               forward runs again during its backward (about a third more compute per step)
    selective  keep everything except the attention core, softmax(q k^T) v, whose (B, nh, T, T)
               probabilities are the largest activation at long contexts and the cheapest to
               recompute (no matmul with weights); that core alone runs again in backward

The model's code does not change: ``apply_recompute`` wraps modules with
``Module.wrap_forward`` (every ``Block`` for "full", every block's ``attn.core`` for
"selective"). ``train/build.py`` applies it. Losses and gradients are bit-identical to no
recomputation, dropout included: the replay draws the masks of the same samples.
"""
from __future__ import annotations

from minillm.autograd.checkpoint import checkpoint
from minillm.choices import RECOMPUTES, Recompute, one_of


def apply_recompute(model, mode: Recompute) -> None:
    """Make ``model`` (a GPT) recompute ``mode``'s activations in backward (in place)."""
    one_of("train.recompute", mode, RECOMPUTES)
    rng = model.dropout_rng
    if mode == "full":
        for block in model.transformer.h:
            block.wrap_forward(_recomputed_block(rng))
    elif mode == "selective":
        for block in model.transformer.h:
            block.attn.core.wrap_forward(_recomputed_core)


def _recomputed_block(rng):
    def wrapper(forward, x, *args, **kwargs):
        return checkpoint(lambda t: forward(t, *args, **kwargs), x, rng=rng)  # rope, cache, layer: constants
    return wrapper


def _recomputed_core(forward, q, k, v, attn_mask=None):
    # no dropout inside the core: no keys to replay; the mask (an array, not a Tensor) is a constant
    return checkpoint(lambda q, k, v: forward(q, k, v, attn_mask=attn_mask), q, k, v)
