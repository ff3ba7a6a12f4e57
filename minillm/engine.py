"""The engine contract: who computes the gradients of one optimizer step, and how.

The trainer never asks how a step is computed. It hands an ``Engine`` this process's
micro-batches and calls the methods below; what differs between a serial run, data parallelism,
ZeRO and a pipeline lives behind them. One step, as ``train/trainer.py`` writes it::

    loss = engine.forward_backward(microbatches)           # grads in the model's parameters, synced
    found_inf = precision.grads_to_master(agree=engine.agree)   # one decision, taken by all ranks
    norm = clip_grad_norm(masters, max_norm, reduce=engine.grad_sq_reduce)
    if not found_inf: optimizer.step(); precision.master_to_model()
    engine.zero_grad()

Implemented by ``LocalEngine`` (below: every layer on this process, serial or data parallel, the
gradient sync a ``GradSync`` from ``distributed/grad_sync.py``) and ``PipelineEngine``
(``distributed/pipeline.py``). ``train/build.py`` chooses and builds them.

A ``Microbatch`` carries its place in the global batch (``step``, ``row0``), so randomness keyed by
sample (dropout) is the same whichever rank, stage or replay computes it, in whatever order.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from minillm.amp import FullPrecision
from minillm.autograd.tensor import no_grad
from minillm.backend import xp
from minillm.distributed.grad_sync import LocalSync
from minillm.distributed.tp_model import NoTensorParallel
from minillm.nn.module import load_params


@dataclass(frozen=True)
class Microbatch:
    """Rows ``[row0, row0 + B)`` of the global batch of optimizer step ``step``.

    ``x``, ``y``: (B, T) token ids and targets on the device. ``step=None`` (evaluation, a
    hand-written loop) means no sample keys: dropout then draws fresh masks per call.
    """
    x: object
    y: object
    step: int | None = None
    row0: int = 0


def keyed(model, mb: Microbatch):
    """Context in which ``model``'s dropout masks are those of ``mb``'s samples."""
    if mb.step is None:
        return contextlib.nullcontext()
    return model.dropout_rng.keyed(mb.step, mb.row0)


class Engine:
    """The interface every engine offers the trainer (see the module docstring).

    Set by every subclass's constructor (nothing is attached afterwards):
      precision          the precision object over ``named_parameters()`` (``amp/precision.py``)
      sync               the ``GradSync`` that averages gradients over data-parallel ranks
      dp_rank, dp_size   which slice of the global batch this process takes, out of how many
      tensor_parallel    how this process's layers are cut over its tp group
                         (``distributed/tp_model.py``; ``NoTensorParallel`` when they are whole):
                         checkpoints, the gradient norm and the overflow vote go through it
    """

    precision = None
    sync = None
    dp_rank, dp_size = 0, 1
    tensor_parallel = NoTensorParallel()

    def named_parameters(self) -> list:
        """The (name, Parameter) pairs this process computes with (a pipeline stage: its own)."""
        raise NotImplementedError

    def forward_backward(self, microbatches: list[Microbatch]):
        """Forward and backward of this process's micro-batches with the loss scaled by the
        precision object, gradients accumulated and synchronised; returns the mean loss as a 0-d
        float64 device array, so a step never waits for the GPU (``backend.fetch`` reads it; on
        a pipeline only the last stage knows it: others return 0.0 and ``reduce_loss`` fixes it)."""
        raise NotImplementedError

    def agree(self, found_inf: bool) -> bool:
        """The overflow decision all ranks take: True when any rank holding different gradients
        found an inf/nan. An explicit collective (all-reduce max of a flag), never a sentinel
        written into a gradient."""
        return self.sync.agree(found_inf)

    def eval_loss(self, x, y):
        """No-grad loss of one micro-batch (a 0-d device array, or 0.0 off a pipeline's last stage)."""
        raise NotImplementedError

    def reduce_loss(self, value: float) -> float:
        """The mean of ``value`` (a float: read it with ``backend.fetch`` first) over data-parallel
        replicas, the same on every rank."""
        raise NotImplementedError

    def grad_sq_reduce(self, sq):
        """This process's sum of squared (master) gradients (a 0-d device array) -> the global one
        (for clipping; engines whose ranks hold different gradients read it on the host). A
        parameter replicated over the tp group counts once, a split one with all its shards."""
        return self.sync.grad_sq_reduce(self.tensor_parallel.count_once(sq, self.precision.master_params))

    def zero_grad(self) -> None:
        for _, p in self.named_parameters():
            p.grad = None

    @property
    def comm_wait_s(self) -> float:
        """Seconds the last step spent blocked on communication (for metrics)."""
        return self.sync.last_wait_s

    def make_optimizer(self, train_cfg):
        """The optimizer over the master weights that fits this engine's gradient sync (ZeRO:
        the sharded one). Chosen by the sync, so the decision is made in one place."""
        return self.sync.make_optimizer(train_cfg, self.precision.master_params)

    # ---- checkpoints: always the serial format (full tensors by name), whatever the layout ----
    def model_state(self) -> dict:
        """Full master weights by name on world rank 0 ({} elsewhere). Collective: every rank
        calls it. No side effects."""
        raise NotImplementedError

    def optimizer_state(self, optimizer) -> dict:
        """The optimizer state in the serial format on world rank 0. Collective."""
        return self.tensor_parallel.gather_optimizer_state(optimizer.state_dict())

    def load_model_state(self, state: dict, source: str = "checkpoint") -> None:
        """Copy this process's tensors out of a full (serial-format) model state: its tp shards
        (``tensor_parallel.local``), and of those what the sync keeps (ZeRO-2/3: its dp shards)."""
        self.sync.load_model_state(self.precision, self.tensor_parallel.local(state), source)

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        optimizer.load_state_dict(self.tensor_parallel.local_optimizer_state(state))

    def write_artifacts(self, run_dir) -> None:
        """Write this rank's observability files into the run directory (a pipeline's timeline).
        Collective where the engine needs it; nothing by default."""


class LocalEngine(Engine):
    """All layers on this process; micro-batches accumulate gradients, then one sync.

    ``LocalEngine(model, precision=None, sync=None, dp_rank=0, dp_size=1, tensor_parallel=None)``:
    ``precision`` defaults to ``FullPrecision`` (float32), ``sync`` to ``LocalSync`` (a world of
    one); with data parallelism ``sync`` is a ``DataParallel`` or ``ZeroSync`` and
    ``dp_rank``/``dp_size`` say which slice of the global batch this process takes; with tensor
    parallelism the model's layers are already split and ``tensor_parallel`` is the plan.
    """

    def __init__(self, model, precision=None, sync=None, dp_rank: int = 0, dp_size: int = 1,
                 tensor_parallel=None):
        self.model = model
        self.precision = precision if precision is not None else FullPrecision(model.named_parameters())
        self.sync = sync if sync is not None else LocalSync()
        self.dp_rank, self.dp_size = dp_rank, dp_size
        if tensor_parallel is not None:
            self.tensor_parallel = tensor_parallel

    def named_parameters(self):
        return list(self.model.named_parameters())

    def forward_backward(self, microbatches):
        n, total = len(microbatches), 0.0
        for i, mb in enumerate(microbatches):
            quiet = self.sync.no_sync() if i < n - 1 else contextlib.nullcontext()
            with quiet, keyed(self.model, mb):  # only the last micro-step's backward communicates
                _, loss = self.model(mb.x, mb.y)
                self.precision.scale_loss(loss * (1.0 / n)).backward()
            total = total + loss.data.astype(xp.float64)  # summed on the device, in float64
        self.sync.finish_gradient_sync()
        return total / n

    def eval_loss(self, x, y):
        with no_grad():
            _, loss = self.model(x, y)
        return loss.data

    def reduce_loss(self, value):
        return self.sync.mean_over_replicas(value)

    def model_state(self):
        return self.tensor_parallel.gather(self.sync.model_state(self.precision.master_params))
