"""LoRA adapter files: the adapters alone, in a small HDF5 file that names its base checkpoint.

    meta      kind "lora", step, base_checkpoint (absolute path), base_sha256, rank, alpha,
              targets (full layer names), new_tokens_from (first id of the added tokens)
    config    the adapted model's config (vocab_size includes the added tokens)
    tokenizer the tokenizer, template tokens included
    adapters  lora_A / lora_B of every adapted layer and the new token rows, by parameter name

Loading reads the base checkpoint, checks it is the same file (sha256), grows its vocabulary,
attaches the adapters and merges them: a plain GPT comes out.
"""
from pathlib import Path

from minillm.checkpoint import load_checkpoint, open_checkpoint, save_checkpoint
from minillm.config import config_from_dict
from minillm.data.tokenizers import tokenizer_from_dict
from minillm.errors import UserError
from minillm.fileio import file_sha256
from minillm.finetune.lora import apply_lora, merge_lora
from minillm.finetune.vocab import grow_vocab

PREFIX = "lora_"


def adapter_path(run_dir, step) -> Path:
    return Path(run_dir) / f"{PREFIX}{step:07d}.h5"


def save_adapters(path, step, base, cfg, tok, lora, arrays) -> Path:
    """Write an adapter file. ``lora``: rank, alpha, targets, new_tokens_from; ``arrays``: name ->
    array of the trained adapter parameters."""
    state = {"meta": {"kind": "lora", "step": int(step), "base_checkpoint": str(Path(base).resolve()),
                      "base_sha256": file_sha256(base), **lora},
             "config": cfg, "tokenizer": tok.to_dict(), "adapters": dict(arrays)}
    return save_checkpoint(path, state)


def is_adapter_file(path) -> bool:
    with open_checkpoint(path) as f:
        return "adapters" in f and "meta" in f


def find_adapter(run_dir):
    """The newest adapter file of a run directory that holds no full checkpoint, else None."""
    run_dir = Path(run_dir)
    if list(run_dir.glob("ckpt_*.h5")):
        return None
    found = sorted(run_dir.glob(f"{PREFIX}*.h5"))
    return found[-1] if found else None


def load_adapted(path, device=None, merge=True):
    """(model, config, tokenizer) of an adapter file on its base checkpoint (merged unless
    ``merge=False``, which leaves the LoRA layers in place, e.g. to train on)."""
    from minillm.nn.module import load_params
    from minillm.train.inference import load_model
    state = load_checkpoint(path)
    meta = state["meta"]
    base = Path(meta["base_checkpoint"])
    if not base.is_file():
        raise UserError(f"{path}: its base checkpoint {base} is missing; the adapters only make sense on it")
    if file_sha256(base) != meta["base_sha256"]:
        raise UserError(f"{path}: the base checkpoint {base} changed since the adapters were trained "
                        f"(sha256 differs); use the checkpoint they were trained on")
    model, _, _ = load_model(base, device)
    cfg = config_from_dict(state["config"])
    grow_vocab(model, cfg.model.vocab_size - model.config.vocab_size, seed=cfg.train.seed)
    first_new = meta["new_tokens_from"]
    apply_lora(model, meta["targets"], int(meta["rank"]), float(meta["alpha"]),
               new_tokens_from=None if first_new is None else int(first_new))
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    load_params(trained, state["adapters"], f"adapter file {path}")
    if merge:
        merge_lora(model)
    return model.eval(), cfg, tokenizer_from_dict(state["tokenizer"])
