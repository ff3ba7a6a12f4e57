"""Dropout masks from a counter-based generator: a pure function of where an element sits.

A sequential generator (one stream, numbers handed out in call order) makes a mask depend on who
asked first. Here every element's random bits are a hash of its coordinates instead:

    bits(seed, step, layer, sample, position, channel)       32 bits, uint32

so a mask is the same whichever data-parallel rank, pipeline stage, accumulation micro-step,
recomputation or sequence-parallel chunk computes it, in whatever order. The hash is written
with xp integer operations (shifts, xors, wrapping uint32 multiplies), so it runs where the
activations are (no host generator, no host-to-device copy) and gives the same bits on the CPU
and the GPU. The mixing function is Chris Wellons' ``lowbias32`` (a bijection of 32-bit words
with good avalanche); coordinates enter one at a time, each through a Weyl step (an odd
multiplier) and a mix:

    key = mix(mix(mix(mix(seed_lo ^ W0) ^ seed_hi) ^ step) ^ layer)     on the host, Python ints
    h   = mix(key ^ sample * W1)          (B, 1, 1)   per sample
    h   = mix(h + position * W2)          (B, T, 1)   per position
    h   = mix(h ^ channel * W3)           (B, T, C)   per element
    keep = h >= round(p * 2**32)          probability 1 - p

Coordinates of an array of shape (B, T, C...): axis 0 is the sample (its row in the global batch),
axis 1 the position in the sequence, the remaining axes together the channel (C order). The
engine says where a micro-batch sits with ``keyed(step, row0, t0)``; ``mask(shape, p, row0, t0)``
draws any slice directly.
"""
import contextlib

import numpy

from minillm.backend import xp

_M32 = 0xFFFFFFFF
_W0, _W1, _W2, _W3 = 0x9E3779B9, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F   # odd: x * W is a bijection
_C1, _C2 = 0x7FEB352D, 0x846CA68B                                       # lowbias32's multipliers
_UNKEYED = 0x5EED                                                        # domain of unkeyed calls


def mix32(h: int) -> int:
    """lowbias32 on a Python int (the host half of the hash)."""
    h &= _M32
    h ^= h >> 16
    h = (h * _C1) & _M32
    h ^= h >> 15
    h = (h * _C2) & _M32
    return h ^ (h >> 16)


def _mix_(h):
    """lowbias32 in place on a uint32 xp array (uint32 multiplies wrap modulo 2**32)."""
    tmp = xp.right_shift(h, numpy.uint32(16))
    h ^= tmp
    h *= numpy.uint32(_C1)
    xp.right_shift(h, numpy.uint32(15), out=tmp)
    h ^= tmp
    h *= numpy.uint32(_C2)
    xp.right_shift(h, numpy.uint32(16), out=tmp)
    h ^= tmp
    return h


def key(seed: int, step: int, layer: int, domain: int = 0) -> int:
    """The 32-bit key of (seed, step, layer): the host half of the hash."""
    h = mix32((seed & _M32) ^ _W0)
    for word in ((seed >> 32) & _M32, step & _M32, layer & _M32, domain):
        h = mix32(h ^ word)
    return h


def _coords(n, start, axis, ndim):
    """(start + arange(n)) as uint32, shaped to broadcast along ``axis`` of an ndim-d array."""
    c = xp.arange(n, dtype=xp.uint32)
    c += numpy.uint32(start & _M32)
    return c.reshape((1,) * axis + (n,) + (1,) * (ndim - axis - 1))


def element_bits(k: int, shape, row0: int = 0, t0: int = 0):
    """uint32 bits of every element of an array of ``shape`` whose first row is sample ``row0``
    and first position ``t0``, under key ``k`` (see the module docstring)."""
    shape = tuple(int(n) for n in shape)
    B = shape[0] if shape else 1
    T = shape[1] if len(shape) > 1 else 1
    C = int(numpy.prod(shape[2:], dtype=numpy.int64)) if len(shape) > 2 else 1
    h = _coords(B, row0, 0, 3)                                   # (B, 1, 1) samples
    h *= numpy.uint32(_W1)
    h ^= numpy.uint32(k)
    _mix_(h)
    pos = _coords(T, t0, 1, 3)                                   # (1, T, 1) positions
    pos *= numpy.uint32(_W2)
    h = _mix_(h + pos)                                           # (B, T, 1)
    ch = _coords(C, 0, 2, 3)                                     # (1, 1, C) channels
    ch *= numpy.uint32(_W3)
    h = _mix_(h ^ ch)                                            # (B, T, C)
    return h.reshape(shape)


def threshold(p: float) -> int:
    """The uint32 cut: an element is kept when its bits are >= this (probability 1 - p)."""
    return min(int(round(p * 2.0 ** 32)), _M32)


class SampleDropoutRNG:
    """Dropout randomness keyed by (seed, step, layer, sample, position, channel).

    An engine runs each micro-batch's forward inside ``keyed(step, row0, t0)``: row r of that
    micro-batch is sample ``row0 + r`` of the global batch of optimizer step ``step``, and its
    position t is ``t0 + t`` in the sequence (``t0`` is nonzero only for a chunk of the sequence).
    The mask of an element depends on nothing else, so any split, order or replay of the same
    samples draws the same masks, on the CPU and the GPU alike, and a resumed run needs no RNG
    state. Outside ``keyed`` (a hand-written loop) every call draws fresh masks, counted per layer.
    """

    def __init__(self, seed=0):
        self.seed = int(seed)
        self.key = None                  # (step, row0, t0) of the micro-batch being computed
        self.calls = {}                  # per-layer call counts, for unkeyed calls only

    @contextlib.contextmanager
    def keyed(self, step, row0=0, t0=0):
        """Masks drawn inside are those of samples row0, row0 + 1, ... (positions t0, t0 + 1, ...)
        of step ``step``."""
        prev, self.key = self.key, (int(step), int(row0), int(t0))
        try:
            yield
        finally:
            self.key = prev

    def replay_point(self):
        """Where the masks drawn next come from: the (step, row0, t0) key, and for unkeyed calls
        the per-layer counts. Activation recomputation records it when a region first runs."""
        return self.key, dict(self.calls)

    @contextlib.contextmanager
    def replaying(self, point):
        """Masks drawn inside are those drawn at ``point`` (``replay_point()``): a recomputed
        region gets the masks of its first run. Afterwards everything is as before."""
        prev = self.key, self.calls
        self.key, self.calls = point[0], dict(point[1])
        try:
            yield
        finally:
            self.key, self.calls = prev

    def for_layer(self, layer):
        """The mask source of one Dropout layer (``.mask(shape, p)``)."""
        return LayerDropoutRNG(self, int(layer))

    def state_dict(self):
        return {"seed": self.seed, "scheme": "lowbias32(seed, step, layer, sample, position, channel)"}


class LayerDropoutRNG:
    """Masks of dropout site ``layer``; ``source`` is the model's ``SampleDropoutRNG``."""

    def __init__(self, source, layer):
        self.source, self.layer = source, layer

    def mask(self, shape, p, row0=None, t0=None):
        """Boolean keep-mask (True = keep, probability 1 - p) of an array of ``shape`` (B, T, C...).

        Inside ``keyed(step, row0, t0)`` its rows are samples ``row0...`` and its positions
        ``t0...`` of that step; passing ``row0`` / ``t0`` here draws another slice of the same
        step directly (a sequence-parallel chunk: ``t0`` = its first position). Outside ``keyed``
        each call gets fresh masks (call k of this layer uses its own key).
        """
        s = self.source
        if s.key is None:
            k_calls = s.calls.get(self.layer, 0)
            s.calls[self.layer] = k_calls + 1
            k = key(s.seed, k_calls, self.layer, domain=_UNKEYED)
            r0, tt0 = 0, 0
        else:
            step, r0, tt0 = s.key
            k = key(s.seed, step, self.layer)
        bits = element_bits(k, shape, r0 if row0 is None else row0, tt0 if t0 is None else t0)
        return bits >= numpy.uint32(threshold(p))
