"""`minillm bench`: where the time of a training step goes, and how it compares with PyTorch.

For one config it times forward, backward and the optimizer (clip + AdamW) separately, reports
tokens/s, MFU against the matmul peak measured on this machine at the same thread count, and
the peak memory Python's allocator saw during a step. With ``--torch`` (PyTorch installed; it is
never a dependency) the same model, batch and optimizer run in PyTorch eager in the same process,
and each line gets a minillm/PyTorch ratio (< 1 means minillm is faster).

Threads: BLAS reads its thread count when NumPy is imported, so ``--threads N`` re-runs the
benchmark in a child process with OPENBLAS_NUM_THREADS=N (and PyTorch set to N threads).
"""
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc

import numpy

from minillm import backend
from minillm.perf.allocator import tune_host_allocator

_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _median_ms(xs):
    return 1000 * statistics.median(xs)


def _batches(cfg, n):
    from minillm.config import data_dir
    from minillm.data import BatchSampler, TokenDataset, ensure_dataset
    d = cfg.data
    ensure_dataset(d.source, data_dir(cfg), d.tokenizer, d.vocab_size or None, d.val_fraction)
    ds = TokenDataset(data_dir(cfg), "train")
    s = BatchSampler(ds.tokens, cfg.model.block_size, cfg.train.batch_size, cfg.train.seed)
    return [s.get_batch(i) for i in range(n)], ds.vocab_size


def bench_minillm(cfg, batches, steps):
    from minillm.model import GPT
    from minillm.optim import AdamW, clip_grad_norm
    from minillm.perf.flops import flops_per_token, matmul_params
    t = cfg.train
    model = GPT(cfg.model, seed=t.seed)
    opt = AdamW(model.named_parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                weight_decay=t.weight_decay)
    params = model.parameters()
    fwd, bwd, optim = [], [], []
    for i, (x, y) in enumerate(batches):
        x, y = backend.asarray(x), backend.asarray(y)
        t0 = time.perf_counter()
        _, loss = model(x, y)
        backend.synchronize()
        t1 = time.perf_counter()
        loss.backward()
        backend.synchronize()
        t2 = time.perf_counter()
        clip_grad_norm(params, t.grad_clip)
        opt.step()
        opt.zero_grad()
        backend.synchronize()
        t3 = time.perf_counter()
        if i >= len(batches) - steps:
            fwd.append(t1 - t0), bwd.append(t2 - t1), optim.append(t3 - t2)
    peak = None
    if not backend.is_gpu():  # NumPy reports its allocations to tracemalloc
        tracemalloc.start()
        _, loss = model(backend.asarray(batches[0][0]), backend.asarray(batches[0][1]))
        loss.backward()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        opt.zero_grad()
    return {"forward_ms": _median_ms(fwd), "backward_ms": _median_ms(bwd),
            "optimizer_ms": _median_ms(optim),
            "step_ms": _median_ms([a + b + c for a, b, c in zip(fwd, bwd, optim)]),
            "params": model.num_parameters(), "peak_mb": peak,
            "flops_per_token": flops_per_token(cfg.model, matmul_params(model))}


def bench_torch(cfg, batches, steps, threads):
    try:
        import torch
    except ImportError:
        return None
    from minillm.reference.torch_gpt import TorchGPT
    if threads:
        torch.set_num_threads(threads)
    t = cfg.train
    torch.manual_seed(t.seed)
    model = TorchGPT(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                            weight_decay=t.weight_decay)
    fwd, bwd, optim = [], [], []
    for i, (x, y) in enumerate(batches):
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        t0 = time.perf_counter()
        _, loss = model(x, y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if i >= len(batches) - steps:
            fwd.append(t1 - t0), bwd.append(t2 - t1), optim.append(t3 - t2)
    return {"forward_ms": _median_ms(fwd), "backward_ms": _median_ms(bwd),
            "optimizer_ms": _median_ms(optim),
            "step_ms": _median_ms([a + b + c for a, b, c in zip(fwd, bwd, optim)]),
            "version": torch.__version__, "threads": torch.get_num_threads()}


def measure(config=None, overrides=(), steps=10, warmup=3, with_torch=False, threads=None):
    """All figures for one config as a dict (in this process, with its current thread count)."""
    import dataclasses

    from minillm.config import load_config
    from minillm.perf.flops import measure_matmul_peak
    from minillm.train.trainer import resolve_vocab
    cfg = load_config(config, overrides)
    backend.set_device(backend.resolve_device(config=cfg.train.device)[0])
    batches, vocab = _batches(cfg, steps + warmup)
    cfg = resolve_vocab(cfg, {"vocab_size": vocab})
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.0))
    peak = measure_matmul_peak()
    ours = bench_minillm(cfg, batches, steps)
    tokens = cfg.train.batch_size * cfg.model.block_size
    ours["tokens_per_s"] = tokens / (ours["step_ms"] / 1000)
    ours["mfu"] = ours["flops_per_token"] * ours["tokens_per_s"] / peak
    ref = bench_torch(cfg, batches, steps, threads) if with_torch else None
    if ref:
        ref["tokens_per_s"] = tokens / (ref["step_ms"] / 1000)
        ref["mfu"] = ours["flops_per_token"] * ref["tokens_per_s"] / peak
    return {"config": config or "(defaults)", "overrides": list(overrides),
            "threads": int(threads or os.environ.get("OPENBLAS_NUM_THREADS") or os.cpu_count()),
            "device": backend.device(), "batch": cfg.train.batch_size,
            "block": cfg.model.block_size, "matmul_peak_gflops": peak / 1e9,
            "minillm": ours, "torch": ref, "numpy": numpy.__version__}


def format_table(r):
    ours, ref = r["minillm"], r["torch"]
    lines = [f"config {r['config']} {' '.join(r['overrides'])} | {ours['params'] / 1e6:.2f}M params | "
             f"batch {r['batch']}x{r['block']} | threads {r['threads']} | device {r['device']} | "
             f"matmul peak {r['matmul_peak_gflops']:.0f} GFLOP/s",
             f"{'':14}{'minillm':>12}{'pytorch':>12}{'ratio':>8}"]
    for key, label in (("forward_ms", "forward ms"), ("backward_ms", "backward ms"),
                       ("optimizer_ms", "optimizer ms"), ("step_ms", "step ms"),
                       ("tokens_per_s", "tokens/s"), ("mfu", "MFU")):
        a = ours[key]
        b = ref[key] if ref else None
        fa = f"{100 * a:.1f}%" if key == "mfu" else f"{a:,.1f}"
        fb = "-" if b is None else (f"{100 * b:.1f}%" if key == "mfu" else f"{b:,.1f}")
        ratio = "-" if b is None else f"{(a / b if key.endswith('_ms') else b / a):.2f}"
        lines.append(f"{label:14}{fa:>12}{fb:>12}{ratio:>8}")
    if ours["peak_mb"] is not None:
        lines.append(f"peak memory during a step (minillm, tracemalloc): {ours['peak_mb']:.1f} MB")
    lines.append("ratio = minillm time / PyTorch time (< 1: minillm faster)" if ref else
                 "(install torch to compare: pip install torch)")
    return "\n".join(lines)


def run_bench(config=None, overrides=(), steps=10, with_torch=False, threads=None, as_json=False):
    """Measure and print; with ``threads`` set, in a child process pinned to that many threads."""
    if threads and os.environ.get("OPENBLAS_NUM_THREADS") != str(threads):
        env = dict(os.environ, **{v: str(threads) for v in _THREAD_VARS})
        cmd = [sys.executable, "-m", "minillm", "bench"] + ([config] if config else []) + \
            list(overrides) + ["--steps", str(steps), "--threads", str(threads), "--json"] + \
            (["--torch"] if with_torch else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            sys.stderr.write(out.stderr)
            raise SystemExit(out.returncode)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    else:
        tune_host_allocator()  # as the trainer does, so the step is timed as training runs it
        result = measure(config, overrides, steps, with_torch=with_torch, threads=threads)
    print(json.dumps(result) if as_json else format_table(result), flush=True)
    return result
