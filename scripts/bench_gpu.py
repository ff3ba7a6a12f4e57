"""GPT-2-small-shaped training step on the GPU: minillm (CuPy) next to PyTorch eager, fp32 and fp16.

    python scripts/bench_gpu.py [--batch 8] [--steps 10] [--out bench_gpu.json]

Random token ids (no dataset needed); AdamW; the fp16 rows use minillm's mixed precision
(fp32 master weights, dynamic loss scaling) and torch.autocast + GradScaler. Prints a table last.
"""
import argparse
import json
import time
from types import SimpleNamespace

import numpy


def bench_minillm(cfg, dtype, batch, steps, warmup):
    from minillm import backend
    backend.set_device("gpu")
    from minillm.amp import make_precision
    from minillm.model import GPT
    from minillm.optim import AdamW, clip_grad_norm
    model = GPT(cfg, seed=0)
    train_cfg = SimpleNamespace(dtype=dtype, loss_scale_init=2.0 ** 16, loss_scale_growth_interval=2000)
    prec = make_precision(train_cfg, list(model.named_parameters()))
    opt = AdamW(prec.master_params, lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    rng = numpy.random.default_rng(0)
    times = []
    for i in range(warmup + steps):
        x = backend.asarray(rng.integers(0, cfg.vocab_size, (batch, cfg.block_size)))
        y = backend.asarray(rng.integers(0, cfg.vocab_size, (batch, cfg.block_size)))
        backend.synchronize()
        t0 = time.perf_counter()
        prec.master_to_model()
        _, loss = model(x, y)
        prec.scale_loss(loss).backward()
        found_inf = prec.grads_to_master()
        clip_grad_norm([p for _, p in prec.master_params], 1.0)
        if not found_inf:
            opt.step()
        prec.update(found_inf)
        opt.zero_grad()
        model.zero_grad()
        backend.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return batch * cfg.block_size / float(numpy.median(times)), float(loss.data)


def bench_torch(cfg, dtype, batch, steps, warmup):
    try:
        import torch
    except ImportError:
        return None, None
    from minillm.reference.torch_gpt import TorchGPT
    model = TorchGPT(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")
    times = []
    for i in range(warmup + steps):
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device="cuda")
        y = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16, enabled=dtype == "float16"):
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
    return batch * cfg.block_size / float(numpy.median(times)), float(loss)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default="bench_gpu.json")
    args = ap.parse_args()
    from minillm.model import GPTConfig
    cfg = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    rows = []
    for dtype in ("float32", "float16"):
        ours, our_loss = bench_minillm(cfg, dtype, args.batch, args.steps, args.warmup)
        ref, ref_loss = bench_torch(cfg, dtype, args.batch, args.steps, args.warmup)
        rows.append({"dtype": dtype, "minillm_tok_s": ours, "torch_tok_s": ref,
                     "ratio": ours / ref if ref else None, "minillm_loss": our_loss, "torch_loss": ref_loss})
        print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"config": "gpt2-small shape 12x768, block 1024, vocab 50304", "batch": args.batch,
                   "rows": rows}, f, indent=1)
    print(f"\n{'dtype':10}{'minillm tok/s':>16}{'pytorch tok/s':>16}{'ratio':>8}")
    for r in rows:
        ref = f"{r['torch_tok_s']:,.0f}" if r["torch_tok_s"] else "-"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
        print(f"{r['dtype']:10}{r['minillm_tok_s']:>16,.0f}{ref:>16}{ratio:>8}")


if __name__ == "__main__":
    main()
