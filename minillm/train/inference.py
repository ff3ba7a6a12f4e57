"""Using a trained model: load it from a run directory or checkpoint, evaluate it, sample from it."""
import math
from pathlib import Path

import numpy

from minillm import backend
from minillm.checkpoint import find_latest_checkpoint, load_checkpoint
from minillm.config import config_from_dict, data_dir
from minillm.data import BatchSampler, TokenDataset, load_tokenizer
from minillm.errors import UserError
from minillm.model import GPT
from minillm.nn.module import load_params


def resolve_checkpoint(path):
    """A checkpoint file, or the newest valid one in a run directory."""
    p = Path(path)
    if p.is_dir():
        found = find_latest_checkpoint(p)
        if found is None:
            raise UserError(f"no checkpoint in {p}; train first (minillm train ... "
                            f"--train.out_dir={p}) or pass a .h5 file")
        return found
    if not p.exists():
        raise UserError(f"{p}: no such run directory or checkpoint file")
    return p


def load_model(path, device=None):
    """(model in eval mode, Config, checkpoint path) from a run dir or checkpoint, on ``device``
    (the command line's), else the run config's ``train.device``, else MINILLM_DEVICE, else the
    CPU. Tensors are copied to the device one at a time, so the GPU never holds two copies."""
    ckpt = resolve_checkpoint(path)
    from minillm.quant import file_kind, load_quantized
    if file_kind(ckpt) == "quantized":  # made by `minillm quantize`: QuantLinear layers
        backend.set_device(backend.resolve_device(device)[0])
        model, cfg = load_quantized(ckpt)
        return model, cfg, ckpt
    state = load_checkpoint(ckpt, exclude=("optimizer",))  # host (numpy) arrays only
    if not isinstance(state.get("model"), dict) or not isinstance(state.get("config"), dict):
        raise UserError(f"{ckpt} is not a model checkpoint (no model/ and config/ groups); "
                        f"pass a ckpt_XXXXXXX.h5 written by minillm train")
    cfg = config_from_dict(state["config"])
    backend.set_device(backend.resolve_device(device, cfg.train.device)[0])
    model = GPT(cfg.model, seed=cfg.train.seed)
    load_params(list(model.named_parameters()), state["model"], f"checkpoint {ckpt}")
    return model.eval(), cfg, ckpt


def load_run_tokenizer(ckpt, cfg):
    """The tokenizer saved next to the checkpoint (run dir), next to the checkpoint a quantized
    file was made from, else in the dataset dir."""
    from minillm.quant import quantized_source
    source = quantized_source(ckpt)
    places = [Path(ckpt).parent] + ([Path(source).parent] if source else []) + [Path(data_dir(cfg))]
    for place in places:
        if (place / "tokenizer.json").exists():
            return load_tokenizer(place)
    raise UserError(f"no tokenizer.json next to {ckpt} or in {data_dir(cfg)}; prepare the dataset "
                    f"again with the same [data] settings")


def evaluate(model, cfg, iters=None, split="val"):
    """Mean loss over the run's fixed evaluation batches of ``split``; also its perplexity."""
    ds = TokenDataset(data_dir(cfg), split)
    sampler = BatchSampler(ds.tokens, cfg.model.block_size, cfg.train.batch_size, cfg.train.seed)
    iters = iters or cfg.train.eval_iters
    from minillm.autograd.tensor import no_grad
    total = 0.0
    with no_grad():
        for i in range(iters):
            x, y = sampler.eval_batch(i)
            total += float(model(backend.asarray(x), backend.asarray(y))[1].data)
    loss = total / iters
    return {"loss": loss, "perplexity": math.exp(loss), "batches": iters, "split": split}


def sample_text(model, tokenizer, prompt="", max_new_tokens=200, temperature=0.8, top_k=None, seed=0):
    """Generate text after ``prompt`` (an empty prompt starts from a newline, or token 0)."""
    ids = tokenizer.encode(prompt) if prompt else _start_ids(tokenizer)
    out = model.generate(numpy.asarray([ids]), max_new_tokens, temperature=temperature,
                         top_k=top_k, seed=seed)
    return tokenizer.decode(out[0].tolist())


def _start_ids(tokenizer):
    try:
        return tokenizer.encode("\n") or [0]
    except UserError:
        return [0]
