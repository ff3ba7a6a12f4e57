"""ZeRO stage 1: data parallelism with the optimizer state sharded across the ranks.

Plain data parallelism keeps a full copy of everything on every rank. With AdamW in float32 that
is, per parameter, 4 bytes of weight, 4 of gradient and 8 of moments (m and v): half of the
memory is optimizer state, and every rank computes the very same update from it. ZeRO-1
(Rajbhandari et al., 2020) cuts that redundancy: think of all master parameters as one flat
vector, cut it into ``dp`` contiguous shards, and let rank r own shard r:

    backward        every rank, its own slice of the batch, full local gradients (as before)
    reduce-scatter  rank r receives the gradient of shard r summed over the ranks (/ dp: averaged)
                    -- half the traffic of an all-reduce, and nobody gets what it would not use
    clip            the global norm: each rank's sum of squares over its shard, summed over ranks
    AdamW           rank r updates shard r only, with moments for shard r only (1/dp of them)
    all-gather      every rank receives every updated shard: all hold the full model again

Reduce-scatter + all-gather move the same bytes as one all-reduce (which is exactly a
reduce-scatter followed by an all-gather), so the memory is saved at no extra communication.

Two objects do it. ``ZeroSync`` is the engine's gradient sync (``grad_sync.py``) in place of
``DataParallel``: after the last backward it reduce-scatters the gradients (zeros outside this
rank's shard, so gradient clipping and the 16-bit inf/nan check work unchanged; the norm and the
overflow decision are then combined over the ranks), and it builds the optimizer that fits it,
``ZeroAdamW``: AdamW over this rank's slices of the
parameters (``ParamSlice``: a flat view of one parameter, cut where shards start and end), so
the update is AdamW's own code, bias correction and all; weight decay follows the parameter a
slice comes from (>= 2-D). Its ``state_dict`` gathers the shards to rank 0 in exactly the serial
format (full ``m`` and ``v`` per parameter name) and ``load_state_dict`` takes this rank's slice of
one, so checkpoints move freely between serial, plain dp and ZeRO runs.

Here the gradient is reduce-scattered in one message after backward; ZeRO-2 (``zero2.py``) does
it bucket by bucket during backward and keeps only the shard. ``ShardedAdamW`` (below) is the
optimizer of every stage: AdamW over a rank's pieces of sharded groups, checkpoints in the serial
format; ``ZeroAdamW`` is it for ZeRO-1's single group of full master weights.
"""
from __future__ import annotations

import time
from collections.abc import Mapping

from minillm.backend import xp
from minillm.distributed.grad_sync import GradSync
from minillm.distributed.shard import (ShardGroup, ShardLayout,  # noqa: F401
                                       broadcast_params, flatten_params_, gather_to_root, piece_of)
from minillm.errors import UserError
from minillm.optim.adamw import AdamW
from minillm.optim.optimizer import named_parameters

_STATE_TAG = 7100  # the moments' shards travelling to rank 0 for a checkpoint


def optimizer_state_nbytes(optimizer) -> int:
    """Bytes of optimizer state (AdamW moments, SGD momentum) this process holds."""
    return sum(int(a.nbytes) for st in optimizer.state.values() for a in st.values())


# ---------------------------------------------------------------- gradients ---------------------
class ShardedGrads(GradSync):
    """What every ZeRO stage answers alike: each rank holds the gradients of its own shard."""

    def agree(self, found_inf: bool) -> bool:
        """An inf/nan lands only in the shard of the rank that owns it, but every rank must take
        the same decision (skip the step, or step and all-gather): an all-reduce max of the flag."""
        return self.comm.allreduce_scalar(float(found_inf), "max") > 0

    def grad_sq_reduce(self, sq: float) -> float:
        """Each rank holds the gradient of its own shard (zeros elsewhere): the squares add up."""
        return self.comm.allreduce_scalar(sq, "sum")


class ZeroSync(ShardedGrads):
    """The gradient sync of ZeRO-1: ``ZeroSync(named_params, comm)``.

    Backward runs as in a serial run, accumulating each rank's local gradients; then
    ``finish_gradient_sync()`` reduce-scatters them in one float32 buffer (MPI cannot add
    bfloat16), so that afterwards every ``param.grad`` is a view into that buffer holding the
    averaged gradient on this rank's shard and zeros elsewhere.
    """

    def __init__(self, named_params, comm):
        self.comm = comm
        self.named = list(named_params)
        self.layout = ShardLayout([p.data.size for _, p in self.named], comm.size)
        self.lo, self.hi = self.layout.shard(comm.rank)
        broadcast_params(self.named, comm)  # everybody starts from rank 0's weights, as with DataParallel
        self.flat = xp.zeros(self.layout.total, dtype=xp.float32)
        self.views = [self.flat[a:b].reshape(p.shape) for (_, p), a, b in
                      zip(self.named, self.layout.offsets, self.layout.offsets[1:])]
        self.last_wait_s = 0.0
        self.total_wait_s = 0.0

    def finish_gradient_sync(self):
        for (_, p), view in zip(self.named, self.views):
            if p.grad is None:  # no gradient on this rank (parameter unused): contribute zeros
                view[...] = 0.0
            else:
                view[...] = p.grad
        t0 = time.perf_counter()
        shard = self.comm.reduce_scatter_(self.flat, self.layout.counts)
        self.last_wait_s = time.perf_counter() - t0
        self.total_wait_s += self.last_wait_s
        shard /= self.comm.size
        # Outside the shard the buffer still holds this rank's own gradients: zero them, so the
        # norm and inf checks over all gradients see exactly this rank's share of the truth.
        self.flat[:self.lo] = 0.0
        self.flat[self.hi:] = 0.0
        for (_, p), view in zip(self.named, self.views):
            p.grad = view

    def make_optimizer(self, train_cfg, params):
        """AdamW over this rank's shard (the config rejects zero with SGD)."""
        t = train_cfg
        return ZeroAdamW(params, self.comm, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                         weight_decay=t.weight_decay)


# ---------------------------------------------------------------- the optimizer -----------------
class ParamSlice:
    """What AdamW sees of one parameter on one rank: a flat slice of its weight and gradient.

    ``data`` is a view into the parameter (updating it updates the weight); ``grad`` is read from
    the parameter at step time. ``decay`` says whether the whole parameter is weight-decayed.
    """

    def __init__(self, param, start: int, stop: int):
        self.param, self.start, self.stop = param, start, stop
        self.decay = param.data.ndim >= 2
        self.data = param.data.reshape(-1)[start:stop]

    @property
    def grad(self):
        g = self.param.grad
        return None if g is None else g.reshape(-1)[self.start:self.stop]


class ShardedAdamW(AdamW):
    """AdamW over this rank's pieces of sharded parameter groups (``shard.py``).

    ``ShardedAdamW(pieces, groups, comm, lr, betas, eps, weight_decay, order=None,
    after_step=None)``: ``pieces`` are the (name, parameter) pairs of every group's pieces in
    order (``ShardGroup.piece_names``), each a flat slice with ``.data`` and ``.grad``. The update
    is AdamW's own code; weight decay follows the parameter a piece comes from (>= 2-D). The
    moments of each group's shard live in one flat array (``m[g]``, ``v[g]``; each piece's state
    is a view), so a checkpoint sends one message per group. ``after_step()`` runs after every
    step (ZeRO-1 and ZeRO-2: all-gather the updated shards). ``state_dict`` / ``load_state_dict``
    are collective and use the serial AdamW format (full ``m``, ``v`` per parameter name, in
    ``order``), so checkpoints move freely between serial, data-parallel and every ZeRO stage.
    """

    def __init__(self, pieces, groups, comm, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, order=None, after_step=None):
        if not pieces:
            total = sum(g.layout.total for g in groups)
            raise UserError(f"the model has {total} parameters, too few to shard over "
                            f"{comm.size} ranks; use parallel.zero=0")
        super().__init__(pieces, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        expected = [n for g in groups for n in g.piece_names()]
        if self.names != expected:
            raise ValueError("ShardedAdamW: pieces must come group by group in shard order")
        self.comm, self.groups, self._after_step = comm, list(groups), after_step
        self.order = list(order) if order is not None else [n for g in groups for n in g.names]
        self._decay = [d for g in groups for d in g.decays()]  # a 1-D slice of a matrix is still decayed
        dtype = self.params[0].data.dtype
        self.m = [xp.zeros(g.count, dtype=dtype) for g in groups]
        self.v = [xp.zeros(g.count, dtype=dtype) for g in groups]
        self.owners = []  # (parameter name, start, stop) of each piece
        for g, m, v in zip(self.groups, self.m, self.v):
            for (i, a, b, o), name in zip(g.slices, g.piece_names()):
                self.state[name] = {"m": m[o:o + b - a], "v": v[o:o + b - a]}
                self.owners.append((g.names[i], a, b))
        self.last_wait_s = 0.0

    def _buffers_for(self, p):
        return ()  # allocate nothing here: __init__ makes the moments views into self.m and self.v

    def step(self, lr=None):
        super().step(lr)  # AdamW on this rank's pieces: its shard of the master weights moves
        t0 = time.perf_counter()
        if self._after_step is not None:
            self._after_step()
        self.last_wait_s = time.perf_counter() - t0

    # ---- checkpoints: the serial format ------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"step", <hyperparameters>, "state": {name: {"m", "v"}}}`` with full arrays per
        parameter name, as ``AdamW.state_dict`` of a serial run, on rank 0. Every rank must call
        it; the others get an empty ``"state"``."""
        d = {"step": self.step_count, **{k: getattr(self, k) for k in self.hyperparameters}}
        full = {k: gather_to_root(self.comm, self.groups, getattr(self, k), _STATE_TAG) for k in ("m", "v")}
        d["state"] = {}
        if self.comm.rank == 0:
            d["state"] = {name: {k: full[k][name] for k in ("m", "v")} for name in self.order}
        return d

    def load_state_dict(self, d: Mapping):
        """Take this rank's pieces of a full (serial-format) AdamW state dict; any mismatch of
        names or shapes is one UserError before anything changes."""
        owner = type(self).__name__
        missing_keys = [k for k in ("step", "state", *self.hyperparameters) if k not in d]
        if missing_keys:
            raise UserError(f"{owner} state dict lacks {missing_keys}; was it saved by AdamW?")
        saved, problems = d["state"], []
        shapes = {n: s for g in self.groups for n, s in zip(g.names, g.shapes)}
        missing = [n for n in self.order if n not in saved]
        unexpected = [n for n in saved if n not in shapes]
        if missing:
            problems.append(f"missing parameters {missing[:6]}")
        if unexpected:
            problems.append(f"unexpected parameters {unexpected[:6]}")
        for name in self.order:
            got = saved.get(name)
            if got is None:
                continue
            if set(got) != {"m", "v"}:
                problems.append(f"{name!r} has buffers {sorted(got)}, AdamW expects ['m', 'v']")
            elif any(tuple(got[k].shape) != shapes[name] for k in ("m", "v")):
                problems.append(f"{name!r} moments have shape {tuple(got['m'].shape)}, expected {shapes[name]}")
        if problems:
            raise UserError(f"cannot load {owner} state: {'; '.join(problems[:6])}")
        self._configure(**{k: d[k] for k in self.hyperparameters})
        self.step_count = int(d["step"])
        for name, (param, a, b) in zip(self.names, self.owners):
            for k in ("m", "v"):
                st = self.state[name][k]
                st[...] = piece_of(saved[param][k], a, b, st.dtype)


class ZeroAdamW(ShardedAdamW):
    """``ZeroAdamW(params, comm, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)``:
    ZeRO-1's optimizer.

    AdamW over this rank's shard of ``params`` (the float32 master weights, all ranks passing
    the same names and shapes). On construction the master weights move into one flat buffer
    (each ``p.data`` a view into it, one group); ``step`` updates this rank's shard, then
    all-gathers the buffer, so afterwards every rank holds the whole updated model.
    """

    def __init__(self, params, comm, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.master_names, self.masters = named_parameters(params, "ZeroAdamW")
        group = ShardGroup(self.master_names, [p.shape for p in self.masters], comm.rank, comm.size)
        self.layout = group.layout
        self.flat = flatten_params_(self.masters)
        pieces = [(name, ParamSlice(self.masters[i], a, b))
                  for (i, a, b, _), name in zip(group.slices, group.piece_names())]
        super().__init__(pieces, [group], comm, lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, after_step=self._allgather)

    def _allgather(self):
        self.comm.allgather_(self.flat, self.layout.counts)  # ... and everybody gets every shard

    def zero_grad(self):
        for p in self.masters:
            p.grad = None
