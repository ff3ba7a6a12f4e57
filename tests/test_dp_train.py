"""Data parallelism through the real command: `mpirun -np 2 ... minillm train --parallel.dp=2`.

The promise under test (DESIGN.md, "Data order"): train.batch_size is the global batch, dp ranks
take contiguous slices of it and accumulation micro-batches split it further, so every layout
sees the same samples and a data-parallel run equals the serial one. Here that is checked on
whole training runs of configs/tiny.toml: every logged loss, and the final checkpoint's weights.
Checkpoints cross layouts (dp=2 -> serial, serial -> dp=2), bad layouts end with one `error:`
line from rank 0 and exit code 2, and a failure on one rank mid-run ends the whole job.

Dropout is off (as in tiny.toml): its masks are drawn per rank, so with dropout a dp run is a
different (equally valid) run, not the serial one. Tolerances: float32 sums in another order
differ in the last bits, and AdamW's division by sqrt(v) amplifies that a little over the steps.
"""
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mpi_util import output, run_mpi

from minillm.checkpoint import load_checkpoint
from minillm.train.metrics import read_metrics

pytestmark = pytest.mark.mpi

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
STEPS, EVERY = 20, 10
LOSS_TOL, PARAM_TOL = 1e-6, 1e-5
LOSSES = ("loss", "train_loss", "val_loss")


def train_args(data_dir, out_dir, *extra):
    return ["-m", "minillm", "train", TINY_CONFIG, f"--data.dir={data_dir}",
            f"--train.out_dir={out_dir}", f"--train.max_steps={STEPS}",
            f"--train.ckpt_interval={EVERY}", "--train.keep_last=0", "--train.log_interval=1",
            "--train.sample_tokens=0", *extra]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_same_curve(got_dir, want_dir, from_step=0):
    """Every logged loss of ``got_dir`` after ``from_step`` matches ``want_dir``'s at the same step."""
    want = {r["step"]: r for r in read_metrics(want_dir)}
    got = [r for r in read_metrics(got_dir) if r["step"] > from_step]
    assert [r["step"] for r in got] == [s for s in sorted(want) if s > from_step]
    for r in got:
        w = want[r["step"]]
        assert r["lr"] == w["lr"] and r["tokens_seen"] == w["tokens_seen"], (r, w)
        assert rel(r["grad_norm"], w["grad_norm"]) <= 1e-5, (r, w)
        for key in LOSSES:
            assert (key in r) == (key in w), (key, r, w)
            if key in r:
                err = rel(r[key], w[key])
                assert err <= LOSS_TOL, f"step {r['step']} {key}: {r[key]} vs {w[key]} ({err:.1e})"


def assert_same_weights(got_ckpt, want_ckpt):
    got, want = load_checkpoint(got_ckpt)["model"], load_checkpoint(want_ckpt)["model"]
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == np.float32
        g, w = got[name], want[name]
        if name.endswith("attn.c_attn.bias"):
            # The key bias adds the same number to every score of a query row, which softmax
            # ignores: its gradient is exactly zero, computed as rounding noise (~1e-10), which
            # AdamW turns into ~1e-7 steps of random sign. Both runs leave it at noise level, so
            # it is compared in absolute terms, the query and value biases as usual.
            C = w.size // 3
            assert np.abs(g[C:2 * C] - w[C:2 * C]).max() <= 1e-5, name
            g, w = np.delete(g, np.s_[C:2 * C]), np.delete(w, np.s_[C:2 * C])
        err = rel(g, w)
        assert err <= PARAM_TOL, f"{name}: relative difference {err:.1e} > {PARAM_TOL:.0e}"


def final(run_dir):
    return run_dir / f"ckpt_{STEPS:07d}.h5"


def mid(run_dir):
    return run_dir / f"ckpt_{EVERY:07d}.h5"


def error_lines(stderr):
    """Our `error: ...` lines. MPICH's own "Abort(2) on node ..." notes (printed when a rank exits
    non-zero under `python -m mpi4py`) end without a newline, so an error may follow one on the
    same line: cut there."""
    return [line[line.index("error:"):] for line in stderr.splitlines() if "error:" in line]


# ---------------------------------------------------------------- the runs (each made once) ----
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("dp_train")


def run_maker(work, char_data, minillm_cli):
    """``run(name, nprocs, *extra_args)`` makes a training run once (serial without mpirun when
    nprocs is 1) and returns its directory; ``run.result(name)`` is its CompletedProcess."""
    made = {}

    def run(name, nprocs, *extra):
        if name not in made:
            if nprocs == 1:  # the plain serial command, no mpirun
                r = minillm_cli(*train_args(char_data, name, *extra)[2:], cwd=work)
                assert r.returncode == 0, r.stderr
            else:
                r = run_mpi(nprocs, train_args(char_data, name, *extra), timeout=120, cwd=work)
                assert r.returncode == 0, output(r)
            assert "Traceback" not in r.stderr, r.stderr
            made[name] = (work / name, r)
        return made[name][0]

    run.result = lambda name: made[name][1]
    return run


@pytest.fixture(scope="module")
def runs(work, char_data, minillm_cli):
    return run_maker(work, char_data, minillm_cli)


@pytest.fixture(scope="module")
def serial(runs):
    return runs("serial", 1)


@pytest.fixture(scope="module")
def dp2(runs):
    return runs("dp2", 2, "--parallel.dp=2")


# ---------------------------------------------------------------- equal to serial ---------------
def test_dp2_equals_serial(serial, dp2, runs):
    assert_same_curve(dp2, serial)
    assert_same_weights(final(dp2), final(serial))
    records = read_metrics(dp2)
    assert all(r["comm_wait_ms"] >= 0 for r in records)       # logged under data parallelism
    assert all("comm_wait_ms" not in r for r in read_metrics(serial))
    assert "world 2 (dp 2, pp 1)" in runs.result("dp2").stdout
    meta = load_checkpoint(final(dp2))["meta"]
    assert meta["layout"]["dp"] == 2 and meta["layout"]["world_size"] == 2


def test_dp2_with_grad_accum_equals_serial(serial, runs):
    # batch 4 = 2 ranks x 2 micro-steps of 1 sequence each
    run = runs("dp2_accum2", 2, "--parallel.dp=2", "--train.grad_accum=2")
    assert_same_curve(run, serial)
    assert_same_weights(final(run), final(serial))


def test_dp2_with_dropout_equals_serial_with_dropout(runs):
    """Dropout masks are keyed by (seed, step, layer, sample), so the rank that processes a sample
    does not change its mask: dp=2 with dropout is the serial run with dropout."""
    serial_drop = runs("serial_dropout", 1, "--model.dropout=0.2")
    dp_drop = runs("dp2_dropout", 2, "--parallel.dp=2", "--model.dropout=0.2")
    assert_same_curve(dp_drop, serial_drop)
    assert_same_weights(final(dp_drop), final(serial_drop))


def test_ring_allreduce_equals_mpi(serial, dp2, runs):
    ring = runs("dp2_ring", 2, "--parallel.dp=2", "--parallel.allreduce=ring",
                "--parallel.bucket_mb=0.01")  # several buckets, each through the hand-written ring
    assert_same_curve(ring, dp2)
    assert_same_weights(final(ring), final(dp2))
    assert_same_curve(ring, serial)


# ---------------------------------------------------------------- resume across layouts --------
def test_dp_checkpoint_resumes_in_a_serial_run(serial, dp2, runs):
    run = runs("dp2_to_serial", 1, f"--resume={mid(dp2)}", "--parallel.dp=1")
    stdout = runs.result("dp2_to_serial").stdout
    assert re.search(rf"resumed from \S+ckpt_{EVERY:07d}\.h5 at step {EVERY}", stdout), stdout
    assert [r["step"] for r in read_metrics(run)][0] == EVERY + 1
    assert_same_curve(run, serial, from_step=EVERY)
    assert_same_weights(final(run), final(serial))


def test_serial_checkpoint_resumes_under_dp2(serial, dp2, runs):
    run = runs("serial_to_dp2", 2, f"--resume={mid(serial)}", "--parallel.dp=2")
    assert f"at step {EVERY}" in runs.result("serial_to_dp2").stdout
    assert_same_curve(run, serial, from_step=EVERY)
    assert_same_curve(run, dp2, from_step=EVERY)
    assert_same_weights(final(run), final(serial))


# ---------------------------------------------------------------- bad input, failures -----------
@pytest.mark.parametrize("nprocs, extra, message", [
    (3, ["--parallel.dp=2"], "but the job has 3"),                     # world size mismatch
    (2, [], "parallel.dp=1 x parallel.pp=1 = 1 ranks but the job has 2"),  # forgot --parallel.dp
    (2, ["--parallel.dp=2", "--train.batch_size=6", "--train.grad_accum=2"],
     "train.batch_size=6 is not divisible by parallel.dp=2 x train.grad_accum=2"),
])
def test_bad_layout_is_one_error_line_from_rank_0(work, char_data, nprocs, extra, message):
    r = run_mpi(nprocs, train_args(char_data, "bad_layout", *extra), timeout=60, cwd=work)
    assert r.returncode == 2, output(r)
    lines = error_lines(r.stderr)
    assert len(lines) == 1, output(r)            # said once (by rank 0), not once per rank
    assert message in lines[0], output(r)
    assert "[rank" not in r.stderr and "Traceback" not in r.stderr, output(r)
    assert not (work / "bad_layout").exists()    # refused before anything was written


def test_checkpoint_failure_on_rank_0_ends_the_job(work, char_data):
    """Only rank 0 writes checkpoints: make its save at step 10 fail (a directory is in the way)
    while rank 1 waits in the barrier after the save. The job must end, not hang."""
    out = work / "blocked_ckpt"
    mid(out).mkdir(parents=True)
    r = run_mpi(2, train_args(char_data, out.name, "--parallel.dp=2"), timeout=60, cwd=work)
    assert r.returncode == 2, output(r)
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "cannot write checkpoint" in lines[0], output(r)
    assert [x["step"] for x in read_metrics(out)][-1] == EVERY   # it trained up to the save


def test_exception_on_rank_1_mid_training_ends_the_job(work, char_data):
    """Rank 1 raises a bug-type exception at step 3 while rank 0 is already waiting for it in the
    gradient all-reduce: the job ends with exit code 1 and rank 1's traceback, no hang. (The CLI
    has no per-rank fault, so the real entry point runs with one method patched on rank 1.)"""
    args = [str(a) for a in train_args(char_data, "rank1_fails", "--parallel.dp=2")[2:]]
    code = textwrap.dedent(f"""
        import sys
        from mpi4py import MPI
        import minillm.train.trainer as trainer
        from minillm.cli import main
        if MPI.COMM_WORLD.Get_rank() == 1:
            step = trainer.Trainer.step_on_device
            def failing_step(self):
                if self.step == 3:
                    raise RuntimeError("injected failure on rank 1")
                return step(self)
            trainer.Trainer.step_on_device = failing_step
        sys.exit(main({args!r}))
    """)
    r = run_mpi(2, ["-c", code], timeout=60, cwd=work)
    assert r.returncode == 1, output(r)
    assert "[rank 1] RuntimeError: injected failure on rank 1" in r.stderr, output(r)
    assert "[rank 1] Traceback" in r.stderr, output(r)
    assert [x["step"] for x in read_metrics(work / "rank1_fails")][-1] < STEPS


# ---------------------------------------------------------------- the benchmark script ----------
def test_bench_dp_script_on_a_short_run(work, char_data):
    """scripts/bench_dp.py end to end on a few steps of a shrunken gpt10m (its report and JSON)."""
    import json
    import subprocess
    import sys
    from conftest import minillm_env
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_dp.py"
    out = work / "bench"
    r = subprocess.run([sys.executable, script, "--case", "gpt10m", "--steps", "4", "--warmup", "1",
                        "--timeout", "90", "--out", out, f"--data.dir={char_data}", "--model.n_layer=1",
                        "--model.n_embd=32", "--model.n_head=2", "--model.block_size=16"],
                       cwd=work, env=minillm_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"gpt10m\s+2\s+\d+ .*x\n", r.stdout) and "scaling efficiency" in r.stdout, r.stdout
    one, two = json.loads((out / "bench_dp.json").read_text())["results"]["gpt10m"]
    assert (one["nprocs"], two["nprocs"]) == (1, 2)
    assert one["timed_steps"] == two["timed_steps"] == 3
    assert one["tokens_per_step"] == two["tokens_per_step"] == 8 * 16
    assert one["comm_wait_ms"] == 0 and two["comm_wait_ms"] >= 0
    assert two["compute_ms"] == two["ms_per_step"] - two["comm_wait_ms"]
    assert rel(two["final_loss"], one["final_loss"]) <= LOSS_TOL   # the same training, only faster

    bad = subprocess.run([sys.executable, script, "--case", "gpt10m", "--np", "3", "--steps", "2",
                          "--warmup", "1", "--out", out, f"--data.dir={char_data}"],
                         cwd=work, env=minillm_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: "), bad.stderr
    assert "not divisible by parallel.dp=3" in bad.stderr and len(bad.stderr.splitlines()) == 1
