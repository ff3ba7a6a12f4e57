"""Scaling study: train a ladder of GPT sizes on the pydocs corpus at several fixed compute
budgets and record the final validation loss of each run (the data of lesson 15).

    flock /tmp/minillm-bench.lock python scripts/scaling_study.py            # every run, ~30 min
    python scripts/scaling_study.py --resume        # only the runs the result file lacks
    python scripts/scaling_study.py --only s0@3e10 --out /tmp/one.json      # one run, seconds

A run of size N (weights that multiply activations) at budget C trains on D = C / F(N) tokens,
where F(N) = 6N + 12 L T C is minillm's count of training FLOPs per token
(``minillm.perf.flops.flops_per_token``), so every run of one budget costs the same FLOPs:
small models see many tokens, big ones few. Everything else is fixed: character tokens, context
64, batch 16 x 64 tokens, AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.1), warm-up over the
first 5% of steps and a cosine decay to lr/10 that ends with the run (a schedule sized to each
run's own length, as in the Chinchilla study). The loss of a run is the mean cross-entropy over
1,024 fixed validation windows of the held-out last 10% of the text.

Each budget trains five or six sizes of the ladder around its optimum (which moves up about one
rung for every 3x of compute), so each budget draws a U: too small a model cannot use its tokens,
too large a one sees too few. The result file (JSON, a few KB) holds one record per run plus the
machine, versions and load average; it is written after every run, and ``--resume`` keeps the
runs it already holds (matched by layers, width, heads and budget) and trains only the others.
Deterministic: a rerun on the same machine and versions gives the same losses bit for bit.
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a checkout without pip install

import numpy as np  # noqa: E402

from minillm import backend, no_grad  # noqa: E402
from minillm.data import BatchSampler, CharTokenizer, load_source  # noqa: E402
from minillm.model import GPT, GPTConfig  # noqa: E402
from minillm.optim import AdamW, clip_grad_norm  # noqa: E402
from minillm.optim.schedules import cosine_lr  # noqa: E402
from minillm.perf.flops import flops_per_token, matmul_params  # noqa: E402

# The ladder: (n_layer, n_embd, n_head), each rung 1.7x to 3.4x the weights of the one before.
SIZES = {"s0": (1, 8, 2), "s1": (1, 16, 2), "s2": (2, 24, 2), "s3": (2, 32, 2), "s4": (3, 48, 3),
         "s5": (3, 64, 4), "s6": (4, 80, 4), "s7": (4, 112, 4), "s8": (5, 144, 4)}
# budget (FLOPs) -> the sizes trained at it: a window of the ladder around the optimum
BUDGETS = {3e10: ["s0", "s1", "s2", "s3", "s4"],
           1e11: ["s0", "s1", "s2", "s3", "s4", "s5"],
           3e11: ["s1", "s2", "s3", "s4", "s5", "s6"],
           1e12: ["s2", "s3", "s4", "s5", "s6", "s7"],
           3e12: ["s3", "s4", "s5", "s6", "s7", "s8"]}
BLOCK, BATCH, LR, SEED, EVAL_BATCHES = 64, 16, 3e-3, 0, 32
DEFAULT_OUT = REPO / "lessons" / "data" / "scaling_results.json"


def corpus():
    """Train and validation token streams of pydocs (characters, the last 10% held out)."""
    text = load_source("pydocs")
    tok = CharTokenizer.train(text)
    ids = np.asarray(tok.encode(text), dtype=np.uint16)
    n_train = int(0.9 * len(ids))
    return ids[:n_train], ids[n_train:], tok.vocab_size


def model_config(size, vocab_size):
    n_layer, n_embd, n_head = SIZES[size]
    return GPTConfig(vocab_size=vocab_size, block_size=BLOCK, n_layer=n_layer, n_head=n_head,
                     n_embd=n_embd, dropout=0.0)


def train_run(size, budget, train_ids, val_ids, vocab_size):
    """Train ``size`` for ``budget`` FLOPs; returns the run's record (a dict of plain numbers)."""
    cfg = model_config(size, vocab_size)
    model = GPT(cfg, seed=SEED)
    n = matmul_params(model)
    fpt = flops_per_token(cfg, n)
    tokens_per_step = BATCH * BLOCK
    steps = max(1, round(budget / (fpt * tokens_per_step)))
    warmup = max(1, steps // 20)
    opt = AdamW(model.named_parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    sampler = BatchSampler(train_ids, BLOCK, BATCH, seed=SEED)
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        x, y = sampler.get_batch(step)
        _, loss = model(backend.asarray(x), backend.asarray(y))
        loss.backward()
        clip_grad_norm(opt.params, 1.0)
        opt.step(lr=cosine_lr(step, LR, LR / 10, warmup, steps))
        opt.zero_grad()
        losses.append(float(loss.data))
    seconds = time.perf_counter() - t0
    val = BatchSampler(val_ids, BLOCK, 2 * BATCH, seed=SEED)
    with no_grad():
        val_loss = float(np.mean([float(model(*map(backend.asarray, val.eval_batch(i)))[1].data)
                                  for i in range(EVAL_BATCHES)]))
    tokens = steps * tokens_per_step
    # the training curve, for plotting loss against FLOPs: mean training loss over 24 equal
    # stretches of the run, at the token count where each stretch ends
    edges = np.linspace(0, steps, min(24, steps) + 1).round().astype(int)
    curve = [[int(b) * tokens_per_step, float(np.mean(losses[a:b]))]
             for a, b in zip(edges[:-1], edges[1:]) if b > a]
    return {"size": size, "budget": budget, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
            "n_head": cfg.n_head, "params": model.num_parameters(), "matmul_params": n,
            "flops_per_token": fpt, "steps": steps, "tokens": tokens,
            "flops": fpt * tokens, "epochs": tokens / len(train_ids),
            "train_loss": float(np.mean(losses[-max(1, steps // 20):])), "val_loss": val_loss,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "curve": curve}


def _key(n_layer, n_embd, n_head, budget):
    return n_layer, n_embd, n_head, float(budget)


def plan(only=None):
    """[(size, budget)] in the order they run: cheapest budget first."""
    runs = [(s, b) for b in sorted(BUDGETS) for s in BUDGETS[b]]
    if only:
        size, budget = only.split("@")
        if size not in SIZES:
            raise SystemExit(f"error: unknown size {size!r}; choose one of {', '.join(SIZES)}")
        runs = [(size, float(budget))]
    return runs


def write(result, path):
    """JSON with one line per run (a readable, diffable file of a few KB)."""
    head = json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1)[:-2]
    runs = ",\n  ".join(json.dumps(r) for r in result["runs"])
    path.write_text(f'{head},\n "runs": [\n  {runs}\n ]\n}}\n')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result file (JSON)")
    ap.add_argument("--only", metavar="SIZE@BUDGET", help="one run, e.g. s0@3e10")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs --out already holds, train only the missing ones")
    args = ap.parse_args(argv)
    train_ids, val_ids, vocab_size = corpus()
    result = {"study": "iso-FLOP ladder on pydocs (characters)",
              "command": "python scripts/scaling_study.py" + (f" --only {args.only}" if args.only else ""),
              "date": datetime.date.today().isoformat(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
              "python": platform.python_version(), "numpy": np.__version__,
              "corpus": {"source": "pydocs", "tokenizer": "char", "vocab_size": vocab_size,
                         "train_tokens": len(train_ids), "val_tokens": len(val_ids)},
              "setup": {"block_size": BLOCK, "batch_size": BATCH, "lr": LR, "min_lr": LR / 10,
                        "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip": 1.0,
                        "warmup": "5% of steps", "schedule": "cosine", "seed": SEED,
                        "eval_windows": EVAL_BATCHES * 2 * BATCH},
              "load_average_start": os.getloadavg(), "runs": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if args.resume and args.out.exists():
        old = json.loads(args.out.read_text())
        if any(old[k] != result[k] for k in ("setup", "corpus", "python", "numpy")):
            raise SystemExit(f"error: {args.out} was made with another setup, corpus, Python or "
                             "NumPy; drop --resume to start over")
        done = {_key(r["n_layer"], r["n_embd"], r["n_head"], r["budget"]): r for r in old["runs"]}
        for k in ("date", "load_average_start", "load_average_end"):
            if k in old:
                result[k] = old[k]
        result["resumed"] = datetime.date.today().isoformat()
    for size, budget in plan(args.only):
        r = done.get(_key(*SIZES[size], budget))
        if r is not None:
            result["runs"].append(dict(r, size=size))  # the ladder's current name for it
            write(result, args.out)
            continue
        r = train_run(size, budget, train_ids, val_ids, vocab_size)
        result["runs"].append(r)
        result["load_average_end"] = os.getloadavg()
        write(result, args.out)
        print(f"{size}@{budget:.0e}: N={r['matmul_params']:>9,} D={r['tokens']:>10,} "
              f"({r['epochs']:.1f} epochs) val {r['val_loss']:.4f}  {r['seconds']:.0f}s "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
