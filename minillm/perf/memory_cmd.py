"""`minillm memory CONFIG [--section.key=value ...] [--measure] [--memory-limit SIZE]`.

Prints the memory ledger (``memory.py``) of every rank of the config's layout; with
``--memory-limit`` refuses (exit 2) a layout the ledger predicts will not fit; with ``--measure``
it then runs a few real steps on this process, or on every rank under
``mpirun -np N python -m mpi4py -m minillm memory ...``, and prints the measured peak of each rank
next to the prediction (``memory_measure.py``).
"""
from __future__ import annotations

import dataclasses
import json

from minillm import backend
from minillm.config import check_layout, data_dir, load_config
from minillm.config_section import parse_size
from minillm.data import read_meta
from minillm.errors import UserError
from minillm.perf.memory import check_memory_limit, fmt_bytes, format_ledger, memory_ledger


def with_vocab(cfg, comm=None, prepare=False):
    """``cfg`` with ``model.vocab_size`` filled in from the dataset when it is 0 (preparing the
    dataset first when ``prepare``, as ``train`` would)."""
    if cfg.model.vocab_size:
        return cfg
    if prepare:
        from minillm.train.trainer import prepare_data
        _, meta = prepare_data(cfg, comm)
    else:
        meta = read_meta(data_dir(cfg))
    if meta is None:
        raise UserError(f"model.vocab_size=0 means 'from the dataset', but {data_dir(cfg)} is not "
                        "prepared; pass --model.vocab_size=N, --measure, or run minillm prepare first")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=int(meta["vocab_size"])))


def memory_command(config, overrides, measure=False, limit=None, steps=2, as_json=False, comm=None) -> int:
    from minillm.distributed.comm import SerialComm
    comm = comm or SerialComm()
    cfg = load_config(config, overrides)
    if measure:
        check_layout(cfg, comm.size)
    cfg = with_vocab(cfg, comm, prepare=measure)
    ranks = memory_ledger(cfg, gpu=backend.resolve_device(config=cfg.train.device)[0] == "gpu")
    limit = limit or cfg.train.memory_limit
    if limit:
        check_memory_limit(ranks, parse_size("--memory-limit", limit))
    measured = None
    if measure:
        from minillm.perf.memory_measure import measure_training
        mine = measure_training(cfg, comm, steps=steps)
        every = comm.allgather_obj(mine)
        measured = {r: m["peak"] for r, m in enumerate(every)}
    if comm.rank != 0:
        return 0
    if as_json:
        out = [{"rank": r.rank, "stage": r.stage, "parts": r.parts, "total": r.total, "state": r.state,
                "activations": r.activations, "peak_at": r.peak_at,
                **({"measured": every[r.rank]} if measured else {})} for r in ranks]
        print(json.dumps(out))
        return 0
    print(format_ledger(ranks, measured))
    if measured:
        rss = every[0]
        print(f"rank 0 process RSS: {fmt_bytes(rss['rss_before'])} before building the trainer, peak "
              f"{fmt_bytes(rss['rss_peak'])} (interpreter, libraries and MPI included); step time "
              f"{1000 * rss['step_s']:.0f} ms")
    return 0
