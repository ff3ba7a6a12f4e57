"""How many BLAS threads should a run use? Time training steps and sampling at 1 and 2 threads.

Each (config, threads) pair trains in its own process (`minillm train ... --train.threads=N`)
and reports the median ms per step of its metrics.jsonl (steps after the first 5); sampling is
timed in-process: 200 tokens from the same model with `set_blas_threads(N)`. `--busy K` starts K
processes that keep a core busy with NumPy work while the timings run, the situation of a
shared machine. The load average is printed with the figures.

Run (one benchmark at a time on a shared machine):
    flock /tmp/minillm-bench.lock python scripts/bench_threads.py --busy 0
    flock /tmp/minillm-bench.lock python scripts/bench_threads.py --busy 2
"""
import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def busy_loop():
    import numpy as np
    a = np.random.default_rng(0).standard_normal((256, 256))
    while True:
        a = np.tanh(a @ a.T * 1e-3)


def train_ms(config, threads, steps, work, data_dir):
    out = Path(work) / f"{Path(config).stem}_t{threads}"
    cmd = [sys.executable, "-m", "minillm", "train", str(config), f"--train.threads={threads}",
           f"--train.max_steps={steps}", f"--train.out_dir={out}", f"--data.dir={data_dir}",
           "--train.log_interval=1", f"--train.eval_interval={10 * steps}", "--train.eval_iters=1",
           "--train.ckpt_interval=0", "--train.sample_tokens=0", "--train.sample_interval=0",
           "--train.progress=false"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    if r.returncode:
        sys.exit(r.stderr)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["ms_per_step"] for r in recs if r["step"] > 5), out


def sample_ms(run_dir, threads, tokens=200):
    from minillm.perf.threads import set_blas_threads
    from minillm.train.inference import load_model, load_run_tokenizer, sample_text
    model, cfg, ckpt = load_model(run_dir)
    tok = load_run_tokenizer(ckpt, cfg)
    set_blas_threads(threads)  # after load_model, which applies the run's own choice
    t0 = time.perf_counter()
    sample_text(model, tok, "", tokens, 0.8, None, 0)
    return 1000 * (time.perf_counter() - t0) / tokens


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=[str(REPO / "configs" / "pydocs_char.toml"),
                                                     str(REPO / "configs" / "gpt10m.toml")])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--busy", type=int, default=0, help="busy processes competing for the cores")
    args = p.parse_args()
    os.environ.update(OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(REPO))  # the run sets its own count
    busy = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(args.busy)]
    for b in busy:
        b.start()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as work:
            from minillm.data import prepare_dataset
            data_dir = Path(work) / "data"
            prepare_dataset("pydocs", data_dir, "char")
            for config in args.configs:
                steps = args.steps if "gpt10m" not in config else max(args.steps // 4, 10)
                for n in args.threads:
                    ms, run = train_ms(config, n, steps, work, data_dir)
                    rows.append({"config": Path(config).stem, "threads": n, "busy": args.busy,
                                 "train_ms_per_step": round(ms, 1),
                                 "sample_ms_per_token": round(sample_ms(run, n), 2),
                                 "loadavg": os.getloadavg()[0]})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        for b in busy:
            b.terminate()
    print(f"\n{'config':<14}{'threads':>8}{'busy':>6}{'train ms/step':>15}{'sample ms/token':>17}{'load':>7}")
    for r in rows:
        print(f"{r['config']:<14}{r['threads']:>8}{r['busy']:>6}{r['train_ms_per_step']:>15}"
              f"{r['sample_ms_per_token']:>17}{r['loadavg']:>7.1f}")


if __name__ == "__main__":
    main()
