"""The conjugate operators of tensor and sequence parallelism, as autograd Functions.

Megatron-LM (Shoeybi et al., 2019) splits a Transformer's matmuls across the ``tp`` ranks of a
group. A region of split computation starts where every rank holds the same activation and ends
where the ranks' partial results are summed. Two operators mark those borders, and each one's
backward is the *other* collective, because the backward of a linear map is its transpose:

    f  copy_to_tensor_parallel       forward: identity      backward: all-reduce (sum)
    g  reduce_from_tensor_parallel   forward: all-reduce    backward: identity

f: every rank uses the same x, so dL/dx is the sum of every rank's contribution (all-reduce).
g: y = sum of the ranks' partial y_r, so dL/dy_r = dL/dy, which every rank already holds.

Sequence parallelism (Korthikanti et al., 2022) keeps the activations between the regions split
along the sequence (each rank holds T/tp positions) instead of replicated. The borders become:

    gather_from_sequence_parallel          forward: all-gather along T    backward: reduce-scatter
    reduce_scatter_to_sequence_parallel    forward: reduce-scatter along T   backward: all-gather
    scatter_to_sequence_parallel           forward: keep my T/tp positions   backward: all-gather

(an all-reduce *is* a reduce-scatter followed by an all-gather, so the bytes moved are the same).

Every collective goes through the ``comm`` passed in (``distributed/comm.py``); sums of 16-bit
activations are taken in float32 (MPI cannot add bfloat16, and float16 sums can overflow).
Activations are (B, T, ...) with the sequence on axis 1.
"""
from __future__ import annotations

from minillm.autograd.function import Function
from minillm.autograd.ops import acc_dtype
from minillm.backend import xp


# ---------------------------------------------------------------- collectives on whole arrays
def all_reduce(comm, a):
    """The sum of ``a`` over the ranks of ``comm`` (a new array; ``a`` is left alone)."""
    buf = xp.array(a, dtype=acc_dtype(a.dtype), order="C", copy=True)
    comm.allreduce_(buf)
    return buf.astype(a.dtype, copy=False)


def _raw(a):
    """A flat uint8 view: an all-gather only moves bytes, whatever the dtype (bfloat16 too)."""
    return a.reshape(-1).view(xp.uint8)


def all_gather(comm, a, axis: int = 1):
    """Every rank's ``a`` concatenated along ``axis`` in rank order: (.., n, ..) -> (.., tp*n, ..)."""
    p = comm.size
    parts = xp.empty((p,) + a.shape, dtype=a.dtype)                     # (tp, B, n, ...)
    parts[comm.rank] = a
    comm.allgather_(_raw(parts), [a.nbytes] * p)
    moved = xp.moveaxis(parts, 0, axis)                                 # (B, tp, n, ...)
    return moved.reshape(a.shape[:axis] + (p * a.shape[axis],) + a.shape[axis + 1:])  # (B, tp*n, ...)


def reduce_scatter(comm, a, axis: int = 1):
    """Sum ``a`` over the ranks and keep this rank's part of ``axis``: (.., T, ..) -> (.., T/tp, ..)."""
    p, n = comm.size, a.shape[axis] // comm.size
    split = a.reshape(a.shape[:axis] + (p, n) + a.shape[axis + 1:])     # (B, tp, T/tp, ...)
    parts = xp.moveaxis(split, axis, 0)                                 # (tp, B, T/tp, ...)
    flat = xp.array(parts, dtype=acc_dtype(a.dtype), order="C", copy=True).reshape(-1)
    mine = comm.reduce_scatter_(flat, [flat.size // p] * p)
    return mine.reshape(parts.shape[1:]).astype(a.dtype, copy=False)   # (B, T/tp, ...)


def local_part(comm, a, axis: int = 1):
    """This rank's contiguous part of ``axis`` (a copy; no communication)."""
    n = a.shape[axis] // comm.size
    index = (slice(None),) * axis + (slice(comm.rank * n, (comm.rank + 1) * n),)
    return xp.ascontiguousarray(a[index])


# ---------------------------------------------------------------- tensor parallelism: f and g
class CopyToTensorParallel(Function):
    """f: identity forward, all-reduce backward (enter a tensor-parallel region)."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view()

    @staticmethod
    def backward(ctx, g):
        return all_reduce(ctx.comm, g)


class ReduceFromTensorParallel(Function):
    """g: all-reduce forward, identity backward (leave a tensor-parallel region)."""

    @staticmethod
    def forward(ctx, x, comm):
        return all_reduce(comm, x)

    @staticmethod
    def backward(ctx, g):
        return g


# ---------------------------------------------------------------- sequence parallelism
class GatherFromSequenceParallel(Function):
    """All-gather along T forward (B, T/tp, C) -> (B, T, C); reduce-scatter backward."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return all_gather(comm, x)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter(ctx.comm, g)


class ReduceScatterToSequenceParallel(Function):
    """Reduce-scatter along T forward (B, T, C) partial -> (B, T/tp, C) summed; all-gather backward."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return reduce_scatter(comm, x)

    @staticmethod
    def backward(ctx, g):
        return all_gather(ctx.comm, g)


class ScatterToSequenceParallel(Function):
    """Keep this rank's T/tp positions forward (B, T, C) -> (B, T/tp, C); all-gather backward."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return local_part(comm, x)

    @staticmethod
    def backward(ctx, g):
        return all_gather(ctx.comm, g)


def copy_to_tensor_parallel(x, comm):
    return CopyToTensorParallel.apply(x, comm=comm)


def reduce_from_tensor_parallel(x, comm):
    return ReduceFromTensorParallel.apply(x, comm=comm)


def gather_from_sequence_parallel(x, comm):
    return GatherFromSequenceParallel.apply(x, comm=comm)


def reduce_scatter_to_sequence_parallel(x, comm):
    return ReduceScatterToSequenceParallel.apply(x, comm=comm)


def scatter_to_sequence_parallel(x, comm):
    return ScatterToSequenceParallel.apply(x, comm=comm)


def leave_region(x, comm, sp: bool):
    """Sum the ranks' partial outputs: g (all-reduce), or with sp a reduce-scatter along T."""
    return reduce_scatter_to_sequence_parallel(x, comm) if sp else reduce_from_tensor_parallel(x, comm)
