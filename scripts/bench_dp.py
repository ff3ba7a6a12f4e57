"""Data-parallel speedup: tokens/s of `mpirun -np 2` against one process, both with one BLAS thread.

    python scripts/bench_dp.py --source data/tinyshakespeare.txt            # both cases
    python scripts/bench_dp.py --case gpt10m --steps 6 --out runs/bench_dp  # a short check

Each case trains a real config with the real command, once as ``minillm train`` (one process,
one thread) and once as ``mpirun -np N python -m mpi4py -m minillm train --parallel.dp=N`` (N
processes, one thread each), the same global batch, and reads the runs' metrics.jsonl:

    shakespeare   configs/shakespeare_char_cpu.toml  (--data.source=SOURCE when --source is given;
                  without it the config's own source, downloaded on first use)
    gpt10m        configs/gpt10m.toml                (the embedded pydocs text)

Per run it reports the median over the timed steps (the first --warmup steps are dropped) of the
time per step, split into the time blocked waiting for the gradient all-reduce (``comm_wait_ms``;
buckets overlapped with backward do not count, only the wait that is left) and the rest
(computing), and the speedup in tokens/s. One BLAS thread per process makes the comparison about
processes, not threads; on a machine with N cores, N ranks leave none for anything else.
Extra ``--section.key=value`` arguments go to every run. Writes OUT/bench_dp.json.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a checkout without pip install

from minillm.config import check_layout, load_config  # noqa: E402
from minillm.errors import UserError  # noqa: E402
from minillm.train.metrics import read_metrics  # noqa: E402

CASES = {"shakespeare": REPO / "configs" / "shakespeare_char_cpu.toml",
         "gpt10m": REPO / "configs" / "gpt10m.toml"}
DEFAULT_STEPS = {"shakespeare": 40, "gpt10m": 8}
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "PYTHONUNBUFFERED": "1"}


class BenchError(Exception):
    """A mistake in how the script was called: one line, exit code 2."""


def find_mpirun() -> str:
    local = Path(sys.executable).parent / "mpirun"  # the venv's MPICH
    found = str(local) if local.exists() else shutil.which("mpirun")
    if found is None:
        raise BenchError("mpirun not found: pip install 'minillm[mpi]' (mpi4py + mpich)")
    return found


def child_env() -> dict:
    env = dict(os.environ, **ONE_THREAD)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def check_case(case, nprocs, source, extra) -> None:
    """Refuse a config the data-parallel run would reject before spending time on the serial one."""
    args = train_command(case, nprocs, "unused", 2, source, extra)
    overrides = args[args.index(str(CASES[case])) + 1:]
    try:
        check_layout(load_config(CASES[case], overrides), nprocs)
    except UserError as e:
        raise BenchError(f"{case} with {nprocs} processes: {' '.join(str(e).split())}")


def train_command(case, nprocs, run_dir, steps, source, extra) -> list[str]:
    args = [str(CASES[case]), f"--train.out_dir={run_dir}", f"--train.max_steps={steps}",
            "--train.log_interval=1",        # one record per step: ms_per_step and comm_wait_ms pair up
            f"--train.eval_interval={steps}", "--train.eval_iters=1",  # evaluation kept out of the way
            "--train.sample_tokens=0", "--train.ckpt_interval=0", "--train.keep_last=1",
            "--train.progress=false", f"--parallel.dp={nprocs}"]
    if case == "shakespeare" and source:
        args.append(f"--data.source={source}")
    args += extra
    if nprocs == 1:
        return [sys.executable, "-m", "minillm", "train", *args]
    return [find_mpirun(), "-np", str(nprocs), sys.executable, "-m", "mpi4py", "-m", "minillm",
            "train", *args]


def run_case(case, nprocs, out, steps, warmup, source, extra, timeout) -> dict:
    run_dir = out / f"{case}_np{nprocs}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run, never a resumed one
    cmd = train_command(case, nprocs, run_dir, steps, source, extra)
    print(f"  {case}, {nprocs} process{'es' if nprocs > 1 else ''}: {steps} steps ...", flush=True)
    t0 = time.perf_counter()
    # its own session: on a timeout mpirun and every rank it started are killed together
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise BenchError(f"{case} with {nprocs} process(es) did not finish in {timeout:.0f}s "
                           f"(use fewer --steps or a larger --timeout)")
    finally:
        if proc.poll() is None:  # Ctrl-C: leave no ranks behind
            os.killpg(proc.pid, signal.SIGKILL)
    r = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        # MPICH's abort notes end without a newline: our message may follow one on a line
        errors = [line.split("error:", 1)[1].strip() for line in r.stderr.splitlines()
                  if "error:" in line]
        if r.returncode == 2 and errors:
            raise BenchError(f"{case} with {nprocs} process(es): {errors[0]}")
        raise RuntimeError(f"{case} with {nprocs} process(es) failed (exit {r.returncode}):\n"
                           f"{' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return summarize(read_metrics(run_dir), warmup, nprocs, wall)


def summarize(records, warmup, nprocs, wall) -> dict:
    """Medians over the timed steps of one run's metrics records."""
    timed = [r for r in records if r["step"] > warmup]
    if not timed:
        raise BenchError(f"no step left after --warmup={warmup}; use more --steps")
    ms = statistics.median(r["ms_per_step"] for r in timed)
    wait = statistics.median(r.get("comm_wait_ms", 0.0) for r in timed)
    tokens_per_step = records[0]["tokens_seen"] / records[0]["step"]
    return {"nprocs": nprocs, "timed_steps": len(timed), "ms_per_step": ms,
            "comm_wait_ms": wait, "compute_ms": ms - wait,
            "tokens_per_step": round(tokens_per_step), "tokens_per_s": tokens_per_step / (ms / 1000),
            "final_loss": records[-1]["loss"], "wall_s": wall}


def report(results: dict, nprocs: int) -> None:
    print(f"\n{'case':<12} {'procs':>5} {'tokens/s':>10} {'ms/step':>9} {'comm wait':>10} "
          f"{'compute':>9} {'speedup':>8}")
    for case, (one, many) in results.items():
        for r in (one, many):
            speed = r["tokens_per_s"] / one["tokens_per_s"]
            print(f"{case:<12} {r['nprocs']:>5} {r['tokens_per_s']:>10.0f} {r['ms_per_step']:>9.1f} "
                  f"{r['comm_wait_ms']:>10.1f} {r['compute_ms']:>9.1f} {speed:>7.2f}x")
        eff = many["tokens_per_s"] / one["tokens_per_s"] / nprocs
        share = many["comm_wait_ms"] / many["ms_per_step"]
        print(f"{'':<12} scaling efficiency {eff:.0%} of {nprocs}x; "
              f"{share:.0%} of a data-parallel step is waiting for gradients")
    print(f"(medians per step; {os.cpu_count()} CPU cores here, one BLAS thread per process)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="other --section.key=value arguments go to every run")
    ap.add_argument("--source", default=None,
                    help="text file for the shakespeare case (e.g. a local tinyshakespeare.txt)")
    ap.add_argument("--case", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--np", dest="nprocs", type=int, default=2, help="data-parallel ranks (default 2)")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"steps per run (default {DEFAULT_STEPS})")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed per run")
    ap.add_argument("--out", default="runs/bench_dp", help="directory for the runs and the JSON")
    args, extra = ap.parse_known_args(argv)
    try:
        bad = [a for a in extra if not (a.startswith("--") and "." in a.split("=")[0])]
        if bad:
            raise BenchError(f"unrecognized arguments {' '.join(bad)} (overrides look like "
                             f"--train.batch_size=16)")
        if args.nprocs < 2:
            raise BenchError(f"--np={args.nprocs}: data parallelism needs 2 or more processes")
        if args.warmup < 0 or (args.steps is not None and args.steps <= args.warmup):
            raise BenchError(f"--steps must be larger than --warmup={args.warmup}")
        source = str(Path(args.source).resolve()) if args.source else None
        if source and not Path(source).is_file():
            raise BenchError(f"--source {args.source}: no such file")
        for case in args.case:
            check_case(case, args.nprocs, source, extra)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        results = {}
        for case in args.case:
            steps = args.steps or DEFAULT_STEPS[case]
            results[case] = tuple(run_case(case, n, out, steps, args.warmup, source, extra,
                                           args.timeout) for n in (1, args.nprocs))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(results, args.nprocs)
    path = out / "bench_dp.json"
    path.write_text(json.dumps({"nprocs": args.nprocs, "cpu_count": os.cpu_count(),
                                "results": {c: list(r) for c, r in results.items()}}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
