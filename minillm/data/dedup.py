"""Deduplication over a whole corpus: exact copies by content hash, near copies by MinHash + LSH.

Both work on arrays (one 64-bit hash per document; ``bands`` 64-bit LSH keys per document), never
on the text, so they need memory for a few numbers per document, not for the corpus:

- exact: documents with the same 64-bit BLAKE2b hash of their cleaned text are copies; the
  first in corpus order is kept. (Two different documents share a 64-bit hash with probability
  about n**2 / 2**65: 3e-8 for a million documents.)
- near: for each band, sort the documents by that band's key; documents with equal keys are
  candidates, each paired with the first of its bucket (a star, so the number of pairs stays
  linear). A candidate pair whose signatures agree on at least ``threshold`` of their positions
  (the estimated Jaccard similarity) is joined; the connected groups are the clusters and each
  keeps its first document. Joining is transitive: A ~ B and B ~ C put A, B, C in one cluster
  even if A and C are less similar.

The defaults (20 bands x 6 rows = 120 hash functions, threshold 0.8) put the LSH curve's steep
part near s = 0.6, so a pair of true similarity 0.8 becomes a candidate with probability 0.998
and is then kept or dropped by the verification, not by chance.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minillm.data.minhash import candidate_probability, lsh_threshold
from minillm.errors import UserError


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    ngram: int = 5              # shingles are word n-grams
    bands: int = 20
    rows: int = 6               # bands * rows hash functions
    threshold: float = 0.8      # estimated Jaccard similarity at which a candidate is a duplicate
    seed: int = 0               # draws the hash functions

    def __post_init__(self):
        for name in ("ngram", "bands", "rows"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"dedup {name}={getattr(self, name)} must be >= 1 "
                                f"(--dedup-{name})")
        if not 0.0 < float(self.threshold) <= 1.0:
            raise UserError(f"dedup threshold={self.threshold} must be in (0, 1] "
                            "(--dedup-threshold, e.g. 0.8)")

    def describe(self) -> dict:
        """The parameters and what they imply, for the report."""
        return {"bands": self.bands, "rows": self.rows, "num_perm": self.bands * self.rows,
                "ngram": self.ngram, "threshold": self.threshold,
                "lsh_threshold": round(lsh_threshold(self.bands, self.rows), 3),
                "p_candidate_at_threshold": round(float(candidate_probability(
                    self.threshold, self.bands, self.rows)), 4)}


def exact_duplicates(hashes: np.ndarray) -> np.ndarray:
    """``dup_of[i]``: the index of the first document with document i's hash, or -1 for firsts."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    order = np.argsort(hashes, kind="stable")             # equal hashes stay in corpus order
    h = hashes[order]
    new_run = np.r_[True, h[1:] != h[:-1]]
    first = order[np.flatnonzero(new_run)][np.cumsum(new_run) - 1]   # run's first, per position
    dup_of = np.full(len(hashes), -1, dtype=np.int64)
    dup_of[order] = np.where(first == order, -1, first)
    return dup_of


def candidate_pairs(keys, alive: np.ndarray | None = None) -> np.ndarray:
    """(P, 2) unique pairs (first of bucket, other) of documents sharing a band key in any band.

    ``keys``: an (N, bands) array, or an object with ``shape`` and ``column(band)`` that reads
    one band at a time (the pipeline's, from disk)."""
    if isinstance(keys, np.ndarray) or not hasattr(keys, "column"):
        arr = np.asarray(keys, dtype=np.uint64)
        column, n_bands, n = (lambda b: arr[:, b]), arr.shape[1], len(arr)
    else:
        column, (n, n_bands) = keys.column, keys.shape
    ids = np.flatnonzero(alive) if alive is not None else np.arange(n)
    pairs = []
    for band in range(n_bands):
        k = column(band)[ids]
        order = np.argsort(k, kind="stable")
        sk, sid = k[order], ids[order]
        new_run = np.r_[True, sk[1:] != sk[:-1]]
        first = sid[np.flatnonzero(new_run)][np.cumsum(new_run) - 1]
        member = ~new_run
        pairs.append(np.stack([first[member], sid[member]], axis=1))
    pairs = np.concatenate(pairs) if pairs else np.empty((0, 2), dtype=np.int64)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2).astype(np.int64)


def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:                              # path compression
        parent[i], i = root, parent[i]
    return root


def near_duplicates(keys, signatures, threshold: float, alive: np.ndarray | None = None):
    """``(dup_of, stats)``: ``dup_of[i]`` is the first document of i's cluster (-1 if i is one, or
    not a near duplicate). ``signatures(idx)`` returns the (len(idx), num_perm) signature rows of
    the documents ``idx`` (so they may live on disk)."""
    n = len(keys)
    pairs = candidate_pairs(keys, alive)
    verified = np.zeros(len(pairs), dtype=bool)
    for s in range(0, len(pairs), 65536):                 # verify in slices: bounded memory
        p = pairs[s:s + 65536]
        sim = np.mean(signatures(p[:, 0]) == signatures(p[:, 1]), axis=1)
        verified[s:s + 65536] = sim >= threshold
    parent = np.arange(n)
    for a, b in pairs[verified]:
        ra, rb = _find(parent, int(a)), _find(parent, int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)              # the root is the cluster's first
    roots = np.array([_find(parent, i) for i in np.unique(pairs[verified])], dtype=np.int64)
    dup_of = np.full(n, -1, dtype=np.int64)
    members = np.unique(pairs[verified])
    dup_of[members] = np.where(roots == members, -1, roots)
    return dup_of, {"candidate_pairs": int(len(pairs)), "verified_pairs": int(verified.sum())}


def clusters(exact_of: np.ndarray, near_of: np.ndarray) -> dict[int, list[int]]:
    """Kept document -> every document removed as its copy (exact copies of a near duplicate
    count toward the near duplicate's cluster)."""
    out: dict[int, list[int]] = {}
    for i in np.flatnonzero((exact_of >= 0) | (near_of >= 0)):
        root = int(exact_of[i]) if exact_of[i] >= 0 else int(i)
        root = int(near_of[root]) if near_of[root] >= 0 else root
        out.setdefault(root, []).append(int(i))
    return out
