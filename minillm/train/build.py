"""Building a run's engine: the one place that decides the layout, the gradient sync and precision.

``build_engine(cfg, model, comm)`` reads ``[parallel]`` and ``[train]`` once and assembles, in
this order:

1. the rank grid (``distributed/topology.py``): which data-parallel replica and pipeline stage
   this rank is;
2. the parameters this rank computes with: all of them, or its pipeline stage's (the others are
   dropped from the model);
3. the gradient sync over the replicas (``make_grad_sync``): none, ``DataParallel`` or ZeRO-1's
   ``ZeroSync``; the optimizer later comes from the sync (``engine.make_optimizer``), so the ZeRO
   decision is made here only;
4. the precision object over those parameters (``amp/precision.py``);
5. the engine (``minillm/engine.py``), which receives all of the above in its constructor.
"""
from minillm.amp import make_precision
from minillm.distributed.data_parallel import DataParallel
from minillm.distributed.grad_sync import GradSync, LocalSync
from minillm.distributed.pipeline import PipelineEngine
from minillm.distributed.topology import (drop_other_stages, make_topology, stage_bounds,
                                          stage_parameters)
from minillm.distributed.zero import ZeroSync
from minillm.engine import Engine, LocalEngine


def make_grad_sync(par, named_params, dp_comm) -> GradSync:
    """How gradients are synchronised over ``dp_comm``: ``LocalSync`` for one replica, else
    ``ZeroSync`` (``parallel.zero=1``) or ``DataParallel``. Collective over ``dp_comm`` (the
    replicas start from rank 0's weights)."""
    if dp_comm.size == 1:
        return LocalSync()
    if par.zero == 1:
        return ZeroSync(named_params, dp_comm)
    return DataParallel(named_params, dp_comm, bucket_mb=par.bucket_mb, allreduce=par.allreduce)


def build_engine(cfg, model, comm, keep_step=None) -> Engine:
    """The engine for this config on this rank of ``comm`` (collective: every rank calls it).
    ``keep_step``: which step's timeline a pipeline engine keeps (default: the latest)."""
    par = cfg.parallel
    topo = make_topology(comm, par.dp, par.pp)
    if par.pp > 1:
        bounds = stage_bounds(model.config.n_layer, par.pp, par.partition_blocks, par.virtual_stages)
        named = stage_parameters(model, bounds, topo.stage, par.pp)
        drop_other_stages(model, named)
    else:
        named = list(model.named_parameters())
    sync = make_grad_sync(par, named, topo.dp_comm)
    precision = make_precision(cfg.train, named)
    if par.pp > 1:
        return PipelineEngine(model, topo, bounds, named, sync, precision, schedule=par.schedule,
                              microbatches=par.microbatches, virtual_stages=par.virtual_stages,
                              keep_step=keep_step)
    return LocalEngine(model, precision, sync, dp_rank=topo.dp_rank, dp_size=topo.dp)
