"""Tensor-parallel layers, the conjugate operators and their costs, on real `mpirun` jobs.

The ranks run this file (``python -m mpi4py tests/test_tp_layers.py``) with tp = the world size
(2, and 4 oversubscribed): every tensor-parallel layer, with and without sequence parallelism,
must give the unsplit layer's output and gradients (input, weight shard, bias) to float32
rounding, the vocabulary-parallel loss the plain cross-entropy's value and logit gradients
(ignored rows and a padded vocabulary included), ring attention over each rank's block of
positions the whole sequence's causal attention (forward and backward). Then a real step of a tiny GPT through
``build_engine`` over a ``CountingComm``: the bytes its tp group moved equal
``perf/tp_cost.comm_bytes`` exactly, and the bytes its graph saved ``activation_bytes``.
The host-only pieces (cutting and joining shards, sliced dropout masks, the grid) are tested in
the pytest process.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

from mpi_util import output, run_mpi

from minillm import backend
from minillm.backend import xp
from minillm.distributed.sequence_parallel import SequenceSliceRNG
from minillm.distributed.topology import grid_coords, layout_problem
from minillm.distributed.tp_layers import COLUMN, QKV, ROW, ShardSpec, padded_length
from minillm.nn.layers import SampleDropoutRNG

HERE = Path(__file__).resolve()


def dev(a):
    """A host array on the active device (the fake-GPU pass runs this file with cupy)."""
    return backend.asarray(a)


def close(got, want, **tol):
    np.testing.assert_allclose(backend.to_numpy(got), backend.to_numpy(want), **tol)


def same(got, want):
    np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(want))
TOL = dict(rtol=2e-5, atol=2e-6)
B, T, C, H, V = 2, 8, 16, 24, 11        # V divisible by neither 2 nor 4: the padding is exercised


# ---------------------------------------------------------------- on every rank ----------------
def layer_checks(comm):
    import minillm.functional as F
    from minillm import Tensor
    from minillm.distributed.tensor_parallel import local_part
    from minillm.distributed.tp_layers import (ColumnParallelLinear, RowParallelLinear,
                                               VocabParallelCrossEntropy, VocabParallelEmbedding)
    from minillm.nn import Embedding, Linear, Parameter
    r, tp = comm.rank, comm.size
    rng = np.random.default_rng(0)            # the same numbers on every rank
    x = dev(rng.standard_normal((B, T, C)).astype(np.float32))

    def full_grads(layer, inp, gy):
        """The unsplit layer's output and gradients (input, weight, bias)."""
        t = Tensor(inp, requires_grad=True)
        y = layer(t)
        y.backward(gy)
        return y.data, t.grad, layer.weight.grad, (layer.bias.grad if layer.bias is not None else None)

    for sp in (False, True):
        seq = (lambda a: local_part(comm, a)) if sp else (lambda a: a)   # what this rank holds of T
        # column-parallel: c_fc style, and c_attn style (q, k, v each split by heads)
        for spec, out in ((COLUMN, H), (QKV, 3 * C)):
            full = Linear(C, out, rng=np.random.default_rng(1))
            gy = dev(rng.standard_normal((B, T, out)).astype(np.float32))
            y_ref, gx_ref, gw_ref, gb_ref = full_grads(full, x, gy)
            col = ColumnParallelLinear.split(full, comm, sp, spec)
            t = Tensor(seq(x), requires_grad=True)
            y = col(t)
            cut = ShardSpec(2, spec.parts)
            close(y.data, cut.take(y_ref, r, tp), **TOL)
            y.backward(cut.take(gy, r, tp))
            close(t.grad, seq(gx_ref), **TOL)       # f / reduce-scatter summed it
            close(col.weight.grad, spec.take(gw_ref, r, tp), **TOL)
            close(col.bias.grad, spec.take(gb_ref, r, tp), **TOL)
        # row-parallel: its input is this rank's slice of the features
        full = Linear(H, C, rng=np.random.default_rng(2))
        h = dev(rng.standard_normal((B, T, H)).astype(np.float32))
        gy = dev(rng.standard_normal((B, T, C)).astype(np.float32))
        y_ref, gx_ref, gw_ref, gb_ref = full_grads(full, h, gy)
        row = RowParallelLinear.split(full, comm, sp)
        row.bias.grad = None          # the replicated bias is the full layer's own Parameter
        t = Tensor(ShardSpec(2).take(h, r, tp), requires_grad=True)
        y = row(t)
        close(y.data, seq(y_ref), **TOL)
        y.backward(seq(gy))
        close(t.grad, ShardSpec(2).take(gx_ref, r, tp), **TOL)
        close(row.weight.grad, ROW.take(gw_ref, r, tp), **TOL)
        gb = comm.allreduce_(row.bias.grad.copy()) if sp else row.bias.grad   # sp: a partial sum
        close(gb, gb_ref, **TOL)

    # the vocabulary: a padded embedding table and the loss over padded, split logits
    emb = Embedding(V, C, rng=np.random.default_rng(3))
    ids = rng.integers(0, V, (B, T))
    gy = dev(rng.standard_normal((B, T, C)).astype(np.float32))
    e_ref = emb(ids)
    e_ref.backward(gy)
    vpe = VocabParallelEmbedding(Parameter(COLUMN.take(emb.weight.data, r, tp)), comm)
    e = vpe(ids)
    close(e.data, e_ref.data, **TOL)
    e.backward(gy)
    want = COLUMN.take(emb.weight.grad, r, tp)                # padded rows: zero gradient
    close(vpe.weight.grad, want, **TOL)

    logits = dev((3 * rng.standard_normal((B, T, V))).astype(np.float32))
    targets = rng.integers(0, V, (B, T))
    targets[0, :3] = targets[1, -1] = -100                    # ignored rows
    lt = Tensor(logits, requires_grad=True)
    loss_ref = F.cross_entropy(lt, targets)
    loss_ref.backward()
    start = r * padded_length(V, tp) // tp
    local = Tensor(ShardSpec(2).take(logits, r, tp), requires_grad=True)
    loss = VocabParallelCrossEntropy(comm, start, V)(local, targets)
    close(float(loss.data), float(loss_ref.data), rtol=1e-6)
    loss.backward()
    close(local.grad, ShardSpec(2).take(lt.grad, r, tp), **TOL)
    assert not local.grad[0, :3].any() and not local.grad[1, -1].any()  # ignored rows: no gradient


def cost_checks(comm):
    """One step of a tiny GPT: bytes on the tp group and bytes saved for backward, vs the formulas."""
    from minillm.autograd.tensor import saved_bytes
    from minillm.config import load_config
    from minillm.distributed.counting import CountingComm
    from minillm.engine import Microbatch
    from minillm.model import GPT
    from minillm.perf.tp_cost import activation_bytes, comm_bytes
    from minillm.train.build import build_engine
    tp = comm.size
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 127, (2, 16)), rng.integers(0, 127, (2, 16))
    for sp in ("false", "true"):
        for extra in ([], ["--model.mlp=swiglu", "--model.norm=rmsnorm", "--model.bias=false"]):
            cfg = load_config(None, [f"--parallel.tp={tp}", f"--parallel.sp={sp}", "--model.n_layer=2",
                                     "--model.n_head=4", "--model.n_embd=32", "--model.block_size=16",
                                     "--model.vocab_size=127", "--model.dropout=0.1", *extra])
            model = GPT(cfg.model, seed=0)
            engine = build_engine(cfg, model, CountingComm(comm))
            group = engine.tensor_parallel.comm
            group.reset()
            engine.forward_backward([Microbatch(x, y, 0, 0), Microbatch(x, y, 0, 2)])
            want = comm_bytes(cfg.model, 2, tp, sp == "true", micro=2)
            got = {k: v for k, v in group.payload.items() if k != "allreduce_scalar"}
            assert got == want, (sp, extra, got, want)
            if not extra:  # the formula is written for the GPT-2 layout
                with model.dropout_rng.keyed(1, 0):
                    _, loss = model(x, y)
                params = {id(p.data) for _, p in engine.named_parameters()}
                assert saved_bytes(loss, params) == activation_bytes(cfg.model, 2, tp, sp == "true")


def ring_attention_checks(comm):
    """Ring attention over this rank's block of positions equals causal attention over all."""
    import minillm.functional as F
    from minillm import Tensor
    from minillm.distributed.context_parallel import ring_attention
    from minillm.distributed.tensor_parallel import local_part
    rng = np.random.default_rng(5)
    q, k, v, gy = (dev(rng.standard_normal((2, 3, 8, 4))) for _ in range(4))         # (B, nh, T, hs), float64
    full = [Tensor(a, requires_grad=True) for a in (q, k, v)]
    out = F.scaled_dot_product_attention(*full)
    out.backward(gy)
    mine = [Tensor(local_part(comm, a, axis=2), requires_grad=True) for a in (q, k, v)]
    got = ring_attention(*mine, comm)
    close(got.data, local_part(comm, out.data, axis=2), rtol=1e-10, atol=1e-12)
    got.backward(local_part(comm, gy, axis=2))
    for name, t, ref in zip("qkv", mine, full):
        close(t.grad, local_part(comm, ref.grad, axis=2), rtol=1e-9, atol=1e-11,
                                   err_msg=f"d{name}")


def worker():
    from minillm.distributed.comm import get_world_comm
    from minillm.distributed.launch import install_abort_handler
    comm = get_world_comm()
    install_abort_handler(comm)
    layer_checks(comm)
    cost_checks(comm)
    ring_attention_checks(comm)
    print(f"rank {comm.rank} of {comm.size}: layers ok", flush=True)


# ---------------------------------------------------------------- mpirun -----------------------
@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [2, 4])
def test_tp_layers_equal_unsplit_layers_and_costs_equal_formulas(nprocs):
    r = run_mpi(nprocs, [HERE, "run"], timeout=120)
    assert r.returncode == 0, output(r)
    assert r.stdout.count("layers ok") == nprocs, output(r)


# ---------------------------------------------------------------- host-side pieces -------------
@pytest.mark.parametrize("spec, shape", [(COLUMN, (11, 3)), (ROW, (3, 8)), (QKV, (12, 2)),
                                         (ShardSpec(2), (2, 3, 7))])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shards_join_back_to_the_full_tensor(spec, shape, tp):
    full = dev(np.arange(np.prod(shape), dtype=np.float32).reshape(shape))
    pieces = [spec.take(full, r, tp) for r in range(tp)]
    assert len({p.shape for p in pieces}) == 1                      # equal shards (padded)
    same(spec.join(pieces, shape[spec.axis]), full)
    if spec is QKV and tp == 2:  # rank 0 holds the first half of q, of k and of v: whole heads
        same(pieces[0], full[[0, 1, 4, 5, 8, 9]])


def test_sequence_slices_of_dropout_masks_are_the_serial_masks():
    drop = SampleDropoutRNG(7)
    full_layer, a, b = drop.for_layer(3), SequenceSliceRNG(drop.for_layer(3), 0, 2), \
        SequenceSliceRNG(drop.for_layer(3), 1, 2)
    with drop.keyed(step=5, row0=4):
        whole = full_layer.mask((2, 8, 3), 0.5)
        halves = xp.concatenate([a.mask((2, 4, 3), 0.5), b.mask((2, 4, 3), 0.5)], axis=1)
    assert bool((halves == whole).all())
    with drop.keyed(step=5, row0=4, t0=8):  # a micro-batch that itself starts later in the sequence
        later = full_layer.mask((2, 8, 3), 0.5)
        assert bool((a.mask((2, 4, 3), 0.5) == later[:, :4]).all())
    assert not bool((later == whole).all())


def test_counting_comm_counts_payload_calls_and_sub_communicators():
    from minillm.distributed.comm import SerialComm
    from minillm.distributed.counting import CountingComm
    comm = CountingComm(SerialComm())
    a = np.zeros(10, dtype=np.float32)
    comm.allreduce_(a)
    comm.allgather_(a, [10])
    comm.reduce_scatter_(a, [10])
    child = comm.split(color=0)
    child.allreduce_scalar(1.0)
    assert dict(comm.payload) == {"allreduce": 40, "allgather": 40, "reduce_scatter": 40}
    assert dict(comm.calls) == {"allreduce": 1, "allgather": 1, "reduce_scatter": 1}
    assert comm.children == [child] and dict(child.calls) == {"allreduce_scalar": 1}
    assert comm.wire_bytes() == 0                # a world of one sends nothing
    comm.reset()
    assert not comm.payload and not comm.seconds


def test_grid_has_tp_innermost_and_layout_errors_name_every_dimension():
    # dp=2 x pp=2 x tp=2: ranks 0,1 are the two shards of stage 0 of replica 0
    assert [grid_coords(r, 2, 2) + (r % 2,) for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert layout_problem(2, 1, 2, 4) is None
    msg = layout_problem(2, 1, 2, 2)
    assert msg.startswith("parallel.dp=2 x parallel.tp=2 x parallel.pp=1 = 4 ranks but the job has 2")
    assert "mpirun -np 4" in msg
    assert layout_problem(1, 1, 1, 2).startswith("parallel.dp=1 x parallel.pp=1 = 1 ranks")


if __name__ == "__main__":
    assert sys.argv[1:] == ["run"], sys.argv
    worker()
