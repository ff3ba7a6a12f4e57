"""DataParallel on real ``mpirun`` jobs equals one process that sees the whole batch.

The ranks run this file (``python -m mpi4py tests/test_data_parallel.py run OUTDIR``): each
takes its half of every global batch, syncs gradients through DataParallel and steps AdamW;
rank 0 saves gradients and final parameters. The pytest process computes the serial reference
itself (the same model and the full batches) and compares.
"""
import contextlib
import sys
from pathlib import Path

import numpy as np
import pytest

from mpi_util import output, run_mpi

import minillm.nn as nn
from minillm.backend import asarray, to_numpy, xp
from minillm.autograd.tensor import Tensor
from minillm.distributed.grad_sync import GradSync
from minillm.distributed.data_parallel import DataParallel, make_buckets
from minillm.distributed.comm import SerialComm
from minillm.errors import ConfigError
from minillm.model import GPT, GPTConfig
from minillm.optim import AdamW

HERE = Path(__file__).resolve()
CFG = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, tie_embeddings=True,
           bias=False)  # a key bias has an exactly-zero gradient that Adam would turn into noise
GLOBAL_B, T, STEPS = 4, 8, 5
# name: (bucket_mb, allreduce, dtype, micro-steps). float64 so that 5 AdamW steps can be compared
# at 1e-6: in float32 Adam's division by sqrt(v) magnifies the last-bit differences of another
# summation order to about that size (the "f32" variant checks float32 with a looser bound).
VARIANTS = {
    "one": (1000.0, "mpi", "float64", 1),         # everything in one bucket
    "several": (0.004, "mpi", "float64", 1),      # a few buckets
    "per_param": (1e-9, "mpi", "float64", 1),     # one bucket per parameter
    "ring": (0.004, "ring", "float64", 1),        # the hand-written ring instead of MPI's
    "no_sync": (0.004, "mpi", "float64", 2),      # 2 accumulation micro-steps, the first in no_sync
    "f32": (0.004, "mpi", "float32", 1),
}


def make_model(seed, dtype):
    model = GPT(GPTConfig(**CFG), seed=seed)
    for _, p in model.named_parameters():
        p.data = p.data.astype(dtype)
    return model


def batch(step):
    """The global batch of a step: the same on every rank and in the reference."""
    rng = np.random.default_rng(100 + step)
    x = rng.integers(0, CFG["vocab_size"], (GLOBAL_B, T))
    return x, np.roll(x, -1, axis=1)


def train(model, rows, steps=STEPS, sync=None, micro=1):
    """Steps of AdamW on ``rows`` of each global batch; returns the first step's gradients."""
    opt = AdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1)
    first = None
    for step in range(steps):
        x, y = batch(step)
        x, y = x[rows], y[rows]
        parts = np.array_split(np.arange(len(x)), micro)
        for k, idx in enumerate(parts):
            last = k == micro - 1
            ctx = sync.no_sync() if (sync is not None and not last) else contextlib.nullcontext()
            with ctx:
                _, loss = model(x[idx], y[idx])
                (loss * (1.0 / micro)).backward()
        if sync is not None:
            sync.finish_gradient_sync()
        if first is None:
            first = {n: to_numpy(p.grad).copy() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    return first


class WithUnused(nn.Module):
    """Two layers in use and one never reached by backward."""

    def __init__(self, rng):
        super().__init__()
        self.fc1 = nn.Linear(4, 8, rng=rng)
        self.unused = nn.Linear(3, 2, rng=rng)
        self.fc2 = nn.Linear(8, 3, rng=rng)

    def forward(self, x, y):
        d = self.fc2(self.fc1(Tensor(asarray(x))).tanh()) - Tensor(asarray(y))
        return None, (d * d).mean()


def unused_data():
    rng = np.random.default_rng(7)
    return rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)


# ---------------------------------------------------------------- the ranks' program -------------
def worker(outdir):
    from minillm.distributed.comm import get_world_comm
    from minillm.distributed.launch import install_abort_handler
    comm = get_world_comm()
    install_abort_handler(comm)
    r, p = comm.rank, comm.size
    B = GLOBAL_B // p
    rows = slice(r * B, (r + 1) * B)
    out = {}
    for name, (mb, kind, dtype, micro) in VARIANTS.items():
        model = make_model(1 + r, dtype)  # different on purpose: DataParallel broadcasts rank 0's
        dp = DataParallel(model, comm, bucket_mb=mb, allreduce=kind)
        grads = train(model, rows, sync=dp, micro=micro)
        assert dp.last_wait_s >= 0.0 and dp.total_wait_s >= 0.0
        dp.check_parameters_equal()  # the same updates kept the copies identical
        params = {n: to_numpy(q.data).copy() for n, q in model.named_parameters()}
        out[name] = (len(dp.buckets), grads, params)

    # A parameter backward never reaches: a gradient it already holds (say from no_sync
    # micro-steps) is averaged like any other; without one it ends with zeros.
    model = WithUnused(np.random.default_rng(3 + r))
    dp = DataParallel(model, comm, bucket_mb=1e-9)
    x, y = unused_data()
    model.unused.weight.grad = xp.full((2, 3), r + 1.0, dtype=xp.float32)
    _, loss = model(x[r::p], y[r::p])
    loss.backward()
    dp.finish_gradient_sync()
    assert (model.unused.weight.grad == (p + 1) / 2).all()  # the mean of 1..p
    model.zero_grad()
    _, loss = model(x[r::p], y[r::p])
    loss.backward()
    dp.finish_gradient_sync()  # the test checks: unused.* zeros, the rest as one process
    out["unused"] = (len(dp.buckets), {n: to_numpy(q.grad) for n, q in model.named_parameters()}, {})

    # a rank whose weights drift is caught (every rank raises)
    if r == 1:
        model.fc1.weight.data[0, 0] += 1.0
    try:
        dp.check_parameters_equal()
        raise AssertionError("differing parameters were not detected")
    except RuntimeError as e:
        assert "fc1.weight" in str(e), e
    # a rank with another model is caught before any broadcast (every rank raises)
    try:
        DataParallel(GPT(GPTConfig(**{**CFG, "n_embd": 16 + 8 * (r == 1)})), comm)
        raise AssertionError("different models were not detected")
    except RuntimeError as e:
        assert "differ across ranks" in str(e), e

    if r == 0:
        arrays = {}
        for name, (nb, grads, params) in out.items():
            arrays[f"{name}/nbuckets"] = np.array(nb)
            arrays.update({f"{name}/grad/{k}": v for k, v in grads.items()})
            arrays.update({f"{name}/param/{k}": v for k, v in params.items()})
        np.savez(Path(outdir) / "dp.npz", **arrays)
    print(f"rank {r} done", flush=True)


# ---------------------------------------------------------------- tests --------------------------
def _close(got, want, what, tol=1e-6):
    got, want = to_numpy(got), to_numpy(want)
    err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    assert err <= tol, f"{what}: relative difference {err:.2e} > {tol:.0e}"


@pytest.fixture(scope="module")
def dp_results(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dp")
    res = run_mpi(2, [HERE, "run", outdir], timeout=300)
    assert res.returncode == 0, output(res)
    with np.load(outdir / "dp.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def serial_reference():
    """One process, whole batches: {dtype: (first gradients, parameters after STEPS steps)}."""
    ref = {}
    for dtype in ("float64", "float32"):
        model = make_model(1, dtype)
        grads = train(model, slice(0, GLOBAL_B))
        ref[dtype] = grads, {n: to_numpy(p.data).copy() for n, p in model.named_parameters()}
    return ref


@pytest.mark.mpi
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_ranks_equal_one_process(dp_results, serial_reference, variant):
    dtype = VARIANTS[variant][2]
    grads, params = serial_reference[dtype]
    param_tol = 1e-6 if dtype == "float64" else 1e-5
    for name in grads:
        assert dp_results[f"{variant}/grad/{name}"].dtype == dtype
        _close(dp_results[f"{variant}/grad/{name}"], grads[name], f"{variant} grad {name}")
        _close(dp_results[f"{variant}/param/{name}"], params[name],
               f"{variant} param {name} after {STEPS} AdamW steps", tol=param_tol)


@pytest.mark.mpi
def test_bucket_layouts_and_ring_agree(dp_results, serial_reference):
    names = list(serial_reference["float64"][0])
    assert dp_results["one/nbuckets"] == 1
    assert 1 < dp_results["several/nbuckets"] < len(names)
    assert dp_results["per_param/nbuckets"] == len(names)
    for name in names:
        for variant in ("several", "per_param", "ring", "no_sync"):
            _close(dp_results[f"{variant}/grad/{name}"], dp_results[f"one/grad/{name}"],
                   f"{variant} vs one bucket: {name}", tol=1e-12)


@pytest.mark.mpi
def test_unused_parameter_gets_zero_gradient(dp_results):
    model = WithUnused(np.random.default_rng(3))
    x, y = unused_data()
    _, loss = model(x, y)
    loss.backward()
    for name, p in model.named_parameters():
        got = dp_results[f"unused/grad/{name}"]
        if name.startswith("unused."):
            assert p.grad is None and (got == 0).all()
        else:
            _close(got, p.grad, name)


def test_buckets_reverse_order_and_sizes():
    named = list(make_model(1, "float32").named_parameters())
    buckets = make_buckets(named, 0.004)
    order = [n for b in buckets for n in b.names]
    assert order == [n for n, _ in reversed(named)]
    for b in buckets:
        assert len(b.params) == 1 or b.nbytes <= 0.004 * 2**20
        assert b.flat.size == sum(p.size for p in b.params)


class RecordingComm(SerialComm):
    """Pretends to be rank 0 of 2 and records when all-reduces start (no real peer)."""

    size = 2

    def __init__(self):
        super().__init__()
        self.started = []

    def iallreduce_(self, a, op="sum"):
        self.started.append(a)
        return super().iallreduce_(a, op)


def test_buckets_start_during_backward_in_order():
    comm = RecordingComm()
    model = make_model(1, "float32")
    dp = DataParallel(model, comm, bucket_mb=0.004)
    x, y = batch(0)
    with dp.no_sync():
        _, loss = model(x, y)
        loss.backward()
    assert comm.started == []
    _, loss = model(x, y)
    loss.backward()
    # overlap: every bucket was already sent before backward returned, in bucket order
    assert [id(a) for a in comm.started] == [id(b.flat) for b in dp.buckets]
    with pytest.raises(RuntimeError, match="finish_gradient_sync"):
        _, loss = model(x, y)
        loss.backward()


def test_world_of_one_and_config_errors():
    model = GPT(GPTConfig(**CFG), seed=1)
    dp = DataParallel(model, SerialComm())
    # a gradient sync over the model's parameters, not a model wrapper: nothing is forwarded
    assert isinstance(dp, GradSync) and not hasattr(dp, "config") and not callable(dp)
    x, y = batch(0)
    _, loss = model(x, y)
    loss.backward()
    dp.finish_gradient_sync()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ConfigError, match="allreduce"):
        DataParallel(model, SerialComm(), allreduce="nccl")
    with pytest.raises(ConfigError, match="bucket_mb"):
        DataParallel(model, SerialComm(), bucket_mb=0)


if __name__ == "__main__":
    assert sys.argv[1] == "run"
    worker(sys.argv[2])
