"""ZeRO-2 and ZeRO-3 on real `mpirun` jobs: equal to plain data parallelism, resumable across stages.

This file is also the program the ranks run (``python -m mpi4py tests/test_zero23.py WORKER DATA
OUT``). To keep the suite fast, one job per world size trains configs/tiny.toml several times
in-process with the real ``Trainer`` (10 steps, checkpoints at 5 and 10) and checks, printing one
``ok`` line per check (any failure aborts the job with the reason, and the test shows it):

- the non-blocking collectives ZeRO uses (``iallgather_``, ``ireduce_scatter``) with uneven parts,
  bfloat16 moved as raw bits;
- zero=2 and zero=3 equal zero=0 (every logged loss and the final weights within 1e-6 relative);
  on 2 ranks also with gradient accumulation, float16 with skipped steps and recomputation;
- checkpoints are in the serial format and resume across stages: a zero=3 checkpoint continued
  under zero=2 and in a serial run, a zero=2 one under zero=3, equal to the uninterrupted run;
- ZeRO-3 keeps about 1/dp of the weights, gradients and optimizer state per rank.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

from mpi_util import output, run_mpi

HERE = Path(__file__).resolve()
TINY = HERE.parents[1] / "configs" / "tiny.toml"
STEPS, EVERY, TOL = 10, 5, 1e-6


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def train_run(comm, data, out, *overrides, resume=None):
    """Train configs/tiny.toml in this process (every rank of ``comm``); returns, on rank 0,
    (the logged records, the final model state by name), None on the other ranks."""
    from minillm.config import load_config
    from minillm.train.metrics import read_metrics
    from minillm.train.trainer import Trainer
    cfg = load_config(TINY, [f"--data.dir={data}", f"--train.out_dir={out}", f"--train.max_steps={STEPS}",
                             f"--train.ckpt_interval={EVERY}", "--train.keep_last=0", "--train.log_interval=1",
                             f"--train.eval_interval={EVERY}", "--train.sample_tokens=0", *overrides])
    trainer = Trainer(cfg, comm=comm, resume=resume, log=lambda msg: None)
    trainer.run()
    state = {k: np.array(v) for k, v in trainer.engine.model_state().items()}
    return (read_metrics(out), state) if comm.rank == 0 else None


def assert_same_run(got, want, what, tol=TOL, from_step=0, exact=False):
    """Every logged loss (after ``from_step``) and every final weight of ``got`` equal ``want``'s:
    bit for bit (``exact``), else within ``tol`` relative. The key bias of attention has an
    exactly-zero gradient computed as rounding noise, which AdamW turns into noise-sized steps:
    it is compared in absolute terms (as in test_dp_train.py). Ranks other than 0 (None) skip."""
    if got is None:
        return
    (got_log, got_w), (want_log, want_w) = got, want
    want_by_step = {r["step"]: r for r in want_log}
    steps = [r["step"] for r in got_log if r["step"] > from_step]
    assert steps == [s for s in sorted(want_by_step) if s > from_step], (what, steps)
    for r in got_log:
        if r["step"] <= from_step:
            continue
        w = want_by_step[r["step"]]
        for key in ("loss", "val_loss"):
            assert (key in r) == (key in w), (what, key, r["step"])
            if key in r:
                err = 0.0 if r[key] == w[key] else rel(r[key], w[key])
                assert err <= (0.0 if exact else tol), f"{what}: step {r['step']} {key} {r[key]} vs {w[key]}"
    assert sorted(got_w) == sorted(want_w), what
    for name, w in want_w.items():
        g = got_w[name]
        assert g.shape == w.shape and g.dtype == np.float32, (what, name, g.shape, g.dtype)
        if exact:
            assert np.array_equal(g, w), f"{what}: {name} differs"
            continue
        if name.endswith("attn.c_attn.bias"):
            C = w.size // 3
            assert np.abs(g[C:2 * C] - w[C:2 * C]).max() <= 1e-5, (what, name)
            g, w = np.delete(g, np.s_[C:2 * C]), np.delete(w, np.s_[C:2 * C])
        assert rel(g, w) <= tol, f"{what}: {name} relative difference {rel(g, w):.1e}"


# ---------------------------------------------------------------- workers (run on every rank) ---
def check_collectives(comm):
    import ml_dtypes
    r, p = comm.rank, comm.size
    counts = [2 * i + (i == 1) for i in range(p)]  # rank 0 gets nothing, the others uneven parts
    n, lo = sum(counts), sum(counts[:r])
    send = np.arange(n, dtype=np.float32) * (r + 1)
    recv = np.full(counts[r], -1.0, np.float32)
    comm.ireduce_scatter(send, recv, counts).wait()
    np.testing.assert_array_equal(recv, np.arange(lo, lo + counts[r]) * sum(range(1, p + 1)))
    for dtype in (np.float32, ml_dtypes.bfloat16):
        a = np.full(n, -1, dtype=dtype)
        part = np.full(counts[r], r, dtype=dtype)
        req = comm.iallgather_(a, counts, part=part)
        req.wait()
        np.testing.assert_array_equal(a.astype(np.float32), np.repeat(np.arange(p), counts))
        b = np.full(n, -1, dtype=dtype)
        b[lo:lo + counts[r]] = r
        comm.iallgather_(b, counts).wait()  # in place
        np.testing.assert_array_equal(b.astype(np.float32), np.repeat(np.arange(p), counts))
    print("collectives ok", flush=True)


def check_zero3_memory(comm):
    """Per-rank state of ZeRO-3 (weights, gradients, moments) is about 1/dp of the whole."""
    from minillm.config import Config, ParallelConfig, TrainConfig
    from minillm.distributed.zero import optimizer_state_nbytes
    from minillm.distributed.zero3 import Zero3Sync
    from minillm.model import GPT, GPTConfig
    from minillm.train.build import make_grad_sync
    model_cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64)
    cfg = Config(model=model_cfg, train=TrainConfig(), parallel=ParallelConfig(dp=comm.size, zero=3))
    model = GPT(model_cfg, seed=1)
    named = list(model.named_parameters())
    total = sum(p.data.nbytes for _, p in named)
    sync = make_grad_sync(cfg.parallel, named, comm, model=model)
    assert isinstance(sync, Zero3Sync)
    pieces = sync.owned(named)
    opt = sync.make_optimizer(cfg.train, pieces)
    held = sum(p.data.nbytes for _, p in pieces) + sum(g.nbytes for g in sync.grad_shards)
    held += optimizer_state_nbytes(opt)
    weights_left = sum(int(np.prod(p.data.strides) != 0) * p.data.nbytes for _, p in named)
    assert weights_left == 0, "ZeRO-3 left whole weights in the model"
    ratio = held / (4 * total / comm.size)  # weights + gradients + m + v, all float32
    print(f"zero3 state per rank {held} bytes = {ratio:.3f} x (total / dp)", flush=True)
    assert ratio <= 1.1, ratio


def worker(kind, data, out):
    from minillm.distributed.comm import SerialComm, get_world_comm
    from minillm.distributed.launch import install_abort_handler
    comm = get_world_comm()
    install_abort_handler(comm)
    out, p = Path(out), comm.size
    common = [f"--parallel.dp={p}", f"--train.batch_size={2 * p}"]
    if kind == "small":
        check_collectives(comm)
        check_zero3_memory(comm)
    runs = {z: train_run(comm, data, out / f"z{z}", *common, f"--parallel.zero={z}") for z in (0, 2, 3)}
    for z in (2, 3):
        assert_same_run(runs[z], runs[0], f"zero={z} vs zero=0")
    print("zero2 zero3 equal zero0 ok", flush=True)
    accum = (*common, "--train.grad_accum=2")
    want = train_run(comm, data, out / "z0_accum", *accum)
    for z in (2, 3):
        assert_same_run(train_run(comm, data, out / f"z{z}_accum", *accum, f"--parallel.zero={z}"), want,
                        f"zero={z} with grad_accum=2")
    print("grad accumulation ok", flush=True)
    if kind != "small":
        return
    mid = lambda z: out / f"z{z}" / f"ckpt_{EVERY:07d}.h5"  # noqa: E731
    for src, dst in ((3, 2), (2, 3), (0, 3)):
        got = train_run(comm, data, out / f"z{src}_to_z{dst}", *common, f"--parallel.zero={dst}", resume=mid(src))
        assert_same_run(got, runs[0], f"zero={src} checkpoint resumed under zero={dst}", from_step=EVERY)
    if comm.rank == 0:  # a serial run (a world of one) continues a ZeRO-3 checkpoint
        got = train_run(SerialComm(), data, out / "z3_to_serial", f"--train.batch_size={2 * p}", resume=mid(3))
        assert_same_run(got, runs[0], "zero=3 checkpoint resumed in a serial run", from_step=EVERY)
    comm.barrier()
    print("resume across zero levels ok", flush=True)
    fp16 = ("--train.dtype=float16", "--train.loss_scale_init=1e9")  # the first steps overflow
    want = train_run(comm, data, out / "z0_fp16", *common, *fp16)
    for z in (2, 3):
        got = train_run(comm, data, out / f"z{z}_fp16", *common, *fp16, f"--parallel.zero={z}")
        assert_same_run(got, want, f"zero={z} float16")
        if got is not None:
            assert [r["skipped_steps"] for r in got[0]] == [r["skipped_steps"] for r in want[0]]
            assert got[0][-1]["skipped_steps"] > 0
    print("float16 with skipped steps ok", flush=True)
    for mode in ("full", "selective"):
        got = train_run(comm, data, out / f"z3_{mode}", *common, "--parallel.zero=3", f"--train.recompute={mode}")
        assert_same_run(got, runs[3], f"zero=3 with recompute={mode}", exact=True)
    print("zero3 with recomputation ok", flush=True)


# ---------------------------------------------------------------- the tests ---------------------
SMALL_CHECKS = ["collectives", "zero3 state per rank", "zero2 zero3 equal zero0", "grad accumulation",
                "resume across zero levels", "float16 with skipped steps", "zero3 with recomputation"]


@pytest.fixture(scope="module")
def job2(char_data, tmp_path_factory):
    return run_mpi(2, [HERE, "small", char_data, tmp_path_factory.mktemp("zero23_np2")], timeout=300)


@pytest.mark.mpi
@pytest.mark.parametrize("check", SMALL_CHECKS)
def test_two_ranks(job2, check):
    assert check in job2.stdout, output(job2)


@pytest.mark.mpi
def test_two_ranks_job_ends_cleanly(job2):
    assert job2.returncode == 0 and "Traceback" not in job2.stderr, output(job2)


@pytest.mark.mpi
def test_four_ranks_oversubscribed(char_data, tmp_path):
    res = run_mpi(4, [HERE, "four", char_data, tmp_path], timeout=300)
    assert res.returncode == 0, output(res)
    for check in ("zero2 zero3 equal zero0", "grad accumulation"):
        assert res.stdout.count(f"{check} ok") == 4, output(res)


@pytest.mark.parametrize("overrides, message", [
    (["--parallel.zero=3", "--parallel.pp=2"], "set parallel.pp=1 or parallel.zero=0"),
    (["--parallel.zero=2", "--train.optimizer=sgd"], "set train.optimizer='adamw' or parallel.zero=0"),
])
def test_unsupported_combinations_are_one_line_errors(overrides, message):
    from minillm.config import Config, apply_overrides
    from minillm.errors import ConfigError
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


if __name__ == "__main__":
    worker(*sys.argv[1:])
