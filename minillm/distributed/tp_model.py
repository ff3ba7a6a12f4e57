"""Tensor parallelism applied to a built GPT, and what the engine needs to know about it.

The model code knows nothing of parallelism. ``parallelize(model, tp_comm, sp)`` takes a GPT
built from the seed (the same full weights on every rank, so a split run starts exactly where the
serial one does) and swaps its layers for their tensor-parallel versions, keeping every
parameter's serial name (picotron style):

    transformer.wte                   VocabParallelEmbedding (rows of the padded vocabulary)
    transformer.h.i.attn.c_attn       ColumnParallelLinear, q, k and v each split by heads
    transformer.h.i.attn.c_proj       RowParallelLinear            (attn.n_head = n_head / tp)
    transformer.h.i.mlp.c_fc, c_gate  ColumnParallelLinear
    transformer.h.i.mlp.c_proj        RowParallelLinear
    lm_head                           ColumnParallelLinear over the vocabulary (tied: wte's shard)
    criterion                         VocabParallelCrossEntropy
    with sp: every Dropout draws its own positions' masks, transformer.drop scatters along T

It returns a ``TensorParallelPlan``: which names are cut how (``ShardSpec``), which replicated
parameters get partial gradients (with sp: the norms and row-parallel biases), and the
conversions an engine needs: ``gather`` (shards -> full tensors by serial name, for checkpoints),
``local`` (a full state -> this rank's shards), ``count_once`` (a replicated gradient enters the
global norm once, not tp times), ``wrap_sync`` (the gradient sync gains the tp group) and
``seq_len`` (a pipeline's activation length). ``NoTensorParallel`` is the same interface doing
nothing (tp=1), so engines have no ``if tp`` branches.

SwiGLU's gate and up projections are two column-parallel layers that each enter the region on
their own: one all-reduce (sp: one all-gather and reduce-scatter) more per layer than Megatron-LM,
which fuses them into one matrix.
"""
from __future__ import annotations

import time

from minillm.backend import xp
from minillm.distributed.grad_sync import GradSync
from minillm.distributed.sequence_parallel import SequenceScatter, SequenceSliceRNG
from minillm.distributed.tensor_parallel import all_gather, all_reduce
from minillm.distributed.tp_layers import (COLUMN, QKV, ROW, ColumnParallelLinear, RowParallelLinear,
                                           VocabParallelCrossEntropy, VocabParallelEmbedding)
from minillm.errors import UserError
from minillm.nn.module import Parameter
from minillm.optim.clip import grad_square_sum


class NoTensorParallel:
    """tp=1: every parameter whole, every conversion the identity."""

    rank, size, sp = 0, 1, False

    def gather(self, local: dict) -> dict:
        return local

    def local(self, state: dict) -> dict:
        return state

    def gather_optimizer_state(self, sd: dict) -> dict:
        return sd

    def local_optimizer_state(self, sd: dict) -> dict:
        return sd

    def count_once(self, sq: float, named_masters) -> float:
        return sq

    def wrap_sync(self, sync, named):
        return sync

    def seq_len(self, T: int) -> int:
        return T


class TensorParallelPlan(NoTensorParallel):
    """How a GPT is split over ``comm`` (a tp group); made by ``parallelize``.

    ``specs``: name -> (ShardSpec, full shape) of every split parameter; ``partial``: names of
    replicated parameters whose gradients are partial sums over the group (sp only).
    """

    def __init__(self, comm, sp: bool, specs: dict, partial: set):
        self.comm, self.sp, self.specs, self.partial = comm, sp, specs, set(partial)
        self.rank, self.size = comm.rank, comm.size

    def seq_len(self, T):
        return T // self.size if self.sp else T

    # ---- checkpoints: full tensors by serial name <-> this rank's shards ----------------------
    def gather(self, local):
        """Full tensors on tp rank 0 ({} on the others). Keys are names, or ``name/<buffer>``
        (optimizer moments). Collective over the group: every rank passes the same keys."""
        out = {}
        for key, a in local.items():
            name = key.split("/")[0]
            if name in self.specs:
                spec, shape = self.specs[name]
                pieces = all_gather(self.comm, a[None], axis=0)              # (tp, *shard)
                a = spec.join(list(pieces), shape[spec.axis])
            out[key] = a
        return out if self.rank == 0 else {}

    def local(self, state):
        """This rank's shard of every split tensor in a full (serial-format) state."""
        out = dict(state)
        for name, (spec, shape) in self.specs.items():
            if name in state:
                if tuple(state[name].shape) != shape:
                    raise UserError(f"tensor {name!r} has shape {tuple(state[name].shape)} but the model "
                                    f"expects {shape}; it was written for a different model")
                out[name] = spec.take(state[name], self.rank, self.size)
        return out

    def gather_optimizer_state(self, sd):
        """An optimizer state dict (moments per name, this rank's shapes) in the serial format."""
        flat = self.gather({f"{n}/{k}": a for n, st in sd["state"].items() for k, a in st.items()})
        state = {n: {} for n in sd["state"]} if self.rank == 0 else {}
        for key, a in flat.items():
            n, k = key.rsplit("/", 1)
            state[n][k] = a
        return {**sd, "state": state}

    def local_optimizer_state(self, sd):
        state = {}
        for n, st in sd["state"].items():
            state[n] = {k: self.local({n: a})[n] for k, a in st.items()}
        return {**sd, "state": state}

    # ---- gradients ------------------------------------------------------------------------------
    def count_once(self, sq, named_masters):
        """Split parameters' squares add up over the group; a replicated one is the same on every
        rank, so only tp rank 0 keeps its share."""
        if self.rank == 0:
            return sq
        return sq - grad_square_sum([p for n, p in named_masters if n not in self.specs])

    def wrap_sync(self, sync, named):
        return TensorParallelSync(sync, self.comm, [(n, p) for n, p in named if n in self.partial])


class TensorParallelSync(GradSync):
    """A data-parallel ``GradSync`` (``inner``) extended over the tp group ``comm``.

    After ``inner`` has averaged every gradient over the replicas, the partial gradients (sp's
    norms and biases) are summed over the tp group in one message. ``agree`` and
    ``grad_sq_reduce`` also combine over the group, since its ranks hold different shards.
    """

    def __init__(self, inner, comm, partial_named):
        self.inner, self.tp_comm, self.partial = inner, comm, list(partial_named)
        self.comm = inner.comm
        self.last_wait_s = 0.0

    def no_sync(self):
        return self.inner.no_sync()

    def finish_gradient_sync(self):
        self.inner.finish_gradient_sync()
        t0 = time.perf_counter()
        if self.partial:
            grads = [p.grad if p.grad is not None else xp.zeros_like(p.data) for _, p in self.partial]
            flat = all_reduce(self.tp_comm, xp.concatenate([g.reshape(-1) for g in grads]))
            start = 0
            for (_, p), g in zip(self.partial, grads):
                p.grad = flat[start:start + g.size].reshape(g.shape).astype(g.dtype, copy=False)
                start += g.size
        self.last_wait_s = self.inner.last_wait_s + time.perf_counter() - t0

    def agree(self, found_inf):
        flag = self.inner.agree(found_inf)
        return self.tp_comm.allreduce_scalar(float(flag), "max") > 0

    def grad_sq_reduce(self, sq):
        return self.inner.grad_sq_reduce(self.tp_comm.allreduce_scalar(sq, "sum"))

    def mean_over_replicas(self, value):
        return self.inner.mean_over_replicas(value)

    def make_optimizer(self, train_cfg, params):
        return self.inner.make_optimizer(train_cfg, params)


# ---------------------------------------------------------------- the swap
def parallelize(model, comm, sp: bool = False):
    """Swap ``model``'s layers for tensor-parallel ones over ``comm`` (see the module docstring);
    returns the plan (``NoTensorParallel`` for a group of one)."""
    if comm.size == 1:
        return NoTensorParallel()
    cfg, r, tp = model.config, comm.rank, comm.size
    V, C = cfg.vocab_size, cfg.n_embd
    specs, partial = {}, set()
    t = model.transformer

    wte = Parameter(COLUMN.take(t.wte.weight.data, r, tp))            # (Vp/tp, C)
    specs["transformer.wte.weight"] = (COLUMN, (V, C))
    head = wte if cfg.tie_embeddings else Parameter(COLUMN.take(model.lm_head.weight.data, r, tp))
    if not cfg.tie_embeddings:
        specs["lm_head.weight"] = (COLUMN, (V, C))
    t.wte = VocabParallelEmbedding(wte, comm)
    model.lm_head = ColumnParallelLinear(head, None, comm, sp)
    model.criterion = VocabParallelCrossEntropy(comm, r * wte.shape[0], V)

    for i, block in enumerate(t.h):
        pre = f"transformer.h.{i}."
        for path, spec, kind in (("attn.c_attn", QKV, "column"), ("attn.c_proj", ROW, "row"),
                                 ("mlp.c_fc", COLUMN, "column"), ("mlp.c_gate", COLUMN, "column"),
                                 ("mlp.c_proj", ROW, "row")):
            owner, attr = path.split(".")
            mod = getattr(block, owner)
            linear = getattr(mod, attr, None)
            if linear is None:  # no c_gate without SwiGLU
                continue
            full = tuple(linear.weight.shape)
            specs[f"{pre}{path}.weight"] = (spec, full)
            if kind == "column":
                new = ColumnParallelLinear.split(linear, comm, sp, spec)
                if linear.bias is not None:
                    specs[f"{pre}{path}.bias"] = (spec, (full[0],))
            else:
                new = RowParallelLinear.split(linear, comm, sp)
                if linear.bias is not None and sp:
                    partial.add(f"{pre}{path}.bias")
            setattr(mod, attr, new)
        block.attn.n_head = cfg.n_head // tp
        if sp:
            partial.update(f"{pre}{n}" for n, _ in block.named_parameters() if n.startswith("ln_"))
            for drop in (block.drop_1, block.drop_2):
                drop.rng = SequenceSliceRNG(drop.rng, r, tp)
    if sp:
        partial.update(f"transformer.ln_f.{n}" for n, _ in t.ln_f.named_parameters())
        t.drop.rng = SequenceSliceRNG(t.drop.rng, r, tp)
        t.drop = SequenceScatter(t.drop, comm)
    names = {n for n, _ in model.named_parameters()}
    assert set(specs) | partial <= names, sorted(set(specs) | partial - names)
    return TensorParallelPlan(comm, sp, specs, partial)
