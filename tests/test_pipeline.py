"""Pipeline parallelism on real ``mpirun`` jobs equals one process over the same micro-batches:
GPipe, 1F1B, interleaved 1F1B (virtual stages) and ZB-H1 (split backward), with and without dp.

The ranks run the real trainer (``python -m mpi4py tests/test_pipeline.py run OUTDIR CASE...``, or
the ``minillm train`` command line) on a tiny GPT; the pytest process trains the same config with
pp=1 (the same micro-batches, accumulated) and compares losses, validation loss, the final
checkpoint (parameters and AdamW moments, gathered by the pipeline into the serial format) and
resumes in both directions. Unit tests cover the partition, the schedules and the ideal bubble.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mpi_util import output, run_mpi

from minillm import backend
from minillm.backend import to_numpy, xp
from minillm.checkpoint import load_checkpoint
from minillm.config import load_config
from minillm.distributed.comm import SerialComm
from minillm.distributed.pipeline_schedule import (KIND, bubble_of, bubble_theory, peak_live_theory,
                                                   schedule, simulate)
from minillm.distributed.timeline import activation_bytes
from minillm.distributed.topology import (TIED, drop_other_stages, grid_coords, make_topology,
                                          stage_bounds, stage_parameters)
from minillm.errors import UserError
from minillm.model import GPT, GPTConfig
from minillm.train.metrics import read_metrics

HERE = Path(__file__).resolve()
STEPS = 4
BASE = ["--model.n_layer=4", "--model.n_head=2", "--model.n_embd=16", "--model.block_size=8",
        "--model.bias=false", "--model.dropout=0.0", "--train.batch_size=8",
        f"--train.max_steps={STEPS}", "--train.lr=1e-2", "--train.warmup_steps=0",
        "--train.schedule=constant", "--train.log_interval=1", f"--train.eval_interval={STEPS}",
        "--train.eval_iters=2", "--train.sample_tokens=0", "--train.progress=false",
        "--train.ckpt_interval=2", "--train.keep_last=0"]
FANCY = ["--model.tie_embeddings=false", "--model.pos=rope", "--model.norm=rmsnorm",
         "--model.mlp=swiglu"]
DROP = ["--model.dropout=0.1"]   # masks keyed by sample: the same whichever stage, chunk or order
# case: (ranks, dp, pp, microbatches per replica, schedule, extra overrides)
CASES = {
    "cli_1f1b2": (2, 1, 2, 4, "1f1b", []),
    "gpipe2": (2, 1, 2, 4, "gpipe", []),
    "resume2": (2, 1, 2, 4, "1f1b", []),       # resumes the serial run's step-2 checkpoint
    "gpipe4": (4, 1, 4, 8, "gpipe", []),
    "1f1b4": (4, 1, 4, 8, "1f1b", []),
    "dp2pp2": (4, 2, 2, 2, "1f1b", FANCY + ["--parallel.partition=4,0"]),  # a stage of no blocks
    "accum2": (2, 1, 2, 2, "gpipe", ["--train.grad_accum=2"]),  # two rounds of the pipeline a step
    # float16 with a loss scale that overflows at first: the same steps must be skipped
    "fp16_2": (2, 1, 2, 2, "1f1b", ["--train.dtype=float16", "--train.loss_scale_init=262144"]),
    # schedules past 1F1B (issue 16), dropout on
    "v2_2": (2, 1, 2, 4, "1f1b", DROP + ["--parallel.virtual_stages=2"]),
    "zb2": (2, 1, 2, 4, "zb-h1", DROP),
    "zb4": (4, 1, 4, 8, "zb-h1", DROP),
    "v2_4": (4, 1, 4, 4, "1f1b", DROP + ["--model.n_layer=8", "--parallel.virtual_stages=2"]),
    "dp2zb2": (4, 2, 2, 2, "zb-h1", DROP + FANCY + ["--train.grad_accum=2"]),
    "dp2v2": (4, 2, 2, 2, "1f1b", DROP + ["--parallel.virtual_stages=2"]),
}


def data_args(root):
    return [f"--data.source={root / 'text.txt'}", f"--data.dir={root / 'data'}"]


def case_args(name, root, out_dir, serial=False):
    """The case's overrides; ``serial``: one process over the same micro-batches (pp=1, dp=1)."""
    _, dp, pp, m, sched, extra = CASES[name]
    par = [f"--parallel.microbatches={dp * m}"] if serial else \
        [f"--parallel.dp={dp}", f"--parallel.pp={pp}", f"--parallel.microbatches={m}",
         f"--parallel.schedule={sched}"]
    if serial:
        extra = [e for e in extra if not e.startswith("--parallel.")]
    return BASE + extra + par + data_args(root) + [f"--train.out_dir={out_dir}"]


# ---------------------------------------------------------------- the ranks' program -------------
def worker(outdir, names):
    from minillm.distributed.comm import get_world_comm
    from minillm.distributed.launch import install_abort_handler
    from minillm.train.trainer import Trainer
    comm = get_world_comm()
    install_abort_handler(comm)
    outdir = Path(outdir)
    for name in names:
        resume = str(outdir / "serial_cli_1f1b2" / "ckpt_0000002.h5") if name == "resume2" else None
        cfg = load_config(None, case_args(name, outdir, outdir / name))
        tr = Trainer(cfg, comm=comm, resume=resume, log=lambda msg: None)
        tr.run()
        eng, topo = tr.engine, tr.engine.topo
        assert (topo.dp_rank, topo.stage) == grid_coords(comm.rank, cfg.parallel.pp)
        assert topo.pipe_comm.size == cfg.parallel.pp and topo.pipe_comm.rank == topo.stage
        assert topo.dp_comm.size == cfg.parallel.dp and topo.dp_comm.rank == topo.dp_rank
        np.savez(outdir / name / f"stage_rank{comm.rank}.npz",
                 **{n: to_numpy(p.data) for n, p in eng.named_parameters()})
        if cfg.train.dtype == "float16":  # an overflow on the last stage only skips the step everywhere
            named = eng.named_parameters()
            for _, p in named:
                p.grad = xp.zeros_like(p.data)
            if topo.is_last:
                named[0][1].grad = xp.full_like(named[0][1].data, xp.inf)
            assert eng.precision.grads_to_master() == topo.is_last  # this stage's own finding
            assert eng.precision.grads_to_master(agree=eng.agree), \
                f"stage {topo.stage} would step after an overflow on the last stage"
    print(f"rank {comm.rank} done", flush=True)


# ---------------------------------------------------------------- fixtures -----------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A small char dataset, and the serial reference runs (pp=1, the same micro-batches)."""
    from minillm.data import ensure_dataset
    from minillm.train.trainer import Trainer
    root = tmp_path_factory.mktemp("pipe")
    rng = np.random.default_rng(0)
    words = ["def", "return", "pipeline", "stage", "micro", "batch", "(x)", "+", "=", "\n"]
    (root / "text.txt").write_text(" ".join(rng.choice(words, 4000)))
    ensure_dataset(str(root / "text.txt"), root / "data", "char")
    for name in CASES:
        if name != "resume2":
            cfg = load_config(None, case_args(name, root, root / f"serial_{name}", serial=True))
            with np.errstate(over="ignore", invalid="ignore"):  # fp16_2 overflows on purpose
                Trainer(cfg, comm=SerialComm(), log=lambda msg: None).run()
    return root


@pytest.fixture(scope="module")
def two_ranks(root):
    res = run_mpi(2, [HERE, "run", root, "gpipe2", "resume2", "accum2", "fp16_2", "v2_2", "zb2"],
                  timeout=150)
    assert res.returncode == 0, output(res)
    res = run_mpi(2, ["-m", "minillm", "train", *case_args("cli_1f1b2", root, root / "cli_1f1b2")],
                  timeout=120)
    assert res.returncode == 0, output(res)
    return root


@pytest.fixture(scope="module")
def four_ranks(root):
    res = run_mpi(4, [HERE, "run", root, "gpipe4", "1f1b4", "dp2pp2", "zb4", "v2_4", "dp2zb2", "dp2v2"],
                  timeout=240)
    assert res.returncode == 0, output(res)
    return root


def _close(got, want, what, tol):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    assert err <= tol, f"{what}: relative difference {err:.2e} > {tol:.0e}"


def check_same_run(run, ref, steps=range(1, STEPS + 1), loss_tol=1e-5, param_tol=1e-4):
    """Losses, grad norms, val loss and the final checkpoint of ``run`` equal those of ``ref``.

    float32 tolerances: the pipeline computes every block exactly as one process does, but adds
    the tied embedding's two gradient parts in another order, and Adam's division by sqrt(v)
    magnifies those last-bit differences over a few steps."""
    got = {r["step"]: r for r in read_metrics(run)}
    want = {r["step"]: r for r in read_metrics(ref)}
    for s in steps:
        for key in ("loss", "grad_norm", "val_loss"):
            if want[s].get(key) is not None:
                _close(got[s][key], want[s][key], f"{run.name} step {s} {key}", loss_tol)
        assert got[s].get("loss_scale") == want[s].get("loss_scale")
        assert got[s].get("skipped_steps") == want[s].get("skipped_steps")
    a, b = (load_checkpoint(d / f"ckpt_{STEPS:07d}.h5") for d in (run, ref))
    assert list(a["model"]) == list(b["model"])  # the serial format, names in the serial order
    for n in b["model"]:
        _close(a["model"][n], b["model"][n], f"{run.name} parameter {n}", param_tol)
    assert list(a["optimizer"]["state"]) == list(b["optimizer"]["state"])
    assert a["optimizer"]["step"] == b["optimizer"]["step"]
    for n, st in b["optimizer"]["state"].items():
        for k in st:
            _close(a["optimizer"]["state"][n][k], st[k], f"{run.name} AdamW {k} of {n}", param_tol)


# ---------------------------------------------------------------- mpirun tests -------------------
@pytest.mark.mpi
@pytest.mark.parametrize("name", ["cli_1f1b2", "gpipe2", "accum2", "v2_2", "zb2"])
def test_two_stages_equal_one_process(two_ranks, name):
    check_same_run(two_ranks / name, two_ranks / f"serial_{name}")


@pytest.mark.mpi
def test_float16_pipeline_skips_the_same_steps(two_ranks):
    assert read_metrics(two_ranks / "fp16_2")[-1]["skipped_steps"] >= 1  # the overflow did happen
    # float16 keeps ~3 significant digits: the tied embedding's other summation order shows there
    check_same_run(two_ranks / "fp16_2", two_ranks / "serial_fp16_2", loss_tol=1e-4, param_tol=1e-2)


@pytest.mark.mpi
@pytest.mark.parametrize("name", ["gpipe4", "1f1b4", "dp2pp2", "zb4", "v2_4", "dp2zb2", "dp2v2"])
def test_four_ranks_equal_one_process(four_ranks, name):
    check_same_run(four_ranks / name, four_ranks / f"serial_{name}")


@pytest.mark.mpi
def test_tied_embedding_identical_on_first_and_last_stage(two_ranks, four_ranks):
    for name, last in (("gpipe2", 1), ("resume2", 1), ("gpipe4", 3), ("1f1b4", 3)):
        with np.load(two_ranks / name / "stage_rank0.npz") as first, \
                np.load(two_ranks / name / f"stage_rank{last}.npz") as end:
            assert TIED in first and TIED in end and "lm_head.weight" not in end
            np.testing.assert_array_equal(first[TIED], end[TIED])  # bit for bit
            assert not set(first) & set(end) - {TIED}  # nothing else is held twice


@pytest.mark.mpi
def test_untied_model_and_empty_stage_hold_the_right_parameters(four_ranks):
    with np.load(four_ranks / "dp2pp2" / "stage_rank1.npz") as last:  # stage 1 holds no block
        assert sorted(last) == ["lm_head.weight", "transformer.ln_f.weight"]


@pytest.mark.mpi
@pytest.mark.parametrize("name", ["cli_1f1b2", "zb2"])
def test_pipeline_checkpoint_resumes_without_pipeline(two_ranks, name):
    from minillm.train.trainer import Trainer
    run = two_ranks / name
    out = two_ranks / f"{name}_resumed_serial"
    cfg = load_config(None, case_args(name, two_ranks, out, serial=True))
    Trainer(cfg, comm=SerialComm(), resume=str(run / "ckpt_0000002.h5"), log=lambda m: None).run()
    check_same_run(out, run, steps=range(3, STEPS + 1))


@pytest.mark.mpi
def test_serial_checkpoint_resumes_as_pipeline(two_ranks):
    # resume2 started from serial_cli_1f1b2's step 2 checkpoint under pp=2
    check_same_run(two_ranks / "resume2", two_ranks / "serial_cli_1f1b2", steps=range(3, STEPS + 1))
    assert [r["step"] for r in read_metrics(two_ranks / "resume2")] == [3, 4]


def _timelines(run, n):
    return [json.loads((run / f"timeline_rank{r}.json").read_text()) for r in range(n)]


@pytest.mark.mpi
def test_1f1b_holds_less_activation_memory_than_gpipe(two_ranks, four_ranks):
    for (g, f, p, m) in ((two_ranks / "gpipe2", two_ranks / "cli_1f1b2", 2, 4),
                         (four_ranks / "gpipe4", four_ranks / "1f1b4", 4, 8)):
        gp, ff = _timelines(g, p)[0]["peak_activation_bytes"], _timelines(f, p)[0]["peak_activation_bytes"]
        for s in range(p):
            assert 0 < ff[s] < gp[s], (s, ff, gp)
            # every micro-batch graph of a stage is the same size: peaks are whole multiples
            per_micro = gp[s] / m
            assert ff[s] == pytest.approx(per_micro * peak_live_theory("1f1b", p, s, m), rel=1e-9)


@pytest.mark.mpi
def test_timelines_and_plot(two_ranks, four_ranks):
    from minillm.train.plots import plot_timeline
    for run, p, m, sched in ((two_ranks / "cli_1f1b2", 2, 4, "1f1b"), (four_ranks / "dp2pp2", 2, 2, "1f1b")):
        tls = _timelines(run, 4 if run.name == "dp2pp2" else 2)
        for t in tls:
            assert t["schedule"] == sched and t["microbatches"] == m and t["step"] == STEPS - 1
            assert t["bubble_theory"] == pytest.approx(bubble_theory(p, m))
            assert 0.0 <= t["bubble_measured"] <= 1.0
            kinds = [e["kind"] for e in t["events"]]
            assert kinds.count("forward") == m and kinds.count("backward") == m
            assert all(e["end"] >= e["start"] >= 0 for e in t["events"])
            assert ("recv" in kinds) and ("send" in kinds)
        fwd = [[e["micro"] for e in t["events"] if e["kind"] == "forward"] for t in tls]
        assert all(f == list(range(m)) for f in fwd)
    png = plot_timeline(two_ranks / "cli_1f1b2")
    assert png.exists() and png.stat().st_size > 1000


@pytest.mark.mpi
@pytest.mark.parametrize("bad, message", [
    (["--parallel.pp=2", "--model.n_layer=1"], "more stages than model.n_layer=1"),
    (["--parallel.pp=4"], "launch with mpirun -np 4"),
    (["--parallel.pp=2", "--parallel.microbatches=3"], "not divisible"),
])
def test_bad_layouts_fail_cleanly_on_every_rank(root, tmp_path, bad, message):
    args = BASE + data_args(root) + [f"--train.out_dir={tmp_path}"] + bad
    res = run_mpi(2, ["-m", "minillm", "train", *args], timeout=60)
    assert res.returncode == 2, output(res)
    # said once, by rank 0; MPICH's "Abort(2) on node ..." note may precede it on the same line
    lines = [line[line.index("error:"):] for line in res.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0], output(res)
    assert "[rank" not in res.stderr and "Traceback" not in res.stderr, output(res)
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.mpi
def test_split_and_interleaved_timelines(two_ranks, four_ranks):
    """ZB-H1 records m forwards, backwards (B) and weight steps (W) per rank; interleaved 1F1B m
    forwards and backwards per chunk, the chunks labelled; and deferring W keeps memory alive
    longer (the peak of a ZB-H1 stage, with its queued weight work, is at least 1F1B's)."""
    for run, p, m, v, sched in ((two_ranks / "zb2", 2, 4, 1, "zb-h1"), (four_ranks / "zb4", 4, 8, 1, "zb-h1"),
                                (two_ranks / "v2_2", 2, 4, 2, "1f1b"), (four_ranks / "v2_4", 4, 4, 2, "1f1b")):
        for t in _timelines(run, p):
            assert t["schedule"] == sched and t["virtual_stages"] == v
            assert t["bubble_theory"] == pytest.approx(bubble_theory(p, m, v, sched))
            steps = [(e["kind"], e["micro"], e["chunk"]) for e in t["events"]
                     if e["kind"] in ("forward", "backward", "weight")]
            want = [(KIND[k], i, c) for k, i, c in schedule(sched, p, t["stage"], m, v)]
            assert steps == want  # the engine ran exactly the schedule's list
    zb = _timelines(two_ranks / "zb2", 2)[0]["peak_activation_bytes"]
    ff = _timelines(two_ranks / "cli_1f1b2", 2)[0]["peak_activation_bytes"]
    assert all(z >= f for z, f in zip(zb, ff)), (zb, ff)


@pytest.mark.mpi
@pytest.mark.parametrize("bad, message", [
    (["--parallel.pp=2", "--parallel.virtual_stages=3", "--parallel.microbatches=2"],
     "does not divide the 2 blocks per pipeline rank"),
    (["--parallel.pp=2", "--parallel.virtual_stages=2", "--parallel.microbatches=3",
      "--train.batch_size=12"], "multiple of parallel.pp=2"),
    (["--parallel.pp=2", "--parallel.schedule=zb-h1", "--parallel.microbatches=1"], "microbatches=1 >= parallel.pp=2"),
    (["--parallel.pp=2", "--parallel.virtual_stages=2", "--parallel.schedule=gpipe"], "interleaves 1F1B"),
])
def test_bad_schedule_settings_fail_cleanly(root, tmp_path, minillm_cli, bad, message):
    res = minillm_cli("train", *BASE, *data_args(root), f"--train.out_dir={tmp_path / 'run'}", *bad,
                      cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- unit tests (one process) -------
def test_stage_bounds_even_and_explicit():
    assert stage_bounds(4, 2) == [(0, 2), (2, 4)]
    assert stage_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]  # left-overs go to the earliest stages
    assert stage_bounds(3, 3, (1, 0, 2)) == [(0, 1), (1, 1), (1, 3)]
    with pytest.raises(ValueError):
        stage_bounds(4, 2, (1, 2))


@pytest.mark.parametrize("tied", [True, False])
def test_every_parameter_is_held_exactly_once(tied):
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=5, n_head=2, n_embd=8,
                          tie_embeddings=tied))
    bounds = stage_bounds(5, 3)
    held = [stage_parameters(model, bounds, s) for s in range(3)]
    names = [n for h in held for n, _ in h]
    extra = [TIED] if tied else []  # the tied embedding also sits on the last stage
    assert sorted(names) == sorted([n for n, _ in model.named_parameters()] + extra)
    assert all(n.startswith("transformer.h.4.") or n.startswith(("transformer.ln_f", "lm_head", TIED))
               or n.startswith("transformer.h.3.") for n, _ in held[2])
    drop_other_stages(model, held[1])
    wte = model.transformer.wte.weight
    assert wte.shape == (11, 8) and wte.data.strides == (0, 0)  # no memory behind it
    if not backend.is_gpu():  # NumPy makes broadcast views read-only: a stray write fails loudly
        with pytest.raises(ValueError):
            wte.data[0, 0] = 1.0
    assert model.num_parameters() == GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=5, n_head=2,
                                                   n_embd=8, tie_embeddings=tied)).num_parameters()


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m", [(2, 1), (2, 4), (3, 2), (4, 4), (4, 8)])
def test_schedules(name, p, m):
    for s in range(p):
        acts = [(k, i) for k, i, _ in schedule(name, p, s, m)]
        assert sorted(acts) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
        assert [i for k, i in acts if k == "F"] == list(range(m))
        assert [i for k, i in acts if k == "B"] == list(range(m))
        live = peak = 0
        for k, _ in acts:
            live += 1 if k == "F" else -1
            peak = max(peak, live)
        assert peak == peak_live_theory(name, p, s, m)
    # with free messages and fixed costs both schedules leave exactly the textbook bubble
    assert bubble_of(simulate(name, p, m, t_f=1.0, t_b=2.0)) == pytest.approx(bubble_theory(p, m))


def test_unknown_schedule():
    with pytest.raises(ValueError, match="gpipe"):
        schedule("interleaved", 2, 0, 4)


def test_topology_of_one_process_and_bad_grid():
    topo = make_topology(SerialComm(), 1, 1)
    assert topo.is_first and topo.is_last and topo.prev_stage is None and topo.next_stage is None
    with pytest.raises(UserError, match="mpirun -np 4"):
        make_topology(SerialComm(), 2, 2)
    assert [grid_coords(r, 2) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_activation_bytes_leave_out_parameters():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16))
    x = xp.asarray(np.random.default_rng(0).integers(0, 11, (2, 8)))
    _, loss = model(x, x)
    params = {id(p.data) for p in model.parameters()}
    acts = activation_bytes(loss, params)
    assert 0 < acts < activation_bytes(loss, ())
    _, loss4 = model(xp.concatenate([x, x]), xp.concatenate([x, x]))
    assert activation_bytes(loss4, params) == pytest.approx(2 * acts, rel=0.01)  # ~ micro-batch size


if __name__ == "__main__" and sys.argv[1:2] == ["run"]:
    worker(sys.argv[2], sys.argv[3:])
