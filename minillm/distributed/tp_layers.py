"""Tensor-parallel layers: each rank holds a shard of a layer's weight and computes a part of it.

For y = x W^T with W of shape (out, in), as ``nn.Linear`` stores it, there are two ways to cut:

    column-parallel   W cut along ``out``: rank r holds rows W_r (out/tp, in) and computes
                      y_r = x W_r^T, its own slice of the output features. Input: the whole x
                      (entered through f, or gathered along T with sequence parallelism).
    row-parallel      W cut along ``in``: rank r holds columns W_r (out, in/tp) and computes
                      x_r W_r^T from its slice x_r of the input features, a partial sum of the
                      whole y: the ranks' parts are summed (g, or a reduce-scatter with sp).

A column-parallel layer followed by a row-parallel one needs no communication in between: the
first leaves each rank with exactly the input slice the second needs. So an MLP is
c_fc (column) -> GELU -> c_proj (row), and attention is c_attn (column, split by heads, so every
rank computes whole heads on its own) -> attention -> c_proj (row): one f and one g each.

The vocabulary is cut the same way: ``VocabParallelEmbedding`` holds rows [start, start + V/tp)
of the token table (a lookup of an id outside them gives zeros, then g sums), the output head is
column-parallel over the vocabulary (tied: the same shard), and ``VocabParallelCrossEntropy``
computes the loss from the local logits (B, T, V/tp) with three small all-reduces (the row max,
the sum of exponentials and the target's logit), never gathering the (B, T, V) logits.
A vocabulary not divisible by tp is padded with zero rows; their logits are masked to -inf.

``ShardSpec`` says how a full tensor is cut (and put back together, for checkpoints).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import minillm.functional as F
from minillm import backend
from minillm.autograd.function import Function
from minillm.autograd.ops import Embedding, acc_dtype, mm, mm_operand, upcast
from minillm.autograd.tensor import Tensor
from minillm.backend import xp
from minillm.distributed.tensor_parallel import (all_gather, copy_to_tensor_parallel, leave_region,
                                                 reduce_from_tensor_parallel, reduce_scatter)
from minillm.nn.module import Module, Parameter


def padded_length(n: int, tp: int) -> int:
    """``n`` rounded up to a multiple of ``tp`` (the padded vocabulary)."""
    return -(-n // tp) * tp


# ---------------------------------------------------------------- how a tensor is cut
@dataclass(frozen=True)
class ShardSpec:
    """A full tensor cut into ``tp`` equal shards along ``axis``.

    ``parts > 1``: the axis holds independent blocks (c_attn's q, k and v: 3), each cut
    separately, so every rank gets whole heads of all three. With ``parts == 1`` a length not
    divisible by tp is padded with zeros (the vocabulary); ``join`` cuts the padding off again.
    """
    axis: int
    parts: int = 1

    def take(self, full, rank: int, tp: int):
        """Rank ``rank``'s shard of the full tensor (a new device array)."""
        full = backend.asarray(full)
        a, n_full = self.axis, full.shape[self.axis]
        if n_full % tp and self.parts == 1:
            pad = [(0, 0)] * full.ndim
            pad[a] = (0, padded_length(n_full, tp) - n_full)
            full = xp.pad(full, pad)
        blocks = xp.split(full, self.parts, axis=a)
        n = blocks[0].shape[a] // tp
        index = (slice(None),) * a + (slice(rank * n, (rank + 1) * n),)
        return xp.ascontiguousarray(xp.concatenate([b[index] for b in blocks], axis=a))

    def join(self, pieces, length: int):
        """The full tensor from every rank's shard (in rank order), ``length`` long on the axis."""
        split = [xp.split(p, self.parts, axis=self.axis) for p in pieces]
        full = xp.concatenate([xp.concatenate([s[j] for s in split], axis=self.axis)
                               for j in range(self.parts)], axis=self.axis)
        index = (slice(None),) * self.axis + (slice(0, length),)
        return xp.ascontiguousarray(full[index])


COLUMN, ROW = ShardSpec(0), ShardSpec(1)
QKV = ShardSpec(0, parts=3)


# ---------------------------------------------------------------- linear layers
class GatherLinear(Function):
    """Sequence-parallel column linear, fused: y = all_gather_T(x) W^T + b.

    x (B, T/tp, in) -> y (B, T, out/tp). Only this rank's x is saved: backward gathers it again
    for the weight gradient (one more all-gather, as in Megatron-LM), so the activation memory
    of the gathered input stays divided by tp. dx is reduce-scattered back to (B, T/tp, in).
    """

    @staticmethod
    def forward(ctx, x, w, b=None, comm=None):
        full = all_gather(comm, x)                            # (B, T, in)
        x2 = full.reshape(-1, full.shape[-1])                 # (N, in), N = B*T
        y = mm(x2, w.T, dtype=acc_dtype(x.dtype))             # (N, out/tp)
        if b is not None:
            y += b
        ctx.save_for_backward(x, w)
        ctx.comm = comm
        return y.astype(x.dtype, copy=False).reshape(full.shape[:-1] + (w.shape[0],))  # (B, T, out/tp)

    @staticmethod
    def backward(ctx, g):
        gx = GatherLinear.backward_input(ctx, g)[0]
        return (gx, *GatherLinear.backward_weight(ctx, g))

    # cut in two for zero-bubble pipelines (``fused.Linear`` does the same): dX now, dW and db
    # (with their re-gather of x) later, in the W step; tp ranks run the same steps in one order
    weight_inputs = (1, 2)

    @staticmethod
    def backward_input(ctx, g):
        _, w = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        g2 = mm_operand(g.reshape(-1, g.shape[-1]))           # (N, out/tp)
        gfull = mm(g2, w, dtype=g.dtype).reshape(g.shape[:-1] + (w.shape[1],))  # (B, T, in)
        return reduce_scatter(ctx.comm, gfull), None, None    # (B, T/tp, in)

    @staticmethod
    def backward_weight(ctx, g):
        x, _ = ctx.saved_tensors
        need_w, need_b = (ctx.needs_input_grad + (False,))[1:3]
        g2 = mm_operand(g.reshape(-1, g.shape[-1]))           # (N, out/tp)
        gw = gb = None
        if need_w:
            full = all_gather(ctx.comm, x)                    # (B, T, in), gathered again
            gw = mm(g2.T, full.reshape(-1, full.shape[-1]), dtype=g.dtype)  # (out/tp, in)
        if need_b:
            gb = g2.sum(axis=0, dtype=acc_dtype(g.dtype)).astype(g.dtype, copy=False)
        return gw, gb


class ColumnParallelLinear(Module):
    """y_r = x W_r^T + b_r: this rank's out/tp output features, from the whole input.

    ``ColumnParallelLinear(weight, bias, comm, sp=False)`` with this rank's shards (weight
    (out/tp, in), bias (out/tp,) or None). The input enters the region through f
    (``copy_to_tensor_parallel``), or with ``sp`` is all-gathered along T (``GatherLinear``).
    ``split(linear, comm, sp, spec)`` cuts a full ``nn.Linear``.
    """

    def __init__(self, weight, bias, comm, sp=False):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.comm, self.sp = comm, sp

    @classmethod
    def split(cls, linear, comm, sp=False, spec=COLUMN):
        b = linear.bias
        return cls(Parameter(spec.take(linear.weight.data, comm.rank, comm.size)),
                   None if b is None else Parameter(spec.take(b.data, comm.rank, comm.size)),
                   comm, sp)

    def forward(self, x):
        if self.sp:
            return GatherLinear.apply(x, self.weight, self.bias, comm=self.comm)
        return F.linear(copy_to_tensor_parallel(x, self.comm), self.weight, self.bias)


class RowParallelLinear(Module):
    """y = sum_r x_r W_r^T + b: the partial products of the ranks' input slices, summed.

    ``RowParallelLinear(weight, bias, comm, sp=False)``: weight (out, in/tp) this rank's shard,
    bias (out,) the whole (replicated) bias, added once, after the sum (g, or with ``sp`` a
    reduce-scatter along T: then each rank adds it to its own positions only).
    """

    def __init__(self, weight, bias, comm, sp=False):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.comm, self.sp = comm, sp

    @classmethod
    def split(cls, linear, comm, sp=False):
        return cls(Parameter(ROW.take(linear.weight.data, comm.rank, comm.size)), linear.bias, comm, sp)

    def forward(self, x):
        y = leave_region(F.linear(x, self.weight), self.comm, self.sp)     # (B, T or T/tp, out)
        return y if self.bias is None else y + self.bias


# ---------------------------------------------------------------- the vocabulary
class VocabParallelEmbedding(Module):
    """Rows [start, start + V/tp) of the token table; other ids give zeros, g sums the ranks.

    ``VocabParallelEmbedding(weight, comm)``: weight (Vp/tp, C), this rank's shard of the table
    padded to Vp (a multiple of tp). The output (B, T, C) is whole and the same on every rank.
    """

    def __init__(self, weight, comm):
        super().__init__()
        self.weight, self.comm = weight, comm
        self.start = comm.rank * weight.shape[0]

    def forward(self, ids):
        local = F._ids(ids) - self.start                      # (B, T) ids in this shard's rows
        inside = (local >= 0) & (local < self.weight.shape[0])
        x = ShardLookup.apply(self.weight, local, inside)     # (B, T, C), zeros for other shards' ids
        return reduce_from_tensor_parallel(x, self.comm)


class ShardLookup(Function):
    """weight[ids] where ``inside`` (ids of this shard's rows), zeros elsewhere; backward adds
    each inside row's gradient into its row, exactly as the plain embedding does."""

    @staticmethod
    def forward(ctx, weight, local, inside):
        ids = xp.where(inside, local, 0)                      # (B, T), any valid row for the outside
        out = weight[ids]                                     # (B, T, C)
        out *= inside[..., None].astype(out.dtype)
        ctx.save_for_backward(ids, inside)
        ctx.shape = weight.shape
        return out

    @staticmethod
    def backward(ctx, g):
        ids, inside = ctx.saved_tensors
        g = g * inside[..., None].astype(g.dtype)             # (B, T, C): outside rows add nothing
        plain = SimpleNamespace(saved_tensors=(ids,), shape=ctx.shape)
        return Embedding.backward(plain, g)[0], None, None


class VocabParallelCE(Function):
    """Cross-entropy from vocabulary-parallel logits, never gathering them.

    logits (..., V/tp) this rank's columns [start, start + V/tp) of the padded vocabulary;
    targets (...) global ids; columns at or past ``vocab_size`` are padding (masked to -inf).
    Forward all-reduces the row max, then the sums of exponentials and the target's shifted
    logit (one message): loss = mean over valid rows of log(sum exp) - logit[target].
    Backward is local: (softmax - onehot) / n_valid on this rank's columns.
    """

    @staticmethod
    def forward(ctx, logits, targets, comm=None, start=0, vocab_size=0, ignore_index=-100):
        Vl = logits.shape[-1]
        if targets.shape != logits.shape[:-1]:
            raise ValueError(f"cross_entropy: targets of shape {targets.shape} do not match logits "
                             f"of shape {logits.shape} (expected {logits.shape[:-1]})")
        x = upcast(logits)                                    # float32 or 64, written in place below
        x = (x.copy(order="C") if x is logits else xp.ascontiguousarray(x)).reshape(-1, Vl)  # (N, V/tp)
        real = min(max(vocab_size - start, 0), Vl)            # columns of real tokens here
        x[:, real:] = -xp.inf
        t = targets.reshape(-1)                               # (N,)
        valid = t != ignore_index
        # as in the plain cross-entropy: checked without stalling a GPU (every tp rank holds the
        # same targets, so every rank raises), and bad ids own no column
        backend.check((((t < 0) | (t >= vocab_size)) & valid).any(),
                      f"cross_entropy: target ids must be in [0, {vocab_size}) (or ignore_index)")
        local = t - start
        owned = valid & (local >= 0) & (local < real)          # rows whose target is in my columns
        local = xp.where(owned, local, 0)
        rows = xp.arange(t.shape[0])
        top = x.max(axis=1)                                   # (N,)
        comm.allreduce_(top, "max")
        x -= top[:, None]                                     # shifted logits (N, V/tp)
        both = xp.stack([xp.zeros_like(top), xp.where(owned, x[rows, local], 0.0)])  # (2, N)
        xp.exp(x, out=x)
        both[0] = x.sum(axis=1)
        comm.allreduce_(both)                                 # sum of exp, target's shifted logit
        x /= both[0][:, None]                                 # this rank's softmax columns
        logp = both[1] - xp.log(both[0])                      # (N,)
        n = xp.maximum(valid.sum(), 1).astype(x.dtype)        # rows that count, on the device
        ctx.save_for_backward(x, local, owned, valid)
        ctx.n, ctx.shape, ctx.dtype = n, logits.shape, logits.dtype
        return xp.asarray(-(logp * valid).sum() / n, dtype=x.dtype)

    @staticmethod
    def backward(ctx, g):
        probs, local, owned, valid = ctx.saved_tensors
        d = probs.copy()                                      # (N, V/tp)
        d[xp.arange(local.shape[0]), local] -= owned.astype(d.dtype)
        d *= (valid * (g / ctx.n)).astype(d.dtype)[:, None]
        return d.reshape(ctx.shape).astype(ctx.dtype, copy=False), None  # (..., V/tp)


class VocabParallelCrossEntropy(Module):
    """The loss of a GPT whose head is vocabulary-parallel (swapped in for ``CrossEntropyLoss``).

    ``VocabParallelCrossEntropy(comm, start, vocab_size)``: this rank's logits are the padded
    vocabulary's columns from ``start``; ``vocab_size`` is the real (unpadded) vocabulary.
    """

    def __init__(self, comm, start: int, vocab_size: int):
        super().__init__()
        self.comm, self.start, self.vocab_size = comm, start, vocab_size

    def forward(self, logits, targets, ignore_index=-100):
        ids = targets.data if isinstance(targets, Tensor) else xp.asarray(targets)
        return VocabParallelCE.apply(logits, ids, comm=self.comm, start=self.start,
                                     vocab_size=self.vocab_size, ignore_index=ignore_index)

