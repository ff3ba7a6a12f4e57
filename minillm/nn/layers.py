"""Layers: Linear, Embedding, LayerNorm, RMSNorm, Dropout, CrossEntropyLoss (thin Modules over fused ops).

Initial values come from an explicit numpy Generator (``rng``) so that runs are reproducible;
they are drawn on the host in float32 and moved to the device once. A GPT's dropout masks come
from ``SampleDropoutRNG`` (``dropout_rng.py``: keyed by sample, drawn on the device).
"""
import math

import numpy

import minillm.functional as F
from minillm import backend
from minillm.backend import xp
from minillm.nn.dropout_rng import LayerDropoutRNG, SampleDropoutRNG  # noqa: F401  (re-exported)
from minillm.nn.module import Module, Parameter


def _rng(rng):
    return rng if rng is not None else numpy.random.default_rng(0)


class Linear(Module):
    """y = x W^T + b, W of shape (out_features, in_features); PyTorch's uniform init by default."""

    def __init__(self, in_features, out_features, bias=True, rng=None, std=None):
        super().__init__()
        rng = _rng(rng)
        if std is None:
            bound = 1.0 / math.sqrt(in_features)
            w = rng.uniform(-bound, bound, (out_features, in_features))
        else:
            w = rng.normal(0.0, std, (out_features, in_features))
        self.weight = Parameter(backend.asarray(w.astype(numpy.float32)))
        self.bias = Parameter(xp.zeros(out_features, dtype=xp.float32)) if bias else None
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Embedding(Module):
    def __init__(self, num_embeddings, embedding_dim, rng=None, std=1.0):
        super().__init__()
        w = _rng(rng).normal(0.0, std, (num_embeddings, embedding_dim)).astype(numpy.float32)
        self.weight = Parameter(backend.asarray(w))

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class LayerNorm(Module):
    def __init__(self, dim, bias=True, eps=1e-5):
        super().__init__()
        self.weight = Parameter(xp.ones(dim, dtype=xp.float32))
        self.bias = Parameter(xp.zeros(dim, dtype=xp.float32)) if bias else None
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = Parameter(xp.ones(dim, dtype=xp.float32))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, self.weight, self.eps)


class Dropout(Module):
    """Inverted dropout; masks come from ``rng``: a numpy Generator, or a ``LayerDropoutRNG``
    (keyed by sample, drawn on the device: what a GPT uses)."""

    def __init__(self, p=0.0, rng=None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p={p} must be in [0, 1)")
        self.p = p
        self.rng = _rng(rng)

    def forward(self, x):
        return F.dropout(x, self.p, self.rng, training=self.training)


class CrossEntropyLoss(Module):
    """The loss as a module (no parameters): ``criterion(logits, targets)``, F.cross_entropy."""

    def forward(self, logits, targets, ignore_index=-100):
        return F.cross_entropy(logits, targets, ignore_index=ignore_index)
