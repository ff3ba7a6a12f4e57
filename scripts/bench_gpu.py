"""A GPT-2-small-shaped training step on the GPU: minillm (CuPy) next to PyTorch eager.

    python scripts/bench_gpu.py [--batch 8] [--steps 10] [--dtypes float32,bfloat16,float16]
                                [--out bench_gpu.json] [--dry-run]

12 layers, 768 wide, 12 heads, block 1024, vocab 50304; random token ids (no dataset); one full
optimizer step each (forward, backward, mixed-precision bookkeeping, clipping, AdamW) as the
trainer does it. PyTorch runs the same model (``minillm/reference/torch_gpt.py``) in eager mode
with torch.autocast + GradScaler for the 16-bit rows. Reported per row: tokens/s (median step),
MFU against the GPU's datasheet peak for that dtype (dense tensor-core FLOPS for 16-bit, plain
FP32 for float32: neither side uses TF32), and the peak device memory of a step (CuPy's memory
pool high-water mark, torch.cuda.max_memory_allocated). Prints a table last, writes JSON.

``--dry-run`` checks the script itself without a GPU: a tiny model, one step, on whatever CuPy
imports (the tests' fake, on the CPU), PyTorch only if installed; the figures mean nothing.
"""
import argparse
import json
import statistics
import time
import types

import numpy

# Datasheet peaks, FLOP/s: (dense 16-bit tensor core, FP32 without TF32), by a name substring
PEAKS = {"H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12),
         "L40S": (362e12, 91.6e12), "L4": (121e12, 30.3e12), "A10": (125e12, 31.2e12)}


def gpu_name():
    from minillm import backend
    cp = backend.array_module()
    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def peak_flops(name, dtype):
    for key, (half, fp32) in PEAKS.items():
        if key in name:
            return fp32 if dtype == "float32" else half
    return None


def bench_minillm(cfg, dtype, batch, steps, warmup):
    """(median step seconds, last loss, peak bytes) of minillm's step on the GPU."""
    from minillm import backend
    from minillm.amp import make_precision
    from minillm.model import GPT
    from minillm.optim import AdamW, clip_grad_norm_device
    cp = backend.array_module()
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    model = GPT(cfg, seed=0)
    train_cfg = types.SimpleNamespace(dtype=dtype, loss_scale_init=2.0 ** 16, loss_scale_growth_interval=2000)
    prec = make_precision(train_cfg, list(model.named_parameters()))
    opt = AdamW(prec.master_params, lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    masters = [p for _, p in prec.master_params]
    rng = numpy.random.default_rng(0)
    times, loss = [], None
    for i in range(warmup + steps):
        x = backend.asarray(rng.integers(0, cfg.vocab_size, (batch, cfg.block_size)))
        y = backend.asarray(rng.integers(0, cfg.vocab_size, (batch, cfg.block_size)))
        backend.synchronize()
        t0 = time.perf_counter()
        _, loss = model(x, y)
        prec.scale_loss(loss).backward()
        found_inf = prec.grads_to_master()
        clip_grad_norm_device(masters, 1.0)
        if not found_inf:
            opt.step()
            prec.master_to_model()
        prec.update(found_inf)
        opt.zero_grad()
        model.zero_grad()
        backend.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), backend.fetch(loss.data)[0], pool.total_bytes()


def bench_torch(cfg, dtype, batch, steps, warmup):
    """The same step in PyTorch eager, or None when PyTorch (with CUDA) is not there."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    from minillm.reference.torch_gpt import TorchGPT
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.cuda.reset_peak_memory_stats()
    model = TorchGPT(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    half = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")
    times, loss = [], None
    for i in range(warmup + steps):
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device="cuda")
        y = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=half or torch.float32, enabled=half is not None):
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated()
    del model, opt
    torch.cuda.empty_cache()
    return statistics.median(times), float(loss), peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--out", default="bench_gpu.json")
    ap.add_argument("--dry-run", action="store_true", help="tiny model, one step (checks the script)")
    args = ap.parse_args()
    from minillm import backend
    from minillm.model import GPTConfig
    from minillm.perf.flops import flops_per_token
    backend.set_device("gpu")
    if args.dry_run:
        cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)
        args.batch, args.steps, args.warmup = 2, 1, 0
    else:
        cfg = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    from minillm.model import GPT
    from minillm.perf.flops import matmul_params
    fpt = flops_per_token(cfg, matmul_params(GPT(cfg, seed=0)))
    tokens = args.batch * cfg.block_size
    name = gpu_name()
    rows = []
    for dtype in args.dtypes.split(","):
        row = {"dtype": dtype}
        for who, fn in (("minillm", bench_minillm), ("torch", bench_torch)):
            got = fn(cfg, dtype, args.batch, args.steps, args.warmup)
            if got is None:
                continue
            seconds, loss, peak_bytes = got
            peak = peak_flops(name, dtype)
            row[who] = {"tokens_per_s": tokens / seconds, "step_ms": 1000 * seconds, "loss": loss,
                        "mfu": fpt * tokens / seconds / peak if peak else None,
                        "peak_mem_gb": peak_bytes / 2 ** 30}
        if "torch" in row:
            row["ratio"] = row["minillm"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"gpu": name, "config": f"{cfg.n_layer}x{cfg.n_embd}, block {cfg.block_size}, "
              f"vocab {cfg.vocab_size}", "batch": args.batch, "steps": args.steps, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(format_table(result))


def format_table(result) -> str:
    def cell(side, key, fmt):
        v = side.get(key) if side else None
        return "-" if v is None else format(v, fmt)
    lines = [f"GPT-2-small-shaped step ({result['config']}, batch {result['batch']}) on {result['gpu']}",
             f"{'dtype':10}{'minillm tok/s':>15}{'MFU':>7}{'mem GB':>8}{'torch tok/s':>13}{'MFU':>7}"
             f"{'mem GB':>8}{'ratio':>7}"]
    for r in result["rows"]:
        m, t = r.get("minillm"), r.get("torch")
        mfu = (lambda s: "-" if not s or s["mfu"] is None else f"{100 * s['mfu']:.1f}%")
        lines.append(f"{r['dtype']:10}{cell(m, 'tokens_per_s', ',.0f'):>15}{mfu(m):>7}"
                     f"{cell(m, 'peak_mem_gb', '.1f'):>8}{cell(t, 'tokens_per_s', ',.0f'):>13}{mfu(t):>7}"
                     f"{cell(t, 'peak_mem_gb', '.1f'):>8}{cell(r, 'ratio', '.2f'):>7}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
