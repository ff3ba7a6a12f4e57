"""Sharding: some parameters seen as one flat vector, cut into one contiguous piece per rank.

Every ZeRO stage rests on this picture. Take a group of parameters (all of them for ZeRO-1, a
gradient bucket for ZeRO-2, one Transformer block for ZeRO-3), lay them end to end as one flat
vector, and cut it into ``dp`` nearly equal contiguous shards; rank r owns shard r::

    group  | a.weight (35) | a.bias (7) | b.weight (33) | ...      112 numbers, 3 ranks
    shards | rank 0: [0, 37)      | rank 1: [37, 74)   | rank 2: [74, 112)

A parameter may straddle a cut; each owner then holds its part. What a rank holds of a group is
a list of *pieces*: flat slices of parameters (``ShardLayout.slices``), named
``name[start:stop]``. The optimizer steps pieces; reduce-scatter delivers each rank the summed
gradient of its shard and all-gather delivers everybody every shard, both as one message per
group (``Comm.reduce_scatter_`` / ``allgather_`` and their non-blocking forms).

Checkpoints stay in the serial format (full tensors by name): ``gather_to_root`` sends every
rank's shard of a group to rank 0, which cuts the flat vector back into parameters, and
``piece_of`` takes a rank's piece out of a full tensor when loading.
"""
from __future__ import annotations

import math

import numpy

from minillm import backend
from minillm.backend import xp
from minillm.distributed.ring import chunk_bounds


class ShardLayout:
    """Where each parameter sits in the flat vector of all parameters, and who owns what.

    ``ShardLayout(sizes, nranks)``: ``sizes`` are the parameters' element counts in order.
    Shard r is ``[bounds[r], bounds[r + 1])``: ``nranks`` nearly equal contiguous pieces; a
    parameter may straddle a boundary, and then each owner gets its part.
    """

    def __init__(self, sizes, nranks: int):
        self.sizes = [int(n) for n in sizes]
        self.offsets = numpy.cumsum([0, *self.sizes]).tolist()  # parameter i is [offsets[i], offsets[i+1])
        self.total = self.offsets[-1]
        self.bounds = chunk_bounds(self.total, nranks)
        self.counts = [b - a for a, b in zip(self.bounds, self.bounds[1:])]

    def shard(self, rank: int) -> tuple[int, int]:
        return self.bounds[rank], self.bounds[rank + 1]

    def slices(self, rank: int) -> list[tuple[int, int, int, int]]:
        """Rank's parts of the parameters: ``(param index, start, stop, offset in the shard)``,
        ``start:stop`` indexing the flattened parameter."""
        lo, hi = self.shard(rank)
        out = []
        for i, (a, b) in enumerate(zip(self.offsets, self.offsets[1:])):
            start, stop = max(a, lo), min(b, hi)
            if start < stop:
                out.append((i, start - a, stop - a, start - lo))
        return out


class ShardGroup:
    """One group of parameters sharded over ``nranks``: ``ShardGroup(names, shapes, rank, nranks)``.

    ``layout`` places them in the flat vector; ``slices`` are this rank's pieces
    ``(param index, start, stop, offset in the shard)``; ``count`` is its shard's length.
    """

    def __init__(self, names, shapes, rank: int, nranks: int):
        self.names, self.shapes = list(names), [tuple(s) for s in shapes]
        self.layout = ShardLayout([math.prod(s) for s in self.shapes], nranks)
        self.lo, self.hi = self.layout.shard(rank)
        self.count = self.hi - self.lo
        self.slices = self.layout.slices(rank)

    def piece_names(self) -> list[str]:
        return [f"{self.names[i]}[{a}:{b}]" for i, a, b, _ in self.slices]

    def decays(self) -> list[bool]:
        """Weight decay of each piece: that of the parameter it comes from (matrices, ndim >= 2)."""
        return [len(self.shapes[i]) >= 2 for i, _, _, _ in self.slices]


def piece_of(full, start: int, stop: int, dtype):
    """This rank's piece ``[start:stop]`` of a full (host or device) tensor, on the device."""
    return backend.asarray(full.reshape(-1)[start:stop], dtype=dtype)  # slice on the host, then copy


def gather_to_root(comm, groups, shards, tag: int) -> dict:
    """Full tensors by name on rank 0 ({} elsewhere) from every rank's shard of each group.

    ``shards[g]``: this rank's part (``groups[g].count`` elements) of group g's flat vector.
    Collective over ``comm``: every rank calls it with the same groups.
    """
    if comm.rank != 0:
        for shard in shards:
            comm.send(xp.ascontiguousarray(shard), 0, tag)
        return {}
    out = {}
    for g, shard in zip(groups, shards):
        full = xp.empty(g.layout.total, dtype=shard.dtype)
        for r in range(comm.size):
            lo, hi = g.layout.shard(r)
            if r == 0:
                full[lo:hi] = shard
            else:
                comm.recv(full[lo:hi], r, tag)
        for name, shape, a, b in zip(g.names, g.shapes, g.layout.offsets, g.layout.offsets[1:]):
            out[name] = full[a:b].reshape(shape)
    return out


def concat_pieces(group, arrays, dtype):
    """This rank's shard of ``group`` as one flat array, from its pieces' arrays (in order)."""
    out = xp.empty(group.count, dtype=dtype)
    for (_, a, b, o), arr in zip(group.slices, arrays):
        out[o:o + b - a] = arr.reshape(-1)
    return out


def broadcast_params(named, comm, root: int = 0) -> None:
    """Every rank's parameters become rank ``root``'s (in place): replicas start equal."""
    for _, p in named:
        if not p.data.flags.c_contiguous:
            p.data = xp.ascontiguousarray(p.data)
        comm.bcast_(p.data, root=root)


def flatten_params_(params):
    """Move the parameters' arrays into one flat buffer (each ``p.data`` becomes a view into it,
    same values) and return the buffer. One collective then writes every parameter at once."""
    dtypes = {p.data.dtype for p in params}
    if len(dtypes) != 1:
        raise ValueError(f"cannot flatten parameters of several dtypes {sorted(map(str, dtypes))}")
    flat = xp.empty(sum(p.data.size for p in params), dtype=dtypes.pop())
    start = 0
    for p in params:
        n = p.data.size
        flat[start:start + n] = p.data.reshape(-1)
        p.data = flat[start:start + n].reshape(p.data.shape)
        start += n
    return flat
