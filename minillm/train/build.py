"""Building a run's engine: the one place that decides the layout, the gradient sync and precision.

``build_engine(cfg, model, comm)`` reads ``[parallel]`` and ``[train]`` once and assembles, in
this order:

1. the rank grid (``distributed/topology.py``): which data-parallel replica, pipeline stage and
   tensor-parallel shard this rank is;
2. tensor parallelism (``distributed/tp_model.parallelize``): the model's layers swapped for their
   split versions over the tp group (nothing when tp=1), before anything looks at parameters;
3. the parameters this rank computes with: all of them (tp: its shards), or its pipeline stage's
   (the others are dropped from the model);
4. the gradient sync over the replicas (``make_grad_sync``): none, ``DataParallel`` or ZeRO's
   ``ZeroSync`` / ``Zero2Sync`` / ``Zero3Sync``, extended over the tp group by the plan; the
   optimizer later comes from the sync (``engine.make_optimizer``), so the ZeRO decision is made
   here only;
5. the precision object over the parameters whose master weights this rank keeps
   (``sync.owned``: all of them, or its shards of them under ZeRO-2/3; ``amp/precision.py``);
6. the engine (``minillm/engine.py``), which receives all of the above in its constructor.

Before all of that, ``train.recompute`` decides which activations backward recomputes
(``model/recompute.py`` wraps the model's blocks; ZeRO-3's wrappers then go around those).

Supported layouts: any dp x tp x pp; ZeRO-1 with dp x tp (not with pp); ZeRO-2/3 with dp only
(not with tp or pp); sequence parallelism with any tp >= 2 layout.
"""
from minillm.amp import make_precision
from minillm.distributed.data_parallel import DataParallel
from minillm.distributed.grad_sync import GradSync, LocalSync
from minillm.distributed.pipeline import PipelineEngine
from minillm.distributed.topology import (drop_other_stages, make_topology, stage_bounds,
                                          stage_parameters)
from minillm.distributed.tp_model import parallelize
from minillm.distributed.zero import ZeroSync
from minillm.distributed.zero2 import Zero2Sync
from minillm.distributed.zero3 import Zero3Sync
from minillm.engine import Engine, LocalEngine
from minillm.model.recompute import apply_recompute


_SYNCS = {  # parallel.zero -> the gradient sync over more than one replica
    0: lambda par, named, comm, model, dtype: DataParallel(named, comm, bucket_mb=par.bucket_mb,
                                                           allreduce=par.allreduce),
    1: lambda par, named, comm, model, dtype: ZeroSync(named, comm),
    2: lambda par, named, comm, model, dtype: Zero2Sync(named, comm, bucket_mb=par.bucket_mb, dtype=dtype),
    3: lambda par, named, comm, model, dtype: Zero3Sync(model, named, comm, dtype=dtype),
}


def make_grad_sync(par, named_params, dp_comm, model=None, dtype="float32") -> GradSync:
    """How gradients are synchronised over ``dp_comm``: ``LocalSync`` for one replica, else
    ``DataParallel`` (``parallel.zero=0``), ``ZeroSync`` (1), ``Zero2Sync`` (2) or ``Zero3Sync``
    (3, which shards ``model``'s weights and wraps its blocks). ``dtype``: ``train.dtype`` (ZeRO-2/3
    keep the weights in it). Collective over ``dp_comm`` (the replicas start from rank 0's weights)."""
    if dp_comm.size == 1:
        return LocalSync()
    return _SYNCS[par.zero](par, list(named_params), dp_comm, model, dtype)


def build_engine(cfg, model, comm, keep_step=None) -> Engine:
    """The engine for this config on this rank of ``comm`` (collective: every rank calls it).
    ``keep_step``: which step's timeline a pipeline engine keeps (default: the latest)."""
    par = cfg.parallel
    apply_recompute(model, cfg.train.recompute)  # which activations backward recomputes
    topo = make_topology(comm, par.dp, par.pp, par.tp)
    tp = parallelize(model, topo.tp_comm, sp=par.sp)
    if par.pp > 1:
        bounds = stage_bounds(model.config.n_layer, par.pp, par.partition_blocks, par.virtual_stages)
        named = stage_parameters(model, bounds, topo.stage, par.pp)
        drop_other_stages(model, named)
    else:
        named = list(model.named_parameters())
    sync = tp.wrap_sync(make_grad_sync(par, named, topo.dp_comm, model=model, dtype=cfg.train.dtype), named)
    precision = make_precision(cfg.train, sync.owned(named))  # ZeRO-2/3: this rank's pieces
    if par.pp > 1:
        return PipelineEngine(model, topo, bounds, named, sync, precision, schedule=par.schedule,
                              microbatches=par.microbatches, virtual_stages=par.virtual_stages,
                              keep_step=keep_step, tensor_parallel=tp)
    return LocalEngine(model, precision, sync, dp_rank=topo.dp_rank, dp_size=topo.dp, tensor_parallel=tp)
