"""One training step of a GPT, simulated array by array: what is alive when, and where memory peaks.

The memory ledger (``memory.py``) needs more than totals: the peak of a step is reached at one
moment, and what is alive then depends on the moment. This module walks a step the way minillm's
autograd engine runs it and keeps a running count of bytes:

- forward, op by op: each op's output and the extra arrays it saves for backward stay alive (the
  activations, counted by component), plus short-lived temporaries inside the op;
- backward, op by op in reverse: each op's backward allocates the gradients of its inputs (and of
  its parameters) and temporaries; then the engine drops the op's saved arrays, its output and
  the gradient it consumed. A tensor used twice (the residual stream, qkv) has its gradients
  summed into a new array;
- recomputation replays a block (or the attention core) right before its backward;
- the gradient sync decides what happens to parameter gradients (``GradSink``): kept until the
  end (plain data parallelism, ZeRO-1) or sent away in buckets/blocks and freed (ZeRO-2/3);
  ZeRO-3 also gathers and frees each block's weights around its forward and backward.

Every size is a formula of the shape (B, T, C, H, nh, V, L) and the dtypes, written next to the
op it models (``autograd/fused.py``, ``ops.py``); a test compares the activations with the arrays
a real graph holds and the peak with tracemalloc. Tensor parallelism (``Dims.tp``) divides the
heads, the hidden width and the (padded) vocabulary and adds the f / g collectives' arrays;
sequence parallelism (``Dims.sp``) divides the replicated regions along T (``Dims.Ns``).
"""
from __future__ import annotations

from dataclasses import dataclass

from minillm.distributed.pipeline_schedule import schedule
from minillm.perf.memory_ops import (F32, I64, block_bwd, block_fwd, block_fwd_no_grad,  # noqa: F401
                                     embed_bwd, embed_fwd, head_bwd, head_fwd)


@dataclass(frozen=True)
class Dims:
    """The shape of one micro-batch's computation on one rank (``b`` sequences of ``T`` tokens)."""
    b: int
    T: int
    C: int
    H: int                    # MLP hidden width
    nh: int
    V: int
    a: int                    # bytes per activation (4 float32, 2 float16/bfloat16)
    cpu_half: bool = False    # 16-bit on the CPU: matmul operands are cast up to float32 first
    fp16: bool = False        # float16 (on the CPU cast up through a table: an int64 index on the way)
    dropout: bool = False
    rope: bool = False
    swiglu: bool = False
    rms: bool = False         # RMSNorm instead of LayerNorm
    learned: bool = True      # learned position embeddings (else RoPE or none)
    tied: bool = True         # the output head is the token embedding
    tp: int = 1               # tensor parallelism: heads, hidden width and vocabulary (V) split tp ways
    sp: bool = False          # sequence parallelism: norms, dropout, residuals split along T tp ways
    bias: bool = True         # the linear layers have biases (a row-parallel one is added after the sum)

    @property
    def N(self):
        return self.b * self.T

    @property
    def Ns(self):
        """Tokens of the replicated regions (norms, dropout, residual stream) on this rank."""
        return self.N // self.tp if self.sp else self.N

    def up(self, n):
        """Bytes of a float32 copy of a 16-bit operand of n elements (0 when none is made)."""
        return F32 * n if self.cpu_half else 0

    def up_peak(self, n):
        """... and the moment it is made (float16's table lookup indexes with int64)."""
        return self.up(n) + (I64 * n if self.cpu_half and self.fp16 else 0)

    def att(self, itemsize):
        """Attention probabilities (B, nh, T, T)."""
        return itemsize * self.b * (self.nh // self.tp) * self.T * self.T


class GradSink:
    """What the gradient sync does with parameter gradients as backward produces them.

    ``groups``: lists of (name, bytes of its gradient in the parameter's dtype) in the order the
    sync sends them (buckets, blocks), ``counts``: this rank's shard of each (elements); ``send``:
    whether a complete group is sent and its gradients freed (ZeRO-2/3) or all are kept until the
    step ends (plain dp, ZeRO-1: a later micro-step adds into them).
    """

    def __init__(self, groups, send: bool, counts=(), inflight: int = 2):
        self.groups, self.send, self.counts, self.inflight = groups, send, list(counts), inflight
        self.where = {name: k for k, g in enumerate(groups) for name, _ in g}
        self.held, self.flying, self.round = set(), [], 0
        self.new_round()

    def new_round(self):
        """A micro-step's backward begins: every group will be complete once more."""
        self.ready, self.next = [0] * len(self.groups), 0
        self.round += 1

    def add(self, sim, name, nbytes):
        if not self.send and name in self.held:  # accumulate: a new sum, then the old array goes
            sim.temp(nbytes, "gradient accumulation")
            return
        sim.alloc(nbytes, "gradients")
        self.held.add(name)
        k = self.where.get(name)
        if not self.send or k is None:
            return
        self.ready[k] += 1
        while self.next < len(self.groups) and self.ready[self.next] == len(self.groups[self.next]):
            self._launch(sim, self.next)

    def hold(self, sim, nbytes, name="transformer.wte.weight"):
        """A partial gradient (the tied embedding's head part) that is not complete yet; from a
        step's second micro-batch on (kept gradients) it is added into the gradient at once."""
        if not self.send and name in self.held:
            sim.temp(nbytes, "gradient accumulation")
        else:
            sim.alloc(nbytes, "gradients")

    def release(self, sim, nbytes, name="transformer.wte.weight"):
        if self.send or name not in self.held:
            sim.free(nbytes, "gradients")

    def _launch(self, sim, k):
        """Copy group k into a float32 send buffer (and, after the step's first micro-step, a
        receive buffer to add from), free its gradients, keep <= inflight going."""
        send = F32 * sum(n // sim.grad_item for _, n in self.groups[k])
        recv = F32 * self.counts[k] if self.round > 1 else 0
        sim.alloc(send + recv, "buffers")
        sim.free(sum(n for _, n in self.groups[k]), "gradients")
        self.held -= {name for name, _ in self.groups[k]}
        if len(self.flying) >= self.inflight:  # the oldest must arrive before another leaves
            sim.free(self.flying.pop(0), "buffers")
        self.flying.append(send + recv)
        self.next = k + 1
        sim.after_send(k)

    def finish(self, sim, temp=0):
        """The step's end: start what is left, wait for everything (``temp``: a temporary of
        the sync's own finish)."""
        sim.temp(temp, "gradient sync")
        while self.send and self.next < len(self.groups):
            self._launch(sim, self.next)
        for n in self.flying:
            sim.free(n, "buffers")
        self.flying = []


class StepSim:
    """The running byte count of one rank through one micro-batch's forward and backward."""

    def __init__(self, d: Dims, base: int, sink: GradSink, grad_item: int, recompute="none",
                 gather=None):
        self.d, self.sink, self.grad_item, self.recompute = d, sink, grad_item, recompute
        self.gather = gather          # ZeRO-3: a Gathers (which units' weights are whole)
        self.mem = self.peak = base
        self.peak_at = "start"
        self.kept = {}                # component -> bytes kept for backward, at the end of forward
        self.now = {}                 # category -> bytes alive now (activations, gradients, ...)
        self.at_peak = {}

    # ---- bookkeeping
    def alloc(self, n, what="activations"):
        self.mem += n
        self.now[what] = self.now.get(what, 0) + n
        self._see(0, what)

    def free(self, n, what="activations"):
        self.mem -= n
        self.now[what] = self.now.get(what, 0) - n

    def temp(self, n, where):
        """A temporary of n bytes inside an op (gone when the op returns)."""
        self._see(n, where)

    def _see(self, extra, where):
        if self.mem + extra > self.peak:
            self.peak, self.peak_at = self.mem + extra, where
            self.at_peak = dict(self.now, workspace=extra)

    def keep(self, comp, n):
        self.alloc(n)
        self.kept[comp] = self.kept.get(comp, 0) + n

    def after_send(self, k):
        if self.gather is not None:  # ZeRO-3: a unit's gradients left, its weights go too
            self.gather.free(self, k)




# ---------------------------------------------------------------- ZeRO-3's gathered weights ------
class Gathers:
    """Which ZeRO-3 units have their weights whole on this rank (``zero3.py``): ``unit_bytes[k]``
    for the units in the sync's order (blocks last to first, then the root). A gather writes
    into the unit's whole buffer (this rank's shard in place): nothing else is allocated."""

    def __init__(self, unit_bytes):
        self.unit_bytes = unit_bytes
        self.state = [None] * len(unit_bytes)  # None, "flying", "whole"
        self.root = len(unit_bytes) - 1

    def start(self, s, k):
        if k is None or self.state[k] is not None:
            return
        s.alloc(self.unit_bytes[k], "buffers")
        self.state[k] = "flying"

    def wait(self, s, k):
        self.start(s, k)
        self.state[k] = "whole"

    def free(self, s, k):
        if self.state[k] is not None:
            self.wait(s, k)
            s.free(self.unit_bytes[k], "buffers")
            self.state[k] = None


# ---------------------------------------------------------------- one step -----------------------
def simulate_step(d: Dims, n_layer: int, base: int, sink: GradSink, recompute="none", n_micro=1,
                  gathers: Gathers | None = None, batch_bytes=0, after_backward=0) -> StepSim:
    """Forward and backward of ``n_micro`` micro-batches one after the other (a ``LocalEngine``
    step), from ``base`` bytes of persistent state; ``after_backward``: a temporary of the
    gradient sync's finish while every gradient is still alive (ZeRO-1's copy of its shard).
    Returns the simulation: ``peak``, ``peak_at``, ``at_peak`` (category -> bytes then) and
    ``kept`` (activations by component)."""
    s = StepSim(d, base, sink, d.a, recompute, gathers)
    s.alloc(batch_bytes, "batch")
    unit = (lambda i: n_layer - 1 - i if 0 <= i < n_layer else None)  # block i -> ZeRO-3 unit
    for m in range(n_micro):
        if gathers:
            gathers.wait(s, gathers.root)
            gathers.start(s, unit(0))
        embed_fwd(s)
        for i in range(n_layer):
            if gathers:
                gathers.wait(s, unit(i))
                gathers.start(s, unit(i + 1))
            if recompute == "full":
                block_fwd_no_grad(s)
            else:
                block_fwd(s, keep_core=recompute != "selective")
            if gathers:
                gathers.free(s, unit(i))
        head_fwd(s)
        if m == 0:
            kept = dict(s.kept)
        if m > 0:
            sink.new_round()
        head_bwd(s, logits_held=True)
        for i in reversed(range(n_layer)):
            if gathers:
                gathers.wait(s, unit(i))
                gathers.start(s, unit(i - 1))
            if recompute == "full":  # the replay: the block's activations, for its backward only
                block_fwd(s)
            block_bwd(s, i, replay_core=recompute == "selective", output_held=recompute == "full")
            if recompute == "full":
                s.free(2 * d.a * d.Ns * d.C)                    # the replay's output and the first pass's
        embed_bwd(s)
        s.free(d.a * d.N * d.V)                                 # the logits, at last
    sink.finish(s, after_backward)
    s.kept = kept
    return s


def block_bytes(d: Dims, keep_core=True) -> dict:
    """Bytes one block keeps for backward, by component (``keep_core=False``: selective)."""
    probe = StepSim(d, 0, GradSink([], False), d.a)
    block_fwd(probe, keep_core)
    return probe.kept


def simulate_stage(cfg, d, base, sink, blocks, stage, batch) -> StepSim:
    """A pipeline stage (``PipelineEngine``): its blocks (and the embeddings / head on the first /
    last stage) running the schedule's steps in order (``pipeline_schedule.schedule``), so the
    micro-batches in flight (1F1B: up to pp - stage, GPipe: all) each keep their activations until
    their backward, and from the second backward on every parameter gradient of the stage is alive
    (the micro-batches add into them). A stage after the first keeps its received input (a leaf)
    and sends its gradient back; a send's buffer lives until a later receive finds it complete
    (``PipelineEngine._poke``), here: through the stage's next backward. Simplified: split
    schedules (ZB-H1) compute the weights' gradients in B, interleaved chunks are not told apart."""
    par, t = cfg.parallel, cfg.train
    first, last = stage == 0, stage == par.pp - 1
    full = t.recompute == "full"
    nc = d.a * d.Ns * d.C
    s = StepSim(d, base + batch, sink, d.a, t.recompute)
    kept, sent, backwards = None, 0, 0
    for kind, _, _ in schedule(par.schedule, par.pp, stage, par.microbatches):
        if kind == "W":
            continue
        if kind == "F":
            if first:
                embed_fwd(s)
            else:
                s.keep("residual", nc)                           # the received activations, a leaf
            for _ in range(*blocks):
                block_fwd_no_grad(s) if full else block_fwd(s, keep_core=t.recompute != "selective")
            if last:
                head_fwd(s)
            kept = kept or dict(s.kept)
            continue
        if backwards:
            sink.new_round()
        backwards += 1
        if last:
            head_bwd(s, own_copy=not first)
        else:
            s.alloc(nc)                                          # the gradient received
        for k in reversed(range(*blocks)):
            if full:  # the replay: the block's activations, for its backward only
                block_fwd(s)
            block_bwd(s, k, replay_core=t.recompute == "selective", output_held=full)
            if full:
                s.free(2 * nc)                                   # the replay's output and the first pass's
        if first:
            embed_bwd(s, own_copy=not last)
        else:  # the input leaf goes; its gradient waits in the send, through the next backward
            s.free(2 * nc)
            s.alloc(nc, "buffers")
            s.free(sent, "buffers")
            sent = nc
    s.free(sent, "buffers")
    sink.finish(s)
    s.kept = kept
    return s
