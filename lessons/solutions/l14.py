"""Reference solutions, lesson 14."""
import numpy as np


def pack_int4(codes):
    u = (codes.astype(np.int16) + 8).astype(np.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def int8_scales(w):
    return np.abs(w).max(axis=1) / 127


def top_p(probs, p):
    order = np.argsort(-probs, axis=1)
    sorted_p = np.take_along_axis(probs, order, axis=1)
    before = np.cumsum(sorted_p, axis=1) - sorted_p
    keep = np.zeros_like(probs, dtype=bool)
    np.put_along_axis(keep, order, before < p, axis=1)
    out = np.where(keep, probs, 0.0)
    return out / out.sum(axis=1, keepdims=True)
