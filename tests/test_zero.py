"""ZeRO-1 (optimizer state sharded over data-parallel ranks) on real `mpirun` jobs.

Two levels. The unit workers below (this file is also the program the ranks run:
``python -m mpi4py tests/test_zero.py WORKER``) check the pieces on 2 and 3 ranks against plain
AdamW on the averaged gradient: reduce-scatter / all-gather with uneven parts, shards that cut
matrices and vectors in two, clipping by the global norm, weight decay, checkpoint state in the
serial format, inf agreement, and the per-rank optimizer memory. Then whole training runs of
configs/tiny.toml through the real command: dp=2 zero=1 equals dp=2 zero=0 and the serial run
(losses, weights, the checkpoint's AdamW moments), in float32 and float16, and checkpoints move
between ZeRO and serial runs both ways. Bad settings end with one `error:` line and exit code 2.
"""
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from mpi_util import output, run_mpi
from test_dp_train import (EVERY, assert_same_curve, assert_same_weights, error_lines, final,
                           mid, rel, run_maker, train_args)

from minillm.backend import asarray as dev
from minillm.backend import to_numpy as host
from minillm.backend import xp
from minillm.checkpoint import load_checkpoint
from minillm.config import Config, ParallelConfig, TrainConfig, apply_overrides
from minillm.distributed.comm import SerialComm, get_world_comm
from minillm.distributed.launch import install_abort_handler
from minillm.distributed.zero import ShardLayout, ZeroAdamW, ZeroSync, optimizer_state_nbytes
from minillm.errors import ConfigError, UserError
from minillm.model import GPT, GPTConfig
from minillm.nn import Parameter
from minillm.optim import AdamW, clip_grad_norm
from minillm.train.metrics import read_metrics
from minillm.train.build import make_grad_sync

HERE = Path(__file__).resolve()

# Five parameters, 112 numbers: 2 ranks cut at 56 (inside the matrix b.weight), 3 ranks at 37
# (inside the vector a.bias) and 74 (inside b.weight), so slices of both kinds are exercised.
SHAPES = [("a.weight", (7, 5)), ("a.bias", (7,)), ("b.weight", (3, 11)), ("ln.weight", (13,)),
          ("c.weight", (4, 6))]
HYPER = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return [(n, Parameter(dev(rng.standard_normal(s).astype(np.float32)))) for n, s in SHAPES]


def local_grads(step, rank):
    """Rank's gradients at ``step``; small on odd steps so that clipping acts on some steps only."""
    rng = np.random.default_rng(1000 * step + rank)
    scale = 0.02 if step % 2 else 1.0
    return [(scale * rng.standard_normal(s)).astype(np.float32) for _, s in SHAPES]


def mean_grads(step, size):
    per_rank = [local_grads(step, r) for r in range(size)]
    total = [sum(gs[1:], gs[0].copy()) for gs in zip(*per_rank)]
    return [g / np.float32(size) for g in total]


def reference_step(named, opt, step, size):
    for (_, p), g in zip(named, mean_grads(step, size)):
        p.grad = dev(g)
    norm = clip_grad_norm([p for _, p in named], 1.0)
    opt.step(lr=1e-2 / (step + 1))
    opt.zero_grad()
    return norm


def zero_step(comm, named, sync, opt, step):
    for (_, p), g in zip(named, local_grads(step, comm.rank)):
        p.grad = dev(g)
    sync.finish_gradient_sync()
    norm = clip_grad_norm([p for _, p in named], 1.0, reduce=sync.grad_sq_reduce)
    opt.step(lr=1e-2 / (step + 1))
    opt.zero_grad()
    return norm


def assert_close(got, want, tol=1e-6, what=""):
    err = rel(host(got), host(want))
    assert err <= tol, f"{what}: relative difference {err:.1e}"


# ---------------------------------------------------------------- workers (run on every rank) ---
def worker_collectives():
    comm = get_world_comm()
    install_abort_handler(comm)
    r, p = comm.rank, comm.size
    counts = [2 * i + (i == 1) for i in range(p)]  # rank 0 gets nothing, the others uneven parts
    n, lo = sum(counts), sum(counts[:r])
    a = dev(np.arange(n, dtype=np.float32) * (r + 1))
    part = comm.reduce_scatter_(a, counts)
    assert part.base is a or part.base is a.base
    np.testing.assert_array_equal(host(part), np.arange(lo, lo + counts[r]) * sum(range(1, p + 1)))
    outside = np.r_[0:lo, lo + counts[r]:n]
    np.testing.assert_array_equal(host(a)[outside], outside * (r + 1))  # the rest is untouched
    b = dev(np.full(n, -1.0))
    b[lo:lo + counts[r]] = r
    assert comm.allgather_(b, counts) is b
    np.testing.assert_array_equal(host(b), np.repeat(np.arange(p), counts))
    try:
        comm.allgather_(b, counts[:-1])
        raise AssertionError("counts for too few ranks were accepted")
    except ValueError:
        pass
    print("collectives ok", flush=True)


def worker_optimizer():
    """ZeroSync + ZeroAdamW against AdamW on the averaged gradient, checkpoints, overflow."""
    comm = get_world_comm()
    install_abort_handler(comm)
    r, p = comm.rank, comm.size
    ref_named = make_params()
    ref = AdamW(ref_named, lr=1e-2, **HYPER)
    named = make_params()
    sync = ZeroSync(named, comm)
    opt = ZeroAdamW(named, comm, lr=1e-2, **HYPER)
    assert {s.decay for s in opt.params} == {True, False}
    clipped = 0
    for step in range(6):
        want = reference_step(ref_named, ref, step, p)
        got = zero_step(comm, named, sync, opt, step)
        clipped += want > 1.0
        assert abs(got - want) <= 1e-6 * want, (step, got, want)  # the global norm, not the shard's
        for (name, q), (_, w) in zip(named, ref_named):
            assert_close(q.data, w.data, what=f"step {step} {name}")
    assert 0 < clipped < 6, clipped
    sums = np.array([float(q.data.sum()) for _, q in named])
    assert (comm.allreduce_(sums.copy(), "max") == comm.allreduce_(sums.copy(), "min")).all()

    # checkpoints: rank 0 gets AdamW's serial state dict; each rank loads its slices of one
    sd, want = opt.state_dict(), ref.state_dict()
    assert {k: v for k, v in sd.items() if k != "state"} == {k: v for k, v in want.items() if k != "state"}
    if r == 0:
        assert list(sd["state"]) == [n for n, _ in SHAPES]
        for name, st in want["state"].items():
            for k in ("m", "v"):
                assert sd["state"][name][k].shape == st[k].shape
                assert_close(sd["state"][name][k], st[k], what=f"{name}.{k}")
    else:
        assert sd["state"] == {}
    fresh = [(n, Parameter(w.data.copy())) for n, w in ref_named]
    sync2, opt2 = ZeroSync(fresh, comm), ZeroAdamW(fresh, comm, lr=0.5)
    opt2.load_state_dict(want)
    assert opt2.step_count == 6 and opt2.betas == (0.9, 0.95)
    for step in range(6, 8):
        reference_step(ref_named, ref, step, p)
        zero_step(comm, fresh, sync2, opt2, step)
    for (name, q), (_, w) in zip(fresh, ref_named):
        assert_close(q.data, w.data, what=f"after loading, {name}")
    bad = ref.state_dict()
    bad["state"]["b.weight"]["m"] = np.zeros((11, 3), np.float32)
    try:
        opt2.load_state_dict(bad)
        raise AssertionError("a mis-shaped moment was accepted")
    except UserError as e:
        assert "b.weight" in str(e) and "(11, 3)" in str(e), e

    # an inf in rank 0's local gradient lands in the last rank's shard only; the overflow
    # decision is an explicit all-reduce of the flag, so every rank takes it
    for _, q in named:
        q.grad = xp.zeros_like(q.data)
    if r == 0:
        named[-1][1].grad[-1, -1] = np.inf
    sync.finish_gradient_sync()
    mine = not all(np.isfinite(host(q.grad)).all() for _, q in named)
    assert mine == (r == p - 1), (r, mine)  # the inf sits in the owner's shard, nowhere else
    assert sync.agree(mine), f"rank {r} would step after an overflow on rank {p - 1}"
    print("optimizer ok", flush=True)


def worker_memory():
    """Per-rank optimizer memory of AdamW vs ZeroAdamW on a small GPT: the moments counted
    exactly, and all bytes the optimizer's construction keeps allocated (tracemalloc)."""
    comm = get_world_comm()
    install_abort_handler(comm)
    model_cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64)
    measured = {}
    for zero in (0, 1):
        cfg = Config(model=model_cfg, train=TrainConfig(),
                     parallel=ParallelConfig(dp=comm.size, zero=zero))
        tracemalloc.start()  # before the model: ZeroAdamW frees its weight arrays (see flatten)
        model = GPT(model_cfg, seed=1)
        params = list(model.named_parameters())
        sync = make_grad_sync(cfg.parallel, params, comm)  # the one place that picks ZeRO or not
        before = tracemalloc.get_traced_memory()[0]
        opt = sync.make_optimizer(cfg.train, params)
        kept = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert type(opt) is (ZeroAdamW if zero else AdamW)
        measured[zero] = (optimizer_state_nbytes(opt), kept)
    (state0, kept0), (state1, kept1) = measured[0], measured[1]
    total = sum(comm.allgather_obj(state1))
    assert total == state0, (total, state0)  # the shards add up to the whole, nothing twice
    print(f"memory rank {comm.rank}: state {state0} -> {state1} (ratio {state1 / state0:.3f}), "
          f"allocated {kept0} -> {kept1} (ratio {kept1 / kept0:.3f})", flush=True)
    assert state1 / state0 < 0.51, (state1, state0)
    assert kept1 / kept0 < 0.6, (kept1, kept0)


# ---------------------------------------------------------------- unit tests on real jobs -------
@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [2, 3])
def test_collectives_and_optimizer(nprocs):
    for worker in ("collectives", "optimizer"):
        res = run_mpi(nprocs, [HERE, worker], timeout=120)
        assert res.returncode == 0, output(res)
        assert res.stdout.count(f"{worker} ok") == nprocs, output(res)


@pytest.mark.mpi
def test_per_rank_optimizer_memory_is_about_half():
    res = run_mpi(2, [HERE, "memory"], timeout=120)
    assert res.returncode == 0, output(res)
    assert res.stdout.count("memory rank") == 2, output(res)


def test_world_of_one_is_plain_adamw():
    named, ref_named = make_params(), make_params()
    opt, ref = ZeroAdamW(named, SerialComm(), lr=1e-2, **HYPER), AdamW(ref_named, lr=1e-2, **HYPER)
    for step in range(3):
        for (_, q), (_, w), g in zip(named, ref_named, mean_grads(step, 1)):
            q.grad, w.grad = dev(g), dev(g)
        opt.step(lr=1e-2)
        ref.step(lr=1e-2)
    for (name, q), (_, w) in zip(named, ref_named):
        np.testing.assert_array_equal(host(q.data), host(w.data), err_msg=name)
        np.testing.assert_array_equal(host(opt.state_dict()["state"][name]["v"]), host(ref.state[name]["v"]))
    assert optimizer_state_nbytes(opt) == optimizer_state_nbytes(ref)


def test_shard_layout_cuts_parameters_at_shard_bounds():
    layout = ShardLayout([35, 7, 33, 13, 24], 3)
    assert layout.bounds == [0, 37, 74, 112] and layout.counts == [37, 37, 38]
    assert layout.slices(0) == [(0, 0, 35, 0), (1, 0, 2, 35)]
    assert layout.slices(1) == [(1, 2, 7, 0), (2, 0, 32, 5)]
    assert layout.slices(2) == [(2, 32, 33, 0), (3, 0, 13, 1), (4, 0, 24, 14)]


@pytest.mark.parametrize("overrides, message", [
    (["--parallel.zero=4"], "parallel.zero=4 is not one of 0, 1, 2, 3"),
    (["--parallel.zero=1", "--parallel.pp=2"], "set parallel.pp=1 or parallel.zero=0"),
    (["--parallel.zero=1", "--train.optimizer=sgd"], "set train.optimizer='adamw' or parallel.zero=0"),
])
def test_bad_zero_settings_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- whole training runs ----------
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("zero_train")


@pytest.fixture(scope="module")
def runs(work, char_data, minillm_cli):
    return run_maker(work, char_data, minillm_cli)


def assert_same_moments(got_ckpt, want_ckpt):
    """The checkpoints' AdamW states: the same format (names, shapes, dtypes, step,
    hyperparameters) and values (the noise-level key bias compared in absolute terms)."""
    got, want = load_checkpoint(got_ckpt)["optimizer"], load_checkpoint(want_ckpt)["optimizer"]
    assert {k: v for k, v in got.items() if k != "state"} == {k: v for k, v in want.items() if k != "state"}
    assert list(got["state"]) == list(want["state"])
    for name, st in want["state"].items():
        assert sorted(got["state"][name]) == ["m", "v"]
        for k, w in st.items():
            g = got["state"][name][k]
            assert g.shape == w.shape and g.dtype == w.dtype, (name, k)
            if name.endswith("attn.c_attn.bias"):
                C = w.size // 3
                assert np.abs(g[C:2 * C] - w[C:2 * C]).max() <= 1e-6, name
                g, w = np.delete(g, np.s_[C:2 * C]), np.delete(w, np.s_[C:2 * C])
            err = rel(g, w)
            assert err <= 1e-5, f"{name}.{k}: relative difference {err:.1e}"


@pytest.fixture(scope="module")
def serial(runs):
    return runs("serial", 1)


@pytest.fixture(scope="module")
def dp2(runs):
    return runs("dp2", 2, "--parallel.dp=2")


@pytest.fixture(scope="module")
def zero1(runs):
    return runs("zero1", 2, "--parallel.dp=2", "--parallel.zero=1")


@pytest.mark.mpi
def test_zero1_equals_plain_dp_and_serial(serial, dp2, zero1):
    for want in (dp2, serial):
        assert_same_curve(zero1, want)
        assert_same_weights(final(zero1), final(want))
        assert_same_moments(final(zero1), final(want))
        assert_same_moments(mid(zero1), mid(want))
    assert all(r["comm_wait_ms"] >= 0 for r in read_metrics(zero1))


@pytest.mark.mpi
def test_zero1_with_grad_accum_equals_serial(serial, runs):
    run = runs("zero1_accum2", 2, "--parallel.dp=2", "--parallel.zero=1", "--train.grad_accum=2")
    assert_same_curve(run, serial)
    assert_same_weights(final(run), final(serial))


@pytest.mark.mpi
def test_zero1_float16_equals_plain_dp_float16_with_the_same_skipped_steps(runs):
    """A huge initial loss scale makes the first steps overflow; both runs must skip the same
    ones (every ZeRO rank agreeing) and then train identically."""
    fp16 = ("--train.dtype=float16", "--train.loss_scale_init=1e9")
    dp = runs("dp2_fp16", 2, "--parallel.dp=2", *fp16)
    zero = runs("zero1_fp16", 2, "--parallel.dp=2", "--parallel.zero=1", *fp16)
    got, want = read_metrics(zero), read_metrics(dp)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert (g["loss_scale"], g["skipped_steps"]) == (w["loss_scale"], w["skipped_steps"]), (g, w)
        assert (g["grad_norm"] is None) == (w["grad_norm"] is None), (g, w)  # None: an overflow
        if w["grad_norm"] is not None:
            assert rel(g["grad_norm"], w["grad_norm"]) <= 1e-5, (g, w)
        for key in ("loss", "val_loss"):
            assert rel(g.get(key, 0.0), w.get(key, 0.0)) <= 1e-6, (key, g, w)
    assert got[-1]["skipped_steps"] > 0 and got[-1]["grad_norm"] is not None
    assert_same_weights(final(zero), final(dp))
    assert_same_moments(final(zero), final(dp))


@pytest.mark.mpi
def test_zero1_checkpoint_resumes_in_a_serial_run(serial, zero1, runs):
    run = runs("zero1_to_serial", 1, f"--resume={mid(zero1)}")
    assert f"at step {EVERY}" in runs.result("zero1_to_serial").stdout
    assert_same_curve(run, serial, from_step=EVERY)
    assert_same_weights(final(run), final(serial))
    assert_same_moments(final(run), final(serial))


@pytest.mark.mpi
def test_serial_checkpoint_resumes_under_zero1(serial, runs):
    run = runs("serial_to_zero1", 2, f"--resume={mid(serial)}", "--parallel.dp=2", "--parallel.zero=1")
    assert f"at step {EVERY}" in runs.result("serial_to_zero1").stdout
    assert_same_curve(run, serial, from_step=EVERY)
    assert_same_weights(final(run), final(serial))
    assert_same_moments(final(run), final(serial))


@pytest.mark.mpi
@pytest.mark.parametrize("extra, message", [
    (["--parallel.pp=2", "--parallel.zero=1"], "parallel.zero=1 shards the optimizer over data-parallel"),
    (["--parallel.dp=2", "--parallel.zero=4"], "parallel.zero=4 is not one of 0, 1, 2, 3"),
])
def test_bad_zero_setting_is_one_error_line_exit_2(work, char_data, extra, message):
    r = run_mpi(2, train_args(char_data, "bad_zero", *extra), timeout=60, cwd=work)
    assert r.returncode == 2, output(r)
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and message in lines[0], output(r)
    assert "Traceback" not in r.stderr, output(r)
    assert not (work / "bad_zero").exists()


if __name__ == "__main__":
    WORKERS = {"collectives": worker_collectives, "optimizer": worker_optimizer,
               "memory": worker_memory}
    WORKERS[sys.argv[1]](*sys.argv[2:])
