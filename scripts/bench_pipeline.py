"""Measure the pipeline bubble and the peak activation memory per stage, against the formulas.

    python scripts/bench_pipeline.py [--pp 2 4] [--micro 1 4 8] [--schedules gpipe 1f1b interleaved zb-h1]
                                     [--steps 6] [--out runs/bench_pipeline]

For every p (stages), m (micro-batches) and schedule this launches
``mpirun -np p python -m mpi4py scripts/bench_pipeline.py --worker ...``: the real trainer on a
GPT of 8 blocks, with the micro-batch size fixed (the global batch is m micro-batches), so

    bubble   = (p - 1) / (m + p - 1)          GPipe and 1F1B
             = (p - 1) / (v m + p - 1)        interleaved 1F1B ("interleaved": v = 2 virtual stages)
             = (p - 1) / (3 m + p - 1)        ZB-H1 when forward, B and W cost the same
    GPipe    peak activations on stage s = m            x a_s
    1F1B     peak activations on stage s = min(p - s, m) x a_s

where a_s, one micro-batch's saved activations on stage s, is measured by the m=1 run. The
bubble is the median over the steps after the first of 1 - (forward + backward [+ W] time) /
(time until the last stage finishes), averaged over stages. Next to it, the simulator's bubble
for the same schedule with the per-step costs measured in the run (mean forward, B and W time of
a micro-batch on a stage): what the schedule would give on a machine where ranks do not share
cores. Prints a Markdown table and writes ``OUT/pipeline.json``. With more ranks than cores the
ranks share cores and the measured bubble says more about the machine than about the schedule.
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


VIRTUAL = 2  # chunks per rank of the "interleaved" schedule


def overrides(p, m, schedule, data_dir, out_dir):
    v = VIRTUAL if schedule == "interleaved" else 1
    name = "1f1b" if schedule == "interleaved" else schedule
    return MODEL + [f"--train.batch_size={MICRO_BATCH * m}", f"--parallel.pp={p}",
                    f"--parallel.microbatches={m}", f"--parallel.schedule={name}",
                    f"--parallel.virtual_stages={v}",
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
    bubbles, peaks, times, costs = [], None, [], {"forward": [], "backward": [], "weight": []}
    for step in range(args.steps):
        tr.train_step()
        tr.step += 1
        stages = eng.topo.pipe_comm.allgather_obj(eng.timeline.summary())
        span = max(s["end"] for s in stages)
        if step > 0:  # the first step pays for warm-up (allocations, MPI connections)
            bubbles.append(float(numpy.mean([1.0 - s["busy"] / span for s in stages])))
            times.append(span)
            for kind, start, end, _, _ in eng.timeline.events:
                if kind in costs:
                    costs[kind].append(end - start)
        peaks = [s["peak"] for s in stages]
    # one micro-batch's forward / B / W on a whole stage (a chunk's times v-fold), averaged over ranks
    v = cfg.parallel.virtual_stages
    mine = {k: v * float(numpy.mean(t)) if t else 0.0 for k, t in costs.items()}
    every = eng.topo.pipe_comm.allgather_obj(mine)
    if comm.rank == 0:
        mean = {k: float(numpy.mean([c[k] for c in every])) for k in mine}
        print("RESULT " + json.dumps({"bubble": float(numpy.median(bubbles)), "peaks": peaks,
                                      "ms": 1000 * float(numpy.median(times)), "costs": mean}),
              flush=True)


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
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b", "interleaved", "zb-h1"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default="runs/bench_pipeline")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from minillm.data import ensure_dataset
    from minillm.distributed.pipeline_schedule import bubble_of, bubble_theory, peak_live_theory, simulate
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmpdir:
        tmp = Path(tmpdir)
        ensure_dataset("pydocs", tmp / "data", "char")
        rows, results = [], []
        for p in args.pp:
            base = None  # a_s: one micro-batch's activations per stage (the m=1 run)
            for m in sorted(args.micro):
                for schedule in args.schedules:
                    v = VIRTUAL if schedule == "interleaved" else 1
                    name = "1f1b" if schedule == "interleaved" else schedule
                    if (v > 1 and m % p) or (name == "zb-h1" and m < p) or (m == 1 and schedule != "1f1b"):
                        continue  # a layout the schedule does not take (and m=1 is the baseline only)
                    r = run_one(p, m, schedule, tmp / "data", tmp / f"run_{p}_{m}_{schedule}", args.steps)
                    if m == 1 and base is None:
                        base = r["peaks"]
                    want = base and [base[s] * peak_live_theory(name, p, s, m, v) for s in range(p)]
                    c = r["costs"]
                    t_b = c["backward"] + c["weight"]  # the whole backward of a micro-batch
                    sim = bubble_of(simulate(name, p, m, t_f=c["forward"], t_b=t_b,
                                             t_w=c["weight"] or None, v=v))
                    theory = bubble_theory(p, m, v, name)
                    results.append({"pp": p, "m": m, "schedule": schedule, **r, "bubble_theory": theory,
                                    "bubble_simulated": sim, "peaks_theory": want})
                    rows.append(f"| {p} | {m} | {schedule} | {theory:.3f} | {sim:.3f} | {r['bubble']:.3f} | "
                                f"{_mb(r['peaks'])} | {_mb(want) if name != 'zb-h1' else '(see text)'} | "
                                f"{r['ms']:.1f} |")
                    print(rows[-1], flush=True)
    (out / "pipeline.json").write_text(json.dumps(results, indent=1))
    print("\n| p | m | schedule | bubble formula | simulated (measured costs) | measured | "
          "peak activations per stage (MB) | formula (MB) | step ms |\n"
          "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    print(f"\nwrote {out / 'pipeline.json'}")


if __name__ == "__main__":
    main()
