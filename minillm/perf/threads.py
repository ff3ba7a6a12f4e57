"""How many BLAS threads a run uses: chosen on purpose, set with threadpoolctl, printed.

OpenBLAS starts one thread per core, and NumPy's matmuls use them all. For the small matmuls of
a small model the extra threads mostly wake up, wait and synchronise; on a shared machine a
thread whose core another process holds stalls every matmul it takes part in. Measured on the
2-core VM (BENCHMARKS.md, "BLAS threads"): one thread trains the default model faster than two,
idle or loaded, and under load two threads are several times slower. So the choice is:

- ``train.threads = N > 0``: N (the user decides; environment variables are overridden);
- several MPI ranks: one per rank (the ranks already take the cores);
- a GPU run: one (the host only feeds the device);
- a model narrower than ``WIDE`` (``model.n_embd``): one;
- otherwise every core this process may run on.
"""
from __future__ import annotations

import os

from minillm import backend

WIDE = 512  # n_embd from which matmuls are big enough for a second thread to pay (measured)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def choose_threads(cfg, world_size: int = 1, gpu: bool | None = None) -> tuple[int, str]:
    """(BLAS threads, the reason in a few words) for a run of ``cfg`` on ``world_size`` ranks;
    ``gpu``: whether it runs on the GPU (default: the active device, which ``train.device="auto"``
    alone cannot tell)."""
    t = cfg.train
    gpu = backend.is_gpu() if gpu is None else gpu
    if t.threads > 0:
        return t.threads, "train.threads"
    if world_size > 1:
        return 1, "one per MPI rank"
    if gpu:
        return 1, "GPU run"
    if cfg.model.n_embd < WIDE:
        return 1, f"model.n_embd < {WIDE}: one is faster"
    return available_cores(), "all cores"


def set_blas_threads(n: int) -> int:
    """Limit every BLAS library loaded in this process to ``n`` threads; returns the count now
    in force (the smallest over the libraries found)."""
    from threadpoolctl import ThreadpoolController

    import numpy  # noqa: F401  (load NumPy's BLAS before asking which libraries there are)
    controller = ThreadpoolController()
    controller.limit(limits=int(n), user_api="blas")
    counts = [p["num_threads"] for p in controller.info() if p["user_api"] == "blas"]
    return min(counts) if counts else int(n)


def apply_threads(cfg, world_size: int = 1) -> str:
    """Choose and set the thread count for ``cfg``; returns ``"N (reason)"`` for the run header."""
    n, why = choose_threads(cfg, world_size)
    return f"{set_blas_threads(n)} ({why})"
