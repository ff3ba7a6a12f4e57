"""Quantized model files: write one from a training checkpoint, read it back as a runnable GPT.

A quantized file is a minillm HDF5 checkpoint (same writer: atomic, checksummed) holding

    meta/       kind = "quantized", bits, group_size, source (absolute path of the checkpoint it
                was made from) and that checkpoint's step
    config/     the source's full config (model shape, data, tokenizer location)
    model/      the float tensors, under their GPT-2 names: embeddings, norms, biases
    quantized/  per quantized Linear weight (``transformer.h.0.attn.c_attn.weight``): its codes
                (int8 ``codes`` or uint8 ``packed``) next to its ``scale``

so ``minillm inspect`` reads it, and ``load_model`` (sample / eval / serve) accepts it wherever a
checkpoint is accepted.
"""
from pathlib import Path

import numpy

from minillm import backend
from minillm.checkpoint import load_checkpoint, open_checkpoint, save_checkpoint
from minillm.errors import UserError
from minillm.quant.formats import check_bits, check_group_size, weight_from_arrays
from minillm.quant.linear import quantizable_layers, quantize_model

KIND = "quantized"


def file_kind(path):
    """"quantized" for a quantized model file, "checkpoint" for anything else that opens."""
    with open_checkpoint(path) as f:
        return KIND if "quantized" in f else "checkpoint"


def default_out_path(ckpt, bits, group_size):
    """ckpt_0001500.h5 -> ckpt_0001500.int8.h5 / ckpt_0001500.int4-g32.h5 (next to it; the run's
    checkpoint discovery ignores these names)."""
    ckpt = Path(ckpt)
    tag = "int8" if bits == 8 else f"int4-g{group_size}"
    return ckpt.with_name(f"{ckpt.stem}.{tag}.h5")


def _load_source(ckpt):
    state = load_checkpoint(ckpt, exclude=("optimizer",))
    if "quantized" in state:
        meta = state.get("meta", {})
        raise UserError(f"{ckpt} is already quantized ({meta.get('bits')} bits); quantize the "
                        f"float checkpoint it was made from: {meta.get('source')}")
    if not isinstance(state.get("model"), dict) or not isinstance(state.get("config"), dict):
        raise UserError(f"{ckpt} is not a model checkpoint (it has no model/ and config/ groups); "
                        f"pass a ckpt_XXXXXXX.h5 written by minillm train")
    return state


def _build(state):
    """An untrained GPT of the file's config (its weights are then loaded)."""
    from minillm.config import config_from_dict
    from minillm.model import GPT
    cfg = config_from_dict(state["config"])
    model = GPT(cfg.model, seed=cfg.train.seed)
    return model, cfg


def quantize_checkpoint(ckpt, bits, group_size=None, out=None):
    """Quantize checkpoint ``ckpt`` and write the quantized file; returns a report dict."""
    from minillm.nn.module import load_params
    check_bits(bits)
    if bits == 8 and group_size is not None:
        raise UserError("--group-size applies to --bits 4 only (int8 has one scale per output row)")
    if bits == 4:
        group_size = 32 if group_size is None else group_size
        check_group_size(group_size)
    state = _load_source(ckpt)
    model, cfg = _build(state)
    load_params(list(model.named_parameters()), state["model"], f"checkpoint {ckpt}")
    float_weights = {n: backend.to_numpy(p.data) for n, p in model.named_parameters()}
    layers = quantize_model(model, bits, group_size)
    out = Path(out) if out else default_out_path(ckpt, bits, group_size)
    save_checkpoint(out, {
        "meta": {"kind": KIND, "bits": bits, "group_size": group_size,
                 "source": str(Path(ckpt).resolve()), "source_step": state.get("meta", {}).get("step")},
        "config": state["config"],
        "model": {n: p.data for n, p in model.named_parameters()},
        "quantized": {f"{n}.weight": q.qweight.arrays() for n, q in layers.items()},
    })
    errors = {}
    for n, q in layers.items():  # relative RMS error of each dequantized weight
        w = float_weights[f"{n}.weight"].astype(numpy.float64)
        d = backend.to_numpy(q.qweight.dequantize()).astype(numpy.float64) - w
        errors[n] = float(numpy.sqrt((d ** 2).mean() / max((w ** 2).mean(), 1e-30)))
    float_bytes = sum(a.nbytes for a in float_weights.values())
    kept = sum(p.data.nbytes for _, p in model.named_parameters())
    return {"out": out, "bits": bits, "group_size": group_size, "layers": len(layers),
            "float_bytes": float_bytes, "quant_bytes": kept + sum(q.qweight.nbytes for q in layers.values()),
            "file_bytes": out.stat().st_size, "source_bytes": Path(ckpt).stat().st_size,
            "weight_rel_rms_error": errors, "config": cfg}


def load_quantized(path):
    """(model in eval mode with QuantLinear layers, Config) from a quantized file."""
    from minillm.nn.module import load_params
    state = load_checkpoint(path)
    if "quantized" not in state:
        raise UserError(f"{path} is not a quantized model file; make one with minillm quantize")
    meta = state["meta"]
    model, cfg = _build(state)
    weights = {name[:-len(".weight")]: backend_arrays(a, meta["bits"], meta.get("group_size"))
               for name, a in state["quantized"].items()}
    missing = sorted(set(n for *_, n in quantizable_layers(model)) - set(weights))
    if missing:
        raise UserError(f"{path} has no quantized weight for layer {missing[0]}; it was written for "
                        f"a different model")
    quantize_model(model, meta["bits"], meta.get("group_size"), weights=weights)
    load_params(list(model.named_parameters()), state["model"], f"quantized file {path}")
    return model.eval(), cfg


def backend_arrays(arrays, bits, group_size):
    return weight_from_arrays({k: backend.asarray(v) for k, v in arrays.items()}, bits, group_size)


def quantized_source(path):
    """The source checkpoint a quantized file names (for finding its tokenizer), else None."""
    with open_checkpoint(path) as f:
        if "quantized" not in f:
            return None
    return load_checkpoint(path, exclude=("model", "quantized", "config"))["meta"].get("source")
