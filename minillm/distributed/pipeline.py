"""Pipeline parallelism: the model cut into stages, one per rank, fed micro-batch by micro-batch.

Stage 0 embeds the tokens, the last stage computes the head and the loss, and every stage runs a
contiguous range of blocks (which parameters each holds: ``topology.py``). A stage receives the
activations (B, T, C) of the previous stage, runs its blocks and sends the result on; backward
runs the other way with the gradients of those activations.

One batch through one stage at a time would leave p-1 of p ranks idle. Cutting the batch into
m micro-batches lets the stages work on different micro-batches at once. Two orders:

- GPipe: all m forwards, then all m backwards. Every stage keeps m activation graphs alive.
- 1F1B: stage s runs p-s-1 warm-up forwards, then alternates one forward and one backward, then
  finishes the backwards. At most p-s graphs are alive: memory bounded by p, not m.

Both leave the same idle "bubble", (p-1)/(m+p-1) of the step when forward and backward cost the
same on every stage: the pipeline takes p-1 steps to fill and p-1 to drain.

With tied embeddings the first and the last stage each hold a copy of the token embedding (every
rank built the same GPT from the same seed, so the copies start equal); after backward the two
gradient parts are summed between those stages, so both copies take the same update forever.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy

import minillm.functional as F
from minillm import backend
from minillm.autograd.tensor import Tensor, no_grad, saved_bytes
from minillm.backend import xp
from minillm.distributed.data_parallel import DataParallel
from minillm.distributed.topology import (TIED, drop_other_stages, make_topology, stage_bounds,  # noqa: F401
                                         stage_of, stage_parameters)
from minillm.nn.module import load_params

SCHEDULES = ("gpipe", "1f1b")
_ACT, _GRAD, _DTYPE, _STATE = 11, 12, 13, 14   # message tags
_COMPUTE = ("forward", "backward")


# ---------------------------------------------------------------------------- schedules
def schedule(name: str, pp: int, stage: int, m: int) -> list[tuple[str, int]]:
    """The order of ("F", micro) and ("B", micro) actions of one stage."""
    if name == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    if name != "1f1b":
        raise ValueError(f"unknown pipeline schedule {name!r}; expected one of {SCHEDULES}")
    warm = min(pp - stage - 1, m)
    acts = [("F", i) for i in range(warm)]
    for j in range(m - warm):
        acts += [("F", warm + j), ("B", j)]
    return acts + [("B", i) for i in range(m - warm, m)]


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
    busy = [sum(e["end"] - e["start"] for e in ev if e["kind"] in _COMPUTE) for ev in events_per_stage]
    return float(numpy.mean([1.0 - b / span for b in busy]))


# ---------------------------------------------------------------------------- recording
class Timeline:
    """What one rank did during a step: (kind, start, end, micro) from time.perf_counter, relative
    to a start that every stage of the pipeline shares (a barrier), plus activation memory."""

    def __init__(self):
        self.t0, self.events, self.live, self.peak = 0.0, [], {}, 0

    def start(self, pipe_comm):
        pipe_comm.barrier()  # clocks of different hosts differ; a common start does not
        self.t0, self.events, self.live, self.peak = time.perf_counter(), [], {}, 0

    @contextlib.contextmanager
    def span(self, kind, micro=None):
        t = time.perf_counter()
        try:
            yield
        finally:
            if kind in _COMPUTE:
                backend.synchronize()  # GPU kernels run asynchronously: time their end, not launch
            self.events.append((kind, t - self.t0, time.perf_counter() - self.t0, micro))

    def alive(self, micro, nbytes):
        """Micro-batch ``micro``'s graph now holds ``nbytes`` (0 once backward freed it)."""
        self.live[micro] = nbytes
        self.peak = max(self.peak, sum(self.live.values()))

    def summary(self):
        busy = sum(e - s for k, s, e, _ in self.events if k in _COMPUTE)
        end = max((e for k, s, e, _ in self.events if k != "allreduce"), default=0.0)
        return {"busy": busy, "end": end, "peak": self.peak}


def activation_bytes(root, exclude_ids) -> int:
    """Bytes the graph behind ``root`` saved for backward, not counting parameters it refers to."""
    return saved_bytes(root, exclude_ids)


# ---------------------------------------------------------------------------- messages
def _as_bytes(a):
    """A flat uint8 view, so any dtype (bfloat16 included) travels as raw bytes."""
    return xp.ascontiguousarray(a).reshape(-1).view(xp.uint8)


def _wait(req, poke=None):
    """Wait for ``req`` without spinning a core: idle stages let busy ones (maybe on the same
    cores) run, and keep our own outgoing messages moving."""
    spins = 0
    while not req.test():
        if poke is not None:
            poke()
        spins += 1
        if spins > 20:
            time.sleep(5e-5)


class _StageParams:
    """What DataParallel needs of a model: the stage's named parameters."""

    def __init__(self, named):
        self._named = named

    def named_parameters(self):
        return iter(self._named)


# ---------------------------------------------------------------------------- the engine
class PipelineEngine:
    """``PipelineEngine(cfg, model, comm)``: this rank's stage of a (dp, pp) grid, behind the engine
    interface of ``minillm.train.engine.LocalEngine``.

    ``forward_backward`` runs the schedule ``train.grad_accum`` times over ``parallel.microbatches``
    micro-batches, then averages gradients in each stage's data-parallel group and sums the tied
    embedding's between the first and last stage. Every step is recorded (``timeline``); the
    latest one (or step ``keep_step`` of this process, counting from 0) is written to
    ``<train.out_dir>/timeline_rank{R}.json`` at each checkpoint (``model_state`` is called on every
    rank) or by ``write_timeline``.
    """

    precision = None
    comm_wait_s = 0.0  # seconds the last step spent in receives, sends and all-reduces

    def __init__(self, cfg, model, comm, keep_step=None):
        par = cfg.parallel
        self.cfg, self.model, self.comm = cfg, model, comm
        self.topo = topo = make_topology(comm, par.dp, par.pp)
        self.stage, self.pp, self.m = topo.stage, par.pp, par.microbatches
        self.dp_rank, self.dp_size = topo.dp_rank, topo.dp
        self.schedule_name = par.schedule
        self.bounds = stage_bounds(model.config.n_layer, par.pp, par.partition_blocks)
        self.start, self.stop = self.bounds[self.stage]
        self.tied = model.config.tie_embeddings
        self._named = stage_parameters(model, self.bounds, self.stage)
        drop_other_stages(model, self._named)
        self.sync = DataParallel(_StageParams(self._named), topo.dp_comm, bucket_mb=par.bucket_mb,
                                 allreduce=par.allreduce)
        self.timeline, self.kept, self.keep_step, self.steps = Timeline(), None, keep_step, 0
        self._sends, self._act_dtype, self._dtype_sent = [], None, False

    def named_parameters(self):
        return list(self._named)

    # ------------------------------------------------------------------ messages
    def _isend(self, a, dest, tag, micro=None):
        with self.timeline.span("send", micro):
            buf = _as_bytes(a)
            self._sends.append(self.topo.pipe_comm.isend(buf, dest, tag))

    def _poke(self):
        self._sends = [r for r in self._sends if not r.test()]

    def _finish_sends(self):
        if self._sends:
            with self.timeline.span("send"):
                for r in self._sends:
                    _wait(r)
            self._sends = []

    def _recv(self, shape, dtype, source, tag, micro=None):
        buf = xp.empty(int(numpy.prod(shape)) * numpy.dtype(dtype).itemsize, dtype=xp.uint8)
        with self.timeline.span("recv", micro):
            _wait(self.topo.pipe_comm.irecv(buf, source, tag), self._poke)
        return buf.view(dtype).reshape(shape)

    def _send_activation(self, a, micro=None):
        if not self._dtype_sent:  # the first message says which dtype every activation will have
            name = numpy.frombuffer(str(a.dtype).encode().ljust(16), dtype=numpy.uint8).copy()
            self.topo.pipe_comm.send(name, self.topo.next_stage, _DTYPE)
            self._dtype_sent = True
        self._isend(a, self.topo.next_stage, _ACT, micro)

    def _recv_activation(self, x, micro=None):
        if self._act_dtype is None:
            name = numpy.empty(16, dtype=numpy.uint8)
            self.topo.pipe_comm.recv(name, self.topo.prev_stage, _DTYPE)
            self._act_dtype = numpy.dtype(name.tobytes().decode().strip())
        shape = (*x.shape, self.model.config.n_embd)                  # (B, T, C)
        return self._recv(shape, self._act_dtype, self.topo.prev_stage, _ACT, micro)

    # ------------------------------------------------------------------ one stage's compute
    def _stage_forward(self, x, received=None):
        """(input leaf or None, output): embeddings on stage 0, else the received activations."""
        if self.topo.is_first:
            inp, h = None, self.model.embed(x)                            # (B, T, C)
        else:
            inp = h = Tensor(received, requires_grad=True)                # (B, T, C)
        rope = self.model.rope_for(x.shape[1], dtype=str(h.dtype))
        return inp, self.model.run_blocks(h, self.start, self.stop, rope)

    def _forward(self, micro, x, y, n):
        received = None if self.topo.is_first else self._recv_activation(x, micro)
        with self.timeline.span("forward", micro):
            inp, h = self._stage_forward(x, received)
            if self.topo.is_last:
                loss = F.cross_entropy(self.model.head(h), y)
                out = self.precision.scale_loss(loss * (1.0 / n))
                self._losses.append(float(loss.data))
            else:
                out = h
        self.timeline.alive(micro, activation_bytes(out, self._param_ids))
        if not self.topo.is_last:
            self._send_activation(h.data, micro)
        self._graphs[micro] = (inp, out)

    def _backward(self, micro, sync):
        inp, out = self._graphs.pop(micro)
        grad = None
        if not self.topo.is_last:
            grad = self._recv(out.shape, out.dtype, self.topo.next_stage, _GRAD, micro)
        quiet = contextlib.nullcontext() if sync else self.sync.no_sync()
        with self.timeline.span("backward", micro), quiet:
            out.backward(grad)
        self.timeline.alive(micro, 0)
        if not self.topo.is_first:
            self._isend(inp.grad, self.topo.prev_stage, _GRAD, micro)

    # ------------------------------------------------------------------ the engine interface
    def forward_backward(self, microbatches):
        """Run the schedule over this replica's micro-batches; returns the mean loss (last stage;
        0.0 elsewhere: ``reduce_loss`` takes it from there)."""
        n, m = len(microbatches), self.m
        if n % m:
            raise ValueError(f"{n} micro-batches are not a whole number of pipeline rounds of {m}")
        self._losses, self._graphs = [], {}
        self._param_ids = {id(p.data) for _, p in self._named}  # (precision may swap the arrays)
        self.timeline.start(self.topo.pipe_comm)
        plan = schedule(self.schedule_name, self.pp, self.stage, m)
        for r in range(0, n, m):  # grad_accum rounds of the pipeline
            for kind, i in plan:
                x, y = microbatches[r + i]
                if kind == "F":
                    self._forward(r + i, x, y, n)
                else:  # only the very last backward lets DataParallel start its all-reduces
                    self._backward(r + i, sync=r + i == n - 1)
        self._finish_sends()
        with self.timeline.span("allreduce"):
            self.sync.finish_gradient_sync()
            self._sum_tied_grads()
        self._agree_on_overflow()
        self.comm_wait_s = sum(e - s for k, s, e, _ in self.timeline.events if k not in _COMPUTE)
        if self.keep_step is None or self.steps == self.keep_step:
            self.kept = (self.steps, list(self.timeline.events), self.timeline.summary())
        self.steps += 1
        return sum(self._losses) / n if self._losses else 0.0

    def _sum_tied_grads(self):
        """The embedding's two gradient parts (input side on stage 0, output side on the last)."""
        if self.tied and self.topo.tied_comm.size == 2:
            p = dict(self._named)[TIED]
            g = xp.ascontiguousarray(p.grad, dtype=xp.float32)  # MPI cannot add bfloat16
            p.grad = self.topo.tied_comm.allreduce_(g).astype(p.grad.dtype, copy=False)

    def _agree_on_overflow(self):
        """In 16-bit training a step is skipped (fp16) or the run stops (bf16) when any stage
        overflowed: make every stage's precision object see it by poisoning one gradient where
        this stage found none, so all stages take the same decision (and none waits alone)."""
        if self.precision.dtype == "float32":
            return
        bad = any(not bool(xp.isfinite(p.grad).all()) for _, p in self._named if p.grad is not None)
        if self.comm.allreduce_scalar(float(bad), "max") > 0 and not bad:
            p = next(p for _, p in self._named if p.grad is not None)
            p.grad = xp.full_like(p.grad, xp.nan)  # the step is skipped: these values never count

    def eval_loss(self, x, y):
        """No-grad loss of one micro-batch through the whole pipeline (0.0 except on the last stage)."""
        self._poke()
        received = None if self.topo.is_first else self._recv_activation(x)
        with no_grad():
            _, h = self._stage_forward(x, received)
            if self.topo.is_last:
                return float(F.cross_entropy(self.model.head(h), y).data)
            self._send_activation(h.data)
        return 0.0

    def reduce_loss(self, value):
        """The last stage's value, averaged over the data-parallel replicas, on every rank."""
        self._finish_sends()
        return self.comm.allreduce_scalar(value if self.topo.is_last else 0.0, "sum") / self.dp_size

    def grad_sq_reduce(self, sq):
        """Sum of squared gradients over the stages, the tied embedding counted once."""
        if self.tied and self.topo.is_last:
            g = dict(self.precision.master_params)[TIED].grad
            if g is not None:
                g = g.reshape(-1).astype(xp.float64)
                sq -= float(xp.dot(g, g))
        return self.topo.pipe_comm.allreduce_scalar(sq, "sum")

    def zero_grad(self):
        for _, p in self._named:
            p.grad = None

    # ------------------------------------------------------------------ checkpoints
    def _gather(self, local: dict) -> dict:
        """Arrays by name from every stage of replica 0 to world rank 0 ({} on other ranks).
        A name already on an earlier stage (the tied copy) is not sent again."""
        pipe = self.topo.pipe_comm
        metas = pipe.allgather_obj([(k, tuple(a.shape), str(a.dtype)) for k, a in local.items()])
        if self.dp_rank != 0:
            return {}
        owner = {}
        for s, meta in enumerate(metas):
            for k, _, _ in meta:
                owner.setdefault(k, s)
        if self.stage > 0:
            for k, a in local.items():
                if owner[k] == self.stage:
                    pipe.send(_as_bytes(a), 0, _STATE)
            return {}
        out = dict(local)
        for s, meta in enumerate(metas[1:], start=1):
            for k, shape, dtype in meta:
                if owner[k] == s:
                    buf = xp.empty(int(numpy.prod(shape)) * numpy.dtype(dtype).itemsize, dtype=xp.uint8)
                    out[k] = pipe.recv(buf, s, _STATE).view(dtype).reshape(shape)
        return out

    def _serial_order(self):
        return [n for n, _ in self.model.named_parameters()]

    def model_state(self):
        """The full model by serial name on world rank 0 (every rank must call it); also writes
        this rank's timeline next to the checkpoint."""
        self.write_timeline(self.cfg.train.out_dir)
        full = self._gather({n: p.data for n, p in self.precision.master_params})
        return {n: full[n] for n in self._serial_order() if n in full}

    def optimizer_state(self, optimizer):
        """The full optimizer state in the serial format on world rank 0 ({} elsewhere)."""
        sd = optimizer.state_dict()
        names = {n for stage in self.topo.pipe_comm.allgather_obj(list(sd["state"])) for n in stage}
        full = self._gather({f"{n}/{k}": a for n, st in sd["state"].items() for k, a in st.items()})
        if self.comm.rank != 0:
            return {}
        state = {n: {} for n in self._serial_order() if n in names}
        for key, a in full.items():
            n, k = key.rsplit("/", 1)
            state[n][k] = a
        return {**sd, "state": state}

    def load_model_state(self, state, source="checkpoint"):
        """Each stage copies its own names out of the full (serial-format) state."""
        load_params(self.precision.master_params, state, source)
        self.precision.master_to_model()

    def load_optimizer_state(self, optimizer, state):
        mine = set(optimizer.names)
        optimizer.load_state_dict({**state, "state": {n: st for n, st in state["state"].items()
                                                      if n in mine}})

    # ------------------------------------------------------------------ observability
    def write_timeline(self, out_dir):
        """Write ``timeline_rank{R}.json`` for the kept step (collective over the pipeline)."""
        if self.kept is None:
            return None
        step, events, mine = self.kept
        stages = self.topo.pipe_comm.allgather_obj(mine)
        span = max(s["end"] for s in stages) or 1.0
        measured = float(numpy.mean([1.0 - s["busy"] / span for s in stages]))
        theory = bubble_theory(self.pp, self.m)
        rec = {"rank": self.comm.rank, "stage": self.stage, "dp_rank": self.dp_rank, "pp": self.pp,
               "dp": self.dp_size, "microbatches": self.m, "schedule": self.schedule_name,
               "step": step, "span": span, "bubble_measured": measured, "bubble_theory": theory,
               "bubble_stage": 1.0 - mine["busy"] / span, "idle_s": span - mine["busy"],
               "peak_activation_bytes": [s["peak"] for s in stages],
               "title": f"{self.schedule_name} p={self.pp} m={self.m}: bubble {measured:.2f} measured, "
                        f"{theory:.2f} theory",
               "events": [{"kind": k, "start": s, "end": e, "micro": i} for k, s, e, i in events]}
        path = Path(out_dir) / f"timeline_rank{self.comm.rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))
        return path
