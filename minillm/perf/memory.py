"""The memory ledger: the bytes each rank will hold in training, predicted before the run.

Why a run fits or not, rank by rank (``minillm memory CONFIG``)::

    parameters     the weights in the dtype the model computes in (ZeRO-3: a shard of them)
    gradients      one per weight, float32 where they are summed over ranks (ZeRO-2/3: a shard)
    masters        float32 copies of the weights when computing in 16 bits (ZeRO-2/3: a shard)
    moments        the optimizer's state: AdamW's m and v (ZeRO-1/2/3: a shard)
    activations    what forward keeps for backward, by component (recomputation trades it for time)
    buffers        communication: all-reduce buckets, gradients in flight, ZeRO-3's whole blocks
    other          scratch of the optimizer and of the ops at the peak, caches, the token batches

The first four are the *state*: fixed, known from the parameter count and the strategy. The
rest moves during a step: the ledger finds the moment of the peak by walking the step array by
array (``memory_sim.py``) and reports what is alive then; ``total`` is that peak. Where
``activations`` are quoted by component, they are the end-of-forward figures (everything backward
will need); the columns hold what is alive at the peak.

Every strategy of minillm is covered: the whole dp x tp x pp grid (pp per stage, with the
schedule's micro-batches in flight), sequence parallelism, zero 0-3, recompute
none/selective/full, float32/float16/bfloat16, gradient accumulation. Under tensor parallelism
(``parallel.tp``) each rank holds its shards (``rank_parameters``: the padded vocabulary's rows,
c_attn / c_fc / c_gate by output, the c_proj weights by input) and whole copies of the rest (norms,
position embeddings, the row-parallel biases); the activations of the split regions are divided by
tp and those of the replicated ones (norms, dropout, residual stream) too with ``parallel.sp``.

``memory_measure.py`` runs real steps and measures the peak (``minillm memory --measure`` prints
it next to the prediction; tests keep the two within 5 %).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy

from minillm.distributed.data_parallel import bucket_groups
from minillm.distributed.shard import ShardGroup
from minillm.distributed.topology import stage_bounds, stage_of
from minillm.distributed.tp_layers import padded_length
from minillm.errors import UserError
from minillm.perf.memory_sim import F32, I64, Dims, Gathers, GradSink, simulate_stage, simulate_step
from minillm.perf.tp_cost import partial_grad_numel

CATEGORIES = ("parameters", "gradients", "masters", "moments", "activations", "buffers", "other")
NODE_BYTES = 768      # Python objects of one graph node (Tensor, Context, their dicts), roughly
OBJECT_BYTES = 1024   # ... of one parameter (Parameter, its module), roughly
BASE_OBJECTS = 48 * 1024  # ... of the trainer, config, tokenizer, lazily imported code, roughly


@dataclass
class RankMemory:
    """The ledger of one rank: bytes by category at the peak, activations by component."""
    rank: int
    stage: int
    dp_rank: int
    parts: dict                       # category -> bytes alive at the peak (they sum to ``total``)
    activations: dict                 # component -> bytes kept for backward at the end of forward
    peak_at: str                      # the moment of the peak ("backward gelu", ...)
    state: int = 0                    # parameters + gradients + masters + moments between steps
    tp_rank: int = 0                  # which shard of its stage's layers (ranks of a tp group: equal)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def gpt_parameters(mc) -> list[tuple[str, tuple]]:
    """(name, shape) of every parameter of ``GPT(mc)``, in its order (tested against the model)."""
    C, V, H = mc.n_embd, mc.vocab_size, mc.mlp_hidden
    out = [("transformer.wte.weight", (V, C))]
    if mc.pos == "learned":
        out.append(("transformer.wpe.weight", (mc.block_size, C)))

    def norm(name):
        out.append((f"{name}.weight", (C,)))
        if mc.norm == "layernorm" and mc.bias:
            out.append((f"{name}.bias", (C,)))

    def linear(name, n_out, n_in):
        out.append((f"{name}.weight", (n_out, n_in)))
        if mc.bias:
            out.append((f"{name}.bias", (n_out,)))

    for i in range(mc.n_layer):
        p = f"transformer.h.{i}."
        norm(p + "ln_1")
        linear(p + "attn.c_attn", 3 * C, C)
        linear(p + "attn.c_proj", C, C)
        norm(p + "ln_2")
        linear(p + "mlp.c_fc", H, C)
        if mc.mlp == "swiglu":
            linear(p + "mlp.c_gate", H, C)
        linear(p + "mlp.c_proj", C, H)
    norm("transformer.ln_f")
    if not mc.tie_embeddings:
        out.append(("lm_head.weight", (V, C)))
    return out


# tensor-parallel cuts (``distributed/tp_model.parallelize``): name suffix -> the axis divided by tp
_COLUMN = ("attn.c_attn.weight", "attn.c_attn.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
           "mlp.c_gate.weight", "mlp.c_gate.bias")
_ROW = ("attn.c_proj.weight", "mlp.c_proj.weight")


def rank_parameters(mc, tp: int = 1) -> list[tuple[str, tuple]]:
    """(name, shape) of the parameters one tensor-parallel rank holds (every tp rank holds the same
    shapes): ``gpt_parameters`` with the vocabulary padded to a multiple of tp and cut in rows,
    column-parallel layers cut by output, row-parallel weights by input; norms, position
    embeddings and row-parallel biases whole (tested against the parameters of real ranks)."""
    out = []
    for name, shape in gpt_parameters(mc):
        if tp > 1 and name in ("transformer.wte.weight", "lm_head.weight"):
            shape = (padded_length(shape[0], tp) // tp, shape[1])
        elif tp > 1 and name.endswith(_COLUMN):
            shape = (shape[0] // tp, *shape[1:])
        elif tp > 1 and name.endswith(_ROW):
            shape = (shape[0], shape[1] // tp)
        out.append((name, shape))
    return out


def _numel(shape) -> int:
    return math.prod(shape)


def _stand_ins(named):
    """Objects with a size and an (float32) dtype, for the grouping code the syncs use."""
    return [(n, SimpleNamespace(size=_numel(s), data=SimpleNamespace(dtype=numpy.dtype("float32"))))
            for n, s in named]


def _half(dtype: str) -> bool:
    return dtype in ("float16", "bfloat16")


def memory_ledger(cfg, gpu: bool = False) -> list[RankMemory]:
    """The predicted ledger of every rank of ``cfg``'s layout (``dp x tp x pp`` ranks, in world
    rank order). ``gpu``: the CuPy backend (no float32 copies of 16-bit matmul operands)."""
    mc, t, par = cfg.model, cfg.train, cfg.parallel
    tp, sp = par.tp, par.sp and par.tp > 1
    if mc.vocab_size < 1:
        raise UserError("the memory ledger needs model.vocab_size (0 means 'from the dataset'): pass "
                        "--model.vocab_size=N, or prepare the dataset first")
    named = rank_parameters(mc, tp)
    bounds = stage_bounds(mc.n_layer, par.pp, par.partition_blocks)
    n_micro = t.grad_accum * par.microbatches
    b = t.batch_size // (par.dp * n_micro)
    if b < 1 or t.batch_size % (par.dp * n_micro):
        raise UserError(f"train.batch_size={t.batch_size} does not split into parallel.dp={par.dp} x "
                        f"train.grad_accum x parallel.microbatches = {par.dp * n_micro} micro-batches")
    a = 2 if _half(t.dtype) else 4
    d = Dims(b=b, T=mc.block_size, C=mc.n_embd, H=mc.mlp_hidden, nh=mc.n_head,
             V=padded_length(mc.vocab_size, tp) // tp, a=a,
             cpu_half=a < 4 and not gpu, fp16=t.dtype == "float16", dropout=mc.dropout > 0, rope=mc.pos == "rope",
             swiglu=mc.mlp == "swiglu", rms=mc.norm == "rmsnorm", learned=mc.pos == "learned",
             tied=mc.tie_embeddings, tp=tp, sp=sp, bias=mc.bias)
    zero = par.zero if par.dp > 1 else 0
    out, done = [], {}
    for stage in range(par.pp):
        mine = [(n, s) for n, s in named if stage in stage_of(n, bounds, mc.tie_embeddings)] \
            if par.pp > 1 else named
        lists = [mine]  # how the sync groups the gradients: one group (ZeRO-1), buckets, blocks
        if zero == 2:
            shapes = dict(mine)
            lists = [[(n, shapes[n]) for n, _ in g] for g in bucket_groups(_stand_ins(mine), par.bucket_mb)]
        elif zero == 3:
            lists = _zero3_units(mine, mc.n_layer)
        for dp_rank in range(par.dp):
            groups = [ShardGroup([n for n, _ in g], [s for _, s in g], dp_rank, par.dp) for g in lists]
            key = (stage, tuple(g.count for g in groups))  # ranks with equal shards: one simulation
            if key not in done:
                done[key] = _rank_ledger(cfg, d, mine, groups, bounds[stage], stage, dp_rank, n_micro, zero)
            for tp_rank in range(tp):  # tp ranks hold equal shapes: equal ledgers
                rank = (dp_rank * par.pp + stage) * tp + tp_rank
                out.append(dataclasses.replace(done[key], rank=rank, dp_rank=dp_rank, tp_rank=tp_rank))
    return sorted(out, key=lambda r: r.rank)


def _rank_ledger(cfg, d, named, groups, blocks, stage, dp_rank, n_micro, zero) -> RankMemory:
    mc, t, par = cfg.model, cfg.train, cfg.parallel
    a, half, dp = d.a, _half(t.dtype), par.dp
    shapes = dict(named)
    psi = sum(_numel(s) for _, s in named)
    largest = max(_numel(s) for _, s in named)
    parts = dict.fromkeys(CATEGORIES, 0)
    gathers, send = None, False

    if zero <= 1:  # every weight, master and gradient whole; ZeRO-1 shards the moments
        owned = moment_n = psi
        parts["parameters"] = a * psi
        if dp > 1:  # DataParallel's buckets (float32 sums), or ZeRO-1's flat gradient buffer
            parts["buffers" if zero == 0 else "gradients"] += F32 * psi
        if zero == 1:
            moment_n, largest = groups[0].count, max(b - a_ for _, a_, b, _ in groups[0].slices)
        groups = []
    else:
        owned = moment_n = sum(g.count for g in groups)
        largest = max((b - a_ for g in groups for _, a_, b, _ in g.slices), default=0)
        parts["parameters"] = a * (psi if zero == 2 else owned) + (a * owned if zero == 2 and half else 0)
        parts["gradients"] += F32 * owned if half else a * owned       # the gradient shards
        send = True
        if zero == 3:
            gathers = Gathers([a * g.layout.total for g in groups])
    if half:  # float32 masters and their gradients (MixedPrecision's flat buffer)
        parts["masters"] = F32 * owned
        parts["gradients"] += F32 * owned
    if t.optimizer == "adamw":
        parts["moments"] = 2 * F32 * moment_n
        parts["other"] += F32 * largest                               # AdamW's scratch
    elif t.momentum:
        parts["moments"] = F32 * moment_n
        parts["other"] += 2 * F32 * largest
    parts["other"] += F32 * mc.block_size ** 2                        # the cached causal mask
    parts["other"] += BASE_OBJECTS + OBJECT_BYTES * len(named)         # Python objects
    if t.dtype == "float16" and d.cpu_half:
        parts["other"] += F32 * 65536                                 # float16 -> float32 table
    state = sum(parts[c] for c in ("parameters", "gradients", "masters", "moments"))

    sink_groups = [[(n, a * _numel(shapes[n])) for n in g.names] for g in groups] if send else []
    sink = GradSink(sink_groups, send, [g.count for g in groups])
    batch = I64 * d.b * (mc.block_size + 1) * n_micro               # the token ids of the step
    base = sum(parts.values())
    if par.pp == 1:
        finish = F32 * moment_n if zero == 1 else 0                # ZeroSync copies out its shard
        if d.sp:  # TensorParallelSync sums the norms' and biases' partial gradients in one message
            finish += 2 * F32 * partial_grad_numel(mc)
        sim = simulate_step(d, mc.n_layer, base, sink, t.recompute, n_micro, gathers, batch, finish)
        nodes = _nodes_per_micro(mc, t.recompute, d.tp)
    else:
        sim = simulate_stage(cfg, d, base, sink, blocks, stage, batch)
        inflight = par.microbatches if par.schedule == "gpipe" else min(par.microbatches, par.pp - stage)
        nodes = _nodes_per_micro(mc, t.recompute, d.tp, blocks[1] - blocks[0]) * inflight
    at = sim.at_peak
    parts["activations"] = at.get("activations", 0) + NODE_BYTES * nodes
    parts["gradients"] += at.get("gradients", 0)
    parts["buffers"] += at.get("buffers", 0)
    parts["other"] += at.get("batch", 0) + at.get("workspace", 0)
    return RankMemory(0, stage, dp_rank, parts, dict(sim.kept), sim.peak_at, state)



def _zero3_units(named, n_layer):
    """ZeRO-3's units in the order its sync reduce-scatters them: blocks last to first, then the
    root (embeddings, final norm, head)."""
    blocks = [[(n, s) for n, s in named if n.startswith(f"transformer.h.{i}.")] for i in range(n_layer)]
    root = [(n, s) for n, s in named if not n.startswith("transformer.h.")]
    return [*reversed(blocks), root]


def _nodes_per_micro(mc, recompute, tp=1, n_blocks=None) -> int:
    """Graph nodes one micro-batch keeps (``n_blocks``: a pipeline stage's, else every block)."""
    per_block = 20 + (4 if mc.dropout > 0 else 0) + (2 if mc.pos == "rope" else 0) + (6 if tp > 1 else 0)
    n_blocks = mc.n_layer if n_blocks is None else n_blocks
    return n_blocks * (1 if recompute == "full" else per_block) + 12 + (4 if tp > 1 else 0)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_ledger(ranks, measured=None) -> str:
    """The ledger as a table (one row per rank), then rank 0's activations by component.
    ``measured``: rank -> measured peak bytes (printed next to the prediction)."""
    cols = ["rank", "stage", *CATEGORIES, "total"] + (["measured", "error"] if measured else [])
    rows = []
    for r in ranks:
        row = [str(r.rank), str(r.stage), *(fmt_bytes(r.parts[c]) for c in CATEGORIES), fmt_bytes(r.total)]
        if measured:
            m = measured.get(r.rank)
            row += [fmt_bytes(m), f"{100 * (r.total - m) / m:+.1f}%"] if m else ["-", "-"]
        rows.append(row)
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(cols), *(line(row) for row in rows)]
    r0 = ranks[0]
    acts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(r0.activations.items(), key=lambda kv: -kv[1]))
    out.append(f"rank 0 keeps {fmt_bytes(sum(r0.activations.values()))} of activations for backward "
               f"per micro-batch ({acts}); its peak is reached in '{r0.peak_at}'")
    return "\n".join(out)


def check_memory_limit(ranks, limit: int, what: str = "--memory-limit") -> None:
    """A one-line UserError when the predicted peak of some rank exceeds ``limit`` bytes."""
    worst = max(ranks, key=lambda r: r.total)
    if worst.total > limit:
        raise UserError(f"the memory ledger predicts {fmt_bytes(worst.total)} on rank {worst.rank}, "
                        f"more than {what}={fmt_bytes(limit)}; lower train.batch_size (or raise "
                        f"train.grad_accum), set train.recompute='full' or raise parallel.zero")
