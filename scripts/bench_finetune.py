"""Benchmark: pretrain on the embedded pydocs text, then fine-tune on 2-digit addition, fully and
with LoRA; exact match before and after, trainable share, time and memory.

    python scripts/bench_finetune.py [--out runs/bench_ft] [--pretrain-steps 1500] [--sft-steps 1000]
                                     [--lora-steps 1000] [--lora-rank 8] [--results FILE.json]

Every stage is a real `minillm` command in its own process (so peak RSS is that stage's), and a
stage whose output exists is reused (delete the folder to start over). The base model is
configs/pydocs_char.toml made 256 wide (8 heads, ~3.2M parameters) so that rank-8 LoRA on the
attention layers is under 2 % of the parameters. Exact match is scored on the 500 test problems
of the built-in add2 task, which fine-tuning never sees (it trains on the other 9500 pairs).
The results (figures and loss curves) go to --results for BENCHMARKS.md and lesson 13.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = ["configs/pydocs_char.toml", "--model.n_embd=256", "--model.n_head=8", "--train.lr=1e-3",
        "--train.min_lr=1e-4", "--train.progress=false", "--train.sample_tokens=0"]


def minillm(*args):
    env = dict(os.environ, OPENBLAS_NUM_THREADS=os.environ.get("OPENBLAS_NUM_THREADS", "1"))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "minillm", *map(str, args)], cwd=REPO, env=env,
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"minillm {' '.join(map(str, args))} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout, time.perf_counter() - t0


def exact_match(path, fmt):
    out = Path(path) / f"add2_{fmt}.json"
    if not out.exists():
        minillm("eval", path, "--task", "add2", "--format", fmt, "--out", out)
    return json.loads(out.read_text())["results"][0]["exact_match"]


def curve(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {"step": [r["step"] for r in rows], "loss": [r["loss"] for r in rows],
            "reward": [r["reward"] for r in rows if "reward" in r],
            "val_step": [r["step"] for r in rows if "val_loss" in r],
            "val_loss": [r["val_loss"] for r in rows if "val_loss" in r]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_ft")
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--sft-steps", type=int, default=1000)
    ap.add_argument("--lora-steps", type=int, default=1000)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-targets", default="attn.c_attn,attn.c_proj")
    ap.add_argument("--sft-lr", default="1e-3")
    ap.add_argument("--lora-lr", default="3e-3")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--grpo-from", type=int, default=0, help="also: SFT this many steps, then N more steps "
                    "of SFT against N steps of --grpo from there (0: skip)")
    ap.add_argument("--grpo-steps", type=int, default=200)
    ap.add_argument("--grpo-lr", default="2e-4")
    ap.add_argument("--results", default="lessons/data/finetune_results.json")
    args = ap.parse_args()
    out = (REPO / args.out).resolve()
    base = out / "base"
    results = {"machine": os.uname().nodename, "load_before": os.getloadavg()}
    if not list(base.glob("ckpt_*.h5")):
        _, results["pretrain_seconds"] = minillm("train", *BASE, f"--train.max_steps={args.pretrain_steps}",
                                                 f"--train.out_dir={base}")
    results["base_val_loss"] = curve(base)["val_loss"][-1]
    results["base_exact_match"] = exact_match(base, "plain")
    runs = {"full": (out / "sft", args.sft_steps, args.sft_lr, []),
            f"lora{args.lora_rank}": (out / f"lora{args.lora_rank}", args.lora_steps, args.lora_lr,
                                      ["--lora-rank", args.lora_rank, "--lora-targets", args.lora_targets])}
    for name, (run, steps, lr, extra) in runs.items():
        if not (run / "summary.json").exists():
            minillm("finetune", base, "--data", "add2", "--out", run, *extra, f"--train.max_steps={steps}",
                    f"--train.lr={lr}", f"--train.min_lr={float(lr) / 10}", f"--train.batch_size={args.batch_size}",
                    "--train.eval_interval=100", "--train.log_interval=20")
        summary = json.loads((run / "summary.json").read_text())
        results[name] = dict(summary, exact_match=exact_match(run, "chat"), lr=float(lr), curve=curve(run))
    if args.grpo_from:
        start = out / f"sft{args.grpo_from}"
        stages = {f"sft{args.grpo_from}": (base, start, args.grpo_from, args.sft_lr, []),
                  "then_sft": (start, out / "then_sft", args.grpo_steps, args.sft_lr, []),
                  "then_grpo": (start, out / "then_grpo", args.grpo_steps, args.grpo_lr, ["--grpo"])}
        for name, (src, run, steps, lr, extra) in stages.items():
            if not (run / "summary.json").exists():
                minillm("finetune", src, "--data", "add2", "--out", run, *extra, f"--train.max_steps={steps}",
                        f"--train.lr={lr}", f"--train.min_lr={float(lr) / 10}",
                        f"--train.batch_size={args.batch_size}", "--train.eval_interval=100", "--train.log_interval=20")
            summary = json.loads((run / "summary.json").read_text())
            results[name] = dict(summary, exact_match=exact_match(run, "chat"), lr=float(lr), from_run=src.name,
                                 curve=curve(run))
        results["rl_runs"] = list(stages)
    results["load_after"] = os.getloadavg()
    path = REPO / args.results
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"base: val loss {results['base_val_loss']:.4f}, add2 exact match {results['base_exact_match']:.3f} (plain)")
    print("| run | steps | trainable | share | exact match | seconds | optimizer state | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for name in runs:
        r = results[name]
        print(f"| {name} | {r['steps']} | {r['trainable_parameters']:,} | {100 * r['trainable_share']:.2f}% | "
              f"{100 * r['exact_match']:.1f}% | {r['seconds']:.0f} | {r['optimizer_state_mb']:.1f} MB | "
              f"{r['peak_rss_mb']:.0f} MB |")
    for name in results.get("rl_runs", []):
        r = results[name]
        print(f"{name} (from {r['from_run']}): {r['steps']} steps, lr {r['lr']:g}, exact match "
              f"{100 * r['exact_match']:.1f}%, {r['seconds']:.0f} s")
    print(f"load average before {results['load_before']}, after {results['load_after']}; wrote {path}")


if __name__ == "__main__":
    main()
