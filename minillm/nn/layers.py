"""Layers: Linear, Embedding, LayerNorm, RMSNorm, Dropout (each a thin Module over a fused op).

Initial values come from an explicit numpy Generator (``rng``) so that runs are reproducible;
they are drawn on the host in float32 and moved to the device once.
"""
import contextlib
import math

import numpy

import minillm.functional as F
from minillm import backend
from minillm.backend import xp
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
    """Inverted dropout; masks come from ``rng`` (a numpy Generator the owner saves and restores)."""

    def __init__(self, p=0.0, rng=None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p={p} must be in [0, 1)")
        self.p = p
        self.rng = _rng(rng)

    def forward(self, x):
        return F.dropout(x, self.p, self.rng, training=self.training)


class SampleDropoutRNG:
    """Dropout randomness keyed by (seed, step, layer, sample): layout-independent masks.

    The mask for sample i of the global batch at dropout layer l in optimizer step s is drawn from
    ``numpy.random.default_rng([seed, s, l, i])``. The sample index travels with the micro-batch:
    an engine runs each micro-batch's forward inside ``keyed(step, row0)``, ``row0`` being the
    global index of its first sample, so row r of that micro-batch is sample ``row0 + r``.
    Whichever data-parallel rank, pipeline stage or accumulation micro-step computes sample i, in
    whatever order, and however often (a recomputation replays the same key), it draws the same
    mask: parallel runs equal serial runs even with dropout, and a resumed run needs no RNG state.

    Outside ``keyed`` (a hand-written loop) every call draws fresh masks, counted per layer.
    """

    def __init__(self, seed=0):
        self.seed = int(seed)
        self.key = None                  # (step, row0) of the micro-batch being computed
        self.calls = {}                  # per-layer call counts, for unkeyed calls only

    @contextlib.contextmanager
    def keyed(self, step, row0=0):
        """Masks drawn inside are those of samples row0, row0 + 1, ... of step ``step``."""
        prev, self.key = self.key, (int(step), int(row0))
        try:
            yield
        finally:
            self.key = prev

    def for_layer(self, layer):
        """A generator-like object for one Dropout layer (``.random(shape, dtype)``)."""
        return _LayerRNG(self, int(layer))

    def state_dict(self):
        return {"seed": self.seed, "scheme": "default_rng([seed, step, layer, sample])"}


class _LayerRNG:
    def __init__(self, source, layer):
        self.source, self.layer = source, layer

    def random(self, shape, dtype="float32"):
        s = self.source
        out = numpy.empty(shape, dtype=dtype)
        if s.key is None:  # no sample keys: fresh masks every call
            k = s.calls.get(self.layer, 0)
            s.calls[self.layer] = k + 1
            out[...] = numpy.random.default_rng([s.seed, 2**32 - 1, self.layer, k]).random(shape, dtype=dtype)
            return out
        step, row0 = s.key
        for r in range(shape[0]):  # one stream per sample (B, ...) -> the row's mask
            out[r] = numpy.random.default_rng([s.seed, step, self.layer, row0 + r]).random(shape[1:], dtype=dtype)
        return out
