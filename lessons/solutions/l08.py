"""Reference solutions, lesson 08."""
import numpy as np

from minillm.distributed.ring import chunk_bounds


def ring_reduce_scatter(comm, a):
    p, r = comm.size, comm.rank
    bounds = chunk_bounds(a.size, p)

    def chunk(i):
        i %= p
        return a[bounds[i]:bounds[i + 1]]

    for s in range(p - 1):
        # send the chunk that already holds s + 1 contributions, receive the one to add ours to;
        # after p - 1 steps the chunk that arrived last, r - (p - 1) - 1 + p = r, is complete
        mine = chunk(r - s - 2)
        incoming = np.empty_like(mine)
        comm.sendrecv(chunk(r - s - 1), (r + 1) % p, incoming, (r - 1) % p)
        mine += incoming
    return a


def bucket_split(sizes, cap_bytes):
    buckets, current, used = [], [], 0
    for name, nbytes in reversed(sizes):
        if current and used + nbytes > cap_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        buckets.append(current)
    return buckets


def zero_shard(sizes, p, rank):
    starts = np.cumsum([0, *sizes])
    lo, hi = chunk_bounds(int(starts[-1]), p)[rank:rank + 2]
    out = []
    for i, n in enumerate(sizes):
        a, b = max(starts[i], lo), min(starts[i] + n, hi)
        if a < b:
            out.append((i, int(a - starts[i]), int(b - starts[i])))
    return out
