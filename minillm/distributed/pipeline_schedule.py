"""Pipeline schedules as pure data: the list of steps each stage runs, and an ideal simulator.

A schedule says, for stage ``s`` of ``p`` and ``m`` micro-batches, in which order the stage runs
its forward ("F", i) and backward ("B", i) steps. It is a pure function of (p, s, m): the engine
(``pipeline.py``) executes the list, the simulator below plays it with fixed costs to draw the
ideal timeline, and lessons and tests check both against the formulas.

- GPipe: all m forwards, then all m backwards. Every stage keeps m activation graphs alive.
- 1F1B: stage s runs p-s-1 warm-up forwards, then alternates one forward and one backward, then
  finishes the backwards. At most p-s graphs are alive: memory bounded by p, not m.

Both leave the same idle "bubble", (p-1)/(m+p-1) of the step when forward and backward cost the
same on every stage: the pipeline takes p-1 steps to fill and p-1 to drain.
"""
from __future__ import annotations

import numpy

from minillm.choices import PIPELINE_SCHEDULES, PipelineSchedule, one_of

SCHEDULES = PIPELINE_SCHEDULES
COMPUTE = ("forward", "backward")   # event kinds that are work (the others are communication)


def gpipe(pp: int, stage: int, m: int) -> list[tuple[str, int]]:
    """All m forwards, then all m backwards."""
    return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]


def one_f_one_b(pp: int, stage: int, m: int) -> list[tuple[str, int]]:
    """p - s - 1 warm-up forwards, then one forward and one backward in turn, then the rest."""
    warm = min(pp - stage - 1, m)
    acts = [("F", i) for i in range(warm)]
    for j in range(m - warm):
        acts += [("F", warm + j), ("B", j)]
    return acts + [("B", i) for i in range(m - warm, m)]


_BY_NAME = {"1f1b": one_f_one_b, "gpipe": gpipe}
assert tuple(_BY_NAME) == PIPELINE_SCHEDULES, "minillm.choices.PipelineSchedule and _BY_NAME differ"


def schedule(name: PipelineSchedule, pp: int, stage: int, m: int) -> list[tuple[str, int]]:
    """The order of ("F", micro) and ("B", micro) actions of stage ``stage`` of ``pp``."""
    return _BY_NAME[one_of("parallel.schedule", name, PIPELINE_SCHEDULES)](pp, stage, m)


def bubble_theory(pp: int, m: int) -> float:
    """Idle fraction of a pipeline step: p-1 fill + p-1 drain slots out of m+p-1 per direction."""
    return (pp - 1) / (m + pp - 1)


def peak_live_theory(name: str, pp: int, stage: int, m: int) -> int:
    """How many micro-batch graphs a stage holds at most: m for GPipe, min(p - s, m) for 1F1B."""
    return m if name == "gpipe" else min(pp - stage, m)


def simulate(name: str, pp: int, m: int, t_f: float = 1.0, t_b: float = 2.0) -> list[list[dict]]:
    """Timeline of an ideal pipeline (free messages, fixed costs): one event list per stage.

    F(i) on stage s starts when s is free and F(i) is done on s-1; B(i) when s is free and B(i) is
    done on s+1 (on the last stage: when its own F(i) is done).
    """
    plans = [schedule(name, pp, s, m) for s in range(pp)]
    done, free, pos = {}, [0.0] * pp, [0] * pp
    events = [[] for _ in range(pp)]
    while any(pos[s] < len(plans[s]) for s in range(pp)):
        progressed = False
        for s in range(pp):
            if pos[s] == len(plans[s]):
                continue
            kind, i = plans[s][pos[s]]
            dep = (("F", s - 1, i) if s > 0 else None) if kind == "F" else \
                  (("B", s + 1, i) if s < pp - 1 else ("F", s, i))
            if dep is not None and dep not in done:
                continue
            start = max(free[s], done.get(dep, 0.0))
            end = start + (t_f if kind == "F" else t_b)
            done[(kind, s, i)], free[s] = end, end
            events[s].append({"kind": "forward" if kind == "F" else "backward",
                              "start": start, "end": end, "micro": i})
            pos[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {name!r} deadlocks with pp={pp}, m={m}")
    return events


def bubble_of(events_per_stage) -> float:
    """Mean idle fraction over stages: 1 - compute time / span of the whole pipeline."""
    span = max(e["end"] for ev in events_per_stage for e in ev)
    busy = [sum(e["end"] - e["start"] for e in ev if e["kind"] in COMPUTE) for ev in events_per_stage]
    return float(numpy.mean([1.0 - b / span for b in busy]))
