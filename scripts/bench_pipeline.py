"""Measure the pipeline bubble and the peak activation memory per stage, against the formulas.

    python scripts/bench_pipeline.py [--pp 2 4] [--micro 1 2 4 8] [--steps 6] [--out runs/bench_pipeline]

For every p (stages), m (micro-batches) and schedule (GPipe, 1F1B) this launches
``mpirun -np p python -m mpi4py scripts/bench_pipeline.py --worker ...``: the real trainer on a
GPT of 8 blocks, with the micro-batch size fixed (the global batch is m micro-batches), so

    bubble   = (p - 1) / (m + p - 1)          of each step, for both schedules
    GPipe    peak activations on stage s = m            x a_s
    1F1B     peak activations on stage s = min(p - s, m) x a_s

where a_s, one micro-batch's saved activations on stage s, is measured by the m=1 run. The
bubble is the median over the steps after the first of 1 - (forward + backward time) / (time
until the last stage finishes), averaged over stages. Prints a Markdown table and writes
``OUT/pipeline.json``. With more ranks than cores the ranks share cores and the measured bubble
says more about the machine than about the schedule.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy

MODEL = ["--model.n_layer=8", "--model.n_head=4", "--model.n_embd=128", "--model.block_size=64",
         "--model.dropout=0.0"]
MICRO_BATCH = 4


def overrides(p, m, schedule, data_dir, out_dir):
    return MODEL + [f"--train.batch_size={MICRO_BATCH * m}", f"--parallel.pp={p}",
                    f"--parallel.microbatches={m}", f"--parallel.schedule={schedule}",
                    f"--data.dir={data_dir}", f"--train.out_dir={out_dir}", "--train.progress=false",
                    "--train.warmup_steps=0"]


# ---------------------------------------------------------------- one configuration, on every rank
def worker(args):
    from minillm.config import load_config
    from minillm.distributed.comm import get_world_comm
    from minillm.distributed.launch import install_abort_handler
    from minillm.train.trainer import Trainer
    comm = get_world_comm()
    install_abort_handler(comm)
    cfg = load_config(None, args.overrides)
    tr = Trainer(cfg, comm=comm, log=lambda msg: None)
    eng = tr.engine
    bubbles, peaks, times = [], None, []
    for step in range(args.steps):
        tr.train_step()
        tr.step += 1
        stages = eng.topo.pipe_comm.allgather_obj(eng.timeline.summary())
        span = max(s["end"] for s in stages)
        if step > 0:  # the first step pays for warm-up (allocations, MPI connections)
            bubbles.append(float(numpy.mean([1.0 - s["busy"] / span for s in stages])))
            times.append(span)
        peaks = [s["peak"] for s in stages]
    if comm.rank == 0:
        print("RESULT " + json.dumps({"bubble": float(numpy.median(bubbles)), "peaks": peaks,
                                      "ms": 1000 * float(numpy.median(times))}), flush=True)


# ---------------------------------------------------------------- the sweep
def _mb(values):
    return " / ".join(f"{v / 1e6:.2f}" for v in values) if values else "-"


def run_one(p, m, schedule, data_dir, out_dir, steps):
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    cmd = [mpirun, "-np", str(p), sys.executable, "-m", "mpi4py", __file__, "--worker",
           "--steps", str(steps), "--", *overrides(p, m, schedule, data_dir, out_dir)]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if res.returncode != 0 or line is None:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stdout}\n{res.stderr}")
    return json.loads(line[len("RESULT "):])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default="runs/bench_pipeline")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from minillm.data import ensure_dataset
    from minillm.distributed.pipeline_schedule import bubble_theory, peak_live_theory
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmpdir:
        tmp = Path(tmpdir)
        ensure_dataset("pydocs", tmp / "data", "char")
        rows, results = [], []
        for p in args.pp:
            base = None  # a_s: one micro-batch's activations per stage (the m=1 run)
            for m in sorted(args.micro):
                for schedule in ("gpipe", "1f1b"):
                    r = run_one(p, m, schedule, tmp / "data", tmp / f"run_{p}_{m}_{schedule}", args.steps)
                    if m == 1 and base is None:
                        base = r["peaks"]
                    want = base and [base[s] * peak_live_theory(schedule, p, s, m) for s in range(p)]
                    results.append({"pp": p, "m": m, "schedule": schedule, **r,
                                    "bubble_theory": bubble_theory(p, m), "peaks_theory": want})
                    rows.append(f"| {p} | {m} | {schedule} | {bubble_theory(p, m):.3f} | {r['bubble']:.3f} | "
                                f"{_mb(r['peaks'])} | {_mb(want)} | {r['ms']:.1f} |")
                    print(rows[-1], flush=True)
    (out / "pipeline.json").write_text(json.dumps(results, indent=1))
    print("\n| p | m | schedule | bubble theory | bubble measured | peak activations per stage (MB) "
          "| formula (MB) | step ms |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    print(f"\nwrote {out / 'pipeline.json'}")


if __name__ == "__main__":
    main()
