"""Activation recomputation ("gradient checkpointing"): keep a region's inputs, not its insides.

Backward needs what forward saved: every intermediate of every op (the activations). A region run
through ``checkpoint(fn, *inputs)`` keeps none of them. Its forward runs ``fn`` under ``no_grad``
and saves only the input arrays; when backward reaches the region, ``Checkpoint.backward`` runs
``fn`` again on those inputs, this time recording a graph, and back-propagates through that
replay. Memory: the region's activations exist for one region at a time, during its backward.
Compute: the region's forward runs twice (for a whole Transformer block about a third more work
per step: backward costs about two forwards).

Correct to the last bit, because the replay computes exactly what the first run did: the same
ops on the same arrays, and the same dropout masks. Those are keyed by sample (``nn/layers.py``:
``SampleDropoutRNG``); ``Checkpoint.forward`` records where the masks come from
(``rng.replay_point()``: the current (step, row0) key) and the replay runs inside
``rng.replaying(point)``, so it draws the masks of the same samples whenever and wherever it runs,
explicitly, not by counting calls.

Parameters used inside ``fn`` are not inputs of the ``Checkpoint`` node: their gradients are
accumulated by the replay's own backward (which also fires their grad-ready hooks, so data
parallelism's buckets start as usual). As with PyTorch's reentrant checkpoint, at least one input
must require a gradient, else the region runs as a plain call and keeps its graph.
"""
from __future__ import annotations

import contextlib

from minillm.autograd.function import Function
from minillm.autograd.tensor import Tensor, enable_grad, is_grad_enabled, no_grad


class Checkpoint(Function):
    """``Checkpoint.apply(*inputs, fn=fn, rng=rng)``: ``fn(*inputs)``, recomputed in backward.

    ``fn`` maps Tensors to one Tensor; ``rng`` (a ``SampleDropoutRNG`` or None) is where the
    region's dropout masks come from.
    """

    @staticmethod
    def forward(ctx, *arrays, fn, rng):
        ctx.region, ctx.rng = fn, rng
        ctx.point = rng.replay_point() if rng is not None else None  # which samples' masks
        with no_grad():
            out = fn(*(Tensor(a, _check=False) for a in arrays))
        ctx.save_for_backward(*arrays)  # the inputs only: the region's insides are dropped
        return out.data

    @staticmethod
    def backward(ctx, g):
        leaves = [Tensor(a, requires_grad=need, _check=False)
                  for a, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        replaying = ctx.rng.replaying(ctx.point) if ctx.rng is not None else contextlib.nullcontext()
        with enable_grad(), replaying:
            out = ctx.region(*leaves)        # the same forward again, this time with a graph
        out.backward(g)                    # parameters inside get their gradients here
        return tuple(x.grad if x.requires_grad else None for x in leaves)


def checkpoint(fn, *inputs, rng=None):
    """``fn(*inputs)`` with its activations recomputed in backward instead of kept.

    ``inputs``: Tensors; ``rng``: the model's ``SampleDropoutRNG`` when ``fn`` applies dropout.
    Without a gradient to compute (``no_grad``, evaluation, no input requiring one) it is a
    plain call.
    """
    if not is_grad_enabled() or not any(x.requires_grad for x in inputs):
        return fn(*inputs)
    return Checkpoint.apply(*inputs, fn=fn, rng=rng)
