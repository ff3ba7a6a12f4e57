"""ZeRO stage 3 (FSDP-style): the weights are sharded too, gathered block by block when needed.

After ZeRO-2 each rank still holds every weight. ZeRO-3 (Rajbhandari et al., 2020; PyTorch's
FSDP) keeps only a shard of them, so per rank every kind of state is 1/N of the whole (P
parameters, N ranks, AdamW, float32: 16P/N bytes). The price is communication: a block's weights
must be put together before it computes, twice per step.

The units are the Transformer blocks, plus a root unit (embeddings, final norm, output head).
Each rank keeps its shard of every unit as its pieces (the precision object and the optimizer
work on them, as in ZeRO-2), and the model's Parameters hold no memory (a zero-stride view of
the right shape) except while their unit is gathered::

    forward of block i     all-gather block i's weights (usually already in flight), start the
                           gather of block i+1 (prefetch: it travels while block i computes),
                           compute, free block i's weights
    backward of block i    when the gradient reaches block i's output (an identity Function,
                           ``GatherForBackward``), gather block i again and prefetch block i-1;
                           once all its gradients are complete, reduce-scatter them (as ZeRO-2)
                           and free the weights
    root                   gathered before the model's forward, freed after its gradients left

A block's graph would normally keep its weight arrays alive until backward (Linear saves W). So
its forward runs inside ``saved_tensors_hooks`` that save the block's weights by reference
(``_ParamRef``) and read back whatever the parameter holds at backward time: the re-gathered
weights. Activation recomputation composes: with ``train.recompute="full"`` the replay simply
runs after the re-gather. The wrappers are put on with ``Module.wrap_forward``: the model's code
does not change. Not supported: pipeline parallelism (``parallel.pp > 1``).
"""
from __future__ import annotations

import functools
import time

from minillm.amp.dtypes import compute_dtype
from minillm.autograd.function import Function, saved_tensors_hooks
from minillm.autograd.tensor import is_grad_enabled
from minillm.backend import xp
from minillm.distributed.shard import broadcast_params
from minillm.distributed.sharded_grads import ShardedSync, grad_dtype_of, make_groups, piece_values


class GatherForBackward(Function):
    """Identity in forward; in backward calls ``gather()`` before the gradient flows on into
    the block that produced ``x`` (so its weights are back before its backward runs)."""

    @staticmethod
    def forward(ctx, x, gather):
        ctx.gather = gather
        return x

    @staticmethod
    def backward(ctx, g):
        ctx.gather()
        return g


class _ParamRef:
    """A saved array that is a parameter's weights, kept as 'whatever the parameter holds'."""

    __slots__ = ("param",)

    def __init__(self, param):
        self.param = param


def _unpack(saved):
    return saved.param.data if isinstance(saved, _ParamRef) else saved


def _empty_like(p):
    """No memory, the parameter's shape and dtype (read-only zeros with NumPy)."""
    return xp.broadcast_to(xp.zeros((), dtype=p.data.dtype), p.data.shape)


class Zero3Sync(ShardedSync):
    """``Zero3Sync(model, named_params, comm, dtype="float32")``: shards ``model``'s weights
    over the data-parallel group ``comm`` and wraps its blocks (see the module docstring).
    Collective: the replicas start from rank 0's weights."""

    def __init__(self, model, named_params, comm, dtype: str = "float32"):
        named = list(named_params)
        self.comm, self._serial = comm, [n for n, _ in named]
        broadcast_params(named, comm)
        cdt = compute_dtype(dtype)
        n_blocks = len(model.transformer.h)
        blocks = [[(n, p) for n, p in named if n.startswith(f"transformer.h.{i}.")] for i in range(n_blocks)]
        root = [(n, p) for n, p in named if not n.startswith("transformer.h.")]
        units = [*reversed(blocks), root]  # the order backward completes them: reduce-scatter order
        self.groups = make_groups(units, comm)
        self.params = [[p for _, p in u] for u in units]
        self._setup(grad_dtype_of(cdt), piece_values(self.groups, self.params))  # this rank's shards
        self._dtype = cdt
        self._full = [None] * len(units)      # a unit's gathered weights (one flat array), or None
        self._pending = [None] * len(units)   # an all-gather in flight: (request, flat array)
        for k in range(len(units)):
            self._free(k)                     # ... and nothing else of the weights
        self._unit_of_block = {i: n_blocks - 1 - i for i in range(n_blocks)}
        self._root = n_blocks
        for i, block in enumerate(model.transformer.h):
            block.wrap_forward(functools.partial(self._block_forward, i))
        model.wrap_forward(self._root_forward)

    # ------------------------------------------------------------------ gather and free
    def _start_gather(self, k):
        """Start unit k's all-gather unless its weights are here or on their way."""
        if k is None or self._full[k] is not None or self._pending[k] is not None:
            return
        g = self.groups[k]
        flat = xp.empty(g.layout.total, dtype=self._dtype)
        for (_, a, b, o), (_, piece) in zip(g.slices, self._pieces_of(k)):
            flat[g.lo + o:g.lo + o + b - a] = piece.data  # this rank's shard in its place ...
        self._pending[k] = (self.comm.iallgather_(flat, g.layout.counts), flat)  # ... the others' around it

    def _gather(self, k):
        """Unit k's weights, whole, in its Parameters (waiting for the gather if needed)."""
        self._start_gather(k)
        if self._pending[k] is None:
            return
        request, flat = self._pending[k]
        t0 = time.perf_counter()
        request.wait()
        self._wait += time.perf_counter() - t0  # counted in the step's communication wait
        self._pending[k], self._full[k] = None, flat
        g = self.groups[k]
        for p, a, b in zip(self.params[k], g.layout.offsets, g.layout.offsets[1:]):
            p.data = flat[a:b].reshape(p.shape)

    def _free(self, k):
        if self._pending[k] is not None:  # MPI may still write into it: finish first
            self._gather(k)
        self._full[k] = None
        for p in self.params[k]:
            p.data = _empty_like(p)

    def _after_launch(self, k):
        self._free(k)  # its gradients have left: the weights are not needed again this step

    def _poke(self):
        super()._poke()
        for pending in self._pending:
            if pending is not None:
                pending[0].test()

    # ------------------------------------------------------------------ the wrappers
    def _block_forward(self, i, forward, x, *args, **kwargs):
        k = self._unit_of_block[i]
        self._gather(k)
        self._start_gather(self._unit_of_block.get(i + 1))  # prefetch: it travels while i computes
        if not is_grad_enabled():
            out = forward(x, *args, **kwargs)
            self._free(k)
            return out
        refs = {id(p.data): p for p in self.params[k]}
        with saved_tensors_hooks(lambda a: _ParamRef(refs[id(a)]) if id(a) in refs else a, _unpack):
            out = forward(x, *args, **kwargs)
        self._free(k)
        return GatherForBackward.apply(out, gather=functools.partial(self._before_backward, i))

    def _before_backward(self, i):
        self._gather(self._unit_of_block[i])
        self._start_gather(self._unit_of_block.get(i - 1))
        self._poke()

    def _root_forward(self, forward, *args, **kwargs):
        self._gather(self._root)
        self._start_gather(self._unit_of_block.get(0))
        out = forward(*args, **kwargs)
        if not is_grad_enabled():
            self._free(self._root)
        return out  # training: the root stays gathered until its gradients leave (end of backward)
