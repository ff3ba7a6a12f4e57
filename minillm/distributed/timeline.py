"""What one pipeline rank did during a step: timed events and activation memory, for plots.

``Timeline`` records (kind, start, end, micro, chunk) spans with ``time.perf_counter`` relative to a start
all stages share (a barrier), and how many bytes of activation graphs are alive. ``timeline_record``
turns one step of every stage into the JSON a rank writes as ``timeline_rank{R}.json`` (read by
``minillm plot --timeline`` and lesson 09).
"""
from __future__ import annotations

import contextlib
import time

import numpy

from minillm import backend
from minillm.autograd.tensor import saved_bytes
from minillm.distributed.pipeline_schedule import COMPUTE, bubble_theory


class Timeline:
    """What one rank did during a step: (kind, start, end, micro, chunk) from time.perf_counter,
    relative to a start that every stage of the pipeline shares (a barrier), plus activation
    memory (graphs not yet back-propagated, and weight-gradient work a split backward deferred)."""

    def __init__(self):
        self.t0, self.events, self.live, self.peak = 0.0, [], {}, 0

    def start(self, pipe_comm):
        pipe_comm.barrier()  # clocks of different hosts differ; a common start does not
        self.t0, self.events, self.live, self.peak = time.perf_counter(), [], {}, 0

    @contextlib.contextmanager
    def span(self, kind, micro=None, chunk=0):
        t = time.perf_counter()
        try:
            yield
        finally:
            if kind in COMPUTE:
                backend.synchronize()  # GPU kernels run asynchronously: time their end, not launch
            self.events.append((kind, t - self.t0, time.perf_counter() - self.t0, micro, chunk))

    def alive(self, key, nbytes):
        """What micro-batch ``key`` (micro, chunk) keeps for backward now holds ``nbytes`` (0 once
        freed)."""
        self.live[key] = nbytes
        self.peak = max(self.peak, sum(self.live.values()))

    def summary(self):
        busy = sum(e - s for k, s, e, _, _ in self.events if k in COMPUTE)
        end = max((e for k, s, e, _, _ in self.events if k != "allreduce"), default=0.0)
        return {"busy": busy, "end": end, "peak": self.peak}


def activation_bytes(root, exclude_ids) -> int:
    """Bytes the graph behind ``root`` saved for backward, not counting parameters it refers to."""
    return saved_bytes(root, exclude_ids)


def timeline_record(kept, stages, *, rank, stage, dp_rank, pp, dp, microbatches, schedule,
                    v=1) -> dict:
    """The JSON record of one rank's kept step: its events, the bubble measured over all
    ``stages`` (every stage's ``Timeline.summary()``) and the theory's."""
    step, events, mine = kept
    span = max(s["end"] for s in stages) or 1.0
    measured = float(numpy.mean([1.0 - s["busy"] / span for s in stages]))
    theory = bubble_theory(pp, microbatches, v, schedule)
    name = schedule if v == 1 else f"interleaved {schedule} v={v}"
    return {"rank": rank, "stage": stage, "dp_rank": dp_rank, "pp": pp, "dp": dp,
            "microbatches": microbatches, "schedule": schedule, "virtual_stages": v,
            "step": step, "span": span,
            "bubble_measured": measured, "bubble_theory": theory,
            "bubble_stage": 1.0 - mine["busy"] / span, "idle_s": span - mine["busy"],
            "peak_activation_bytes": [s["peak"] for s in stages],
            "title": f"{name} p={pp} m={microbatches}: bubble {measured:.2f} measured, "
                     f"{theory:.2f} theory",
            "events": [{"kind": k, "start": s, "end": e, "micro": i, "chunk": c}
                       for k, s, e, i, c in events]}

