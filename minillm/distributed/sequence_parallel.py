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
- ``SequenceSliceRNG``: a Dropout's mask generator that gives each rank the masks of its own
  positions only. Masks are keyed by sample (``nn/layers.SampleDropoutRNG``), so a split run must
  draw exactly the serial run's mask for position t of sample i on whichever rank holds t.
  ``positions_of_mask`` is the one place that does it: today it draws the sample's whole mask and
  keeps the slice (right, and tp times the work); a counter-based generator that can draw a slice
  by position (issue 12) makes it draw only the slice.

The norms' weights (and the row-parallel biases, added after the reduce-scatter) then see only
this rank's positions: their gradients are partial sums, all-reduced over the tp group after
backward (``tp_model.TensorParallelSync``).
"""
from __future__ import annotations

from minillm.distributed.tensor_parallel import scatter_to_sequence_parallel
from minillm.nn.module import Module


def positions_of_mask(rng, shape, start: int, full_len: int, dtype="float32"):
    """Uniform numbers (B, T_local, ...) for positions [start, start + T_local) of a mask whose
    sequences are ``full_len`` long, equal to that slice of ``rng.random((B, full_len, ...))``."""
    full = rng.random((shape[0], full_len) + tuple(shape[2:]), dtype=dtype)      # (B, T, C)
    return full[:, start:start + shape[1]]                                        # (B, T/tp, C)


class SequenceSliceRNG:
    """Wraps a dropout layer's generator (``.random(shape, dtype)``) for rank ``rank`` of ``tp``
    ranks that each hold T/tp consecutive positions of every sequence."""

    def __init__(self, rng, rank: int, tp: int):
        self.rng, self.rank, self.tp = rng, rank, tp

    def random(self, shape, dtype="float32"):
        n = shape[1]
        return positions_of_mask(self.rng, shape, self.rank * n, self.tp * n, dtype)


class SequenceScatter(Module):
    """(B, T, C) whole -> this rank's (B, T/tp, C), then ``inner`` (the embedding dropout, whose
    generator is a ``SequenceSliceRNG``). Backward all-gathers the gradient."""

    def __init__(self, inner, comm):
        super().__init__()
        self.inner, self.comm = inner, comm

    def forward(self, x):
        return self.inner(scatter_to_sequence_parallel(x, self.comm))
