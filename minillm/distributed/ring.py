"""Ring all-reduce, written out by hand on top of ``Comm.sendrecv``.

This is the algorithm behind NCCL and most MPI libraries for large messages. The p ranks stand
in a ring; each only ever talks to its two neighbours. The flat array is cut into p chunks.

1. Reduce-scatter (p-1 steps): every step each rank passes one chunk to its right neighbour and
   adds the chunk arriving from its left neighbour into its own copy. A chunk travels around the
   ring collecting one contribution per hop; after p-1 hops rank r holds chunk r+1 fully reduced.
2. All-gather (p-1 steps): the finished chunks travel around the ring once more, each rank
   overwriting its stale copy, until everybody has every finished chunk.

Every rank sends 2(p-1) messages of n/p elements: 2(p-1)/p * n in total, nearly independent of
p. That is why the ring is bandwidth-optimal, and also why it pays 2(p-1) latencies.

Example, p = 3, chunks a|b|c, rank r's values written a_r (Σ = reduced over all ranks):

    reduce-scatter   rank 0         rank 1         rank 2
    start            a0  b0  c0     a1  b1  c1     a2  b2  c2
    step 0 sends     a0 → r1        b1 → r2        c2 → r0
    after            a0  b0 c02     a01 b1  c1     a2 b12  c2
    step 1 sends     c02 → r1       a01 → r2       b12 → r0
    after            a0 Σb  c02     a01 b1 Σc      Σa b12  c2
    all-gather       rank r now owns chunk r+1; two more steps pass the Σ chunks around.
"""
from __future__ import annotations

from minillm.backend import xp

RING_TAG = 7000  # ring messages use their own tags so they never match unrelated traffic

_REDUCE = {"sum": "add", "max": "maximum", "min": "minimum", "prod": "multiply"}


def chunk_bounds(n: int, p: int) -> list[int]:
    """Boundaries of p nearly equal chunks of n elements: chunk i is [b[i], b[i+1]).

    Sizes differ by at most one; when n < p some chunks are empty, which the ring handles
    like any other (a zero-length message)."""
    return [i * n // p for i in range(p + 1)]


def ring_allreduce_(comm, a, op: str = "sum"):
    """All-reduce ``a`` in place across ``comm`` with the ring algorithm; returns ``a``.

    Gives MPI's allreduce up to floating-point rounding (the additions happen in another order).
    """
    if op not in _REDUCE:
        raise ValueError(f"unknown reduction op {op!r}; expected one of {tuple(_REDUCE)}")
    p, r = comm.size, comm.rank
    if p == 1 or a.size == 0:
        return a
    if not a.flags.c_contiguous:
        raise ValueError("ring_allreduce_ needs a C-contiguous array")
    flat = a.reshape(-1)  # a view: writing into flat writes into a
    bounds = chunk_bounds(flat.size, p)
    reduce = getattr(xp, _REDUCE[op])
    right, left = (r + 1) % p, (r - 1) % p

    def chunk(i):
        i %= p
        return flat[bounds[i]:bounds[i + 1]]

    largest = max(bounds[i + 1] - bounds[i] for i in range(p))
    incoming = xp.empty(largest, dtype=flat.dtype)  # landing buffer for the chunk being reduced

    # Reduce-scatter. Step s: send chunk r-s (which already holds s+1 contributions) to the right,
    # receive chunk r-s-1 from the left and fold our own contribution into it.
    for s in range(p - 1):
        mine = chunk(r - s - 1)
        buf = incoming[:mine.size]
        comm.sendrecv(chunk(r - s), right, buf, left, sendtag=RING_TAG + s)
        reduce(mine, buf, out=mine)

    # Rank r now holds the fully reduced chunk r+1 (r-(p-2)-1 = r+1 mod p).
    # All-gather. Step s: pass on the finished chunk r+1-s, receive finished chunk r-s in place.
    for s in range(p - 1):
        comm.sendrecv(chunk(r + 1 - s), right, chunk(r - s), left, sendtag=RING_TAG + p + s)
    return a
