"""`minillm quantize`: write the quantized file and report its size and (optionally) quality."""
from minillm.quant import quantize_checkpoint
from minillm.train.inference import evaluate, load_model, resolve_checkpoint


def _mb(n):
    return f"{n / 2**20:.2f} MiB"


def quantize_command(path, bits, group_size=None, out=None, with_eval=False):
    ckpt = resolve_checkpoint(path)
    r = quantize_checkpoint(ckpt, bits, group_size, out)
    scheme = "int8 per output channel" if bits == 8 else f"int4, groups of {r['group_size']}"
    print(f"wrote {r['out']} ({scheme}, from {ckpt})")
    print(f"  {r['layers']} Linear layers quantized; embeddings, norms and biases stay float32")
    print(f"  weights in memory {_mb(r['float_bytes'])} -> {_mb(r['quant_bytes'])} "
          f"({r['float_bytes'] / r['quant_bytes']:.2f}x smaller); file {_mb(r['file_bytes'])} "
          f"(the checkpoint with optimizer state: {_mb(r['source_bytes'])})")
    errs = r["weight_rel_rms_error"]
    worst = max(errs, key=errs.get)
    print(f"  weight error (RMS / RMS of the weight): mean {sum(errs.values()) / len(errs):.2e}, "
          f"worst {errs[worst]:.2e} in {worst}")
    if with_eval:
        base, cfg, _ = load_model(ckpt)
        quant, _, _ = load_model(r["out"])
        a, b = evaluate(base, cfg)["loss"], evaluate(quant, cfg)["loss"]
        print(f"  val loss {a:.4f} -> {b:.4f} ({b - a:+.4f} nats, {100 * (b - a) / a:+.2f} %)")
    return r
