"""The gradient-sync interface: how this process's gradients become the ones the optimizer uses.

An engine drives one ``GradSync`` per optimizer step::

    with sync.no_sync():            # every micro-batch but the last: gradients pile up locally,
        backward(micro_1) ...       # nothing is communicated
    backward(micro_last)            # hooks may start communication while backward runs
    sync.finish_gradient_sync()     # wait for it; every .grad now holds what the optimizer uses

and asks it three questions that depend on how gradients are spread over the ranks:
``agree(found_inf)`` (the overflow decision all ranks take), ``grad_sq_reduce(sq)`` (this rank's
sum of squared gradients -> the global one) and ``mean_over_replicas(value)``. It also builds the
optimizer that fits it (``make_optimizer``), so that choosing the sync is the only place a run
decides between plain and ZeRO data parallelism.

Where the master weights live is the sync's business too, because ZeRO-2 and ZeRO-3 shard them:
``owned(named)`` says which (name, parameter) pairs this rank keeps master weights, gradients and
optimizer state for (the precision object and the optimizer are built over those), and
``model_state`` / ``load_model_state`` turn them into / from full tensors by serial name.

Implementations: ``LocalSync`` (below, a world of one: does nothing), ``DataParallel``
(``data_parallel.py``: bucketed all-reduce overlapped with backward), ``ZeroSync`` (``zero.py``,
ZeRO-1: reduce-scatter into this rank's shard), ``Zero2Sync`` (``zero2.py``: gradients
reduce-scattered in buckets during backward, sharded) and ``Zero3Sync`` (``zero3.py``: parameters
sharded too, gathered block by block). ``train/build.py`` picks one.
"""
from __future__ import annotations

import contextlib

from minillm.nn.module import load_params
from minillm.optim import make_optimizer as _plain_optimizer


class GradSync:
    """Base class and documentation of the interface; every method has the serial meaning."""

    comm = None          # the data-parallel group (None for a world of one)
    last_wait_s = 0.0    # seconds the last finish_gradient_sync (and what it started) blocked

    def no_sync(self):
        """Context: backward inside only accumulates gradients locally."""
        return contextlib.nullcontext()

    def finish_gradient_sync(self) -> None:
        """After the step's last backward: every gradient final on this rank."""

    def agree(self, found_inf: bool) -> bool:
        """True when any rank of the group found an inf/nan in its gradients. Ranks whose
        gradients are identical after the sync (plain data parallelism) already agree."""
        return bool(found_inf)

    def grad_sq_reduce(self, sq: float) -> float:
        """The global sum of squared gradients from this rank's ``sq``: replicas hold identical
        averaged gradients, so by default there is nothing to combine."""
        return sq

    def mean_over_replicas(self, value: float) -> float:
        """The mean of a per-rank scalar (a loss) over the data-parallel group."""
        if self.comm is None or self.comm.size == 1:
            return value
        return self.comm.allreduce_scalar(value, "sum") / self.comm.size

    def make_optimizer(self, train_cfg, params):
        """The optimizer over ``params`` (the float32 master weights) for ``train.optimizer``."""
        return _plain_optimizer(train_cfg, params)

    def owned(self, named_params) -> list:
        """The (name, Parameter) pairs whose master weights, gradients and optimizer state this
        rank keeps (what ``train/build.py`` builds the precision object over): ``named_params``
        themselves, or this rank's pieces of them where they are sharded (ZeRO-2/3)."""
        return list(named_params)

    def model_state(self, master_params) -> dict:
        """The full master weights by serial name, at least on the group's rank 0. Collective."""
        return {name: p.data for name, p in master_params}

    def load_model_state(self, precision, state: dict, source: str) -> None:
        """Copy this rank's part of a full (serial-format) model state into the master weights of
        ``precision``, and from them into the model."""
        load_params(precision.master_params, state, source)
        precision.master_to_model()


class LocalSync(GradSync):
    """No gradient communication: a world of one (the no-op stand-in for DataParallel)."""

