"""Batch sampling where the data order is a function of (seed, step, global batch) only.

For training step ``step`` the *global* batch is ``batch_size`` windows of ``block_size + 1``
tokens at offsets drawn from ``numpy.random.default_rng([seed, step])``. Whoever needs part
of it (a data-parallel rank, a gradient-accumulation or pipeline micro-batch) asks for rows
``[start, start + count)``. Consequences:

- every layout of ranks and micro-batches trains on exactly the same samples;
- nothing has to be saved to resume: step 1234 draws the same batch on any run;
- no epochs, no shuffling buffers; windows may overlap, which is fine for LM training.

Validation batches use a separate stream, ``rng([seed, VAL_STREAM, i])``, so evaluation
always scores the same fixed windows and never disturbs the training order.
"""
from __future__ import annotations

import numpy as np

from minillm.errors import UserError

VAL_STREAM = 0x76616C  # "val": a third seed word keeps eval draws apart from training draws


class BatchSampler:
    """``get_batch(step, start, count) -> (x, y)``, int64 arrays of shape (count, block_size)."""

    def __init__(self, tokens, block_size: int, batch_size: int, seed: int = 0):
        self.tokens = tokens
        self.block_size, self.batch_size, self.seed = int(block_size), int(batch_size), int(seed)
        if self.block_size < 1 or self.batch_size < 1:
            raise UserError(f"block_size={block_size} and batch_size={batch_size} must be >= 1")
        if self.seed < 0:
            raise UserError(f"seed={seed} must be a non-negative integer")
        n = len(tokens)
        if n < self.block_size + 1:
            raise UserError(f"the token stream has {n} tokens but block_size={self.block_size} "
                            f"needs at least {self.block_size + 1}; lower model.block_size "
                            "or use more text")
        self.n_offsets = n - self.block_size  # offsets 0 .. n - block_size - 1

    def offsets(self, rng: np.random.Generator) -> np.ndarray:
        """The start of each of the ``batch_size`` windows of one global batch."""
        return rng.integers(0, self.n_offsets, size=self.batch_size)

    def _rows(self, offsets, start: int, count: int | None):
        count = self.batch_size - start if count is None else count
        if not (0 <= start and count >= 1 and start + count <= self.batch_size):
            raise ValueError(f"rows [{start}, {start + count}) are not inside the global batch "
                             f"of {self.batch_size}")
        off = offsets[start:start + count]
        idx = off[:, None] + np.arange(self.block_size + 1)     # (count, T+1)
        window = np.asarray(self.tokens[idx], dtype=np.int64)   # (count, T+1)
        return window[:, :-1], window[:, 1:]                    # x, y: (count, T) each

    def get_batch(self, step: int, start: int = 0, count: int | None = None):
        """Rows ``[start, start+count)`` of step ``step``'s global batch: inputs and targets."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self._rows(self.offsets(np.random.default_rng([self.seed, int(step)])),
                          start, count)

    def eval_batch(self, i: int, start: int = 0, count: int | None = None):
        """The ``i``-th fixed evaluation batch (same for every run with this seed)."""
        if i < 0:
            raise ValueError(f"eval batch index must be >= 0, got {i}")
        return self._rows(self.offsets(np.random.default_rng([self.seed, VAL_STREAM, int(i)])),
                          start, count)

    def eval_batches(self, n: int, start: int = 0, count: int | None = None):
        """The first ``n`` fixed evaluation batches, as a list of (x, y)."""
        return [self.eval_batch(i, start, count) for i in range(n)]
