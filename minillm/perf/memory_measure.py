"""Measuring a rank's memory during real training steps, to hold the ledger to account.

``measure_training(cfg, comm)`` builds the real ``Trainer`` (real data, the real engine) and runs
a few optimizer steps. On the CPU, NumPy reports every array to Python's ``tracemalloc``, started
before the model exists, so its peak over the measured steps is the most this process held at
once of everything the ledger counts (and of the small Python objects it estimates); the peak
RSS of the process is reported as well, for reference (it also holds the interpreter, the
libraries and MPI's own buffers). On the GPU the CuPy memory pool is watched instead: a memory
hook tracks the bytes the pool hands out and their peak.

Step time is measured on further steps with tracing off (tracemalloc slows Python down).
"""
from __future__ import annotations

import dataclasses
import os
import resource
import tempfile
import time
import tracemalloc

import numpy

from minillm import backend
from minillm.amp.dtypes import compute_dtype


class _PoolPeak:
    """Bytes handed out by CuPy's memory pool, and their peak (a CuPy MemoryHook)."""

    def __init__(self):
        import cupy

        class Hook(cupy.cuda.MemoryHook):
            name = "minillm_peak"

            def __init__(self):
                self.used, self.peak = 0, 0

            def malloc_postprocess(self, device_id, size, mem_size, mem_ptr, pmem_id):
                self.used += mem_size
                self.peak = max(self.peak, self.used)

            def free_postprocess(self, device_id, mem_size, mem_ptr, pmem_id):
                self.used -= mem_size

        self.hook = Hook()
        self.hook.__enter__()

    def reset_peak(self):
        self.hook.peak = self.hook.used

    def peak(self):
        return self.hook.peak

    def stop(self):
        self.hook.__exit__()


class _TracedPeak:
    def __init__(self):
        tracemalloc.start()

    def reset_peak(self):
        tracemalloc.reset_peak()

    def peak(self):
        return tracemalloc.get_traced_memory()[1]

    def stop(self):
        tracemalloc.stop()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_training(cfg, comm, steps: int = 2, warmup: int = 1, timed: int = 2) -> dict:
    """Run ``warmup`` + ``steps`` real optimizer steps of ``cfg`` on this rank (collective:
    every rank of ``comm`` calls it); returns ``{"peak", "held", "rss_before", "rss_peak",
    "step_s"}`` for this rank (``held``: bytes still allocated after the measured steps). Nothing is written but a scratch run directory, removed afterwards."""
    from minillm.train.trainer import Trainer
    with tempfile.TemporaryDirectory(prefix="minillm_measure_") as tmp:
        out = comm.bcast_obj(tmp, 0)  # rank 0's directory (the one that writes)
        t = dataclasses.replace(cfg.train, out_dir=out, sample_tokens=0, progress=False,
                                memory_limit="")
        cfg = dataclasses.replace(cfg, train=t)
        backend.set_device(backend.resolve_device(config=t.device)[0])  # as the Trainer will
        compute_dtype(t.dtype)  # imports ml_dtypes now: its import is not training memory
        import threadpoolctl  # so is this one's, which the Trainer makes to set BLAS threads, and
        threadpoolctl.ThreadpoolController()  # the caches of its first scan of the loaded libraries
        import mmap  # noqa: F401  (imported by the data's memmap on the first batch)
        rss_before = _rss()
        meter = _PoolPeak() if backend.is_gpu() else _TracedPeak()
        try:
            trainer = Trainer(cfg, comm=comm, log=lambda msg: None)
            for i in range(warmup + steps):
                if i == warmup:
                    backend.synchronize()
                    meter.reset_peak()
                trainer.train_step()
                trainer.step += 1
            backend.synchronize()
            peak = meter.peak()
            held = _held() if not backend.is_gpu() else meter.hook.used
        finally:
            meter.stop()
        t0 = time.perf_counter()
        for _ in range(timed):
            trainer.train_step()
            trainer.step += 1
        backend.synchronize()
        step_s = (time.perf_counter() - t0) / max(timed, 1)
        trainer.close()  # release the scratch run directory's lock before it is removed
        comm.barrier()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak": int(peak), "held": int(held), "rss_before": rss_before, "rss_peak": rss_peak,
            "step_s": step_s}


def _held() -> int:
    """Bytes traced now: between steps, what the run keeps (state, buffers, caches)."""
    return tracemalloc.get_traced_memory()[0]


def graph_bytes(root, exclude=()) -> int:
    """Bytes of the distinct buffers the graph behind ``root`` keeps alive: every op's output and
    every array saved for backward, a view counted as the buffer it views, ``exclude`` (arrays,
    e.g. the parameters') left out. What the ledger calls the activations."""
    from minillm.autograd.tensor import topological_order

    def owner(a):
        while getattr(a, "base", None) is not None:
            a = a.base
        return a

    def key(o):  # the buffer's address: a CuPy view's base may be a new object for the same memory
        return o.ctypes.data if isinstance(o, numpy.ndarray) else o.data.ptr

    skip = {key(owner(a)) for a in exclude}
    seen, total = set(skip), 0
    for node in [*topological_order(root), root]:
        arrays = [node.data]
        if node._ctx is not None:
            arrays += [a for a in node._ctx.saved_tensors if backend.is_array(a)]
            arrays += [p.data for p in node._ctx.parents  # Tensors (a raw array's .data is its buffer)
                       if not backend.is_array(p) and backend.is_array(getattr(p, "data", None))]
        for a in arrays:
            o = owner(a)
            if backend.is_array(o) and key(o) not in seen:
                seen.add(key(o))
                total += o.nbytes
    return total
