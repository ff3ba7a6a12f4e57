"""Context parallelism: causal attention over a sequence split across ranks (ring attention).

Sequence parallelism (``sequence_parallel.py``) splits the norms and dropout along T but gathers
the whole sequence for attention, whose (T, T) scores are the activation that grows fastest with
the context. Ring attention (Liu et al., 2023) never gathers it: rank r keeps the queries, keys
and values of its block r of T/p consecutive positions, and the key/value blocks travel around
the ring of ranks. After p - 1 hops every rank has seen every block; it attends to the ones at or
before its own (causality: a later block is skipped, the diagonal block is masked) and merges the
partial results with the *online softmax* of flash attention: with a running row maximum m, a
running sum l and an unnormalised output o,

    m' = max(m, max_j s_j)     l' = l e^(m - m') + sum_j e^(s_j - m')     o' = o e^(m - m') + sum_j e^(s_j - m') v_j

and out = o / l at the end. Backward uses the saved log-sum-exp (m + log l) to rebuild each
block's probabilities, and sends each key/value block around the ring once more together with
the gradient it has collected, so that after p hops it arrives home with every query's part.

``ring_attention(q, k, v, comm)`` equals ``F.scaled_dot_product_attention`` on the whole sequence,
forward and backward (tested on 2 and 4 ranks). It is not wired into the GPT or the trainer (there
is no ``parallel.cp``): it is the building block. A simplification against production ring
attention: blocks are contiguous, so with the causal mask rank 0 has 1 block of work and rank
p - 1 has p (a "zigzag" assignment of two blocks per rank balances it), and the hops are not
overlapped with the block computations.
"""
from __future__ import annotations

import math

from minillm.autograd.function import Function
from minillm.backend import xp


def _hop(comm, buf):
    """Send ``buf`` to the next rank of the ring, receive the previous rank's."""
    out = xp.empty_like(buf)
    return comm.sendrecv(buf, (comm.rank + 1) % comm.size, out, (comm.rank - 1) % comm.size)


def _scores(q, k, diagonal):
    """Scaled scores (B, nh, Tq, Tk) of q against one key block; the diagonal block is causal."""
    s = xp.matmul(q, k.swapaxes(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if diagonal:
        T = q.shape[-2]
        s = s + xp.where(xp.arange(T)[None, :] > xp.arange(T)[:, None], -xp.inf, 0.0).astype(s.dtype)
    return s


class RingAttention(Function):
    """Causal attention of this rank's queries (B, nh, T/p, hs) over the whole sequence, whose key
    and value blocks are passed around the ring of ``comm`` (block r on rank r)."""

    @staticmethod
    def forward(ctx, q, k, v, comm=None):
        p, r = comm.size, comm.rank
        m = xp.full(q.shape[:-1], -xp.inf, dtype=q.dtype)                    # (B, nh, Tl)
        l = xp.zeros(q.shape[:-1], dtype=q.dtype)
        o = xp.zeros_like(q)                                                  # (B, nh, Tl, hs)
        kv = xp.stack([k, v])                                                 # (2, B, nh, Tl, hs)
        for s in range(p):
            j = (r - s) % p                                                   # the block held now
            if j <= r:                                                        # later blocks: masked
                sc = _scores(q, kv[0], j == r)                                # (B, nh, Tl, Tl)
                m_new = xp.maximum(m, sc.max(axis=-1))
                scale = xp.exp(m - m_new)
                e = xp.exp(sc - m_new[..., None])
                l = l * scale + e.sum(axis=-1)
                o = o * scale[..., None] + xp.matmul(e, kv[1])
                m = m_new
            if s < p - 1:
                kv = _hop(comm, kv)
        out = o / l[..., None]
        ctx.save_for_backward(q, k, v, out, m + xp.log(l))
        ctx.comm = comm
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, lse = ctx.saved_tensors
        comm = ctx.comm
        p, r = comm.size, comm.rank
        c = 1.0 / math.sqrt(q.shape[-1])
        delta = (g * out).sum(axis=-1)                                        # (B, nh, Tl)
        dq = xp.zeros_like(q)
        travel = xp.stack([k, v, xp.zeros_like(k), xp.zeros_like(v)])         # k, v, dk, dv
        for s in range(p):
            j = (r - s) % p
            if j <= r:
                kj, vj = travel[0], travel[1]
                prob = xp.exp(_scores(q, kj, j == r) - lse[..., None])        # (B, nh, Tl, Tl)
                travel[3] += xp.matmul(prob.swapaxes(-1, -2), g)              # dv_j
                ds = prob * (xp.matmul(g, vj.swapaxes(-1, -2)) - delta[..., None])
                dq += xp.matmul(ds, kj) * c
                travel[2] += xp.matmul(ds.swapaxes(-1, -2), q) * c            # dk_j
            travel = _hop(comm, travel)                                       # p hops: home again
        return dq, travel[2], travel[3]


def ring_attention(q, k, v, comm):
    """Causal attention for this rank's block of positions; see the module docstring."""
    return RingAttention.apply(q, k, v, comm=comm)
