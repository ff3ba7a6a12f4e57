"""Tensor-parallel training runs on real `mpirun` jobs equal the serial run, and resume anywhere.

configs/tiny.toml with dropout 0.2 (its vocabulary of 103 characters is padded for tp=2), 20
steps, a checkpoint at step 10. Each layout trains the same global batch; every logged loss and
gradient norm and every final weight must equal the serial run's within 1e-5 (relative): tp=2
(through the `minillm train` command), tp=2 with sequence parallelism, dp=2 x tp=2, tp=2 x pp=2
(1F1B, and zero-bubble ZB-H1 with sp: the split backward defers the tp layers' weight gradients),
dp=2 x tp=2 with ZeRO-1 and sp, a Llama-style model (SwiGLU, RMSNorm, RoPE, untied head, no
biases) with tp=2 + sp, and float16 with tp=2 (same skipped steps). The checkpoint written under
tp=2 at step 10 resumes serially and under dp=2 with the same next losses, and the serial one under
tp=2 x pp=2; an overflow in one tp rank's shard skips the step on every rank. Bad layouts end with
one `error:` line and exit code 2. The ranks run this file (``python -m mpi4py
tests/test_tp_train.py ROOT DATA CASE...``) for all but the command-line case.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

from mpi_util import output, run_mpi
from test_dp_train import EVERY, STEPS, TINY_CONFIG, error_lines, final, mid, rel, train_args

from minillm.checkpoint import load_checkpoint
from minillm.config import load_config
from minillm.train.metrics import read_metrics

HERE = Path(__file__).resolve()
TOL = 1e-5
DROPOUT = ["--model.dropout=0.2"]
FANCY = ["--model.mlp=swiglu", "--model.norm=rmsnorm", "--model.pos=rope",
         "--model.tie_embeddings=false", "--model.bias=false"]
FP16 = ["--train.dtype=float16", "--train.loss_scale_init=1e9"]   # overflows at first: skipped steps
TP2 = ["--parallel.tp=2"]
# name: (ranks, overrides, serial reference, resumes from this run's step-10 checkpoint)
CASES = {
    "serial": (1, [], None, None),
    "fancy": (1, FANCY, None, None),
    "fp16": (1, FP16, None, None),
    "tp2": (2, TP2, "serial", None),                             # through the CLI
    "tp2_sp": (2, TP2 + ["--parallel.sp=true"], "serial", None),
    "fancy_tp2_sp": (2, FANCY + TP2 + ["--parallel.sp=true"], "fancy", None),
    "fp16_tp2": (2, FP16 + TP2, "fp16", None),
    "tp2_to_dp2": (2, ["--parallel.dp=2"], "serial", "tp2"),
    "tp2_to_serial": (1, [], "serial", "tp2"),
    "dp2_tp2": (4, ["--parallel.dp=2"] + TP2, "serial", None),
    "tp2_pp2": (4, TP2 + ["--parallel.pp=2", "--parallel.microbatches=2"], "serial", None),
    "tp2_pp2_zb_sp": (4, TP2 + ["--parallel.pp=2", "--parallel.microbatches=2", "--parallel.schedule=zb-h1",
                                "--parallel.sp=true"], "serial", None),
    "serial_to_tp2_pp2": (4, TP2 + ["--parallel.pp=2", "--parallel.microbatches=2"], "serial", "serial"),
    "dp2_tp2_zero1_sp": (4, ["--parallel.dp=2", "--parallel.zero=1", "--parallel.sp=true"] + TP2,
                         "serial", None),
}


def overrides(name, data, root):
    _, extra, _, source = CASES[name]
    resume = [f"--resume={mid(root / source)}"] if source else []
    return [str(a) for a in train_args(data, root / name, *DROPOUT, *extra, *resume)[3:]]  # after "-m minillm train"


def train_case(name, data, root, comm):
    from minillm.train.trainer import Trainer
    args = overrides(name, data, root)
    resume = next((a.split("=", 1)[1] for a in args if a.startswith("--resume=")), None)
    cfg = load_config(args[0], [a for a in args[1:] if not a.startswith("--resume=")])
    trainer = Trainer(cfg, comm=comm, resume=resume, log=lambda msg: None)
    trainer.run()
    return trainer


def overflow_on_one_shard_skips_everywhere(engine, comm):
    """An inf in one tp rank's shard only: that rank finds it, and the vote makes every rank skip."""
    from minillm.backend import xp
    named = engine.named_parameters()
    for _, p in named:
        p.grad = xp.zeros_like(p.data)
    shard = dict(named)["transformer.h.0.mlp.c_fc.weight"]     # split: each rank holds its own rows
    if comm.rank == 1:
        shard.grad[0, 0] = xp.inf
    assert engine.precision.grads_to_master() == (comm.rank == 1)   # this rank's own finding
    assert engine.precision.grads_to_master(agree=engine.agree), f"rank {comm.rank} would step"


def worker(root, data, names):
    from minillm.distributed.comm import get_world_comm
    from minillm.distributed.launch import install_abort_handler
    comm = get_world_comm()
    install_abort_handler(comm)
    for name in names:
        trainer = train_case(name, Path(data), Path(root), comm)
        if name == "fp16_tp2":
            overflow_on_one_shard_skips_everywhere(trainer.engine, comm)
    print(f"rank {comm.rank} done", flush=True)


# ---------------------------------------------------------------- the runs -----------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory, char_data):
    """The serial references (in this process), then the parallel runs, 2 ranks and 4 ranks."""
    import warnings
    from minillm.distributed.comm import SerialComm
    root = tmp_path_factory.mktemp("tp_train")
    for name in ("serial", "fancy", "fp16"):
        with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore"):
            train_case(name, char_data, root, SerialComm())
    r = run_mpi(2, ["-m", "minillm", "train", *overrides("tp2", char_data, root)], timeout=120, cwd=root)
    assert r.returncode == 0, output(r)
    assert "world 2 (dp 1, pp 1, tp 2)" in r.stdout, output(r)
    for nprocs in (2, 4):
        names = [n for n, c in CASES.items() if c[0] == nprocs and n != "tp2"]
        r = run_mpi(nprocs, [HERE, root, char_data, *names], timeout=150, cwd=root)
        assert r.returncode == 0, output(r)
    train_case("tp2_to_serial", char_data, root, SerialComm())
    return root


def assert_same_curve(got_dir, want_dir, from_step=0, tol=TOL):
    want = {r["step"]: r for r in read_metrics(want_dir)}
    got = [r for r in read_metrics(got_dir) if r["step"] > from_step]
    assert [r["step"] for r in got] == [s for s in sorted(want) if s > from_step]
    for r in got:
        w = want[r["step"]]
        assert r.get("skipped_steps") == w.get("skipped_steps"), (r, w)
        for key in ("loss", "train_loss", "val_loss", "grad_norm"):
            assert (r.get(key) is None) == (w.get(key) is None), (key, r, w)
            if r.get(key) is not None:
                err = rel(r[key], w[key])
                assert err <= tol, f"{got_dir.name} step {r['step']} {key}: {r[key]} vs {w[key]} ({err:.1e})"


def assert_same_weights(got_ckpt, want_ckpt, tol=TOL, noise=1e-5):
    got, want = load_checkpoint(got_ckpt)["model"], load_checkpoint(want_ckpt)["model"]
    assert list(got) == list(want)                     # the serial format, in the serial order
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == np.float32, name
        if name.endswith("attn.c_attn.bias"):
            # the key bias has an exactly-zero gradient computed as rounding noise (test_dp_train):
            # compared in absolute terms, up to ``noise``
            C = w.size // 3
            assert np.abs(g[C:2 * C] - w[C:2 * C]).max() <= noise, name
            g, w = np.delete(g, np.s_[C:2 * C]), np.delete(w, np.s_[C:2 * C])
        assert rel(g, w) <= tol, f"{got_ckpt}: {name} relative difference {rel(g, w):.1e}"


# ---------------------------------------------------------------- equal to serial ---------------
@pytest.mark.mpi
@pytest.mark.parametrize("name", ["tp2", "tp2_sp", "fancy_tp2_sp", "dp2_tp2", "tp2_pp2", "tp2_pp2_zb_sp",
                                  "dp2_tp2_zero1_sp"])
def test_tensor_parallel_run_equals_serial(root, name):
    ref = root / CASES[name][2]
    assert_same_curve(root / name, ref)
    assert_same_weights(final(root / name), final(ref))
    meta = load_checkpoint(final(root / name))["meta"]
    assert meta["layout"]["tp"] == 2 and meta["layout"]["world_size"] == CASES[name][0]
    assert any(r.get("val_loss") for r in read_metrics(root / name))


@pytest.mark.mpi
def test_float16_tensor_parallel_skips_the_same_steps(root):
    assert read_metrics(root / "fp16_tp2")[-1]["skipped_steps"] >= 1   # the overflows did happen
    # float16 keeps ~3 digits, and each rank's partial sums are rounded to it before they are added
    assert_same_curve(root / "fp16_tp2", root / "fp16", tol=1e-3)
    # (AdamW moves the noise-driven key bias by up to lr per step: 20 x 1e-3)
    assert_same_weights(final(root / "fp16_tp2"), final(root / "fp16"), tol=1e-2, noise=2e-2)


@pytest.mark.mpi
@pytest.mark.parametrize("name", ["tp2_to_serial", "tp2_to_dp2", "serial_to_tp2_pp2"])
def test_checkpoints_resume_across_tp(root, name):
    run = root / name
    assert read_metrics(run)[0]["step"] == EVERY + 1
    assert_same_curve(run, root / CASES[name][3], from_step=EVERY)
    assert_same_curve(run, root / "serial", from_step=EVERY)
    assert_same_weights(final(run), final(root / "serial"))
    ckpt = load_checkpoint(mid(root / "tp2"))
    want = load_checkpoint(mid(root / "serial"))
    assert ckpt["model"]["transformer.wte.weight"].shape == (103, 32)  # padding cut off again
    for n, st in want["optimizer"]["state"].items():                   # whole AdamW moments
        for k in ("m", "v"):
            assert ckpt["optimizer"]["state"][n][k].shape == st[k].shape, (n, k)


# ---------------------------------------------------------------- bad input ---------------------
@pytest.mark.parametrize("extra, message", [
    (["--parallel.tp=2", "--model.n_head=3", "--model.n_embd=48"],
     "model.n_head=3 is not divisible by parallel.tp=2"),
    (["--parallel.tp=3", "--model.n_head=3", "--model.n_embd=48", "--model.mlp=swiglu"],
     "the MLP width 128 (model.mlp='swiglu') is not divisible by parallel.tp=3"),
    (["--parallel.sp=true"], "parallel.sp=true splits the sequence between tensor-parallel ranks; it needs"),
    (["--parallel.tp=2", "--parallel.sp=true", "--model.block_size=15"],
     "model.block_size=15 is not divisible by parallel.tp=2"),
])
def test_bad_tensor_parallel_config_is_one_error_line(tmp_path, capsys, extra, message):
    from minillm.cli import main
    assert main(["train", str(TINY_CONFIG), f"--train.out_dir={tmp_path / 'run'}", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.mpi
@pytest.mark.parametrize("extra, message", [
    (["--parallel.tp=2", "--parallel.dp=2"],
     "parallel.dp=2 x parallel.tp=2 x parallel.pp=1 = 4 ranks but the job has 2; launch with mpirun -np 4"),
    (["--parallel.tp=2", "--model.n_head=1", "--model.n_embd=32"], "model.n_head=1 is not divisible by parallel.tp=2"),
])
def test_bad_tensor_parallel_layout_under_mpirun_ends_every_rank(tmp_path, char_data, extra, message):
    r = run_mpi(2, train_args(char_data, tmp_path / "bad", *extra), timeout=60, cwd=tmp_path)
    assert r.returncode == 2, output(r)
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and message in lines[0], output(r)
    assert "Traceback" not in r.stderr and not (tmp_path / "bad").exists(), output(r)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3:])
