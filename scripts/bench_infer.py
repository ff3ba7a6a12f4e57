"""Benchmark: decoding speed against batch size and weight format, memory-bandwidth use, and the
HTTP server under a bounded load of concurrent streaming clients on loopback.

    python scripts/bench_infer.py decode [--n-layer 12 --n-embd 768 ...] [--batches 1,2,4,8,16,32]
    python scripts/bench_infer.py http RUN [--clients 1,2,4,8,16] [--max-batch 8]
    python scripts/bench_infer.py bandwidth
    (each takes --json FILE: its results go under the mode's key in FILE, e.g.
    lessons/data/inference_results.json, which lesson 14 reads)

decode: a GPT of the given shape (random weights: speed does not depend on them) decodes
``--steps`` tokens for B prompts at once through the batched generator, in float32, int8 and
int4 g32. Per step it must read every weight once plus the KV cache of every row; bytes read per
step / step time, against the machine's measured read bandwidth, is the utilisation. (The
quantized formats are counted at their stored size, what a fused dequantize-in-registers kernel
reads; NumPy materialises a float32 copy of each weight per call, so here they move more.)

http: `minillm serve RUN` in a subprocess and C client threads, each sending ``--requests``
streaming requests one after another (closed loop, so the load is bounded by C); time to first
token, time per token after it, and total tokens/s.

bandwidth: single-thread read (sum) and copy bandwidth of NumPy on a 512 MiB array.
"""
import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from minillm.infer.generate import Batch, SamplingParams, Sequence
from minillm.model import GPT, GPTConfig
from minillm.perf.allocator import tune_host_allocator
from minillm.quant import quantize_model


def measure_bandwidth(mib=512, repeat=3):
    """Read bandwidth: the faster of summing a large array and a matrix-vector product over it
    (what decoding does with each weight matrix); copy bandwidth counts read + write."""
    a = np.ones(mib * 2**20 // 4, dtype=np.float32)
    b = np.empty_like(a)
    x = np.ones(1024, dtype=np.float32)
    reads, copies = [], []
    for _ in range(repeat):
        for read in (a.sum, lambda: a.reshape(-1, 1024) @ x):
            t = time.perf_counter()
            read()
            reads.append(a.nbytes / (time.perf_counter() - t))
        t = time.perf_counter()
        np.copyto(b, a)
        copies.append(2 * a.nbytes / (time.perf_counter() - t))
    return {"read_GBps": max(reads) / 1e9, "copy_GBps": max(copies) / 1e9, "array_MiB": mib}


def weight_bytes_read(model):
    """Bytes of weights one decoding step reads: every Linear (quantized at stored size), the
    lm_head (the tied embedding), the norms; the embedding lookups read only B rows (ignored)."""
    total = sum(m.qweight.nbytes for _, m in model.named_modules() if hasattr(m, "qweight"))
    for name, p in model.named_parameters():
        if name.startswith(("transformer.wte", "transformer.wpe")):
            continue
        total += p.data.nbytes
    return total + model.lm_head.weight.data.nbytes * (model.lm_head.weight is model.transformer.wte.weight)


def decode_run(model, B, prompt_len, steps, rng):
    batch = Batch(model, B)
    seqs = [Sequence(rng.integers(0, model.config.vocab_size, prompt_len).tolist(),
                     SamplingParams(max_new_tokens=steps + 2, temperature=0)) for _ in range(B)]
    t0 = time.perf_counter()
    batch.add(seqs)
    prefill = time.perf_counter() - t0
    batch.step()  # warm-up: the first step touches this batch's buffers for the first time
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        batch.step()
        times.append(time.perf_counter() - t)
    step = statistics.median(times)
    C, L = model.config.n_embd, prompt_len + steps // 2
    kv = 2 * model.config.n_layer * B * L * C * 4          # keys + values read per step (float32)
    return {"batch": B, "prefill_s": prefill, "step_ms": 1000 * step, "tokens_per_s": B / step,
            "kv_bytes": kv, "kv_cache_MiB": batch.cache.nbytes / 2**20}


def bench_decode(args):
    tune_host_allocator()  # as the server does
    cfg = GPTConfig(vocab_size=args.vocab, block_size=args.block, n_layer=args.n_layer,
                    n_head=args.n_head, n_embd=args.n_embd)
    bw = measure_bandwidth()
    out = {"config": vars(cfg), "bandwidth": bw, "steps": args.steps, "prompt_len": args.prompt_len,
           "formats": {}}
    for fmt, bits, group in (("float32", None, None), ("int8", 8, None), ("int4 g32", 4, 32)):
        model = GPT(cfg, seed=0).eval()
        if bits:
            quantize_model(model, bits, group)
        wbytes = weight_bytes_read(model)
        rows = []
        for B in args.batches:
            r = decode_run(model, B, args.prompt_len, args.steps, np.random.default_rng(B))
            r["GBps"] = (wbytes + r["kv_bytes"]) / (r["step_ms"] / 1000) / 1e9
            r["bandwidth_util"] = r["GBps"] / bw["read_GBps"]
            rows.append(r)
            print(f"{fmt:9} B={B:3}: {r['step_ms']:8.1f} ms/step {r['tokens_per_s']:8.1f} tok/s "
                  f"{r['GBps']:6.2f} GB/s ({100 * r['bandwidth_util']:5.1f} % of read bw) "
                  f"prefill {r['prefill_s']:.2f} s", flush=True)
        out["formats"][fmt] = {"weight_bytes": wbytes, "rows": rows}
        del model
    print(f"bandwidth: read {bw['read_GBps']:.1f} GB/s, copy {bw['copy_GBps']:.1f} GB/s (one thread)")
    return out


# ---------------------------------------------------------------------------- HTTP load
def client(host, port, body, n, results):
    for _ in range(n):
        c = http.client.HTTPConnection(host, port, timeout=300)
        t0 = time.perf_counter()
        stamps = []
        try:
            c.request("POST", "/v1/stream", body=body, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            if r.status != 200:
                results.append({"status": r.status})
                r.read()
                continue
            for line in r.fp:
                if line.startswith(b"data:") and b'"token"' in line:
                    stamps.append(time.perf_counter())
        except OSError as e:  # counted, not fatal: a load generator must survive what it measures
            results.append({"status": f"{type(e).__name__}"})
            continue
        finally:
            c.close()
        gaps = np.diff(stamps)
        results.append({"status": 200, "ttft": stamps[0] - t0, "tokens": len(stamps),
                        "per_token": float(gaps.mean()) if len(gaps) else None,
                        "total": time.perf_counter() - t0})


def bench_http(args):
    proc = subprocess.Popen([sys.executable, "-m", "minillm", "serve", args.run, "--port", "0",
                             "--max-batch", str(args.max_batch), "--max-queue", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    m = re.search(r"http://([\d.]+):(\d+)/", proc.stdout.readline())
    host, port = m.group(1), int(m.group(2))
    body = json.dumps({"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0.8,
                       "seed": 0}).encode()
    rows = []
    try:
        client(host, port, body, 2, [])  # warm up
        for C in args.clients:
            results = []
            threads = [threading.Thread(target=client, args=(host, port, body, args.requests, results))
                       for _ in range(C)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            ok = [r for r in results if r["status"] == 200]
            refused = sum(r["status"] in (429, 503) for r in results)
            row = {"clients": C, "requests": len(results), "refused": refused,
                   "errors": len(results) - len(ok) - refused,
                   "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
                   "ttft_ms_median": 1000 * statistics.median(r["ttft"] for r in ok),
                   "ttft_ms_p90": 1000 * float(np.percentile([r["ttft"] for r in ok], 90)),
                   "per_token_ms_median": 1000 * statistics.median(r["per_token"] for r in ok)}
            rows.append(row)
            print(f"C={C:3}: {row['tokens_per_s']:8.1f} tok/s  TTFT median {row['ttft_ms_median']:7.1f} ms "
                  f"p90 {row['ttft_ms_p90']:7.1f} ms  per token {row['per_token_ms_median']:6.2f} ms "
                  f"({row['refused']} refused, {row['errors']} errors)", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"run": args.run, "max_batch": args.max_batch, "max_tokens": args.max_tokens,
            "requests_per_client": args.requests, "rows": rows}


def save_results(path, key, value):
    """Store ``value`` under ``key`` in the JSON file at ``path``, keeping its other keys (the
    quantization, decode and HTTP benchmarks share one results file, which lesson 14 reads)."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = dict(value, date=time.strftime("%Y-%m-%d"), load_average=list(os.getloadavg()))
    path.write_text(json.dumps(data, indent=1) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    d = sub.add_parser("decode")
    for name, default in (("n-layer", 12), ("n-head", 12), ("n-embd", 768), ("vocab", 256),
                          ("block", 256), ("steps", 16), ("prompt-len", 32)):
        d.add_argument(f"--{name}", type=int, default=default)
    d.add_argument("--batches", default="1,2,4,8,16,32")
    h = sub.add_parser("http")
    h.add_argument("run")
    h.add_argument("--clients", default="1,2,4,8,16")
    h.add_argument("--requests", type=int, default=4)
    h.add_argument("--max-batch", type=int, default=8)
    h.add_argument("--max-tokens", type=int, default=48)
    h.add_argument("--prompt", default="The ")
    sub.add_parser("bandwidth")
    for p in (d, h, sub.choices["bandwidth"]):
        p.add_argument("--json", default=None)
        p.add_argument("--key", default=None, help="key of the results in the JSON file (default: the mode)")
    args = ap.parse_args()
    if args.mode == "decode":
        args.batches = [int(x) for x in args.batches.split(",")]
        out = bench_decode(args)
    elif args.mode == "http":
        args.clients = [int(x) for x in args.clients.split(",")]
        out = bench_http(args)
    else:
        out = measure_bandwidth()
        print(out)
    if args.json:
        save_results(args.json, args.key or args.mode, out)


if __name__ == "__main__":
    main()
