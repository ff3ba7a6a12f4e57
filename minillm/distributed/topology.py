"""The (dp, pp) grid of MPI ranks and its sub-communicators.

With ``dp`` data-parallel replicas of a pipeline of ``pp`` stages there are ``dp * pp`` ranks::

    world rank = dp_rank * pp + stage          (dp=2, pp=2:  rank 0 1 | 2 3)
                                                               stage 0 1 | 0 1
Each rank belongs to two groups, both cut out of the world with ``Comm.split``:

- its *pipeline* (``pipe_comm``, the ``pp`` stages of one replica, rank = stage): activations
  and their gradients travel here, stage to stage;
- its *data-parallel group* (``dp_comm``, the ``dp`` ranks that hold the same stage): the
  gradients of that stage's parameters are averaged here.

With tied embeddings the first and the last stage of a pipeline both hold the token embedding;
``tied_comm`` joins exactly those two ranks so their two gradient contributions can be summed
(other stages get a group of their own that they never use: every rank must call ``split``).

Stage 0 of replica 0 is world rank 0, which prints, writes metrics and checkpoints.

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

    def world_rank(self, dp_rank: int, stage: int) -> int:
        return dp_rank * self.pp + stage

    def __repr__(self):
        return (f"Topology(rank {self.rank}: stage {self.stage}/{self.pp}, "
                f"replica {self.dp_rank}/{self.dp})")


def grid_coords(rank: int, pp: int) -> tuple[int, int]:
    """(dp_rank, stage) of a world rank: consecutive ranks form one pipeline."""
    return rank // pp, rank % pp


def make_topology(comm, dp: int, pp: int) -> Topology:
    """Split ``comm`` into the (dp, pp) grid. Every rank must call this (it is collective)."""
    if dp < 1 or pp < 1:
        raise UserError(f"parallel.dp={dp} and parallel.pp={pp} must both be >= 1")
    if dp * pp != comm.size:
        raise UserError(f"parallel.dp={dp} x parallel.pp={pp} = {dp * pp} ranks but the job has "
                        f"{comm.size}; launch with mpirun -np {dp * pp} or make dp x pp = {comm.size}")
    dp_rank, stage = grid_coords(comm.rank, pp)
    pipe_comm = comm.split(color=dp_rank, key=stage)
    dp_comm = comm.split(color=stage, key=dp_rank)
    # first and last stage of replica r share colour r; the others get a colour no one else has
    ends = stage in (0, pp - 1)
    tied_comm = comm.split(color=dp_rank if ends else dp + comm.rank, key=stage)
    return Topology(comm, dp, pp, dp_rank, stage, pipe_comm, dp_comm, tied_comm)


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
