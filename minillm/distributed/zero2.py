"""ZeRO stage 2: gradients (and master weights) sharded too, reduce-scattered during backward.

ZeRO-1 still lets every rank build the full gradient and reduce-scatters it after backward.
ZeRO-2 (Rajbhandari et al., 2020) never keeps it: gradients are grouped into the same buckets as
data parallelism's all-reduce (``data_parallel.bucket_groups``: last layers first, ~``bucket_mb``
each), and as soon as a bucket's gradients are complete its non-blocking reduce-scatter starts
while backward computes earlier layers; the bucket's full gradients are dropped at once and rank
r keeps only the summed gradient of its shard of the bucket (``sharded_grads.py``). Per rank,
with AdamW and float32 (P parameters, N ranks):

    plain dp     4P weights + 4P gradients + 8P moments             = 16P bytes
    ZeRO-1       4P weights + 4P gradients + 8P/N moments
    ZeRO-2       4P weights + 4P/N gradients + 8P/N moments (+ a couple of buckets in flight)

Every rank still holds all the weights, which the next forward needs: each bucket's weights are
one flat array (each parameter a view into it), and after the optimizer stepped this rank's
pieces, one all-gather per bucket hands everybody every updated shard (``_publish``). In 16-bit
training the float32 master weights are sharded as well (the precision object is built over
this rank's pieces), and ``_publish`` rounds them into the 16-bit weights before the gather.
"""
from __future__ import annotations

from minillm.amp.dtypes import compute_dtype
from minillm.distributed.comm import wait_all
from minillm.distributed.data_parallel import bucket_groups
from minillm.backend import xp
from minillm.distributed.shard import broadcast_params, flatten_params_
from minillm.distributed.sharded_grads import ShardedSync, grad_dtype_of, make_groups, piece_values


class Zero2Sync(ShardedSync):
    """``Zero2Sync(named_params, comm, bucket_mb=25.0, dtype="float32")``: the gradient sync of
    ZeRO-2 over the data-parallel group ``comm``; ``dtype`` is ``train.dtype`` (the weights are
    kept in the dtype the model computes in). Collective: the replicas start from rank 0's
    weights."""

    def __init__(self, named_params, comm, bucket_mb: float = 25.0, dtype: str = "float32"):
        named = list(named_params)
        self.comm, self._serial = comm, [n for n, _ in named]
        broadcast_params(named, comm)
        cdt = compute_dtype(dtype)
        buckets = bucket_groups(named, bucket_mb)
        self.groups = make_groups(buckets, comm)
        self.params = [[p for _, p in b] for b in buckets]
        self._views = cdt == xp.float32  # float32: the pieces are views into the weights themselves
        pieces = None if self._views else piece_values(self.groups, self.params)
        for ps in self.params:
            for p in ps:
                p.data = p.data.astype(cdt, copy=False)
        self.flats = [flatten_params_(ps) for ps in self.params]  # each bucket's weights, whole
        if self._views:
            pieces = [flat[g.lo + o:g.lo + o + b - a] for flat, g in zip(self.flats, self.groups)
                      for _, a, b, o in g.slices]
        self._setup(grad_dtype_of(cdt), pieces)

    def _publish(self):
        """Every rank's updated shard to every rank: the weights are whole again everywhere."""
        for (_, piece), master in zip(self.pieces, self._masters or ()):
            if master is not piece:  # 16-bit training: round the float32 master into the piece
                piece.data[...] = master.data
        for k, (flat, g) in enumerate(zip(self.flats, self.groups)):
            if not self._views:
                flat[g.lo:g.hi] = self._shard_of(k, flat.dtype)
        wait_all([self.comm.iallgather_(flat, g.layout.counts) for flat, g in zip(self.flats, self.groups)])
