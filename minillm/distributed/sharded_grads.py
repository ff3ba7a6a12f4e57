"""Sharded gradients and master weights: what ZeRO-2 and ZeRO-3 have in common.

ZeRO-1 (``zero.py``) shards only the optimizer's moments; each rank still holds every gradient
and every master weight. From stage 2 on, a rank keeps only its shard of those as well:

- Parameters are grouped (``ShardGroup``: ZeRO-2 a gradient bucket, ZeRO-3 a block) and each
  group's flat vector cut into one shard per rank (``shard.py``). What a rank keeps of a group
  is a list of *pieces*: Parameters of one dimension, views into its shard of the weights,
  named ``name[start:stop]``. ``owned()`` returns them: the precision object (fp32 masters of
  the pieces when training in 16 bits) and the optimizer (``ShardedAdamW``) are built over them.
- During backward, as soon as every gradient of a group is complete (the autograd grad-ready
  hook), the group's gradients are copied into one flat buffer and a non-blocking
  reduce-scatter starts (``Comm.ireduce_scatter``): rank r receives the sum over ranks of shard
  r, accumulated into its gradient shard, and the full gradients are dropped at once. Groups
  start strictly in order (MPI needs the same collective order on every rank), at most
  ``max_inflight`` at a time (each holds a send buffer until MPI is done with it), so the
  gradient memory is one shard plus a couple of groups, whatever the model size.
- Sharded gradients cannot pile up locally, so ``no_sync`` does not apply: with gradient
  accumulation every micro-step reduce-scatters (more messages, not more memory).
- ``finish_gradient_sync`` waits for the rest and divides by the number of ranks; every piece's
  ``.grad`` is then a view into the gradient shard. The norm, the overflow flag and checkpoints
  combine over ranks as in ZeRO-1; ``model_state`` gathers the master pieces to rank 0 as full
  tensors by name (the serial format) and ``load_model_state`` takes this rank's pieces of them.

Subclasses say where the weights live: ``Zero2Sync`` keeps every parameter whole on every rank
(``_publish`` all-gathers the updated shards after each step), ``Zero3Sync`` only its shards
(blocks gather their parameters just before they compute).
"""
from __future__ import annotations

import time

import numpy

from minillm.autograd.ops import acc_dtype
from minillm.backend import xp
from minillm.distributed.shard import ShardGroup, concat_pieces, gather_to_root, piece_of
from minillm.distributed.zero import ShardedAdamW, ShardedGrads
from minillm.nn import Parameter
from minillm.nn.module import check_state

_MASTER_TAG = 7101  # master-weight shards travelling to rank 0 for a checkpoint


class ShardedSync(ShardedGrads):
    """Base of ``Zero2Sync`` and ``Zero3Sync`` (see the module docstring).

    A subclass builds ``self.groups`` (``ShardGroup``s, in the order their reduce-scatters start)
    and ``self.params`` (each group's model Parameters), then calls ``_setup(grad_dtype,
    arrays)`` with the arrays of this rank's pieces, group by group.

    The pieces hold their values in the float32 of the initial weights until the precision object
    is built over them (its float32 masters must start from those, not from 16-bit roundings);
    a 16-bit precision object then turns them into 16-bit arrays of their own, which is why the
    subclasses copy pieces into place (``_shard_of``) rather than assume they are views.
    """

    max_inflight = 2  # groups whose reduce-scatter may be in flight at once

    def _setup(self, grad_dtype, arrays):
        names = [n for g in self.groups for n in g.piece_names()]
        self.pieces = [(name, Parameter(a)) for name, a in zip(names, arrays)]  # in group order
        self._first_piece = numpy.cumsum([0] + [len(g.slices) for g in self.groups]).tolist()
        self.grad_shards = [xp.zeros(g.count, dtype=grad_dtype) for g in self.groups]
        self._grad_dtype = grad_dtype
        self._where = {id(p): k for k, ps in enumerate(self.params) for p in ps}
        self._ready = [set() for _ in self.groups]
        self._handles = [p.register_post_accumulate_grad_hook(self._grad_ready)
                         for ps in self.params for p in ps]
        self._launched = [False] * len(self.groups)
        self._next = 0            # the next group to start: strictly in order
        self._inflight = []       # (group index, request, send buffer, receive buffer)
        self._fresh = [True] * len(self.groups)  # no gradient summed into the shard this step yet
        self._masters = None      # set by make_optimizer
        self._wait = 0.0
        self.last_wait_s = self.total_wait_s = 0.0

    # ------------------------------------------------------------------ what this rank keeps
    def owned(self, named_params=None) -> list:
        return list(self.pieces)

    @property
    def order(self) -> list[str]:
        """Parameter names in the model's (serial) order (set by the subclass: ``_serial``)."""
        return list(self._serial)

    # ------------------------------------------------------------------ during backward
    def _grad_ready(self, p):
        k = self._where[id(p)]
        if self._launched[k]:  # the next micro-step's backward has begun: finish this round first
            self._launch_all()
            self._new_round()
        self._ready[k].add(id(p))
        while self._next < len(self.groups) and len(self._ready[self._next]) == len(self.params[self._next]):
            self._launch(self._next)
        self._poke()

    def _launch(self, k):
        """Start group k's reduce-scatter: its gradients into one flat buffer (zeros where a
        parameter got none), the full gradients dropped."""
        g = self.groups[k]
        send = xp.empty(g.layout.total, dtype=self._grad_dtype)
        for p, a, b in zip(self.params[k], g.layout.offsets, g.layout.offsets[1:]):
            if p.grad is None:
                send[a:b] = 0
            else:
                send[a:b] = p.grad.reshape(-1)
                p.grad = None
        if self._fresh[k]:  # the step's first contribution lands in the shard itself
            recv, self._fresh[k] = self.grad_shards[k], False
        else:               # later micro-steps: apart, added once it has arrived (in order)
            recv = xp.empty(g.count, dtype=self._grad_dtype)
        while len(self._inflight) >= self.max_inflight:
            self._complete(self._inflight.pop(0))
        self._inflight.append((k, self.comm.ireduce_scatter(send, recv, g.layout.counts), send, recv))
        self._launched[k] = True
        self._next = k + 1
        self._after_launch(k)

    def _after_launch(self, k):
        """What a stage does once group k's gradients have left (ZeRO-3: free its weights)."""

    def _complete(self, item):
        k, request, _, recv = item
        t0 = time.perf_counter()
        request.wait()
        self._wait += time.perf_counter() - t0
        if recv is not self.grad_shards[k]:
            self.grad_shards[k] += recv  # a later micro-step: accumulate in the shard

    def _poke(self):
        """Let MPI progress in-flight reductions (most MPI libraries only move data inside calls)."""
        for _, request, _, _ in self._inflight:
            request.test()

    def _launch_all(self):
        while self._next < len(self.groups):
            self._launch(self._next)

    def _new_round(self):
        self._ready = [set() for _ in self.groups]
        self._launched = [False] * len(self.groups)
        self._next = 0

    # ------------------------------------------------------------------ after backward
    def finish_gradient_sync(self):
        """Start what backward did not, wait for everything, average: every piece's ``.grad``
        is then its part of the mean gradient over the ranks."""
        self._launch_all()
        while self._inflight:
            self._complete(self._inflight.pop(0))
        for shard in self.grad_shards:
            shard /= self.comm.size
        for (_, piece), (k, o, n) in zip(self.pieces, self._piece_slots()):
            piece.grad = self.grad_shards[k][o:o + n]
        self._new_round()
        self._fresh = [True] * len(self.groups)
        self.last_wait_s, self._wait = self._wait, 0.0
        self.total_wait_s += self.last_wait_s

    def _pieces_of(self, k):
        """Group k's (name, piece) pairs on this rank."""
        return self.pieces[self._first_piece[k]:self._first_piece[k + 1]]

    def _shard_of(self, k, dtype):
        """Group k's shard on this rank as one flat array, from its pieces' current values."""
        return concat_pieces(self.groups[k], [p.data for _, p in self._pieces_of(k)], dtype)

    def _piece_slots(self):
        return [(k, o, b - a) for k, g in enumerate(self.groups) for _, a, b, o in g.slices]

    # ------------------------------------------------------------------ optimizer, checkpoints
    def make_optimizer(self, train_cfg, params):
        """AdamW over this rank's pieces (``params``: their float32 masters, in ``owned()``
        order); the config rejects ZeRO with SGD."""
        self._masters = [p for _, p in params]
        t = train_cfg
        return ShardedAdamW(params, self.groups, self.comm, lr=t.lr, betas=(t.beta1, t.beta2),
                            eps=t.eps, weight_decay=t.weight_decay, order=self.order,
                            after_step=self._publish)

    def _publish(self):
        """After the optimizer stepped this rank's master pieces (ZeRO-2: every rank gets them)."""

    def model_state(self, master_params) -> dict:
        """Full master weights by serial name on rank 0 of the group ({} elsewhere). Collective."""
        masters = [p.data for _, p in master_params]
        shards, start = [], 0
        for g in self.groups:
            shards.append(concat_pieces(g, masters[start:start + len(g.slices)], masters[0].dtype))
            start += len(g.slices)
        full = gather_to_root(self.comm, self.groups, shards, _MASTER_TAG)
        return {name: full[name] for name in self.order} if full else {}

    def load_model_state(self, precision, state, source):
        """This rank's pieces of a full (serial-format) model state into the master weights, then
        into the model's (sharded) weights."""
        check_state({n: s for g in self.groups for n, s in zip(g.names, g.shapes)}, state, source)
        owners = [(g.names[i], a, b) for g in self.groups for i, a, b, _ in g.slices]
        for (_, master), (name, a, b) in zip(precision.master_params, owners):
            master.data[...] = piece_of(state[name], a, b, master.data.dtype)
        precision.master_to_model()
        self._masters = [p for _, p in precision.master_params]
        self._publish()


def make_groups(named_lists, comm) -> list[ShardGroup]:
    """A ``ShardGroup`` over ``comm`` for each list of (name, Parameter) pairs."""
    return [ShardGroup([n for n, _ in named], [p.shape for _, p in named], comm.rank, comm.size)
            for named in named_lists]


def grad_dtype_of(dtype):
    """Gradients are summed in float32 for 16-bit parameters (MPI cannot add bfloat16)."""
    return acc_dtype(xp.dtype(dtype))


def piece_values(groups, params):
    """Copies of this rank's pieces of every group, cut out of the full parameters ``params``
    (one list per group), as they are now (the float32 initial weights)."""
    return [ps[i].data.reshape(-1)[a:b].copy() for g, ps in zip(groups, params) for i, a, b, _ in g.slices]
