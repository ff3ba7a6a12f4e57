"""Pipeline parallelism: the model cut into stages, one per rank, fed micro-batch by micro-batch.

Stage 0 embeds the tokens, the last stage computes the head and the loss, and every stage runs a
contiguous range of blocks (which parameters each holds: ``topology.py``). A stage receives the
activations (B, T, C) of the previous stage, runs its blocks and sends the result on; backward
runs the other way with the gradients of those activations. In which order a stage runs its
forward and backward steps is the schedule's business (``pipeline_schedule.py``: pure lists of
steps); this engine executes such a list with Send/Recv between neighbouring stages.

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

from minillm.autograd.tensor import DeferredWeightGrads, Tensor, no_grad
from minillm.backend import xp
from minillm.distributed.pipeline_schedule import COMPUTE, SPLIT, schedule
from minillm.distributed.timeline import Timeline, activation_bytes, timeline_record
from minillm.distributed.topology import TIED
from minillm.engine import Engine, keyed

_DTYPE, _STATE, _ACT, _GRAD = 13, 14, 8192, 16384   # message tags (_ACT, _GRAD: + micro, chunk)


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


class PipelineEngine(Engine):
    """This rank's stage of a (dp, pp) grid, behind the ``Engine`` interface (``minillm/engine.py``).

    ``PipelineEngine(model, topo, bounds, named, sync, precision, schedule="1f1b", microbatches=1,
    virtual_stages=1, keep_step=None)``: ``topo`` the rank grid (``topology.make_topology``),
    ``bounds`` the block range of every chunk in model order (``topology.stage_bounds``; chunk g
    on stage g % pp, ``virtual_stages`` chunks per stage), ``named`` this stage's (name,
    Parameter) pairs (the other stages' parameters already dropped from ``model``), ``sync`` the
    gradient sync over this stage's data-parallel group, ``precision`` over ``named``.
    ``train/build.py`` makes all of these.

    ``forward_backward`` runs the schedule's steps (``pipeline_schedule.py``) ``len(microbatches)
    / microbatches`` times (gradient accumulation rounds): F receives a chunk's input, runs it and
    sends its output on; B receives the gradient of the output, back-propagates and sends the
    gradient of the input back (split schedules leave the weights' gradients in a queue); W runs
    that queue. Then gradients are averaged in each stage's data-parallel group and the tied
    embedding's summed between the first and last stage. Every step is recorded (``timeline``);
    the latest one (or step ``keep_step`` of this process, counting from 0) is written to
    ``timeline_rank{R}.json`` by ``write_artifacts``.
    """

    comm_wait_s = 0.0  # seconds the last step spent in receives, sends and all-reduces

    def __init__(self, model, topo, bounds, named, sync, precision, schedule="1f1b", microbatches=1,
                 virtual_stages=1, keep_step=None, tensor_parallel=None):
        self.model, self.topo, self.comm = model, topo, topo.world
        self.stage, self.pp, self.m, self.v = topo.stage, topo.pp, microbatches, virtual_stages
        self.dp_rank, self.dp_size = topo.dp_rank, topo.dp
        self.schedule_name, self.split = schedule, schedule in SPLIT
        self.bounds = bounds
        self.last_chunk = len(bounds) - 1                    # global index of the model's last chunk
        self.tied = model.config.tie_embeddings
        self._named = list(named)
        self.sync, self.precision = sync, precision
        if tensor_parallel is not None:  # each stage split over its tp group (tp_model.py)
            self.tensor_parallel = tensor_parallel
        self.timeline, self.kept, self.keep_step, self.steps = Timeline(), None, keep_step, 0
        self._sends, self._act_dtype, self._dtype_sent = [], {}, set()

    def named_parameters(self):
        return list(self._named)

    # ------------------------------------------------------------------ where chunks live
    def _global(self, chunk):
        """Chunk ``chunk`` of this rank is chunk ``chunk * pp + stage`` of the model."""
        return chunk * self.pp + self.stage

    def _neighbour(self, g):
        """(pipeline rank, that rank's local chunk index) of the model's chunk ``g``."""
        return g % self.pp, g // self.pp

    @staticmethod
    def _tag(base, micro, chunk):
        """Messages carry (micro-batch, receiving chunk) in their tag, so none can be mistaken for
        another whatever order the schedules post them in (tags stay below MPI's minimum 32767)."""
        return base + (micro % 512) * 16 + chunk

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

    def _send_activation(self, a, g, micro):
        dest, chunk = self._neighbour(g + 1)
        if dest not in self._dtype_sent:  # the first message to a rank says which dtype follows
            name = numpy.frombuffer(str(a.dtype).encode().ljust(16), dtype=numpy.uint8).copy()
            self.topo.pipe_comm.send(name, dest, _DTYPE)
            self._dtype_sent.add(dest)
        self._isend(a, dest, self._tag(_ACT, micro, chunk), micro)

    def _recv_activation(self, x, g, micro):
        source, _ = self._neighbour(g - 1)
        if source not in self._act_dtype:  # (waiting, keep our own sends moving: the peer may need them)
            name = numpy.empty(16, dtype=numpy.uint8)
            _wait(self.topo.pipe_comm.irecv(name, source, _DTYPE), self._poke)
            self._act_dtype[source] = numpy.dtype(name.tobytes().decode().strip())
        B, T = x.shape
        shape = (B, self.tensor_parallel.seq_len(T), self.model.config.n_embd)  # (B, T or T/tp, C)
        return self._recv(shape, self._act_dtype[source], source,
                          self._tag(_ACT, micro, g // self.pp), micro)

    # ------------------------------------------------------------------ one chunk's compute
    def _chunk_forward(self, x, g, received=None):
        """(input leaf or None, output) of model chunk ``g``: embeddings first on chunk 0, else the
        received activations."""
        if g == 0:
            inp, h = None, self.model.embed(x)                            # (B, T, C)
        else:
            inp = h = Tensor(received, requires_grad=True)                # (B, T, C)
        rope = self.model.rope_for(x.shape[1], dtype=str(h.dtype))
        start, stop = self.bounds[g]
        return inp, self.model.run_blocks(h, start, stop, rope)

    def _forward(self, micro, chunk, mb, n):
        g = self._global(chunk)
        received = None if g == 0 else self._recv_activation(mb.x, g, micro)
        with self.timeline.span("forward", micro, chunk), keyed(self.model, mb):
            inp, h = self._chunk_forward(mb.x, g, received)
            if g == self.last_chunk:
                loss = self.model.criterion(self.model.head(h), mb.y)
                out = self.precision.scale_loss(loss * (1.0 / n))
                self._losses.append(loss.data.astype(xp.float64))  # read only when reported
            else:
                out = h
        self._graphs[micro, chunk] = (inp, out)
        self._alive(micro, chunk, activation_bytes(out, self._param_ids))
        if g != self.last_chunk:
            self._send_activation(h.data, g, micro)

    def _backward(self, micro, chunk, sync):
        """B: back-propagate one chunk of one micro-batch and send the input's gradient upstream;
        with a split schedule the weights' gradients wait in a queue for ``_weights``."""
        g = self._global(chunk)
        inp, out = self._graphs.pop((micro, chunk))
        grad = None
        if g != self.last_chunk:
            dest, _ = self._neighbour(g + 1)
            grad = self._recv(out.shape, out.dtype, dest, self._tag(_GRAD, micro, chunk), micro)
        queue = DeferredWeightGrads() if self.split else None
        quiet = contextlib.nullcontext() if sync else self.sync.no_sync()
        with self.timeline.span("backward", micro, chunk), quiet:
            out.backward(grad, defer=queue)
        if queue is not None:
            self._deferred[micro, chunk] = queue
        self._alive(micro, chunk, queue.nbytes if queue is not None else 0)
        if g != 0:
            source, src_chunk = self._neighbour(g - 1)
            self._isend(inp.grad, source, self._tag(_GRAD, micro, src_chunk), micro)

    def _weights(self, micro, chunk, sync):
        """W: the weight gradients B left for later (zero-bubble schedules)."""
        queue = self._deferred.pop((micro, chunk))
        quiet = contextlib.nullcontext() if sync else self.sync.no_sync()
        with self.timeline.span("weight", micro, chunk), quiet:
            queue.run()
        self._alive(micro, chunk, 0)

    def _alive(self, micro, chunk, nbytes):
        self.timeline.alive((micro, chunk), nbytes)

    # ------------------------------------------------------------------ the engine interface
    def forward_backward(self, microbatches):
        """Run the schedule over this replica's micro-batches; returns the mean loss (last stage;
        0.0 elsewhere: ``reduce_loss`` takes it from there)."""
        n, m = len(microbatches), self.m
        if n % m:
            raise ValueError(f"{n} micro-batches are not a whole number of pipeline rounds of {m}")
        self._losses, self._graphs, self._deferred = [], {}, {}
        self._param_ids = {id(p.data) for _, p in self._named}  # (precision may swap the arrays)
        self.timeline.start(self.topo.pipe_comm)
        plan = schedule(self.schedule_name, self.pp, self.stage, m, self.v)
        for r in range(0, n, m):  # grad_accum rounds of the pipeline
            for kind, i, chunk in plan:
                last = r + i == n - 1  # only the last micro-batch lets the gradient sync talk
                self._poke()  # sends done let their buffers go at every step (not only while a receive waits)
                if kind == "F":
                    self._forward(r + i, chunk, microbatches[r + i], n)
                elif kind == "B":
                    self._backward(r + i, chunk, sync=last)
                else:
                    self._weights(r + i, chunk, sync=last)
        self._finish_sends()
        with self.timeline.span("allreduce"):
            self.sync.finish_gradient_sync()
            self._sum_tied_grads()
        self.comm_wait_s = sum(e - s for k, s, e, _, _ in self.timeline.events if k not in COMPUTE)
        if self.keep_step is None or self.steps == self.keep_step:
            self.kept = (self.steps, list(self.timeline.events), self.timeline.summary())
        self.steps += 1
        total = 0.0
        for loss in self._losses:  # summed in order on the device, as the serial engine does
            total = total + loss
        return total / n if self._losses else 0.0

    def _sum_tied_grads(self):
        """The embedding's two gradient parts (input side on stage 0, output side on the last)."""
        if self.tied and self.topo.tied_comm.size == 2:
            p = dict(self._named)[TIED]
            g = xp.ascontiguousarray(p.grad, dtype=xp.float32)  # MPI cannot add bfloat16
            p.grad = self.topo.tied_comm.allreduce_(g).astype(p.grad.dtype, copy=False)

    def agree(self, found_inf):
        """Stages hold different parameters: an overflow on one stage must stop the step on all
        (fp16 skips it, bf16 stops the run), so every rank takes the maximum of the flags."""
        return self.comm.allreduce_scalar(float(found_inf), "max") > 0

    def eval_loss(self, x, y):
        """No-grad loss of one micro-batch through the whole pipeline (0.0 except on the last stage)."""
        self._poke()
        loss = 0.0
        for chunk in range(self.v):
            g = self._global(chunk)
            received = None if g == 0 else self._recv_activation(x, g, 0)
            with no_grad():
                _, h = self._chunk_forward(x, g, received)
                if g == self.last_chunk:
                    loss = self.model.criterion(self.model.head(h), y).data  # on the device
                else:
                    self._send_activation(h.data, g, 0)
        return loss

    def reduce_loss(self, value):
        """The last stage's value, averaged over the data-parallel replicas, on every rank (the
        tp ranks of a stage all know it: one of them speaks)."""
        self._finish_sends()
        speaks = self.topo.is_last and self.topo.tp_rank == 0
        return self.comm.allreduce_scalar(value if speaks else 0.0, "sum") / self.dp_size

    def grad_sq_reduce(self, sq):
        """Sum of squared gradients over the stages, the tied embedding counted once (and, within
        a stage, a parameter replicated over the tp group once, through the sync)."""
        if self.tied and self.topo.is_last:
            g = dict(self.precision.master_params)[TIED].grad
            if g is not None:
                g = g.reshape(-1).astype(xp.float64)
                sq = sq - xp.dot(g, g)
        sq = self.sync.grad_sq_reduce(self.tensor_parallel.count_once(sq, self.precision.master_params))
        return self.topo.pipe_comm.allreduce_scalar(sq, "sum")  # stages differ: read once per step

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
        """The full model by serial name on world rank 0 (every rank must call it)."""
        full = self._gather(self.tensor_parallel.gather({n: p.data for n, p in self.precision.master_params}))
        return {n: full[n] for n in self._serial_order() if n in full}

    def optimizer_state(self, optimizer):
        """The full optimizer state in the serial format on world rank 0 ({} elsewhere)."""
        sd = optimizer.state_dict()
        names = {n for stage in self.topo.pipe_comm.allgather_obj(list(sd["state"])) for n in stage}
        full = self._gather(self.tensor_parallel.gather(
            {f"{n}/{k}": a for n, st in sd["state"].items() for k, a in st.items()}))
        if self.comm.rank != 0:
            return {}
        state = {n: {} for n in self._serial_order() if n in names}
        for key, a in full.items():
            n, k = key.rsplit("/", 1)
            state[n][k] = a
        return {**sd, "state": state}

    def load_optimizer_state(self, optimizer, state):
        mine = set(optimizer.names)
        optimizer.load_state_dict(self.tensor_parallel.local_optimizer_state(
            {**state, "state": {n: st for n, st in state["state"].items() if n in mine}}))

    # ------------------------------------------------------------------ observability
    def write_artifacts(self, run_dir):
        """Write ``timeline_rank{R}.json`` for the kept step (collective over the pipeline)."""
        return self.write_timeline(run_dir)

    def write_timeline(self, out_dir):
        if self.kept is None:
            return None
        stages = self.topo.pipe_comm.allgather_obj(self.kept[2])
        rec = timeline_record(self.kept, stages, rank=self.comm.rank, stage=self.stage,
                              dp_rank=self.dp_rank, pp=self.pp, dp=self.dp_size,
                              microbatches=self.m, schedule=self.schedule_name, v=self.v)
        path = Path(out_dir) / f"timeline_rank{self.comm.rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))
        return path
