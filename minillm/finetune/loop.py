"""`minillm finetune CKPT --data FILE.jsonl`: supervised fine-tuning, fully or with LoRA.

The trainer's loop in miniature, serial (one process): packed chat rows -> model with a
document mask -> loss on assistant tokens only -> backward -> clip -> AdamW -> log -> save.
It reuses the pretraining pieces (AdamW with parameter groups, get_lr, train/update.apply_update, the
precision objects, save_checkpoint) and writes its own run directory:

    config.toml     the base run's config, vocab grown, [train] as this fine-tune ran it
    finetune.json   base checkpoint (path, sha256), data, template tokens, LoRA settings, sizes
    tokenizer.json  the base tokenizer plus the chat template's tokens
    metrics.jsonl   step, loss, lr, grad_norm, tokens_per_s; val_loss on evaluation steps
    summary.json    at the end: steps, seconds, losses, trainable share, optimizer state, peak RSS
    ckpt_XXXXXXX.h5 (full fine-tuning: a normal checkpoint, so eval / sample just work) or
    lora_XXXXXXX.h5 (LoRA: the adapters alone; --merge also writes the merged ckpt)
"""
import dataclasses
import json
import math
import resource
import time
from pathlib import Path

from minillm import backend
from minillm.amp import make_precision
from minillm.amp.dtypes import compute_dtype
from minillm.checkpoint import checkpoint_path, save_checkpoint
from minillm.config import ParallelConfig, apply_overrides, config_to_dict, override_text, save_config
from minillm.data.chat import TEMPLATE_TOKENS, chat_tokenizer
from minillm.errors import ConfigError, UserError
from minillm.fileio import file_sha256
from minillm.finetune.adapters import adapter_path, save_adapters
from minillm.finetune.data import PackedBatches, load_examples, pack, split_examples, tokenize_rows
from minillm.finetune.lora import apply_lora, base_state, parameter_report, trainable_parameters
from minillm.finetune.vocab import grow_vocab
from minillm.model import document_mask
from minillm.model.recompute import apply_recompute
from minillm.optim import AdamW, get_lr, param_groups
from minillm.train.metrics import MetricsLog
from minillm.train.progress import format_line
from minillm.train.rundir import claim_run_dir
from minillm.train.update import apply_update

# [train] defaults for a fine-tune (pretraining's are for long runs); --train.key=value overrides
FINETUNE_TRAIN = dict(max_steps=300, lr=1e-3, min_lr=1e-4, warmup_steps=20, schedule="cosine", weight_decay=0.0,
                      batch_size=16, grad_accum=1, eval_interval=100, log_interval=10, ckpt_interval=0)


@dataclasses.dataclass
class FinetuneOptions:
    data: str                          # a JSONL file, or a generated task's name (add2, add3, copy)
    out_dir: str = ""                  # "" = runs/<base run>_sft or _lora<rank>
    lora_rank: int = 0                 # 0 = full fine-tuning
    lora_alpha: float = 0.0            # 0 = 2 * rank
    lora_targets: str = "attn.c_attn,attn.c_proj"
    pack: bool = True                  # several chats per row, kept apart by a document mask
    val_fraction: float = 0.05         # examples held out for val_loss
    merge: bool = False                # LoRA: also save the merged model as a full checkpoint
    overwrite: bool = False            # replace a run already in out_dir (else that is an error)

    def __post_init__(self):
        if self.lora_rank < 0:
            raise UserError(f"--lora-rank={self.lora_rank} must be >= 0 (0 = full fine-tuning)")
        if self.lora_alpha < 0:
            raise UserError(f"--lora-alpha={self.lora_alpha} must be >= 0 (0 = 2 * rank)")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction={self.val_fraction} must be in [0, 1)")


def _train_config(cfg, overrides, out_dir):
    bad = [o for o in overrides if o.startswith("-") and not o.startswith(("--train.", "--parallel."))]
    if bad:
        raise UserError(f"minillm finetune takes --train.key=value overrides only (the model comes from "
                        f"the checkpoint); got {bad[0]}")
    t = dataclasses.replace(cfg.train, **FINETUNE_TRAIN, out_dir=out_dir)
    # The checkpoint is in the serial format whatever layout the base ran with, and a fine-tune runs
    # in one process: it starts from the serial layout, and asking for another is an error.
    cfg = apply_overrides(dataclasses.replace(cfg, train=t, parallel=ParallelConfig()), overrides)
    serial = ParallelConfig()
    for f in dataclasses.fields(ParallelConfig):
        if getattr(cfg.parallel, f.name) != getattr(serial, f.name):
            raise ConfigError(f"--parallel.{f.name}={getattr(cfg.parallel, f.name)}: minillm finetune runs in one "
                              f"process (fine-tuning with data, pipeline or tensor parallelism or ZeRO is not "
                              f"implemented); drop it")
    if cfg.train.memory_limit:
        raise ConfigError("--train.memory_limit: the memory ledger does not model a fine-tune (LoRA, grown "
                          "vocabulary); drop it")
    return cfg


def _examples(data, tok, block_size, seed):
    if Path(data).is_file():
        return load_examples(data, tok, block_size)
    from minillm.evals.tasks import GENERATED, train_rows
    if data in GENERATED:
        return tokenize_rows([(f"{data} train row {i}", r) for i, r in enumerate(train_rows(data, seed=seed))],
                             tok, block_size)
    raise UserError(f"--data {data}: no such file (or a generated task: {', '.join(GENERATED)})")


class Finetuner:
    def __init__(self, ckpt, opts: FinetuneOptions, overrides=(), log=print):
        from minillm.train.inference import load_model, load_run_tokenizer
        self.log, self.opts = log, opts
        device = override_text(overrides, "train.device")  # the model is loaded where it will train
        model, cfg, self.base = load_model(ckpt, None if device in (None, "auto") else device)
        base_tok = load_run_tokenizer(self.base, cfg)
        self.tok = chat_tokenizer(base_tok)
        # ids from here on are tokens this fine-tune adds (None: the base had them all already)
        first_new = base_tok.vocab_size if self.tok.vocab_size > base_tok.vocab_size else None
        kind = f"lora{opts.lora_rank}" if opts.lora_rank else "sft"
        out_dir = opts.out_dir or str(Path("runs") / f"{Path(self.base).parent.name}_{kind}")
        cfg = _train_config(cfg, overrides, out_dir)
        grow_vocab(model, self.tok.vocab_size - model.config.vocab_size, seed=cfg.train.seed)
        self.cfg = cfg = dataclasses.replace(cfg, model=model.config)
        t = cfg.train
        examples = _examples(opts.data, self.tok, cfg.model.block_size, t.seed)
        self.train_ex, self.val_ex = split_examples(examples, opts.val_fraction, t.seed)
        self.lora = None
        if opts.lora_rank:
            targets = [s.strip() for s in opts.lora_targets.split(",") if s.strip()]
            names = apply_lora(model, targets, opts.lora_rank, opts.lora_alpha or None, t.seed, new_tokens_from=first_new)
            alpha = opts.lora_alpha or 2.0 * opts.lora_rank
            self.lora = {"rank": opts.lora_rank, "alpha": alpha, "targets": names, "new_tokens_from": first_new}
        apply_recompute(model, t.recompute)  # around the LoRA layers too: they run again in backward
        self.model = model.train()
        self.report = parameter_report(model)
        self.precision = make_precision(t, trainable_parameters(model))
        if self.lora and t.dtype != "float32":  # the frozen base computes in 16 bits too
            for _, p in model.named_parameters():
                if not p.requires_grad:
                    p.data = p.data.astype(compute_dtype(t.dtype))
        self.optimizer = AdamW(param_groups(self.precision.master_params, t.no_decay, strict=False), lr=t.lr,
                               betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay)
        self.batches = PackedBatches(self.train_ex, cfg.model.block_size, t.batch_size, t.seed, opts.pack)
        self.val = pack(self.val_ex, cfg.model.block_size, opts.pack) if self.val_ex else None
        self.run_dir = Path(t.out_dir)
        self.step = 0

    def write_run_files(self):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.toml")
        self.tok.save(self.run_dir)
        info = {"base_checkpoint": str(Path(self.base).resolve()), "base_sha256": file_sha256(self.base),
                "data": self.opts.data, "train_examples": len(self.train_ex), "val_examples": len(self.val_ex),
                "template_tokens": list(TEMPLATE_TOKENS), "pack": self.opts.pack, "lora": self.lora,
                "parameters": self.report, "rows_per_epoch": self.batches.rows_per_epoch()}
        (self.run_dir / "finetune.json").write_text(json.dumps(info, indent=1) + "\n")

    def loss(self, x, y, doc):
        mask = document_mask(doc) if self.opts.pack else None
        return self.model(backend.asarray(x), backend.asarray(y), attn_mask=mask)[1]

    def val_loss(self):
        from minillm.autograd.tensor import no_grad
        x, y, doc = self.val
        self.model.eval()
        total = n = 0
        with no_grad():
            for i in range(0, len(x), self.cfg.train.batch_size):
                s = slice(i, i + self.cfg.train.batch_size)
                k = int((y[s] >= 0).sum())
                total, n = total + float(self.loss(x[s], y[s], doc[s]).data) * k, n + k
        self.model.train()
        return total / max(n, 1)

    def train_step(self):
        t = self.cfg.train
        lr = get_lr(self.step, t)
        x, y, doc = self.batches.batch(self.step)
        with self.precision.quiet():
            loss = self.loss(x, y, doc)
            self.precision.scale_loss(loss).backward()
            found_inf = self.precision.grads_to_master()
        grad_norm = apply_update(self.precision, self.optimizer, lr, t.grad_clip, found_inf)
        self.model.zero_grad()
        loss, grad_norm = backend.fetch(loss.data, grad_norm)  # one read of the device per step
        return loss, lr, grad_norm, int((y >= 0).sum())

    def step_metrics(self):
        """Extra fields for this step's metrics record (a subclass's, e.g. GRPO's reward)."""
        return {}

    def save(self):
        masters = {n: p.data for n, p in self.precision.master_params}
        if self.lora:
            path = save_adapters(adapter_path(self.run_dir, self.step), self.step, self.base,
                                 config_to_dict(self.cfg), self.tok, self.lora, masters)
            if not self.opts.merge:
                return path
        state = base_state(self.model) if self.lora else masters
        return save_checkpoint(checkpoint_path(self.run_dir, self.step), {
            "meta": {"step": self.step, "finetune": {"base_checkpoint": str(Path(self.base).resolve()),
                                                     "data": self.opts.data, "lora": bool(self.lora)}},
            "config": config_to_dict(self.cfg), "model": state})

    def run(self):
        # the directory belongs to this fine-tune, as a training run's does (fine-tunes do not resume)
        lock = claim_run_dir(self.run_dir, None, self.opts.overwrite, out_option="--out", resumable=False)
        try:
            return self._run()
        finally:
            lock.release()

    def _run(self):
        t = self.cfg.train
        self.write_run_files()
        r = self.report
        self.log(f"finetune {self.base} on {self.opts.data}: {len(self.train_ex):,} train / {len(self.val_ex):,} val "
                 f"examples, {self.batches.rows_per_epoch():,} packed rows of {self.cfg.model.block_size} per epoch | "
                 f"{'LoRA rank %d' % self.opts.lora_rank if self.lora else 'full'}: trainable {r['trainable']:,} of "
                 f"{r['total']:,} parameters ({100 * r['share']:.2f}%) | run dir {self.run_dir}")
        metrics = MetricsLog(self.run_dir)
        start = last = time.perf_counter()
        last_step, trained_tokens, val = 0, 0, None
        while self.step < t.max_steps:
            loss, lr, grad_norm, n_tok = self.train_step()
            if not math.isfinite(loss):
                raise UserError(f"the loss became {loss} at step {self.step}; lower --train.lr")
            self.step += 1
            trained_tokens += n_tok
            is_eval = self.val is not None and (self.step % t.eval_interval == 0 or self.step == t.max_steps)
            if self.step % t.log_interval == 0 or self.step == 1 or is_eval:
                now = time.perf_counter()
                dt = (now - last) / (self.step - last_step)
                rec = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "ms_per_step": 1000 * dt,
                       "tokens_per_s": t.batch_size * self.cfg.model.block_size / dt, "trained_tokens": trained_tokens}
                extra = self.step_metrics()
                rec.update(extra)
                if is_eval:
                    rec["val_loss"] = val = self.val_loss()
                metrics.write(rec)
                self.log(format_line(rec) + "".join(f" | {k} {v:.3f}" for k, v in extra.items()))
                last, last_step = time.perf_counter(), self.step
        seconds = time.perf_counter() - start
        path = self.save()
        summary = {"steps": self.step, "seconds": seconds, "loss": loss, "val_loss": val, "checkpoint": str(path),
                   **{f"{k}_parameters" if k != "share" else "trainable_share": v for k, v in r.items()},
                   "optimizer_state_mb": sum(a.nbytes for s in self.optimizer.state.values() for a in s.values()) / 2**20,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        self.log(f"done: {self.step} steps in {seconds:.1f}s, saved {path}")
        return summary


def finetune(ckpt, opts: FinetuneOptions, overrides=(), log=print) -> dict:
    """Fine-tune the checkpoint (or newest checkpoint of a run dir) ``ckpt``; returns a summary."""
    return Finetuner(ckpt, opts, overrides, log).run()
