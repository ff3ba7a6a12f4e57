"""Engines: who computes the gradients of one optimizer step, and how.

The trainer hands an engine the micro-batches of this process and gets back the mean loss with
gradients ready in the master parameters. ``LocalEngine`` runs them one after another on this
process; with data parallelism its ``sync`` is a DataParallel wrapper that all-reduces gradients
(otherwise ``LocalSync``, which does nothing). ``ShardedEngine`` is the same with ZeRO-1's
``ZeroSync``, where each rank ends up with the gradient of its own shard only. A pipeline engine
runs a schedule across stages behind the same methods.
"""
import contextlib

from minillm.autograd.tensor import no_grad
from minillm.nn.module import load_params


class LocalSync:
    """No gradient communication: a world of one (the no-op stand-in for DataParallel)."""

    last_wait_s = 0.0

    def no_sync(self):
        return contextlib.nullcontext()

    def finish_gradient_sync(self):
        pass


class LocalEngine:
    """All layers on this process; micro-batches accumulate gradients, then one sync.

    The interface every engine offers the trainer:
      named_parameters()            the (name, Parameter) pairs this process computes with
      precision                     set by the trainer (scales the loss for backward)
      dp_rank, dp_size              which slice of the global batch this process takes
      forward_backward(mbs) -> loss mean loss of this process's micro-batches, grads ready
      eval_loss(x, y) -> loss       no-grad loss of one micro-batch
      reduce_loss(v) -> v           the mean over data-parallel replicas, the same on every rank
      grad_sq_reduce(sq) -> sq      sum of squared grads over processes holding different params
      zero_grad()
      model_state() / optimizer_state(opt)        full (unsharded) tensors by name, for checkpoints
      load_model_state(state, source) / load_optimizer_state(opt, state)
    """

    precision = None

    def __init__(self, model, sync=None, comm=None):
        self.model = model
        self.sync = sync or LocalSync()
        self.comm = comm
        self.dp_rank = comm.rank if comm is not None else 0
        self.dp_size = comm.size if comm is not None else 1

    def named_parameters(self):
        return list(self.model.named_parameters())

    @property
    def comm_wait_s(self):
        """Seconds the last step spent blocked on gradient communication."""
        return self.sync.last_wait_s

    def forward_backward(self, microbatches):
        """Accumulate d(mean loss)/d(params) over the micro-batches; returns the mean loss."""
        n, total = len(microbatches), 0.0
        for i, (x, y) in enumerate(microbatches):
            quiet = self.sync.no_sync() if i < n - 1 else contextlib.nullcontext()
            with quiet:  # only the last micro-step's backward talks to the other ranks
                _, loss = self.model(x, y)
                self.precision.scale_loss(loss * (1.0 / n)).backward()
            total += float(loss.data)
        self.sync.finish_gradient_sync()
        return total / n

    def eval_loss(self, x, y):
        with no_grad():
            _, loss = self.model(x, y)
        return float(loss.data)

    def reduce_loss(self, value):
        if self.dp_size == 1:
            return value
        return self.comm.allreduce_scalar(value, "sum") / self.dp_size

    def grad_sq_reduce(self, sq):
        """Data-parallel replicas hold identical averaged gradients: nothing to combine."""
        return sq

    def zero_grad(self):
        self.model.zero_grad()

    def model_state(self):
        """Full parameter arrays by name (master weights), for checkpoints."""
        return {name: p.data for name, p in self.precision.master_params}

    def optimizer_state(self, optimizer):
        return optimizer.state_dict()

    def load_model_state(self, state, source="checkpoint"):
        """Copy full arrays by name into the master weights (one tensor at a time), then the model."""
        load_params(self.precision.master_params, state, source)
        self.precision.master_to_model()

    def load_optimizer_state(self, optimizer, state):
        optimizer.load_state_dict(state)


class ShardedEngine(LocalEngine):
    """LocalEngine for ZeRO-1 (``sync`` a ``ZeroSync``): after the sync each rank holds the
    averaged gradient of its own shard and zeros elsewhere, so the squared gradient norm is the
    sum of the ranks' shares. Checkpoints need nothing more: ``ZeroAdamW.state_dict`` itself
    gathers the moments into the serial format."""

    def grad_sq_reduce(self, sq):
        return self.comm.allreduce_scalar(sq, "sum")
