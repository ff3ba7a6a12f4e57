"""Data parallelism: every rank keeps a full copy of the model and averages gradients.

Each rank runs forward and backward on its own slice of the global batch. Before the optimizer
step the gradients are averaged across ranks, so every rank applies the same update and the
copies stay identical, exactly as if one process had seen the whole batch.

How the averaging is made cheap (the same design as PyTorch's DistributedDataParallel):

- Buckets. Thousands of small all-reduces would each pay the network latency, so gradients are
  copied into a few flat buffers ("buckets") of about ``bucket_mb`` MB and reduced as one message
  each. Buckets follow the parameters in REVERSE order, because backward produces the gradients
  of the last layers first.
- Overlap. The autograd engine calls a hook as soon as a parameter's gradient is complete. When
  the last gradient of a bucket is in, that bucket's non-blocking all-reduce starts while
  backward keeps computing earlier layers. ``finish_gradient_sync()`` then waits for whatever
  is still in flight, divides by the number of ranks and hands the averages back as ``.grad``.
- Buckets are always started in the same order (bucket 0, 1, 2, ...) on every rank: MPI requires
  collectives to be called in the same order everywhere, whatever order the hooks fire in.
- ``no_sync()`` turns the hooks off for gradient-accumulation micro-steps: gradients pile up
  locally in ``.grad`` and only the last backward (outside ``no_sync``) communicates.
- Buckets sum in float32 when the parameters are 16-bit (MPI cannot add bfloat16, and a sum of
  float16 gradients over ranks can overflow), else in the parameters' own dtype.

The model knows nothing of this: ``DataParallel`` is a ``GradSync`` (``grad_sync.py``) over the
model's parameters; it only adds hooks to them.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy

from minillm import backend
from minillm.autograd.ops import acc_dtype
from minillm.backend import xp
from minillm.choices import ALLREDUCES, one_of
from minillm.distributed.grad_sync import GradSync
from minillm.distributed.ring import ring_allreduce_
from minillm.errors import ConfigError
from minillm.nn.module import Module


@dataclass
class Bucket:
    """A flat buffer holding the gradients of a few consecutive parameters."""

    names: list[str]
    params: list
    offsets: list[int]       # where each parameter's gradient starts in ``flat``
    flat: object             # 1-D xp array: float32 for 16-bit parameters, else their dtype
    ready: set = field(default_factory=set)  # slots whose gradient has been copied in
    request: object = None   # the in-flight all-reduce, once launched
    launched: bool = False

    @property
    def nbytes(self) -> int:
        return int(self.flat.nbytes)

    def slot(self, i):
        """The part of ``flat`` that belongs to parameter i, shaped like it."""
        p = self.params[i]
        return self.flat[self.offsets[i]:self.offsets[i] + p.size].reshape(p.shape)

    def copy_in(self, i):
        g = self.params[i].grad
        if g is None:  # no gradient on this rank (parameter unused): contribute zeros
            self.slot(i)[...] = 0
        else:
            self.slot(i)[...] = g


def bucket_groups(named_params, bucket_mb: float) -> list[list]:
    """(name, Parameter) pairs grouped, last first, into buckets of at most ``bucket_mb`` MB of
    gradient (a parameter larger than that gets a bucket of its own; a change of summing dtype
    starts a new bucket). DataParallel and ZeRO-2 bucket the same way."""
    cap = bucket_mb * 1024 * 1024
    groups, current, size, dtype = [], [], 0, None
    for name, p in reversed(list(named_params)):
        p_dtype = xp.dtype(acc_dtype(p.data.dtype))
        nbytes = p.size * p_dtype.itemsize
        if current and (size + nbytes > cap or p_dtype != dtype):
            groups.append(current)
            current, size = [], 0
        current.append((name, p))
        size += nbytes
        dtype = p_dtype
    if current:
        groups.append(current)
    return groups


def make_buckets(named_params, bucket_mb: float) -> list[Bucket]:
    """Buckets (``bucket_groups``) with their flat gradient buffers."""
    buckets = []
    for group in bucket_groups(named_params, bucket_mb):
        offsets = numpy.cumsum([0] + [p.size for _, p in group]).tolist()
        flat = xp.zeros(offsets[-1], dtype=acc_dtype(group[0][1].data.dtype))
        buckets.append(Bucket([n for n, _ in group], [p for _, p in group], offsets[:-1], flat))
    return buckets


class DataParallel(GradSync):
    """``DataParallel(params, comm, bucket_mb=25.0, allreduce="mpi" | "ring")``: the gradients of
    ``params`` (a model, or its (name, Parameter) pairs) averaged over the ranks of ``comm``.

    After each backward that should communicate call ``finish_gradient_sync()`` before reading
    gradients::

        dp = DataParallel(model, comm)
        for micro in range(grad_accum):
            with dp.no_sync() if micro < grad_accum - 1 else contextlib.nullcontext():
                _, loss = model(x[micro], y[micro])
                (loss / grad_accum).backward()
        dp.finish_gradient_sync()       # every .grad is now the average over all ranks
        opt.step()

    ``last_wait_s``: seconds the last sync spent blocked on communication (for metrics).
    """

    def __init__(self, params, comm, bucket_mb: float = 25.0, allreduce: str = "mpi"):
        one_of("parallel.allreduce", allreduce, ALLREDUCES)
        if not bucket_mb > 0:
            raise ConfigError(f"parallel.bucket_mb={bucket_mb} must be > 0 (e.g. 25)")
        all_named = list(params.named_parameters() if isinstance(params, Module) else params)
        self.comm = comm
        self.allreduce = allreduce
        self.bucket_mb = float(bucket_mb)
        self._named = all_named
        named = [(n, p) for n, p in all_named if p.requires_grad]
        self._check_same_model(all_named)
        self.broadcast_parameters()
        self.check_parameters_equal()

        self.buckets = make_buckets(named, self.bucket_mb)
        self._where = {id(p): (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        self._handles = []
        if comm.size > 1:  # a world of one has nothing to average: no hooks, no copies
            self._handles = [p.register_post_accumulate_grad_hook(self._grad_ready) for _, p in named]
        self._sync = True
        self._next = 0            # the next bucket to launch: buckets start strictly in order
        self._wait = 0.0
        self.last_wait_s = 0.0
        self.total_wait_s = 0.0

    # ------------------------------------------------------------------ start: same weights
    def _check_same_model(self, named):
        """Every rank must hold the same parameter names, shapes and dtypes (all ranks agree
        on the verdict, so they raise together instead of hanging in a mismatched broadcast)."""
        mine = [(n, tuple(p.shape), str(p.data.dtype)) for n, p in named]
        root = self.comm.bcast_obj(mine, root=0)
        ok = self.comm.allreduce_scalar(float(mine == root), op="min")
        if ok < 1.0:
            diff = next((f"{a} vs rank 0's {b}" for a, b in zip(mine, root) if a != b),
                        f"{len(mine)} parameters vs rank 0's {len(root)}")
            raise RuntimeError(f"rank {self.comm.rank}: the models differ across ranks ({diff})")

    def broadcast_parameters(self, root: int = 0):
        """Copy rank ``root``'s parameter values to every rank, in place."""
        for _, p in self._named:
            if not p.data.flags.c_contiguous:
                p.data = xp.ascontiguousarray(p.data)
            self.comm.bcast_(p.data, root=root)

    def check_parameters_equal(self):
        """Raise RuntimeError unless every rank holds bit-identical parameters (two checksums per
        parameter, compared with an all-reduce max and min)."""
        named = self._named
        if not named:
            return
        sums = []
        for _, p in named:
            d = p.data.reshape(-1).astype(xp.float64)
            ramp = (xp.arange(d.size) % 251 + 1).astype(xp.float64)  # catches swapped elements
            sums.append(xp.stack([d.sum(), (d * ramp).sum()]))
        sums = backend.to_numpy(xp.stack(sums)).reshape(len(named), 2)  # one read of the device
        hi, lo = self.comm.allreduce_(sums.copy(), "max"), self.comm.allreduce_(sums.copy(), "min")
        same = (hi == lo) | (numpy.isnan(hi) & numpy.isnan(lo))
        bad = [named[k][0] for k in range(len(named)) if not same[k].all()]
        if bad:
            raise RuntimeError("parameters differ across ranks after the broadcast: "
                               + ", ".join(bad[:5]))

    # ------------------------------------------------------------------ during backward
    @contextlib.contextmanager
    def no_sync(self):
        """Gradients only accumulate locally inside; the next synced backward carries them."""
        prev, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = prev

    def _grad_ready(self, p):
        """Autograd hook: p.grad is complete for this backward."""
        if not self._sync:
            return
        bucket, i = self._where[id(p)]
        if bucket.launched:
            raise RuntimeError("a second backward ran before finish_gradient_sync(): call it after "
                               "each synced backward, or accumulate micro-steps inside no_sync()")
        bucket.copy_in(i)
        bucket.ready.add(i)
        self._launch_ready()
        self._poke()

    def _launch_ready(self):
        while self._next < len(self.buckets):
            b = self.buckets[self._next]
            if len(b.ready) < len(b.params):
                return
            self._launch(b)

    def _launch(self, b):
        for i in range(len(b.params)):
            if i not in b.ready:  # never reached by this backward: send what .grad holds (or zeros)
                b.copy_in(i)
        if self.allreduce == "ring":
            t0 = time.perf_counter()
            ring_allreduce_(self.comm, b.flat)  # blocking: the whole ring runs right here
            self._wait += time.perf_counter() - t0
        else:
            b.request = self.comm.iallreduce_(b.flat)
        b.launched = True
        self._next += 1

    def _poke(self):
        """Let MPI progress in-flight reductions (most MPI libraries only move data inside calls),
        and start those whose device-to-host copy has finished (GPU staging), strictly in order."""
        for b in self.buckets[:self._next]:
            if b.request is not None:
                b.request.test()
                if not b.request.started:  # a later bucket must not start before this one
                    break

    # ------------------------------------------------------------------ after backward
    def finish_gradient_sync(self):
        """Wait for every bucket, average over the ranks and set each ``param.grad`` to it.

        Buckets not started during backward (parameters the graph never reached, or no backward
        at all) are started here from the current ``.grad`` (zeros where None). After this every
        trainable parameter has a gradient, identical on all ranks.
        """
        if self.comm.size == 1:
            for b in self.buckets:
                for p in b.params:
                    if p.grad is None:
                        p.grad = xp.zeros_like(p.data)
            self.last_wait_s = 0.0
            return
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
        for b in self.buckets:
            if b.request is not None:
                t0 = time.perf_counter()
                b.request.wait()
                self._wait += time.perf_counter() - t0
            b.flat /= self.comm.size
            for i, p in enumerate(b.params):
                p.grad = b.slot(i)  # a view into the bucket: no copy
            b.ready.clear()
            b.request, b.launched = None, False
        self._next = 0
        self.last_wait_s, self._wait = self._wait, 0.0
        self.total_wait_s += self.last_wait_s

    @property
    def bytes_per_sync(self) -> int:
        """Bytes of gradient each rank all-reduces per optimizer step."""
        return sum(b.nbytes for b in self.buckets)

    def remove_hooks(self):
        for h in self._handles:
            h.remove()
        self._handles = []
