"""Engines: who computes the gradients of one optimizer step, and how.

The trainer hands an engine the micro-batches of this process and gets back the mean loss with
gradients ready in the master parameters. ``LocalEngine`` runs them one after another on this
process; with data parallelism its ``sync`` is a DataParallel wrapper that all-reduces gradients
(otherwise ``LocalSync``, which does nothing). A pipeline engine runs a schedule across stages
behind the same methods.
"""
import contextlib

from minillm import backend
from minillm.autograd.tensor import no_grad
from minillm.errors import UserError


def load_params(named_params, state, source):
    """Copy ``state[name]`` into each parameter in place; a missing or mis-shaped tensor is a
    UserError naming it and the file."""
    missing = [n for n, _ in named_params if n not in state]
    if missing:
        raise UserError(f"{source} has no tensor {missing[0]!r}" +
                        (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else "") +
                        "; it was written for a different model")
    for name, p in named_params:
        if tuple(state[name].shape) != p.shape:
            raise UserError(f"{source}: tensor {name!r} has shape {tuple(state[name].shape)} but the "
                            f"model expects {p.shape}; check the [model] config")
        p.data[...] = backend.asarray(state[name]).astype(p.data.dtype, copy=False)


class LocalSync:
    """No gradient communication: a world of one (the no-op stand-in for DataParallel)."""

    comm_wait_s = 0.0

    def no_sync(self):
        return contextlib.nullcontext()

    def finish_gradient_sync(self):
        pass


class LocalEngine:
    """All layers on this process; micro-batches accumulate gradients, then one sync."""

    def __init__(self, model, precision, sync=None, comm=None):
        self.model, self.precision = model, precision
        self.sync = sync or LocalSync()
        self.comm = comm

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

    def grad_sq_reduce(self, sq):
        """Combine gradient sums of squares across processes holding different parameters
        (none here: data-parallel replicas hold identical averaged gradients)."""
        return sq

    def model_state(self):
        """Full parameter arrays by name (master weights), for checkpoints."""
        return {name: p.data for name, p in self.precision.master_params}

    def load_model_state(self, state, source="checkpoint"):
        """Copy full arrays by name into the master weights (one tensor at a time), then the model."""
        load_params(self.precision.master_params, state, source)
        self.precision.master_to_model()

    def is_output_rank(self):
        return self.comm is None or self.comm.rank == 0
