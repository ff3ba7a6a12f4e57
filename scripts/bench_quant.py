"""Benchmark: quality and size of weight-only quantization (float32 vs int8 vs int4 g32/64/128).

    python scripts/bench_quant.py runs/pydocs_char runs/shakespeare_char_cpu [--iters 200] [--json FILE]

For each run's newest checkpoint and each scheme: the validation loss over the run's own fixed
evaluation batches (the trainer's, so float32 matches its logged val loss), bits per byte, the
change against float32, and the bytes of the weights in memory and of the file on disk.

Bits per byte = loss / ln 2 / (bytes per token), bytes per token measured on the run's whole val
split (UTF-8 bytes of the decoded text / tokens), so char and BPE models compare. (A small helper
here: the evaluation harness of issue 18 was not on this branch.)
"""
import argparse
import math
import tempfile
from pathlib import Path

from minillm.config import data_dir
from minillm.data import TokenDataset
from minillm.quant import quantize_checkpoint
from minillm.train.inference import evaluate, load_model, load_run_tokenizer, resolve_checkpoint

SCHEMES = [("float32", None, None), ("int8", 8, None), ("int4 g32", 4, 32), ("int4 g64", 4, 64),
           ("int4 g128", 4, 128)]


def bytes_per_token(cfg, tokenizer):
    tokens = TokenDataset(data_dir(cfg), "val").tokens
    return len(tokenizer.decode([int(t) for t in tokens]).encode("utf-8")) / len(tokens)


def weight_bytes(model):
    """Bytes of every tensor the model computes with: float parameters + quantized weights."""
    total = sum(p.data.nbytes for _, p in model.named_parameters())
    return total + sum(m.qweight.nbytes for _, m in model.named_modules() if hasattr(m, "qweight"))


def bench_run(run, iters):
    ckpt = resolve_checkpoint(run)
    base, cfg, _ = load_model(ckpt)
    bpt = bytes_per_token(cfg, load_run_tokenizer(ckpt, cfg))
    iters = iters or cfg.train.eval_iters
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, bits, group in SCHEMES:
            if bits is None:
                model, path = base, ckpt
                file_bytes = None  # a training checkpoint also holds optimizer state
            else:
                path = quantize_checkpoint(ckpt, bits, group, Path(tmp) / f"{bits}_{group}.h5")["out"]
                model, _, _ = load_model(path)
                file_bytes = path.stat().st_size
            loss = evaluate(model, cfg, iters)["loss"]
            rows.append({"scheme": name, "val_loss": loss, "bpb": loss / math.log(2) / bpt,
                         "weight_bytes": weight_bytes(model), "file_bytes": file_bytes})
    f32 = rows[0]
    for r in rows:
        r["delta_nats"] = r["val_loss"] - f32["val_loss"]
        r["delta_pct"] = 100 * r["delta_nats"] / f32["val_loss"]
        r["size_ratio"] = f32["weight_bytes"] / r["weight_bytes"]
    return {"run": str(run), "checkpoint": str(ckpt), "params": base.num_parameters(),
            "eval_tokens": iters * cfg.train.batch_size * cfg.model.block_size,
            "bytes_per_token": bpt, "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories (or checkpoints)")
    ap.add_argument("--iters", type=int, default=None, help="eval batches (default: the run's eval_iters)")
    ap.add_argument("--json", default=None, help="also store the results under 'quant' in this JSON file")
    args = ap.parse_args()
    results = [bench_run(r, args.iters) for r in args.runs]
    for res in results:
        print(f"\n{res['run']} ({res['params']:,} parameters, {res['eval_tokens']:,} val tokens, "
              f"{res['bytes_per_token']:.4f} bytes/token)")
        print("| scheme | val loss | bits/byte | change | weights | file |")
        print("|---|---|---|---|---|---|")
        for r in res["rows"]:
            change = ("-" if r["scheme"] == "float32" else
                      f"{r['delta_nats']:+.4f} nats ({r['delta_pct']:+.2f} %)")
            file = "-" if r["file_bytes"] is None else f"{r['file_bytes'] / 2**20:.2f} MiB"
            print(f"| {r['scheme']} | {r['val_loss']:.4f} | {r['bpb']:.4f} | {change} | "
                  f"{r['weight_bytes'] / 2**20:.2f} MiB ({r['size_ratio']:.2f}x) | {file} |")
    if args.json:
        from bench_infer import save_results  # scripts/ is on sys.path when run as a script
        save_results(args.json, "quant", {"runs": results})


if __name__ == "__main__":
    main()
