"""Sequence parallelism: the parts of a block that tensor parallelism leaves replicated, split along T.

Between its tensor-parallel regions a Transformer block runs layer norms, dropout and residual
adds on (B, T, C) activations that plain tensor parallelism keeps whole on every tp rank: the same
numbers computed and stored tp times. They act on each position separately, so with
``parallel.sp=true`` rank r keeps only positions [r T/tp, (r+1) T/tp) of every sequence there.
The region borders become an all-gather along T (into a column-parallel layer) and a reduce-scatter
(out of a row-parallel one): ``tensor_parallel.py`` and ``tp_layers.GatherLinear``.

What this file adds:

- ``SequenceScatter``: after the embeddings (whole on every rank, as in Megatron-LM with learned
  positions) each rank keeps its own positions, then the embedding dropout runs on them;
- ``SequenceSliceRNG``: a Dropout's mask source that gives each rank the masks of its own
  positions only. Masks are a hash of (seed, step, layer, sample, position, channel)
  (``nn/dropout_rng.py``), so a split run draws exactly the serial run's mask for position t of
  sample i on whichever rank holds t, and only that slice.

The norms' weights (and the row-parallel biases, added after the reduce-scatter) then see only
this rank's positions: their gradients are partial sums, all-reduced over the tp group after
backward (``tp_model.TensorParallelSync``).
"""
from __future__ import annotations

from minillm.distributed.tensor_parallel import scatter_to_sequence_parallel
from minillm.nn.module import Module


class SequenceSliceRNG:
    """Wraps a dropout layer's mask source (``nn.dropout_rng.LayerDropoutRNG``) for rank ``rank``
    of ``tp`` ranks that each hold T/tp consecutive positions of every sequence: masks are a hash
    of each element's (sample, position, channel), so the rank draws the serial run's mask of its
    own positions directly, starting at position ``rank * T/tp``."""

    def __init__(self, rng, rank: int, tp: int):
        self.rng, self.rank, self.tp = rng, rank, tp

    def mask(self, shape, p):
        key = self.rng.source.key                     # (step, row0, t0) of the micro-batch, or None
        t0 = (key[2] if key is not None else 0) + self.rank * shape[1]
        return self.rng.mask(shape, p, t0=t0)


class SequenceScatter(Module):
    """(B, T, C) whole -> this rank's (B, T/tp, C), then ``inner`` (the embedding dropout, whose
    generator is a ``SequenceSliceRNG``). Backward all-gathers the gradient."""

    def __init__(self, inner, comm):
        super().__init__()
        self.inner, self.comm = inner, comm

    def forward(self, x):
        return self.inner(scatter_to_sequence_parallel(x, self.comm))
