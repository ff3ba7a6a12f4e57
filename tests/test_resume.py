"""Checkpoints under real process deaths: kill -9 and resume is bit-identical, SIGTERM / SIGINT save
and exit cleanly, corrupt or mismatched checkpoints are skipped or refused, a kill in the middle
of a save never leaves a checkpoint that gets picked.

Every run is the real `python -m minillm train` in a subprocess. One uninterrupted reference run
(module fixture) gives the losses every interrupted-and-resumed run must reproduce exactly: the
JSON floats of metrics.jsonl are compared with ==, with dropout on so the RNG story is tested too.
"""
import os
import re
import shutil
import signal
import time
from pathlib import Path

import h5py
import pytest

from minillm.checkpoint import verify_checkpoint
from minillm.train.metrics import read_metrics

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"

STEPS, EVERY = 60, 10          # the run, and its checkpoint interval
COMPARED = ("loss", "lr", "grad_norm", "val_loss", "train_loss", "tokens_seen")


def train_args(data_dir, out_dir, *extra):
    return ("train", TINY_CONFIG, f"--data.dir={data_dir}", f"--train.out_dir={out_dir}",
            f"--train.max_steps={STEPS}", f"--train.ckpt_interval={EVERY}", "--train.keep_last=0",
            "--train.log_interval=1", "--train.eval_interval=20", "--model.dropout=0.1",
            "--train.sample_tokens=0", *extra)


def curve(run_dir):
    """What must be bit-identical between runs: every logged number except timings."""
    return [{k: r.get(k) for k in ("step",) + COMPARED} for r in read_metrics(run_dir)]


def ckpt(run_dir, step):
    return run_dir / f"ckpt_{step:07d}.h5"


def wait_for(predicate, proc, timeout=60.0, poll=0.002):
    """Poll until predicate() holds; fail if the process ends first or time runs out."""
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before the awaited moment:\n{out}\n{err}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(poll)


def kill9(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill landed"


def resumed_step(stdout):
    m = re.search(r"resumed from (\S+) at step (\d+)", stdout)
    assert m, stdout
    return m.group(1), int(m.group(2))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def reference(work, char_data, minillm_cli):
    """The uninterrupted run: its directory (a checkpoint every EVERY steps, all kept)."""
    r = minillm_cli(*train_args(char_data, "ref"), cwd=work)
    assert r.returncode == 0, r.stderr
    run = work / "ref"
    assert [c["step"] for c in curve(run)] == list(range(1, STEPS + 1))
    assert all(ckpt(run, s).exists() for s in range(EVERY, STEPS + 1, EVERY))
    return run


def test_kill9_then_resume_auto_is_bit_identical(reference, work, char_data, minillm_cli):
    run = work / "killed"
    proc = minillm_cli.popen(*train_args(char_data, "killed"), cwd=work)
    wait_for(lambda: ckpt(run, EVERY).exists(), proc)
    kill9(proc)
    assert not ckpt(run, STEPS).exists()
    r = minillm_cli(*train_args(char_data, "killed", "--resume", "auto"), cwd=work)
    assert r.returncode == 0, r.stderr
    path, step = resumed_step(r.stdout)
    assert EVERY <= step < STEPS and path.endswith(ckpt(run, step).name)
    assert curve(run) == curve(reference)       # steps 1..STEPS, each logged once, == floats


def test_resume_from_a_path_into_a_new_run_dir(reference, work, char_data, minillm_cli):
    r = minillm_cli(*train_args(char_data, "from_path", "--resume", ckpt(reference, 30)), cwd=work)
    assert r.returncode == 0, r.stderr
    assert resumed_step(r.stdout)[1] == 30
    assert curve(work / "from_path") == curve(reference)[30:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_preemption_signal_saves_and_exits_cleanly(sig, reference, work, char_data, minillm_cli):
    name = f"preempted_{sig.name}"
    run = work / name
    metrics = run / "metrics.jsonl"
    proc = minillm_cli.popen(*train_args(char_data, name), cwd=work)
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 13, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    m = re.search(rf"received {sig.name}.*saved step (\d+) to (\S+\.h5)", out)
    assert m, out
    step, path = int(m.group(1)), m.group(2)
    assert 13 <= step < STEPS
    assert (work / path).resolve() == ckpt(run, step).resolve()
    verify_checkpoint(ckpt(run, step))
    assert [c["step"] for c in curve(run)][-1] == step   # it finished the step it was in
    r = minillm_cli(*train_args(char_data, name, "--resume", "auto"), cwd=work)
    assert r.returncode == 0, r.stderr
    assert resumed_step(r.stdout)[1] == step
    assert curve(run)[-1] == curve(reference)[-1]
    assert curve(run) == curve(reference)


# ---------------------------------------------------------------- damaged checkpoints

def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_bytes(path):
    """Flip a few bytes in the middle of a tensor's data: the file still opens fine."""
    with h5py.File(path, "r") as f:
        info = f["model/transformer.h.0.mlp.c_fc.weight"].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        chunk = fh.read(4)
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes(b ^ 0x5A for b in chunk))


def not_hdf5(path):
    path.write_text("this is not a checkpoint\n" * 100)


@pytest.fixture
def copied_run(reference, tmp_path):
    """A copy of the reference run directory to damage."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return run


@pytest.mark.parametrize("damage", [truncate, flip_bytes], ids=["truncated", "flipped"])
def test_resume_auto_skips_a_corrupt_newest_checkpoint(damage, copied_run, reference, char_data,
                                                       minillm_cli):
    newest = ckpt(copied_run, STEPS)
    damage(newest)
    with pytest.raises(Exception):
        verify_checkpoint(newest)
    r = minillm_cli(*train_args(char_data, copied_run, "--resume", "auto"), cwd=copied_run.parent)
    assert r.returncode == 0, r.stderr
    assert re.search(rf"warning: .*{newest.name}", r.stderr), r.stderr
    assert resumed_step(r.stdout)[1] == STEPS - EVERY
    assert curve(copied_run) == curve(reference)
    verify_checkpoint(newest)  # the rerun wrote a good one in its place


def missing(path):
    path.unlink()


@pytest.mark.parametrize("damage", [truncate, flip_bytes, not_hdf5, missing],
                         ids=["truncated", "flipped", "not-hdf5", "missing"])
def test_resume_path_to_a_bad_file_is_a_user_error(damage, copied_run, char_data, minillm_cli):
    bad = ckpt(copied_run, 30)
    damage(bad)
    r = minillm_cli(*train_args(char_data, "new_run", "--resume", bad), cwd=copied_run.parent)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0], r.stderr


def test_resume_with_a_different_model_is_refused(copied_run, char_data, minillm_cli):
    before = (copied_run / "config.toml").read_text()
    r = minillm_cli(*train_args(char_data, copied_run, "--model.n_layer=3", "--resume", "auto"),
                    cwd=copied_run.parent)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert re.search(r"model\.n_layer\D*2\D+3", lines[0]), lines[0]   # the key, saved 2, asked 3
    assert (copied_run / "config.toml").read_text() == before     # nothing overwritten


# ---------------------------------------------------------------- kill -9 in the middle of a save

def temp_files(run_dir):
    try:
        return [e.name for e in os.scandir(run_dir) if ".h5.tmp-" in e.name]
    except FileNotFoundError:
        return []


def newest_step(run_dir):
    steps = [int(p.stem[5:]) for p in run_dir.glob("ckpt_*.h5")]
    return max(steps, default=0)


def test_kill_during_save_never_leaves_a_checkpoint_that_gets_picked(reference, work, char_data,
                                                                     minillm_cli):
    """Save every step and kill -9 each time a temp file is being written, twice; then finish."""
    name = "killed_in_save"
    run = work / name
    every_step = ("--train.ckpt_interval=1", "--train.keep_last=3")
    left_temp = []
    for round_ in range(2):
        resume = ("--resume", "auto") if round_ else ()
        proc = minillm_cli.popen(*train_args(char_data, name, *every_step, *resume), cwd=work)
        start = newest_step(run)
        wait_for(lambda: temp_files(run) and newest_step(run) > start + 1, proc, poll=0.0005)
        kill9(proc)
        left_temp.append(temp_files(run))
        for p in run.glob("ckpt_*.h5"):
            verify_checkpoint(p)          # a kill mid-save never leaves a broken ckpt_*.h5
    assert any(left_temp), "no kill landed inside a save; the test did not test anything"
    r = minillm_cli(*train_args(char_data, name, "--resume", "auto"), cwd=work)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr              # temp files are never even considered
    assert resumed_step(r.stdout)[1] >= 2
    assert curve(run) == curve(reference)
    assert not temp_files(run)                    # the finished run's saves pruned the stale ones
