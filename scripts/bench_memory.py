"""Benchmark: the memory ledger against measured peaks, and what each strategy costs in time.

For configs/gpt10m.toml on 2 ranks (and 4, oversubscribed on 2 cores) it runs every combination
of parallel.zero 0-3 and train.recompute none / selective / full through
``mpirun -np N python -m mpi4py -m minillm memory CONFIG --measure --json`` (one warm-up step, two
measured under tracemalloc, two timed without it) and prints, per combination, the predicted and
measured peak per rank, the error, the per-rank state (weights, gradients, masters, moments) and
the step time; then the ratios the issue asks about (ZeRO-3 state vs total / dp, recomputation's
memory and time). Run it under the machine's benchmark lock:

    flock /tmp/minillm-bench.lock .venv/bin/python scripts/bench_memory.py [--ranks 2 4] [--out results.json]
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minillm.perf.memory import fmt_bytes  # noqa: E402


def run(ranks, zero, recompute, extra):
    mpirun = str(Path(sys.executable).parent / "mpirun")
    cmd = [mpirun, "-np", str(ranks), sys.executable, "-m", "mpi4py", "-m", "minillm", "memory",
           str(REPO / "configs" / "gpt10m.toml"), f"--parallel.dp={ranks}", f"--parallel.zero={zero}",
           f"--train.recompute={recompute}", "--measure", "--json", *extra]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if out.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    return {"ranks": ranks, "zero": zero, "recompute": recompute, "wall_s": time.time() - t0, "per_rank": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--recompute", nargs="+", default=["none", "selective", "full"])
    ap.add_argument("--out", default=None)
    ap.add_argument("extra", nargs="*", help="more --section.key=value overrides")
    args = ap.parse_args()
    results = []
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| ranks | zero | recompute | predicted peak (rank 0) | measured | error (worst rank) | "
          "weights+grads+moments per rank | held between steps | activations kept | step time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for ranks in args.ranks:
        for zero in args.zero:
            for recompute in args.recompute:
                r = run(ranks, zero, recompute, args.extra)
                results.append(r)
                rows = r["per_rank"]
                errs = [(x["total"] - x["measured"]["peak"]) / x["measured"]["peak"] for x in rows]
                worst = max(errs, key=abs)
                r0 = rows[0]
                print(f"| {ranks} | {zero} | {recompute} | {fmt_bytes(r0['total'])} | "
                      f"{fmt_bytes(r0['measured']['peak'])} | {100 * errs[0]:+.1f}% ({100 * worst:+.1f}%) | "
                      f"{fmt_bytes(state_of(r))} | {fmt_bytes(r0['measured']['held'])} | "
                      f"{fmt_bytes(sum(r0['activations'].values()))} | "
                      f"{1000 * max(x['measured']['step_s'] for x in rows):.0f} ms |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    summary(results)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def state_of(result):
    """Weights + gradients + moments (+ masters) rank 0 keeps: the ledger's state, plus, for plain
    data parallelism, the gradients it keeps in its all-reduce buckets (filed under buffers)."""
    r0 = result["per_rank"][0]
    return r0["state"] + (r0["parts"]["buffers"] if result["zero"] == 0 else 0)


def summary(results):
    """The ratios the issue sets goals for, from the runs above."""
    by = {(r["ranks"], r["zero"], r["recompute"]): r for r in results}
    for ranks in sorted({r["ranks"] for r in results}):
        z0, z3 = by.get((ranks, 0, "none")), by.get((ranks, 3, "none"))
        if z0 and z3:  # float32 AdamW: weights, gradients, m, v = 4 x the weights' bytes
            total = 4 * z0["per_rank"][0]["parts"]["parameters"]
            worst = max(x["state"] for x in z3["per_rank"])  # ZeRO-3 has no buckets: state is all
            held = max(x["measured"]["held"] for x in z3["per_rank"])
            print(f"{ranks} ranks: ZeRO-3 state per rank {fmt_bytes(worst)} = {worst / (total / ranks):.3f} x "
                  f"(total {fmt_bytes(total)} / dp); measured held between steps {fmt_bytes(held)} "
                  f"(with optimizer scratch, caches, Python objects)")
        none, full = by.get((ranks, 0, "none")), by.get((ranks, 0, "full"))
        if none and full:
            a0, a1 = (sum(x["per_rank"][0]["activations"].values()) for x in (none, full))
            t0, t1 = (max(y["measured"]["step_s"] for y in x["per_rank"]) for x in (none, full))
            p0, p1 = (x["per_rank"][0]["measured"]["peak"] for x in (none, full))
            print(f"{ranks} ranks, zero 0: full recomputation keeps {fmt_bytes(a1)} of activations instead of "
                  f"{fmt_bytes(a0)} ({a1 / a0:.2f}x), measured peak {fmt_bytes(p1)} vs {fmt_bytes(p0)}, "
                  f"step time x{t1 / t0:.2f}")


if __name__ == "__main__":
    main()
