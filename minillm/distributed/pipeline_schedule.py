"""Pipeline schedules as pure data: the list of steps each stage runs, and an ideal simulator.

A schedule says, for stage ``s`` of ``p`` stages and ``m`` micro-batches, in which order the stage
runs its steps: ``Step(kind, micro, chunk)`` with kind "F" (forward), "B" (backward: the gradient
of the stage's input, and of its weights too unless the schedule splits them off) or "W" (the
weights' gradients, split schedules only), ``chunk`` being which of the stage's ``v`` virtual
stages it concerns. A schedule is a pure function of (p, s, m, v): the engine (``pipeline.py``)
executes the list, the simulator below plays it with fixed costs to draw the ideal timeline, and
lessons and tests check both against the formulas.

- GPipe: all m forwards, then all m backwards. Every stage keeps m activation graphs alive.
- 1F1B: stage s runs p-s-1 warm-up forwards, then alternates one forward and one backward, then
  finishes the backwards. At most p-s graphs are alive: memory bounded by p, not m.
  Both leave the same idle "bubble", (p-1)/(m+p-1) of the step: p-1 steps to fill, p-1 to drain.
- Interleaved 1F1B (Megatron, ``v`` virtual stages): each rank holds v non-adjacent chunks of
  layers (rank r: chunks r, r+p, r+2p, ...), so a micro-batch visits every rank v times and each
  visit is v times shorter: the fill and drain shrink to (p-1)/v of a stage's work, the bubble to
  (p-1)/(v m + p - 1), for v times more point-to-point messages. Needs m a multiple of p.
- ZB-H1 (zero bubble, Qi et al. 2023): backward split into B (input gradient: the stage upstream
  waits for it) and W (weight gradients: nobody waits). W steps fill the time a stage would sit
  idle, while at most p-s micro-batches are alive at once (as in 1F1B: an activation is freed
  only after its W). With F, B and W of equal cost the idle time falls from 3(p-1) to p-1 units.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy

from minillm.choices import PIPELINE_SCHEDULES, PipelineSchedule, one_of

SCHEDULES = PIPELINE_SCHEDULES
SPLIT = ("zb-h1",)                             # schedules whose B leaves the weights to W
COMPUTE = ("forward", "backward", "weight")    # event kinds that are work (the rest: communication)
KIND = {"F": "forward", "B": "backward", "W": "weight"}


class Step(NamedTuple):
    kind: str        # "F", "B" or "W"
    micro: int       # which micro-batch
    chunk: int = 0   # which of this rank's virtual stages (0 unless interleaved)


def gpipe(pp: int, stage: int, m: int) -> list[Step]:
    """All m forwards, then all m backwards."""
    return [Step("F", i) for i in range(m)] + [Step("B", i) for i in range(m)]


def one_f_one_b(pp: int, stage: int, m: int) -> list[Step]:
    """p - s - 1 warm-up forwards, then one forward and one backward in turn, then the rest."""
    warm = min(pp - stage - 1, m)
    steps = [Step("F", i) for i in range(warm)]
    for j in range(m - warm):
        steps += [Step("F", warm + j), Step("B", j)]
    return steps + [Step("B", i) for i in range(m - warm, m)]


def interleaved_warmup(pp: int, stage: int, m: int, v: int) -> int:
    """Forward steps (of one chunk each) a rank runs before its first backward (Megatron)."""
    if m == pp:  # every forward fits before the first backward comes back
        return m * v
    return min((pp - stage - 1) * 2 + (v - 1) * pp, m * v)


def interleaved_1f1b(pp: int, stage: int, m: int, v: int) -> list[Step]:
    """Megatron's interleaved 1F1B: the k-th forward of every rank is micro-batch
    ``(k // (p v)) p + k % p`` of chunk ``(k % (p v)) // p``; backwards visit the chunks in reverse.
    Warm-up forwards, then one forward and one backward in turn, then the remaining backwards."""
    if m % pp:
        raise ValueError(f"interleaved 1F1B needs the micro-batches ({m}) to be a multiple of the "
                         f"pipeline stages ({pp})")
    total, group = m * v, pp * v

    def step(kind, k):
        chunk = (k % group) // pp
        return Step(kind, (k // group) * pp + k % pp, chunk if kind == "F" else v - 1 - chunk)

    warm = interleaved_warmup(pp, stage, m, v)
    steps = [step("F", k) for k in range(warm)]
    for k in range(total - warm):
        steps += [step("F", warm + k), step("B", k)]
    return steps + [step("B", k) for k in range(total - warm, total)]


def zb_h1(pp: int, stage: int, m: int) -> list[Step]:
    """ZB-H1: 1F1B's order of forwards and input-gradient backwards, with stage s postponing s of
    its weight-gradient steps (W) to the end, where 1F1B would leave it idle while later stages
    drain; every other W follows right after a B. Warm-up p-s-1 forwards; s pairs of F, B (their
    W wait); one F; then (B, F, W) m-p times; then (B, W) p-s-1 times; the last B; the s
    postponed W and the last one. Needs m >= p."""
    if m < pp:
        raise ValueError(f"ZB-H1 needs at least as many micro-batches ({m}) as stages ({pp})")
    nxt = {"F": 0, "B": 0, "W": 0}

    def step(kind):
        nxt[kind] += 1
        return Step(kind, nxt[kind] - 1)

    steps = [step("F") for _ in range(pp - stage - 1)]
    for _ in range(stage):
        steps += [step("F"), step("B")]
    steps.append(step("F"))
    for _ in range(m - pp):
        steps += [step("B"), step("F"), step("W")]
    for _ in range(pp - stage - 1):
        steps += [step("B"), step("W")]
    steps.append(step("B"))
    return steps + [step("W") for _ in range(stage + 1)]


_BY_NAME = {"1f1b": one_f_one_b, "gpipe": gpipe, "zb-h1": zb_h1}
assert tuple(_BY_NAME) == PIPELINE_SCHEDULES, "minillm.choices.PipelineSchedule and _BY_NAME differ"


def schedule(name: PipelineSchedule, pp: int, stage: int, m: int, v: int = 1) -> list[Step]:
    """The steps of stage ``stage`` of ``pp`` over ``m`` micro-batches; ``v > 1`` (virtual stages)
    interleaves 1F1B."""
    one_of("parallel.schedule", name, PIPELINE_SCHEDULES)
    if v > 1:
        if name != "1f1b":
            raise ValueError(f"virtual stages interleave 1F1B; schedule {name!r} takes v=1")
        return interleaved_1f1b(pp, stage, m, v)
    return _BY_NAME[name](pp, stage, m)


def bubble_theory(pp: int, m: int, v: int = 1, name: str = "1f1b") -> float:
    """Idle fraction of a pipeline step by the formula: (p-1)/(v m + p - 1) for GPipe and
    (interleaved) 1F1B, whatever the forward and backward costs; for ZB-H1 with F, B and W of one
    unit each, p-1 idle units next to 3m units of work: (p-1)/(3m + p - 1)."""
    if name in SPLIT:
        return (pp - 1) / (3 * m + pp - 1)
    return (pp - 1) / (v * m + pp - 1)


def peak_live_theory(name: str, pp: int, stage: int, m: int, v: int = 1) -> float:
    """How many micro-batches' activations a stage holds at most, counted in whole stages (an
    interleaved chunk is 1/v of one): m for GPipe, min(p - s, m) for 1F1B and ZB-H1 (which frees
    an activation after its W), (warm-up + 1) / v for interleaved 1F1B."""
    if v > 1:
        return min(interleaved_warmup(pp, stage, m, v) + 1, m * v) / v
    return m if name == "gpipe" else min(pp - stage, m)


def simulate(name: str, pp: int, m: int, t_f: float = 1.0, t_b: float = 2.0, t_w: float | None = None,
             v: int = 1) -> list[list[dict]]:
    """Timeline of an ideal pipeline (free messages, fixed costs) running schedule ``name``: one
    event list per stage. ``t_f`` and ``t_b`` are a whole stage's forward and backward; a split
    schedule's B costs ``t_b - t_w`` and its W ``t_w`` (default half the backward); an interleaved
    chunk 1/v of each."""
    t_w = t_b / 2 if t_w is None else t_w
    cost = {"F": t_f / v, "B": (t_b - t_w if name in SPLIT else t_b) / v, "W": t_w / v}
    return simulate_plans([schedule(name, pp, s, m, v) for s in range(pp)], cost)


def simulate_plans(plans, cost) -> list[list[dict]]:
    """Play every stage's step list (``plans[s]``) with fixed ``cost[kind]`` per step.

    A step starts when its stage is free and what it needs is done: F(i) of global chunk g needs
    F(i) of chunk g-1; B(i) needs B(i) of chunk g+1 (the last chunk: its own F(i)); W(i) its B(i).
    Raises RuntimeError when no stage can move (the plans deadlock)."""
    pp = len(plans)
    v = 1 + max((step[2] if len(step) > 2 else 0) for plan in plans for step in plan)
    last = pp * v - 1
    done, free, pos = {}, [0.0] * pp, [0] * pp
    events = [[] for _ in range(pp)]
    while any(pos[s] < len(plans[s]) for s in range(pp)):
        progressed = False
        for s in range(pp):
            if pos[s] == len(plans[s]):
                continue
            kind, i, c = Step(*plans[s][pos[s]])
            g = c * pp + s
            dep = {"F": ("F", g - 1, i) if g > 0 else None,
                   "B": ("B", g + 1, i) if g < last else ("F", g, i),
                   "W": ("B", g, i)}[kind]
            if dep is not None and dep not in done:
                continue
            start = max(free[s], done.get(dep, 0.0))
            end = start + cost[kind]
            done[(kind, g, i)], free[s] = end, end
            events[s].append({"kind": KIND[kind], "start": start, "end": end, "micro": i, "chunk": c})
            pos[s] += 1
            progressed = True
        if not progressed:
            stuck = {s: plans[s][pos[s]] for s in range(pp) if pos[s] < len(plans[s])}
            raise RuntimeError(f"the schedule deadlocks: every stage waits ({stuck})")
    return events


def bubble_of(events_per_stage) -> float:
    """Mean idle fraction over stages: 1 - compute time / span of the whole pipeline."""
    span = max(e["end"] for ev in events_per_stage for e in ev)
    busy = [sum(e["end"] - e["start"] for e in ev if e["kind"] in COMPUTE) for ev in events_per_stage]
    return float(numpy.mean([1.0 - b / span for b in busy]))


def idle_of(events_per_stage) -> float:
    """Mean idle time per stage (the bubble in time units, not as a fraction)."""
    span = max(e["end"] for ev in events_per_stage for e in ev)
    busy = [sum(e["end"] - e["start"] for e in ev if e["kind"] in COMPUTE) for ev in events_per_stage]
    return float(numpy.mean([span - b for b in busy]))
