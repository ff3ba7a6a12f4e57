"""Choosing the next token from logits: temperature, top-k, top-p (nucleus), seeded.

Host-side NumPy in float64, so the same logits and the same Generator give the same token on any
device. Filters apply in the usual order: temperature, then top-k, then top-p.
"""
import numpy


def check_sampling(temperature=1.0, top_k=None, top_p=None):
    """ValueError naming the first bad sampling argument."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")


def top_p_filter(probs, top_p):
    """Keep, per row of probs (B, V), the smallest set of most likely tokens whose probabilities
    sum to at least top_p (the most likely token always stays); the rest become 0, then rows are
    renormalised."""
    order = numpy.argsort(-probs, axis=1, kind="stable")                  # (B, V) most likely first
    sorted_p = numpy.take_along_axis(probs, order, axis=1)
    before = numpy.cumsum(sorted_p, axis=1)                               # mass of the more likely
    before = numpy.concatenate([numpy.zeros_like(before[:, :1]), before[:, :-1]], axis=1)  # ones
    keep_sorted = before < top_p                                          # the first one: 0 < top_p
    keep = numpy.empty_like(keep_sorted)
    numpy.put_along_axis(keep, order, keep_sorted, axis=1)
    out = numpy.where(keep, probs, 0.0)
    return out / out.sum(axis=1, keepdims=True)


def sample_next(logits, temperature=1.0, top_k=None, rng=None, top_p=None):
    """One token per row of logits (B, V). temperature 0 picks the most likely (argmax); otherwise
    one uniform draw per row from ``rng`` inverts the cumulative distribution."""
    logits = logits.astype(numpy.float64)
    if temperature == 0:
        return logits.argmax(axis=1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[1]:
        kth = numpy.sort(logits, axis=1)[:, -top_k][:, None]
        logits = numpy.where(logits < kth, -numpy.inf, logits)
    probs = numpy.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    u = rng.random(logits.shape[0])[:, None]
    return numpy.minimum((numpy.cumsum(probs, axis=1) < u).sum(axis=1), logits.shape[1] - 1)
