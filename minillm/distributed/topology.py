"""The dp x tp x pp grid of MPI ranks and its sub-communicators.

With ``dp`` data-parallel replicas of a pipeline of ``pp`` stages, each stage split over ``tp``
tensor-parallel ranks, there are ``dp * pp * tp`` ranks, tp the innermost (fastest) dimension::

    world rank = (dp_rank * pp + stage) * tp + tp_rank
                                   dp=2, pp=2, tp=1:  rank 0 1 | 2 3         stage 0 1 | 0 1
                                   dp=1, pp=2, tp=2:  rank 0 1 | 2 3         stage 0 0 | 1 1

tp is innermost because its collectives sit on the critical path of every layer (an all-reduce
per sub-layer, forward and backward): its ranks should be the closest ones (the same node, NVLink).
Each rank belongs to these groups, all cut out of the world with ``Comm.split``:

- its *tensor-parallel group* (``tp_comm``, the ``tp`` ranks that hold the shards of one stage of
  one replica, rank = tp_rank): activations are all-reduced / gathered here inside every layer;
- its *pipeline* (``pipe_comm``, the ``pp`` stages of one replica with the same tp_rank, rank =
  stage): activations and their gradients travel here, stage to stage;
- its *data-parallel group* (``dp_comm``, the ``dp`` ranks that hold the same shard of the same
  stage): the gradients of those parameters are averaged here.

With tied embeddings the first and the last stage of a pipeline both hold the token embedding (the
same vocabulary shard for the same tp_rank); ``tied_comm`` joins exactly those two ranks so their
two gradient contributions can be summed (other stages get a group of their own that they never
use: every rank must call ``split``).

Replica 0, stage 0, tp rank 0 is world rank 0, which prints, writes metrics and checkpoints.

The partition says which parameters a stage holds: stage 0 the embeddings, the last stage the
final norm and the output head (and, with tied embeddings, its own copy of the token embedding),
and every stage a contiguous range of blocks: ``parallel.partition`` blocks per stage, or as even
as possible, left-over blocks going to the earliest stages (the last one also computes the head).

With ``v`` virtual stages (interleaved schedules) the blocks are cut into ``p v`` chunks instead,
and rank r holds chunks r, r + p, r + 2p, ...: non-adjacent pieces of the model, so that a
micro-batch passes every rank v times. ``bounds`` then lists the chunks in model order (chunk g
on rank g % p).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy

from minillm.backend import xp
from minillm.errors import UserError

TIED = "transformer.wte.weight"   # the tied embedding's serial name (lm_head.weight is the same array)


@dataclass
class Topology:
    world: object        # the Comm (or SerialComm) all ranks share
    dp: int
    pp: int
    dp_rank: int         # which replica this rank belongs to (its slice of the global batch)
    stage: int           # which pipeline stage it runs
    pipe_comm: object    # this replica's stages; pipe_comm.rank == stage
    dp_comm: object      # the ranks holding this stage; dp_comm.rank == dp_rank
    tied_comm: object    # first + last stage of this pipeline (size 2), else a group of one
    tp: int = 1
    tp_rank: int = 0     # which shard of this stage's layers this rank holds
    tp_comm: object = None   # the tp ranks of this stage and replica; tp_comm.rank == tp_rank

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.pp - 1

    @property
    def prev_stage(self) -> int | None:
        """The neighbour that sends this stage its activations (a pipe_comm rank), or None."""
        return None if self.is_first else self.stage - 1

    @property
    def next_stage(self) -> int | None:
        return None if self.is_last else self.stage + 1

    def world_rank(self, dp_rank: int, stage: int, tp_rank: int = 0) -> int:
        return (dp_rank * self.pp + stage) * self.tp + tp_rank

    def __repr__(self):
        return (f"Topology(rank {self.rank}: stage {self.stage}/{self.pp}, "
                f"replica {self.dp_rank}/{self.dp}, shard {self.tp_rank}/{self.tp})")


def grid_coords(rank: int, pp: int, tp: int = 1) -> tuple[int, int]:
    """(dp_rank, stage) of a world rank: ``tp`` consecutive ranks hold one stage's shards,
    ``pp * tp`` consecutive ranks form one pipeline. Its tp_rank is ``rank % tp``."""
    group = rank // tp
    return group // pp, group % pp


def layout_problem(dp: int, pp: int, tp: int, world_size: int) -> str | None:
    """The one-line complaint when dp x tp x pp ranks do not make the job's world, else None."""
    n = dp * tp * pp
    if n == world_size:
        return None
    dims = [("dp", dp)] + ([("tp", tp)] if tp != 1 else []) + [("pp", pp)]  # tp named when used
    text = " x ".join(f"parallel.{k}={v}" for k, v in dims)
    return (f"{text} = {n} ranks but the job has {world_size}; launch with mpirun -np {n} or make "
            f"{' x '.join(k for k, _ in dims)} = {world_size}")


def make_topology(comm, dp: int, pp: int, tp: int = 1) -> Topology:
    """Split ``comm`` into the dp x tp x pp grid. Every rank must call this (it is collective)."""
    if dp < 1 or pp < 1 or tp < 1:
        raise UserError(f"parallel.dp={dp}, parallel.tp={tp} and parallel.pp={pp} must all be >= 1")
    problem = layout_problem(dp, pp, tp, comm.size)
    if problem:
        raise UserError(problem)
    dp_rank, stage = grid_coords(comm.rank, pp, tp)
    tp_rank = comm.rank % tp
    tp_comm = comm.split(color=comm.rank // tp, key=tp_rank)
    pipe_comm = comm.split(color=dp_rank * tp + tp_rank, key=stage)
    dp_comm = comm.split(color=stage * tp + tp_rank, key=dp_rank)
    # first and last stage of (replica, shard) c share colour c; the others get a colour of their own
    ends = stage in (0, pp - 1)
    tied_comm = comm.split(color=dp_rank * tp + tp_rank if ends else dp * tp + comm.rank, key=stage)
    return Topology(comm, dp, pp, dp_rank, stage, pipe_comm, dp_comm, tied_comm, tp, tp_rank, tp_comm)


# ---------------------------------------------------------------- the partition: who holds what
def stage_bounds(n_layer: int, pp: int, blocks=(), v: int = 1) -> list[tuple[int, int]]:
    """(start, stop) block range of every chunk, in model order (p v chunks; chunk g on rank
    g % p): ``blocks`` per chunk, or an even split."""
    chunks = pp * v
    if not blocks:
        base, extra = divmod(n_layer, chunks)
        blocks = [base + (s < extra) for s in range(chunks)]
    if len(blocks) != chunks or sum(blocks) != n_layer:
        raise ValueError(f"partition {list(blocks)} does not place {n_layer} blocks on {chunks} stages")
    edges = numpy.cumsum([0, *blocks]).tolist()
    return list(zip(edges[:-1], edges[1:]))


def stage_of(name: str, bounds, tied: bool = False, pp: int | None = None) -> list[int]:
    """Stages (ranks of the pipeline) that hold the parameter ``name`` (serial GPT naming);
    ``bounds`` lists every chunk, chunk g living on stage g % pp (pp defaults to one chunk each)."""
    pp = len(bounds) if pp is None else pp
    last = pp - 1
    if name.startswith(("transformer.wte.", "transformer.wpe.")):
        return [0, last] if tied and name == TIED else [0]  # tied: it is the output head too
    if name.startswith(("transformer.ln_f.", "lm_head.")):
        return [last]
    if name.startswith("transformer.h."):
        i = int(name.split(".")[2])
        return sorted({g % pp for g, (a, b) in enumerate(bounds) if a <= i < b})
    raise RuntimeError(f"parameter {name!r} belongs to no pipeline stage: teach stage_of about it")


def stage_parameters(model, bounds, stage: int, pp: int | None = None) -> list:
    """(name, Parameter) pairs stage ``stage`` computes with, in the serial order."""
    tied = model.config.tie_embeddings
    return [(n, p) for n, p in model.named_parameters() if stage in stage_of(n, bounds, tied, pp)]


def drop_other_stages(model, named) -> None:
    """Free the memory of parameters this stage does not hold. Each becomes a zero-stride view of
    a single zero: the shape stays (the model still reports its size and FLOPs) but no memory is
    behind it (and with NumPy it is read-only, so a stray write on the wrong stage fails)."""
    keep = {id(p) for _, p in named}
    for _, p in model.named_parameters():
        if id(p) not in keep:
            p.data = xp.broadcast_to(xp.zeros((), dtype=p.data.dtype), p.data.shape)
