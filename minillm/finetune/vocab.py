"""Growing a model's vocabulary: new token rows in the embedding (and the output layer).

A fine-tune adds special tokens (chat roles) after the base vocabulary, so the token embedding
(V, C) becomes (V + n, C) and every old id keeps its row. A new row starts at the mean of the old
rows plus a little noise: its logits start near the average (no token suddenly dominates) and
the new tokens still differ from each other. With tied embeddings (GPT-2) the output layer is the
same matrix and grows with it; an untied ``lm_head`` grows the same way.
"""
import dataclasses

import numpy

from minillm import backend
from minillm.backend import xp


def _grown(w, n_new, rng):
    """(V, C) -> (V + n_new, C): the old rows, then mean + noise."""
    host = backend.to_numpy(w).astype(numpy.float64)
    rows = host.mean(axis=0) + rng.normal(0.0, 0.1 * host.std(), (n_new, host.shape[1]))  # (n, C)
    return xp.concatenate([w, backend.asarray(rows.astype(host.dtype)).astype(w.dtype)], axis=0)


def grow_vocab(model, n_new: int, seed: int = 0):
    """Add ``n_new`` rows to the token embedding (and an untied lm_head) in place; the Parameter
    objects stay the same (tied weights stay tied). Returns the model, whose config says the new
    vocab_size."""
    if n_new <= 0:
        return model
    rng = numpy.random.default_rng(seed)
    wte = model.transformer.wte.weight
    wte.data = _grown(wte.data, n_new, rng)
    if model.lm_head.weight is not wte:
        model.lm_head.weight.data = _grown(model.lm_head.weight.data, n_new, rng)
    model.lm_head.out_features += n_new
    model.config = dataclasses.replace(model.config, vocab_size=model.config.vocab_size + n_new)
    return model
