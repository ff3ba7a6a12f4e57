"""The training loop: data -> model -> loss -> backward -> (sync) -> clip -> AdamW -> log -> checkpoint.

One function, ``train(cfg)``, runs the whole job on one process or on every rank of an MPI job
(``mpirun -np N python -m mpi4py -m minillm train ...``). What differs between layouts lives in
the engine (``minillm/engine.py``: serial, data parallel, ZeRO, pipeline, built by
``train/build.py``); what differs between float32 and mixed precision lives in the precision
object; the loop itself is the same for all.

Reproducibility: the batch of step s is a function of (seed, s) only (``data/sampler.py``), and
the dropout mask of sample i at layer l is a hash of (seed, s, l, i, position, channel)
(``nn/dropout_rng.py``), the sample index travelling with its micro-batch (``engine.Microbatch``). So a resumed run replays exactly
what the uninterrupted one would have done, and nothing random needs saving: a checkpoint holds
the weights, the optimizer state, the loss scaler, the config and the step.

Nothing is lost or mixed: the run directory belongs to this run while it lives (``rundir.py``:
ownership, lock), every save prunes first and a failed one names the last good checkpoint, and
what the console shows (step/total, ETA, MFU, the summary) comes from ``progress.py``.
"""
import dataclasses
import math
import signal
import time
from pathlib import Path

import numpy

from minillm import __version__, backend
from minillm.amp import LossDivergedError
from minillm.checkpoint import (check_config, check_vocab, checkpoint_path, checkpoint_step,
                                find_latest_checkpoint, list_checkpoints, load_checkpoint,
                                make_room, prune_checkpoints, save_checkpoint)
from minillm.config import check_layout, config_to_dict, data_dir, save_config
from minillm.data import BatchSampler, TokenDataset, ensure_dataset, load_tokenizer, read_meta
from minillm.distributed.comm import get_world_comm
from minillm.engine import Microbatch
from minillm.errors import UserError
from minillm.fileio import write_atomic, write_error
from minillm.model import GPT
from minillm.config_section import parse_size
from minillm.optim import check_no_decay, get_lr
from minillm.perf.allocator import tune_host_allocator
from minillm.perf.memory import check_memory_limit, memory_ledger
from minillm.perf.flops import flops_per_token, matmul_params, measure_matmul_peak
from minillm.perf.threads import apply_threads
from minillm.train.build import build_engine
from minillm.train.metrics import MetricsLog
from minillm.train.progress import MFU, Progress, summary_line
from minillm.train.rundir import claim_run_dir, resume_command
from minillm.train.update import apply_update

class _StopFlag:
    """Set by SIGTERM / SIGINT; the loop finishes its step, saves, and exits cleanly."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook runners)
                pass

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def prepare_data(cfg, comm):
    """Rank 0 prepares the dataset the config names (once); the others wait for it."""
    ddir = data_dir(cfg)
    if comm.rank == 0:
        d = cfg.data
        ensure_dataset(d.source, ddir, d.tokenizer, d.vocab_size or None, d.val_fraction,
                       verbose=True)
    comm.barrier()
    meta = read_meta(ddir)
    if meta is None:
        raise UserError(f"dataset {ddir} is missing; run `minillm prepare` first")
    return ddir, meta


def resolve_vocab(cfg, meta):
    """model.vocab_size = 0 means 'as the dataset says'; a smaller explicit value is an error."""
    v = int(meta["vocab_size"])
    if cfg.model.vocab_size == 0:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=v))
    if cfg.model.vocab_size < v:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the dataset's "
                        f"vocabulary of {v}; set --model.vocab_size={v} (or 0 to take it from the data)")
    return cfg


class Trainer:
    """One run: ``Trainer(cfg, comm, resume, log, overwrite).run()``. Construction claims the run
    directory (train/rundir.py: fails at once if another run holds it), picks the BLAS threads,
    prepares the data and builds model, engine and optimizer; ``run()`` trains, and releases the
    directory when it ends (``close()`` does it for a Trainer that is never run)."""

    def __init__(self, cfg, comm=None, resume=None, log=None, overwrite=False):
        self.comm = comm or get_world_comm()
        check_layout(cfg, self.comm.size)
        self.device, self.device_source = backend.resolve_device(config=cfg.train.device)
        backend.set_device(self.device)
        self.rank0 = self.comm.rank == 0
        self.log = log or (lambda msg: print(msg, flush=True))
        self.lock = self._claim(cfg.train.out_dir, resume, overwrite)
        try:
            self._build(cfg, resume)
        except BaseException:
            self.close()
            raise

    def _claim(self, run_dir, resume, overwrite):
        """Rank 0 locks and checks the run directory; every rank raises the same error, if any."""
        lock, err = None, None
        if self.rank0:
            try:
                lock = claim_run_dir(run_dir, resume, overwrite)
            except UserError as e:
                err = str(e)
        err = self.comm.bcast_obj(err, 0) if self.comm.size > 1 else err
        if err:
            raise UserError.everywhere(err)
        return lock

    def close(self):
        """Release the run directory (idempotent)."""
        if self.lock is not None:
            self.lock.release()

    def _build(self, cfg, resume):
        self.threads = apply_threads(cfg, self.comm.size)
        if backend.is_gpu():  # which GPU this rank uses, from its rank on the node (every rank says)
            print(f"rank {self.comm.rank}: {backend.use_gpu_for_rank(*self.comm.node_rank_and_size())}",
                  flush=True)
        self.ddir, meta = prepare_data(cfg, self.comm)
        # the saved config names the dataset by absolute path, so sample / eval / resume work from any cwd
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir=str(Path(self.ddir).resolve())))
        self.cfg = cfg = resolve_vocab(cfg, meta)
        t = cfg.train
        if t.memory_limit:  # refuse before anything is allocated (the same verdict on every rank)
            check_memory_limit(memory_ledger(cfg, gpu=self.device == "gpu"),
                               parse_size("train.memory_limit", t.memory_limit), "train.memory_limit")
        self.run_dir = Path(t.out_dir)
        self.train_data = TokenDataset(self.ddir, "train")
        self.val_data = TokenDataset(self.ddir, "val")
        self.sampler = BatchSampler(self.train_data.tokens, cfg.model.block_size, t.batch_size, t.seed)
        self.val_sampler = BatchSampler(self.val_data.tokens, cfg.model.block_size, t.batch_size, t.seed)
        tune_host_allocator()  # freed temporaries are reused, not re-faulted in (perf/allocator.py)
        self.model = GPT(cfg.model, seed=t.seed)  # the same initial weights on every rank
        check_no_decay(t.no_decay, [n for n, _ in self.model.named_parameters()])
        self.n_params, self.n_matmul = self.model.num_parameters(), matmul_params(self.model)  # before tp splits it
        self.engine = build_engine(cfg, self.model, self.comm)
        self.precision = self.engine.precision
        self.optimizer = self.engine.make_optimizer(t)
        self.dp_rank, self.dp_size = self.engine.dp_rank, self.engine.dp_size
        self.step, self.tokens_seen, self.best_val = 0, 0, math.inf
        self.last_val, self.resumed_from = None, None
        if resume:
            self._resume(resume, int(meta["vocab_size"]))
        if self.rank0:
            save_config(cfg, self.run_dir / "config.toml")
            tok = Path(self.ddir) / "tokenizer.json"
            if tok.exists():
                write_atomic(self.run_dir / "tokenizer.json", tok.read_bytes(), "tokenizer")
        self.comm.barrier()
        self.metrics = MetricsLog(self.run_dir, self.step, enabled=self.rank0)

    # ------------------------------------------------------------------ batches
    def local_microbatches(self, step, sampler=None, eval_index=None):
        """This data-parallel rank's slice of the global batch of ``step``, cut into
        ``Microbatch``es that know where their rows sit in the global batch (dropout keys);
        ``eval_index``: the i-th fixed evaluation batch of ``sampler`` instead (no keys)."""
        t = self.cfg.train
        per_rank = t.batch_size // self.dp_size
        n_micro = t.grad_accum * self.cfg.parallel.microbatches
        size = per_rank // n_micro
        start = self.dp_rank * per_rank
        out = []
        for i in range(n_micro):
            row0 = start + i * size
            if eval_index is None:
                x, y = (sampler or self.sampler).get_batch(step, row0, size)
            else:
                x, y = sampler.eval_batch(eval_index, row0, size)
            out.append(Microbatch(backend.asarray(x), backend.asarray(y),
                                  step if eval_index is None else None, row0))
        return out

    # ------------------------------------------------------------------ evaluation
    def estimate_loss(self, sampler):
        """Mean loss over eval_iters fixed batches (every rank scores its slice, then average)."""
        self.model.eval()
        total = 0.0
        for i in range(self.cfg.train.eval_iters):
            mbs = self.local_microbatches(0, sampler, eval_index=i)
            part = 0.0
            for mb in mbs:  # summed on the device, read once below
                part = part + self.engine.eval_loss(mb.x, mb.y)
            total = total + part / len(mbs)
        self.model.train()
        (total,) = backend.fetch(total)
        return self.engine.reduce_loss(total / self.cfg.train.eval_iters)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self):
        return {
            "meta": {"step": self.step, "tokens_seen": self.tokens_seen,
                     "best_val_loss": self.best_val,
                     "layout": {"dp": self.cfg.parallel.dp, "pp": self.cfg.parallel.pp,
                                "tp": self.cfg.parallel.tp, "sp": self.cfg.parallel.sp,
                                "world_size": self.comm.size}},
            "config": config_to_dict(self.cfg),
            "model": self.engine.model_state(),
            "optimizer": self.engine.optimizer_state(self.optimizer),
            "scaler": self.precision.state_dict(),
            "rng": {"data_seed": self.cfg.train.seed,
                    "dropout": self.model.dropout_rng.state_dict(),
                    "note": "batches and dropout masks are functions of (seed, step, sample): nothing to restore"},
        }

    def save(self):
        try:
            self.engine.write_artifacts(self.run_dir)  # e.g. a pipeline rank's timeline (collective)
        except OSError as e:
            raise write_error("run files in", self.run_dir, e) from None
        state = self.checkpoint_state()  # every rank takes part (pipeline stages gather to rank 0)
        path = checkpoint_path(self.run_dir, self.step)
        if self.rank0:
            keep = self.cfg.train.keep_last
            make_room(self.run_dir, keep, path)  # a full disk gets the old checkpoints' space first
            try:
                save_checkpoint(path, state)
            except UserError as e:
                raise UserError(f"{e}; {self._last_good()}") from None
            prune_checkpoints(self.run_dir, keep)
        self.comm.barrier()
        return path

    def _last_good(self):
        """What is left after a failed save, and how to go on from it."""
        good = list_checkpoints(self.run_dir)  # atomic saves: every one of them is whole
        if not good:
            return "no checkpoint of this run was saved"
        return (f"the last good checkpoint is {good[0]} (step {checkpoint_step(good[0])}); make room, "
                f"then continue with: {resume_command(self.run_dir, self.comm.size)}")

    def _resume(self, resume, data_vocab):
        if resume == "auto":
            path = find_latest_checkpoint(self.run_dir) if self.rank0 else None
            path = self.comm.bcast_obj(str(path) if path else None, 0)
            if path is None:
                if self.rank0:
                    self.log(f"no checkpoint in {self.run_dir}: starting from scratch")
                return
        else:
            path = resume
        if not Path(path).is_file():
            raise UserError(f"--resume {path}: no such checkpoint file")
        state = load_checkpoint(path)
        check_vocab(path, state["config"], config_to_dict(self.cfg), data_vocab)
        check_config(path, state["config"], config_to_dict(self.cfg), sections=("model",))
        self.engine.load_model_state(state["model"], source=f"checkpoint {path}")
        self.engine.load_optimizer_state(self.optimizer, state["optimizer"])
        self.precision.load_state_dict(state.get("scaler") or {})
        meta = state["meta"]
        self.step, self.tokens_seen = int(meta["step"]), int(meta["tokens_seen"])
        self.best_val = float(meta["best_val_loss"]) if meta.get("best_val_loss") is not None else math.inf
        self.resumed_from = path
        if self.rank0:
            self.log(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ the loop
    def step_on_device(self):
        """One optimizer step; the loss and grad norm stay 0-d device arrays (nothing waits for a
        GPU here except the overflow decision of mixed precision). Returns (loss, lr, grad_norm,
        found_inf)."""
        t = self.cfg.train
        lr = get_lr(self.step, t)
        mbs = self.local_microbatches(self.step)
        with self.precision.quiet():
            loss = self.engine.forward_backward(mbs)
            found_inf = self.precision.grads_to_master(agree=self.engine.agree)  # same on every rank
        grad_norm = apply_update(self.precision, self.optimizer, lr, t.grad_clip, found_inf,
                                 reduce=self.engine.grad_sq_reduce)
        self.engine.zero_grad()
        return loss, lr, grad_norm, found_inf

    def train_step(self):
        """``step_on_device`` with the loss (averaged over replicas) and grad norm read as floats."""
        loss, lr, grad_norm, found_inf = self.step_on_device()
        loss, grad_norm = backend.fetch(loss, grad_norm)
        return self.engine.reduce_loss(loss), lr, grad_norm, found_inf

    def run(self):
        try:
            return self._run()
        finally:
            self.close()

    def _header(self, peak):
        t, par = self.cfg.train, self.cfg.parallel
        tp = f", tp {par.tp}{' + sp' if par.sp else ''}" if par.tp > 1 else ""
        return (f"minillm {__version__} | {self.n_params / 1e6:.2f}M parameters | "
                f"data {self.ddir} ({len(self.train_data):,} train tokens) | device {backend.device()} "
                f"({self.device_source}) | dtype {t.dtype} | world {self.comm.size} (dp {par.dp}, "
                f"pp {par.pp}{tp}) | threads {self.threads} | matmul peak {peak / 1e9:.0f} GFLOP/s | "
                f"run dir {self.run_dir}")

    def _run(self):
        t, cfg = self.cfg.train, self.cfg
        if self.step >= t.max_steps:  # a resume with nothing left to do
            if self.rank0:
                self.log(f"nothing to do: the run is at step {self.step} and train.max_steps is "
                         f"{t.max_steps}; its checkpoint is {self.resumed_from} (raise "
                         f"--train.max_steps to train further)")
            return {"stopped": False, "step": self.step, "val_loss": None, "best_val_loss": self.best_val,
                    "checkpoint": str(self.resumed_from), "seconds": 0.0}
        tokens_per_step = t.batch_size * cfg.model.block_size
        peak = measure_matmul_peak() if self.rank0 else 0.0  # at this run's thread count
        mfu = MFU(flops_per_token(cfg.model, self.n_matmul), peak, self.comm.size)
        if self.rank0:
            self.log(self._header(peak))
        stop = _StopFlag()
        stop.install()
        progress = Progress(t.max_steps, self.step, self.log, bar=t.progress and self.rank0)
        last_t, last_step, skipped = time.perf_counter(), self.step, 0
        try:
            while self.step < t.max_steps:
                try:
                    loss, lr, grad_norm, found_inf = self.step_on_device()
                except LossDivergedError:  # the failed step changed no weight: save them, then stop
                    path = self.save()
                    if self.rank0:
                        self.log(f"saved the last good state (step {self.step}) to {path}")
                    raise
                skipped += int(found_inf)
                self.step += 1
                self.tokens_seen += tokens_per_step
                step = self.step
                record = None
                is_eval = step % t.eval_interval == 0 or step == t.max_steps
                if step % t.log_interval == 0 or step == 1 or is_eval:
                    loss, grad_norm = backend.fetch(loss, grad_norm)  # the step's one read of the device
                    loss = self.engine.reduce_loss(loss)
                    now = time.perf_counter()
                    dt = (now - last_t) / max(step - last_step, 1)
                    last_t, last_step = now, step
                    record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": tokens_per_step / dt, "ms_per_step": 1000 * dt,
                              "mfu": mfu(tokens_per_step / dt), "tokens_seen": self.tokens_seen}
                    if self.comm.size > 1:
                        record["comm_wait_ms"] = 1000 * self.engine.comm_wait_s
                    if self.precision.loss_scale is not None:
                        record.update(loss_scale=self.precision.loss_scale, skipped_steps=skipped)
                extra_t = time.perf_counter()  # evaluation, samples and saves are not step time
                if is_eval:
                    record["train_loss"] = self.estimate_loss(self.sampler)
                    record["val_loss"] = self.last_val = self.estimate_loss(self.val_sampler)
                    self.best_val = min(self.best_val, self.last_val)
                if record is not None and self.rank0:
                    self.metrics.write(record)
                    progress.line(record)
                progress.tick()
                if t.sample_interval and step % t.sample_interval == 0 and step < t.max_steps:
                    self.print_sample(progress.write)
                if t.ckpt_interval and step % t.ckpt_interval == 0 and step < t.max_steps:
                    self.save()
                last_t += time.perf_counter() - extra_t
                got = stop.signal is not None
                if self.comm.size > 1:
                    got = self.comm.allreduce_scalar(float(got), "max") > 0
                if got:
                    path = self.save()
                    if self.rank0:
                        progress.close()
                        self.log(f"received {stop.signal or 'a stop signal'} on some rank: saved step "
                                 f"{step} to {path}; continue with: "
                                 f"{resume_command(self.run_dir, self.comm.size)}")
                    return {"stopped": True, "step": step, "checkpoint": str(path)}
        finally:
            stop.restore()
            progress.close()
        path = self.save()
        summary = {"stopped": False, "step": self.step, "val_loss": self.last_val,
                   "best_val_loss": self.best_val, "checkpoint": str(path), "seconds": progress.elapsed()}
        if self.rank0:
            self.print_sample(self.log)
            self.log(summary_line(self.step, summary["seconds"], self.last_val, self.best_val, path))
        return summary

    def print_sample(self, write):
        """A sample from the model as it is now (rank 0; not with pipeline stages, which each hold
        a part of the model); padded vocabulary ids are never drawn."""
        t = self.cfg.train
        par = self.cfg.parallel
        if not self.rank0 or t.sample_tokens <= 0 or par.pp > 1 or par.tp > 1 or (par.zero == 3 and par.dp > 1):
            return  # one rank alone cannot run a model spread over stages, tp shards or ZeRO-3 shards
        tok = load_tokenizer(self.ddir)
        prompt = t.sample_prompt or "\n"
        try:
            ids = tok.encode(prompt)
        except UserError:
            ids = [0]
        out = self.model.generate(numpy.asarray([ids or [0]]), t.sample_tokens, temperature=0.8,
                                  top_k=None, seed=t.seed, n_valid=tok.vocab_size)
        write(f"---- sample at step {self.step} ----\n" + tok.decode(out[0].tolist()) + "\n----------------")


def train(cfg, resume=None, comm=None, log=None, overwrite=False):
    """Train ``cfg`` to ``train.max_steps``; returns a summary dict. ``overwrite``: replace a run
    already in ``train.out_dir`` (else that is an error; see train/rundir.py)."""
    return Trainer(cfg, comm=comm, resume=resume, log=log, overwrite=overwrite).run()
