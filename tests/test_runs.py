"""Runs that never lose or mix results, end to end through the real `minillm` command: a run
directory belongs to one run (a second fresh run, a concurrent run, --overwrite, a resume with
nothing to do), a full disk at the final save and pruning that makes room first (real tmpfs
mounts, as root), read-only and invalid paths, honest progress lines, padded vocabularies,
the vocabulary-mismatch hint, count options, Tiny Shakespeare offline, and the resume command
printed after SIGTERM under mpirun.
"""
import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import minillm_env
from minillm.checkpoint import verify_checkpoint
from minillm.train.metrics import read_metrics
from test_cli import TINY_CONFIG, assert_user_error


def tiny(data_dir, out, *extra):
    """configs/tiny.toml (20 steps, a checkpoint every 10) on the session's dataset."""
    return ("train", TINY_CONFIG, f"--data.dir={data_dir}", f"--train.out_dir={out}",
            "--train.sample_tokens=0", *extra)


def cli(*args, cwd, env=None, timeout=120):
    """The real command in a subprocess, with extra environment variables."""
    return subprocess.run([sys.executable, "-m", "minillm", *map(str, args)], cwd=cwd,
                          env={**minillm_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def files(d):
    return sorted(p.name for p in Path(d).iterdir()) if Path(d).is_dir() else []


def snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file()}


# ---------------------------------------------------------------- mounts (root only)

@contextlib.contextmanager
def mounted_tmpfs(where, size, read_only=False):
    """A real tmpfs of ``size`` bytes at ``where``; the test is skipped unless we may mount."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory no write can land in: a read-only tmpfs as root, else chmod 555."""
    where = tmp_path / "ro"
    if os.geteuid() == 0:
        with mounted_tmpfs(where, 64 * 1024, read_only=True):
            yield where
    else:
        where.mkdir()
        where.chmod(0o555)
        yield where
        where.chmod(0o755)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, char_data, minillm_cli):
    """One finished tiny run with samples every 10 steps: (run dir, the CompletedProcess)."""
    cwd = tmp_path_factory.mktemp("runs")
    r = minillm_cli(*tiny(char_data, "run", "--train.sample_interval=10", "--train.sample_tokens=12",
                          "--train.log_interval=2"), cwd=cwd)
    assert r.returncode == 0, r.stderr
    return cwd / "run", r


# ---------------------------------------------------------------- 1. one run per directory

def test_a_second_fresh_run_is_refused_overwrite_replaces_and_resume_says_nothing_to_do(
        char_data, minillm_cli, tmp_path):
    first = minillm_cli(*tiny(char_data, "run"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = snapshot(tmp_path / "run")
    assert {"ckpt_0000010.h5", "ckpt_0000020.h5", "metrics.jsonl", "config.toml"} <= set(before)

    # the same command again: one line offering the three ways on, and nothing touched
    again = minillm_cli(*tiny(char_data, "run", "--train.max_steps=4"), cwd=tmp_path)
    assert_user_error(again, "already holds a run", "newest at step 20", "--resume auto",
                      "--train.out_dir=run-2", "--overwrite")
    assert snapshot(tmp_path / "run") == before

    # --overwrite: the shorter run replaces the old one; eval scores its checkpoint, not step 20's
    short = minillm_cli(*tiny(char_data, "run", "--train.max_steps=4", "--overwrite"), cwd=tmp_path)
    assert short.returncode == 0, short.stderr
    assert [p for p in files(tmp_path / "run") if p.startswith("ckpt_")] == ["ckpt_0000004.h5"]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 4]
    assert "run.lock" not in files(tmp_path / "run")  # released at the end of the run
    done = re.search(r"^done: .* \| checkpoint (\S+)$", short.stdout, re.M)
    assert done and (tmp_path / done.group(1)).is_file(), short.stdout
    ev = minillm_cli("eval", "run", cwd=tmp_path)
    assert ev.returncode == 0 and "ckpt_0000004.h5" in ev.stdout, ev.stdout + ev.stderr

    # a resume with nothing left to do says so, names the checkpoint and writes none
    again = minillm_cli(*tiny(char_data, "run", "--train.max_steps=4", "--resume", "auto"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert re.search(r"nothing to do: .*step 4.*run/ckpt_0000004\.h5", again.stdout), again.stdout
    assert [p for p in files(tmp_path / "run") if p.startswith("ckpt_")] == ["ckpt_0000004.h5"]


def test_resume_from_another_runs_checkpoint_into_a_run_directory_is_refused(finished, char_data,
                                                                              minillm_cli, tmp_path):
    run, _ = finished
    other = minillm_cli(*tiny(char_data, "other", "--train.max_steps=2"), cwd=tmp_path)
    assert other.returncode == 0, other.stderr
    before = snapshot(tmp_path / "other")
    r = minillm_cli(*tiny(char_data, "other", "--resume", run / "ckpt_0000010.h5"), cwd=tmp_path)
    assert_user_error(r, "already holds a run", "new --train.out_dir", "--overwrite")
    assert snapshot(tmp_path / "other") == before


def test_a_concurrent_run_fails_at_once_naming_the_holder(char_data, minillm_cli, tmp_path):
    run = tmp_path / "run"
    holder = minillm_cli.popen(*tiny(char_data, "run", "--train.max_steps=100000",
                                     "--train.log_interval=1"), cwd=tmp_path)
    try:
        end = time.monotonic() + 60
        while not ((run / "ckpt_0000010.h5").exists() and (run / "run.lock").exists()):
            assert holder.poll() is None and time.monotonic() < end, holder.communicate()
            time.sleep(0.01)
        config = (run / "config.toml").read_bytes()
        second = minillm_cli(*tiny(char_data, "run", "--resume", "auto"), cwd=tmp_path)
        assert holder.poll() is None, "the holder must still be running"
        assert_user_error(second, f"in use by another run (pid {holder.pid})", "--train.out_dir")
        assert (run / "config.toml").read_bytes() == config
    finally:
        holder.kill()
        holder.communicate(timeout=30)
    # kill -9 left the lock file behind, but no process holds it: the run continues
    assert (run / "run.lock").exists()
    newest = max(int(p[5:12]) for p in files(run) if p.startswith("ckpt_"))
    resumed = minillm_cli(*tiny(char_data, "run", "--resume", "auto", f"--train.max_steps={newest + 2}",
                                "--train.log_interval=1"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {newest}" in resumed.stdout
    # one run's records, each step once
    assert [r["step"] for r in read_metrics(run)] == list(range(1, newest + 3))


def test_presets_write_to_distinct_directories_and_checkpoint_periodically():
    from minillm.config import load_config
    presets = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml")) + [None]
    dirs = set()
    for path in presets:                                  # None: the built-in defaults
        cfg = load_config(path)
        t = cfg.train
        assert 0 < t.ckpt_interval < t.max_steps, (path, t.ckpt_interval)
        for overrides in ([], ["--parallel.dp=2"], ["--train.max_steps=200"]):
            dirs.add(load_config(path, overrides).train.out_dir)
    assert len(dirs) == 3 * len(presets)                  # the README's examples never collide
    main = Path(__file__).resolve().parents[1] / "configs" / "pydocs_char.toml"
    assert load_config(main).train.out_dir == os.path.join("runs", "pydocs_char")
    assert load_config(main, ["--parallel.dp", "2"]).train.out_dir == os.path.join("runs", "pydocs_char-dp=2")
    assert load_config(main, ["--parallel.dp=2", "--train.out_dir=x"]).train.out_dir == "x"


# ---------------------------------------------------------------- 2. full disks

def test_a_full_disk_at_the_final_save_exits_2_naming_the_last_good_checkpoint(finished, char_data,
                                                                               tmp_path):
    size = (finished[0] / "ckpt_0000010.h5").stat().st_size
    with mounted_tmpfs(tmp_path / "disk", int(1.5 * size)) as disk:   # room for one checkpoint
        r = cli(*tiny(char_data, disk / "run"), cwd=tmp_path)
        assert_user_error(r, f"cannot write checkpoint {disk / 'run' / 'ckpt_0000020.h5'}",
                          "No space left on device",
                          f"the last good checkpoint is {disk / 'run' / 'ckpt_0000010.h5'} (step 10)")
        assert files(disk / "run") == ["ckpt_0000010.h5", "config.toml", "metrics.jsonl", "tokenizer.json"]
        verify_checkpoint(disk / "run" / "ckpt_0000010.h5")
        # make room as the message says, then its command finishes the run
        subprocess.run(["mount", "-o", f"remount,size={3 * size}", str(disk)], check=True)
        command = r.stderr.split("continue with: ")[1].strip()
        assert command == f"minillm train {disk / 'run' / 'config.toml'} --resume auto"
        again = cli(*shlex.split(command)[1:], cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        verify_checkpoint(disk / "run" / "ckpt_0000020.h5")


def test_pruning_makes_room_before_a_save(finished, char_data, tmp_path):
    size = (finished[0] / "ckpt_0000010.h5").stat().st_size
    room = int(2.3 * size)  # two checkpoints and the small files fit, three never do
    with mounted_tmpfs(tmp_path / "disk", room) as disk:
        r = cli(*tiny(char_data, disk / "run", "--train.ckpt_interval=5", "--train.keep_last=2"),
                cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert [p for p in files(disk / "run") if p.endswith(".h5")] == ["ckpt_0000015.h5", "ckpt_0000020.h5"]


def test_a_full_disk_while_preparing_data_is_one_line_and_leaves_no_temp_file(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", 128 * 1024) as disk:        # the token files need ~900 KB
        r = cli("prepare", "pydocs", "--out", disk / "data", cwd=tmp_path)
        assert_user_error(r, f"cannot write dataset file {disk / 'data' / 'train.bin'}",
                          "No space left on device")
        assert files(disk / "data") == ["tokenizer.json"]               # no meta.json: incomplete


def test_metrics_and_config_writes_that_fail_name_the_file(tmp_path):
    from minillm.config import Config, save_config
    from minillm.errors import UserError
    from minillm.train.metrics import MetricsLog
    log = MetricsLog(tmp_path)
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")               # every write: ENOSPC
    with pytest.raises(UserError, match=r"cannot write metrics .*metrics\.jsonl: No space left"):
        log.write({"step": 1, "loss": 1.0})
    (tmp_path / "sub").write_text("a file where a directory should be")
    with pytest.raises(UserError, match=r"cannot write config .*sub/config\.toml"):
        save_config(Config(), tmp_path / "sub" / "config.toml")


# ---------------------------------------------------------------- 3. unwritable or invalid paths

@pytest.mark.parametrize("case", ["out_dir", "data_dir"])
def test_train_into_a_read_only_directory(case, read_only_dir, char_data, tmp_path):
    if case == "out_dir":
        r = cli(*tiny(char_data, read_only_dir / "run"), cwd=tmp_path)
        assert_user_error(r, f"cannot write run directory {read_only_dir / 'run'}", "--train.out_dir")
    else:
        r = cli("train", TINY_CONFIG, f"--data.dir={read_only_dir / 'data'}", "--train.out_dir=run",
                cwd=tmp_path)
        assert_user_error(r, f"cannot write dataset directory {read_only_dir / 'data'}", "data.dir")
    assert files(read_only_dir) == []


def test_train_into_an_out_dir_that_is_a_file(char_data, tmp_path):
    (tmp_path / "run").write_text("notes")
    r = cli(*tiny(char_data, "run"), cwd=tmp_path)
    assert_user_error(r, "run directory run is not a directory", "--train.out_dir")
    assert (tmp_path / "run").read_text() == "notes"


def test_prepare_and_plot_into_a_read_only_directory(read_only_dir, finished, capsys):
    from minillm.cli import main
    assert main(["prepare", "pydocs", "--out", str(read_only_dir / "data")]) == 2
    assert main(["plot", str(finished[0]), "--out", str(read_only_dir / "curves.png")]) == 2
    assert main(["plot", str(finished[0]), "--out", str(finished[0])]) == 2      # a directory
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), lines
    assert f"cannot write dataset directory {read_only_dir / 'data'}" in lines[0]
    assert f"cannot write plot {read_only_dir / 'curves.png'}" in lines[1]
    assert "is a directory" in lines[2]
    assert files(read_only_dir) == []


# ---------------------------------------------------------------- 5. progress

def test_progress_lines_samples_and_summary_when_not_on_a_terminal(finished):
    run, r = finished
    steps = re.findall(r"^step +(\d+)/20 \| loss [\d.]+ .*\| [\d.]+k tok/s \| .*mfu ([\d.]+)% \| ETA \S+$",
                       r.stdout, re.M)
    assert [int(s) for s, _ in steps] == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20], r.stdout
    assert all(float(m) <= 100 for _, m in steps)
    assert re.findall(r"^---- sample at step (\d+) ----$", r.stdout, re.M) == ["10", "20"]
    assert re.search(r"^minillm .*\| threads 1 \(.*\) \| matmul peak \d+ GFLOP/s \|", r.stdout, re.M)
    done = re.search(r"^done: 20 steps in \S+ \| val loss [\d.]+ \(best [\d.]+\) \| checkpoint (\S+)$",
                     r.stdout, re.M)
    assert done and Path(run.parent / done.group(1)) == run / "ckpt_0000020.h5", r.stdout


def test_eta_is_this_runs_mean_step_time_times_the_steps_left(monkeypatch):
    from minillm.train import progress
    clock = iter([100.0, 130.0, 160.0])             # start, then two readings
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    p = progress.Progress(total=1500, start=500, log=lambda s: None)   # a resumed run: 1000 to go
    assert p.eta(500) is None                       # nothing measured yet: no figure is better than a guess
    assert p.eta(600) == pytest.approx(30 / 100 * 900)   # 0.3 s/step of this run, 900 steps left
    assert p.elapsed() == pytest.approx(60.0)
    assert [progress.hms(s) for s in (12.34, 185, 3725)] == ["12.3s", "3m05s", "1h02m"]


def test_mfu_never_exceeds_100_percent():
    from minillm.train.progress import MFU
    mfu = MFU(flops_per_token=1e6, peak=1e9)      # a peak measured while the cores were busy
    assert mfu(500.0) == pytest.approx(0.5)
    assert mfu(4000.0) == 1.0                     # did better than the "peak": that is the peak now
    assert mfu(2000.0) == pytest.approx(0.5)


# ---------------------------------------------------------------- 6. threads

def test_thread_choice(monkeypatch):
    from minillm.config import load_config
    from minillm.perf import threads
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    small = load_config(TINY_CONFIG)
    wide = load_config(TINY_CONFIG, [f"--model.n_embd={threads.WIDE}", "--model.n_head=8"])
    assert threads.choose_threads(small, gpu=False) == (1, f"model.n_embd < {threads.WIDE}: one is faster")
    assert threads.choose_threads(wide, gpu=False) == (8, "all cores")
    assert threads.choose_threads(wide, gpu=True) == (1, "GPU run")  # train.device "auto" says nothing
    assert threads.choose_threads(wide, world_size=2) == (1, "one per MPI rank")
    assert threads.choose_threads(load_config(TINY_CONFIG, ["--train.threads=3"]), 2) == (3, "train.threads")
    from threadpoolctl import threadpool_info
    try:
        assert threads.set_blas_threads(2) == 2
        assert {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"} == {2}
    finally:
        threads.set_blas_threads(1)


# ---------------------------------------------------------------- 7. padded vocabularies, resume hints

def test_a_padded_vocabulary_samples_and_evaluates(char_data, minillm_cli, tmp_path):
    r = minillm_cli(*tiny(char_data, "run", "--train.max_steps=2", "--model.vocab_size=192"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # nearly untrained, the padded ids carry about 45 % of the probability: 300 draws find one
    s = minillm_cli("sample", "run", "--max-new-tokens", "300", "--temperature", "2", cwd=tmp_path)
    assert s.returncode == 0 and len(s.stdout) > 300, s.stderr
    e = minillm_cli("eval", "run", "--iters", "2", cwd=tmp_path)
    assert e.returncode == 0 and "val loss" in e.stdout, e.stderr


def test_generate_and_evaluate_never_use_padded_ids():
    import numpy as np

    from minillm import Tensor
    from minillm.functional import cross_entropy
    from minillm.model import GPT, GPTConfig
    from minillm.model.vocab import mask_padded_logits
    model = GPT(GPTConfig(vocab_size=128, block_size=16, n_layer=1, n_head=2, n_embd=16), seed=0)
    out = model.generate(np.zeros((2, 1), dtype=np.int64), 200, temperature=3.0, seed=0, n_valid=100)
    assert out.max() < 100
    assert model.generate(np.zeros((2, 1), dtype=np.int64), 200, temperature=3.0, seed=0).max() >= 100
    logits, _ = model(np.zeros((1, 4), dtype=np.int64))
    y = np.arange(4)[None]                        # (1, 4)
    masked = float(cross_entropy(Tensor(mask_padded_logits(logits.data, 100)), y).data)
    full = float(cross_entropy(logits, y).data)
    assert masked < full                          # the 28 impossible ids no longer take probability
    assert mask_padded_logits(logits.data, 128) is logits.data
    # the batched generator (`minillm serve`) takes the tokenizer's vocabulary the same way
    from minillm.data import CharTokenizer
    from minillm.infer.generate import generate
    tok = CharTokenizer.train("".join(chr(32 + i) for i in range(100)))
    done = generate(model, [[0], [1]], 200, temperature=3.0, seed=0, tokenizer=tok)
    assert tok.vocab_size == 100 and all(max(c.tokens) < 100 and len(c.text) > 0 for c in done)
    assert max(max(c.tokens) for c in generate(model, [[0], [1]], 200, temperature=3.0, seed=0)) >= 100


def test_the_vocabulary_mismatch_hint_leads_to_a_run_that_works(tmp_path, minillm_cli):
    from minillm.data.sources import pydocs_text
    text = pydocs_text()[:60_000]
    (tmp_path / "small.txt").write_text("".join(c for c in text.lower() if c in "abcdefghij \n"))
    (tmp_path / "big.txt").write_text(text)
    base = ("train", TINY_CONFIG, "--train.out_dir=run", "--train.sample_tokens=0")
    first = minillm_cli(*base, "--data.source=small.txt", "--train.max_steps=10", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    r = minillm_cli(*base, "--data.source=big.txt", "--train.max_steps=12", "--resume", "auto", cwd=tmp_path)
    assert_user_error(r, "trained on a vocabulary of 12 tokens", "--data.source=small.txt")
    fix = re.search(r"\((--data\.\S+(?: --data\.\S+)*)\)", r.stderr).group(1).split()
    again = minillm_cli(*base, "--data.source=big.txt", "--train.max_steps=12", "--resume", "auto",
                        *fix, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout and [r["step"] for r in read_metrics(tmp_path / "run")][-1] == 12


# ---------------------------------------------------------------- 8. count options

@pytest.mark.parametrize("argv, needle", [
    (["eval", "RUN", "--iters", "0"], "--iters: must be >= 1, got 0"),
    (["eval", "RUN", "--iters", "-3"], "--iters: must be >= 1, got -3"),
    (["sample", "RUN", "--num-samples", "0"], "--num-samples: must be >= 1, got 0"),
    (["sample", "RUN", "--seed", "-1"], "--seed=-1 must be >= 0"),
    (["prepare", "pydocs", "--tokenizer", "bpe", "--vocab-size", "0"], "--vocab-size: must be >= 1"),
    (["bench", "--steps", "0"], "--steps: must be >= 1"),
], ids=["iters-0", "iters-neg", "num-samples-0", "seed-neg", "vocab-size-0", "bench-steps-0"])
def test_count_options_reject_zero_and_negative(argv, needle, finished, capsys):
    from minillm.cli import main
    assert main([str(finished[0]) if a == "RUN" else a for a in argv]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


# ---------------------------------------------------------------- 9. Tiny Shakespeare offline

def test_prepare_shakespeare_offline_says_where_the_file_goes_and_uses_a_local_copy(tmp_path, shared_data):
    offline = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
               "no_proxy": "", "NO_PROXY": "", "MINILLM_DATA": ""}   # port 9: connection refused
    r = cli("prepare", "shakespeare", cwd=tmp_path, env=offline)
    assert_user_error(r, "could not download", f"save the file as {Path('data') / 'tinyshakespeare.txt'}",
                      "$MINILLM_DATA")
    assert files(tmp_path / "data") == []
    r = cli("prepare", "shakespeare", cwd=tmp_path, env={**offline, "MINILLM_DATA": str(shared_data)})
    assert r.returncode == 0, r.stderr
    assert "1,003,854 train" in r.stdout and (tmp_path / "data" / "shakespeare_char" / "meta.json").is_file()


# ---------------------------------------------------------------- 10. SIGTERM under mpirun

@pytest.mark.mpi
def test_sigterm_under_mpirun_prints_the_full_mpirun_command_that_continues(char_data, tmp_path):
    from mpi_util import SINGLE_THREAD_ENV, _kill_group, find_mpirun
    mpirun = find_mpirun()
    if mpirun is None:
        pytest.skip("mpirun not found")
    env = {**minillm_env(), **SINGLE_THREAD_ENV}
    args = [sys.executable, "-m", "mpi4py", "-m", "minillm", *map(str, tiny(
        char_data, "run", "--parallel.dp=2", "--train.max_steps=100000", "--train.log_interval=1"))]
    proc = subprocess.Popen([mpirun, "-np", "2", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        end = time.monotonic() + 90
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            assert proc.poll() is None and time.monotonic() < end, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)                # to mpirun, which passes it to the ranks
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    assert proc.returncode == 0, err
    assert "threads 1 (one per MPI rank)" in out
    m = re.search(r"received SIGTERM .*saved step (\d+) to \S+; continue with: (.*)$", out, re.M)
    assert m, out
    command = shlex.split(m.group(2))
    assert command == [mpirun, "-np", "2", sys.executable, "-m", "mpi4py", "-m", "minillm", "train",
                       os.path.join("run", "config.toml"), "--resume", "auto"]
    step = int(m.group(1))
    again = subprocess.run(command + [f"--train.max_steps={step + 2}"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"at step {step}" in again.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "run")][-3:] == [step, step + 1, step + 2]
