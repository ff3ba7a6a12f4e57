"""Reference solutions, lesson 03b."""
import numpy as np


def minhash_signature(shingles, a, b):
    x = np.asarray(shingles, dtype=np.uint64)
    v = a[:, None] * x[None, :] + b[:, None]          # (k, n), wraps mod 2**64
    return (v.min(axis=1) >> np.uint64(32)).astype(np.uint32)


def band_probability(s, bands, rows):
    return 1 - (1 - s ** rows) ** bands


def repeated_line_share(text):
    lines = [ln for ln in text.split("\n") if ln.strip()]
    seen, repeats = set(), 0
    for ln in lines:
        repeats += ln in seen
        seen.add(ln)
    return repeats / len(lines) if lines else 0.0
