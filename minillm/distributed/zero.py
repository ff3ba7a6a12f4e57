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

A simplification against production ZeRO: the gradient is reduce-scattered in one message after
backward, not in buckets overlapped with it (``DataParallel`` shows that technique).
"""
from __future__ import annotations

import time
from collections.abc import Mapping

import numpy

from minillm import backend
from minillm.backend import xp
from minillm.distributed.grad_sync import GradSync
from minillm.distributed.ring import chunk_bounds
from minillm.errors import UserError
from minillm.optim.adamw import AdamW
from minillm.optim.optimizer import default_decay, flatten_groups

_STATE_TAG = 7100  # the moments' shards travelling to rank 0 for a checkpoint


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


def optimizer_state_nbytes(optimizer) -> int:
    """Bytes of optimizer state (AdamW moments, SGD momentum) this process holds."""
    return sum(int(a.nbytes) for st in optimizer.state.values() for a in st.values())


# ---------------------------------------------------------------- gradients ---------------------
class ZeroSync(GradSync):
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
        for _, p in self.named:  # everybody starts from rank 0's weights, as with DataParallel
            if not p.data.flags.c_contiguous:
                p.data = xp.ascontiguousarray(p.data)
            comm.bcast_(p.data, root=0)
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

    def agree(self, found_inf: bool) -> bool:
        """An inf/nan lands only in the shard of the rank that owns it, but every rank must take
        the same decision (skip the step, or step and all-gather): an all-reduce max of the flag."""
        return self.comm.allreduce_scalar(float(found_inf), "max") > 0

    def grad_sq_reduce(self, sq: float) -> float:
        """Each rank holds the gradient of its own shard (zeros elsewhere): the squares add up."""
        return self.comm.allreduce_scalar(sq, "sum")

    def make_optimizer(self, train_cfg, params):
        """AdamW over this rank's shard (the config rejects zero with SGD)."""
        t = train_cfg
        return ZeroAdamW(params, self.comm, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                         weight_decay=t.weight_decay)


# ---------------------------------------------------------------- the optimizer -----------------
class ParamSlice:
    """What AdamW sees of one parameter on one rank: a flat slice of its weight and gradient.

    ``data`` is a view into the parameter (updating it updates the weight); ``grad`` is read from
    the parameter at step time. ``decay`` says whether the whole parameter is weight-decayed
    (by default: a matrix is; see optim/groups.py).
    """

    def __init__(self, param, start: int, stop: int, decay=None):
        self.param, self.start, self.stop = param, start, stop
        self.decay = default_decay(param) if decay is None else decay
        self.data = param.data.reshape(-1)[start:stop]

    @property
    def grad(self):
        g = self.param.grad
        return None if g is None else g.reshape(-1)[self.start:self.stop]


class ZeroAdamW(AdamW):
    """``ZeroAdamW(params, comm, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)``.

    AdamW over this rank's shard of ``params`` (the float32 master weights, all ranks passing
    the same names and shapes). On construction the master weights move into one flat buffer
    (each ``p.data`` a view into it); ``step`` updates this rank's shard, then all-gathers the
    buffer, so afterwards every rank holds the whole updated model. ``state_dict`` and
    ``load_state_dict`` are collective and use the serial AdamW format (see the module doc).
    """

    def __init__(self, params, comm, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.master_names, self.masters, decay = flatten_groups(params, "ZeroAdamW")
        decay = decay or [None] * len(self.masters)
        self.comm = comm
        self.layout = ShardLayout([p.data.size for p in self.masters], comm.size)
        self.flat = flatten_params_(self.masters)
        pieces = self.layout.slices(comm.rank)
        if not pieces:
            raise UserError(f"the model has {self.layout.total} parameters, too few to shard over "
                            f"{comm.size} ranks; use parallel.zero=0")
        slices = [(f"{self.master_names[i]}[{a}:{b}]", ParamSlice(self.masters[i], a, b, decay[i]))
                  for i, a, b, _ in pieces]
        super().__init__(slices, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.owners = [self.master_names[i] for i, _, _, _ in pieces]  # each slice's parameter name
        self._decay = [s.decay for s in self.params]  # a 1-D slice of a matrix is still decayed
        # The moments of the shard live in two flat arrays (one message each to rank 0 for a
        # checkpoint); each slice's state is a view into them.
        n = self.layout.counts[comm.rank]
        self.m, self.v = xp.zeros(n, dtype=self.flat.dtype), xp.zeros(n, dtype=self.flat.dtype)
        self.state = {name: {"m": self.m[o:o + s.data.size], "v": self.v[o:o + s.data.size]}
                      for (name, s), (_, _, _, o) in zip(slices, pieces)}
        self.last_wait_s = 0.0

    def _buffers_for(self, p):
        return ()  # allocate nothing here: __init__ makes the moments views into self.m and self.v

    def step(self, lr=None):
        super().step(lr)  # AdamW on this rank's slices: its shard of the master weights moves
        t0 = time.perf_counter()
        self.comm.allgather_(self.flat, self.layout.counts)  # ... and everybody gets every shard
        self.last_wait_s = time.perf_counter() - t0

    def zero_grad(self):
        for p in self.masters:
            p.grad = None

    # ---- checkpoints: the serial format ------------------------------------------------------
    def _gather_to_root(self, shard):
        """The full flat array on rank 0 (None elsewhere), from every rank's shard."""
        if self.comm.rank != 0:
            self.comm.send(shard, 0, _STATE_TAG)
            return None
        full = xp.empty(self.layout.total, dtype=shard.dtype)
        for r in range(self.comm.size):
            lo, hi = self.layout.shard(r)
            if r == 0:
                full[lo:hi] = shard
            else:
                self.comm.recv(full[lo:hi], r, _STATE_TAG)
        return full

    def state_dict(self) -> dict:
        """``{"step", <hyperparameters>, "state": {name: {"m", "v"}}}`` with full arrays per
        parameter name, as ``AdamW.state_dict`` of a serial run, on rank 0. Every rank must call
        it; the others get an empty ``"state"``."""
        d = {"step": self.step_count, **{k: getattr(self, k) for k in self.hyperparameters}}
        full = {k: self._gather_to_root(buf) for k, buf in (("m", self.m), ("v", self.v))}
        d["state"] = {}
        if self.comm.rank == 0:
            for name, p, a, b in zip(self.master_names, self.masters, self.layout.offsets,
                                     self.layout.offsets[1:]):
                d["state"][name] = {k: full[k][a:b].reshape(p.shape) for k in ("m", "v")}
        return d

    def load_state_dict(self, d: Mapping):
        """Take this rank's slices of a full (serial-format) AdamW state dict; any mismatch of
        names or shapes is one UserError before anything changes."""
        missing_keys = [k for k in ("step", "state", *self.hyperparameters) if k not in d]
        if missing_keys:
            raise UserError(f"ZeroAdamW state dict lacks {missing_keys}; was it saved by AdamW?")
        saved, problems = d["state"], []
        missing = [n for n in self.master_names if n not in saved]
        unexpected = [n for n in saved if n not in set(self.master_names)]
        if missing:
            problems.append(f"missing parameters {missing[:6]}")
        if unexpected:
            problems.append(f"unexpected parameters {unexpected[:6]}")
        for name, p in zip(self.master_names, self.masters):
            got = saved.get(name)
            if got is None:
                continue
            if set(got) != {"m", "v"}:
                problems.append(f"{name!r} has buffers {sorted(got)}, AdamW expects ['m', 'v']")
            elif any(tuple(got[k].shape) != p.shape for k in ("m", "v")):
                problems.append(f"{name!r} moments have shape {tuple(got['m'].shape)}, expected {p.shape}")
        if problems:
            raise UserError(f"cannot load ZeroAdamW state: {'; '.join(problems[:6])}")
        self._configure(**{k: d[k] for k in self.hyperparameters})
        self.step_count = int(d["step"])
        for name, owner, s in zip(self.names, self.owners, self.params):
            for k in ("m", "v"):
                part = saved[owner][k].reshape(-1)[s.start:s.stop]  # host slice first, then the device
                self.state[name][k][...] = backend.asarray(part, dtype=self.m.dtype)
