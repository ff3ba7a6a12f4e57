"""MinHash signatures and LSH band keys: near-duplicate detection without comparing all pairs.

The Jaccard similarity of two documents is |A & B| / |A | B| over their sets of shingles (here:
word 5-grams of the lower-cased text). For a random hash function h, P[min h(A) == min h(B)]
equals exactly that Jaccard similarity, so a *signature* of k minima under k independent hash
functions estimates it as the fraction of positions where two signatures agree.

Comparing every pair of signatures is still quadratic. LSH cuts each signature into ``bands``
bands of ``rows`` values and hashes every band to a key; two documents become *candidates* when
any band key matches. For Jaccard similarity s,

    P[candidate] = 1 - (1 - s**rows) ** bands          (``candidate_probability``)

an S-curve that rises steeply around s ~ (1/bands) ** (1/rows) (``lsh_threshold``). Candidates
are then verified on the estimated similarity (``estimated_jaccard``).

Hashing, all in NumPy with uint64 arithmetic that wraps modulo 2**64 (deterministic in every
process and on every run, unlike Python's ``hash``):

- a word's hash is a polynomial hash of its UTF-8 bytes, read off a prefix sum (one pass for the
  whole document), a shingle's hash is a polynomial of its words' hashes, finalised with
  splitmix64 and kept to 32 bits;
- hash function i is ``h_i(x) = ((a_i * x + b_i) mod 2**64) >> 32`` with random 64-bit a_i, b_i
  (multiply-add-shift, a universal family); the minimum commutes with the shift, so the shift is
  applied once to the minimum.
"""
from __future__ import annotations

import functools

import numpy as np

_P = np.uint64(0x100000001B3)            # the byte polynomial's base (odd, so invertible mod 2**64)
_P_INV = np.uint64(pow(0x100000001B3, -1, 2 ** 64))
_Q = np.uint64(0x9E3779B97F4A7C15)       # the shingle polynomial's base
_CHUNK = 4096                            # shingles per step: bounds the (k, chunk) temporary
_GROUP_CHARS = 1 << 18                   # text hashed per group of documents


@functools.lru_cache(maxsize=4)
def _powers(base: int, n: int) -> np.ndarray:
    out = np.empty(n, dtype=np.uint64)
    out[0] = 1
    with np.errstate(over="ignore"):
        np.cumprod(np.full(n - 1, base, dtype=np.uint64), out=out[1:])
    return out


def _pows(n: int):
    size = 1 << max(16, int(n).bit_length())       # cached by powers of two
    return _powers(int(_P), size)[:n], _powers(int(_P_INV), size)[:n]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit affects every output bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def batch_shingle_hashes(texts, ngram: int = 5):
    """Shingle hashes of many documents at once (the per-call cost of NumPy dominates for short
    documents): ``(hashes, owner)``, uint64 32-bit hashes and the index of each one's document,
    in document order. The shingles are the word ``ngram``-grams of the lower-cased text; a
    document shorter than ``ngram`` words is one shingle of all its words; empty text has none."""
    norm = [" ".join(t.lower().split()) for t in texts]          # words apart by one space
    counts = np.array([n.count(" ") + 1 if n else 0 for n in norm], dtype=np.int64)
    if counts.sum() == 0:
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
    data = np.frombuffer(" ".join(filter(None, norm)).encode("utf-8"), dtype=np.uint8)
    pw, ipw = _pows(len(data) + 1)
    cum = np.zeros(len(data) + 1, dtype=np.uint64)
    np.cumsum((data.astype(np.uint64) + np.uint64(1)) * pw[:len(data)], out=cum[1:])
    spaces = np.flatnonzero(data == 32)
    starts = np.concatenate(([0], spaces + 1))
    ends = np.concatenate((spaces, [len(data)]))
    word = (cum[ends] - cum[starts]) * ipw[starts]                  # position-free word hashes
    owner_of_word = np.repeat(np.arange(len(texts)), counts)
    first_word = np.cumsum(counts) - counts
    n = np.minimum(ngram, counts)                                   # shingle length per document
    # window i (starting at word i) is a shingle of its document if it fits inside it
    span = n[owner_of_word]
    fits = np.arange(len(word)) + span <= (first_word + counts)[owner_of_word]
    starts_w = np.flatnonzero(fits)
    acc = word[starts_w].copy()
    for k in range(1, ngram):
        more = span[starts_w] > k                                   # shorter documents stop early
        idx = np.minimum(starts_w + k, len(word) - 1)
        acc = np.where(more, acc * _Q + word[idx], acc)
    return _mix(acc) >> np.uint64(32), owner_of_word[starts_w]


def shingle_hashes(text: str, ngram: int = 5) -> np.ndarray:
    """The shingle hashes of one document (see ``batch_shingle_hashes``)."""
    return batch_shingle_hashes([text], ngram)[0]


class MinHasher:
    """``bands * rows`` hash functions drawn from ``seed``; signatures are uint32 vectors."""

    def __init__(self, bands: int = 20, rows: int = 6, ngram: int = 5, seed: int = 0):
        self.bands, self.rows, self.ngram = int(bands), int(rows), int(ngram)
        self.num_perm = self.bands * self.rows
        rng = np.random.default_rng([seed, 0x6D68])
        self.a = (rng.integers(0, 2 ** 63, self.num_perm, dtype=np.uint64) << np.uint64(1)) \
            | np.uint64(1)                                          # odd multipliers
        self.b = rng.integers(0, 2 ** 63, self.num_perm, dtype=np.uint64) << np.uint64(1)

    def signatures(self, texts) -> np.ndarray:
        """(N, num_perm) uint32 MinHash signatures of N documents (hashed in groups of about
        ``_GROUP_CHARS`` characters: few enough NumPy calls per document, bounded temporaries)."""
        out, group, size = [], [], 0
        for t in texts:
            group.append(t)
            size += len(t)
            if size >= _GROUP_CHARS:
                out.append(self.signatures_of_sets(*batch_shingle_hashes(group, self.ngram), len(group)))
                group, size = [], 0
        if group or not out:
            out.append(self.signatures_of_sets(*batch_shingle_hashes(group, self.ngram), len(group)))
        return np.concatenate(out)

    def signatures_of_sets(self, x: np.ndarray, owner: np.ndarray | None = None, n: int = 1):
        """Signatures of ``n`` sets given as element hashes ``x`` (32-bit values) and the set each
        belongs to (``owner``, non-decreasing; None: all in set 0). An empty set's signature is
        all 0xFFFFFFFF."""
        x = np.asarray(x, dtype=np.uint64)
        owner = np.zeros(len(x), dtype=np.int64) if owner is None else np.asarray(owner)
        sig = np.full((n, self.num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
        first = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]]) if len(x) else x
        a, b = self.a[:, None], self.b[:, None]
        for c0 in range(0, len(x), _CHUNK):
            c1 = min(len(x), c0 + _CHUNK)
            v = a * x[None, c0:c1]                                  # (k, chunk), wraps mod 2**64
            v += b
            inside = first[(first > c0) & (first < c1)] - c0        # documents starting inside
            offsets = np.concatenate(([0], inside))
            docs = owner[c0 + offsets]
            part = np.minimum.reduceat(v, offsets, axis=1)          # (k, documents in chunk)
            sig[docs] = np.minimum(sig[docs], part.T)
        return (sig >> np.uint64(32)).astype(np.uint32)             # no shingles: 0xFFFFFFFF

    def signature(self, text: str) -> np.ndarray:
        """The MinHash signature of ``text``: ``num_perm`` uint32 values."""
        return self.signatures([text])[0]

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(N, num_perm) signatures -> (N, bands) uint64 keys, one hash per band of ``rows``."""
        sig = np.asarray(signatures, dtype=np.uint64).reshape(len(signatures), self.bands, self.rows)
        acc = np.zeros(sig.shape[:2], dtype=np.uint64)
        for r in range(self.rows):
            acc = _mix(acc * _Q + sig[:, :, r])
        return acc


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """The share of equal positions: an unbiased estimate of the Jaccard similarity (rows of
    2-D inputs are compared pairwise)."""
    return np.mean(np.asarray(sig_a) == np.asarray(sig_b), axis=-1)


def jaccard(text_a: str, text_b: str, ngram: int = 5) -> float:
    """The exact Jaccard similarity of two documents' shingle sets (for tests and the lesson)."""
    a, b = set(shingle_hashes(text_a, ngram).tolist()), set(shingle_hashes(text_b, ngram).tolist())
    return len(a & b) / len(a | b) if a | b else 1.0


def candidate_probability(s, bands: int, rows: int):
    """P[two documents of Jaccard similarity ``s`` share at least one band key]."""
    return 1.0 - (1.0 - np.asarray(s, dtype=float) ** rows) ** bands


def lsh_threshold(bands: int, rows: int) -> float:
    """Where the S-curve is steepest, roughly: (1 / bands) ** (1 / rows)."""
    return (1.0 / bands) ** (1.0 / rows)
