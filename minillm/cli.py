"""The `minillm` command: prepare | train | sample | eval | finetune | plot | inspect | quantize |
serve | bench | memory.

Exit codes: 0 done, 2 a user error (one line on stderr, no traceback), 1 a bug. Under mpirun
every rank runs this same entry point; an error on any rank ends the whole job.
"""
import argparse
import sys

from minillm.choices import DEVICES
from minillm.errors import UserError

_EPILOG = """examples:
  minillm train                                   # the default: char GPT on the embedded pydocs text
  minillm train configs/shakespeare_char_cpu.toml --train.max_steps=500
  mpirun -np 2 python -m mpi4py -m minillm train configs/pydocs_char.toml --parallel.dp=2
  minillm sample runs/pydocs_char --prompt "def " --max-new-tokens 200
  minillm eval runs/pydocs_char
  minillm eval runs/pydocs_char --task add2 --task pydocs-cloze --task val
  minillm finetune runs/pydocs_char --data add2 --lora-rank 8 --train.max_steps=300
  minillm plot runs/pydocs_char
  minillm inspect runs/pydocs_char/ckpt_0001000.h5
  minillm quantize runs/pydocs_char --bits 4 --group-size 32
  minillm serve runs/pydocs_char --port 8000      # then open http://127.0.0.1:8000/
  minillm memory configs/gpt10m.toml --parallel.dp=2 --parallel.zero=3 --train.recompute=full
"""


def _count(text):
    """argparse type of a count option: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a UserError (one line, exit code 2)."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def _add_eval_task_args(s):
    s.add_argument("--task", action="append", default=None,
                   help="val, add2, add3, copy, pydocs-cloze, or text|choice|exact with --data (or as "
                        "text:FILE); repeatable; without --task: the validation loss, as before")
    s.add_argument("--data", default=None, help="the text file (text) or JSONL rows (choice, exact)")
    s.add_argument("--n", type=_count, default=None, help="rows per task (default: all; built-in: 500)")
    s.add_argument("--seed", type=int, default=0, help="seed of the generated tasks")
    s.add_argument("--format", default="auto", help="auto | plain | chat prompts for exact tasks "
                                                     "(auto: chat when the tokenizer has the template)")
    s.add_argument("--max-new-tokens", type=_count, default=None, help="exact tasks (default: answer + 2)")
    s.add_argument("--stop", default="\n", help="where a plain-prompt answer ends (default newline)")
    s.add_argument("--out", default=None, help="results JSON (default: eval_results.json next to the checkpoint)")


def build_parser():
    p = _Parser(prog="minillm", description="Train a GPT from scratch with minillm.",
                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    s = sub.add_parser("prepare", help="tokenize text into train/val token files (or shards)",
                       description=_PREPARE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("source", nargs="+", help="pydocs (embedded), shakespeare (downloaded), text or "
                   "JSONL files, directories")
    s.add_argument("--tokenizer", default="char", help="char | bpe | gpt2 (default char)")
    s.add_argument("--vocab-size", type=_count, default=None, help="BPE vocabulary size (default 512)")
    s.add_argument("--out", default=None, help="output directory (default data/<source>_<tokenizer>"
                   "[_shards])")
    s.add_argument("--val-fraction", type=float, default=0.1)
    _add_pipeline_args(s)

    s = sub.add_parser("train", help="train a model (config file + --section.key=value overrides)")
    s.add_argument("config", nargs="?", default=None, help="a TOML config (default: built-in defaults)")
    s.add_argument("--resume", default=None, help="'auto' (newest valid checkpoint in out_dir) or a path")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the run already in train.out_dir (its checkpoints, metrics, config)")

    for name, text in (("sample", "generate text from a trained model"),
                       ("eval", "validation loss and perplexity of a trained model")):
        s = sub.add_parser(name, help=text)
        s.add_argument("path", help="a run directory or a checkpoint .h5 file")
        s.add_argument("--device", default=None, choices=DEVICES,
                       help="cpu | gpu (default: the run's train.device, else MINILLM_DEVICE, else cpu)")
        if name == "sample":
            s.add_argument("--prompt", default="")
            s.add_argument("--max-new-tokens", type=_count, default=200)
            s.add_argument("--temperature", type=float, default=0.8)
            s.add_argument("--top-k", type=int, default=None)
            s.add_argument("--seed", type=int, default=0)
            s.add_argument("--num-samples", type=_count, default=1)
        else:
            s.add_argument("--iters", type=_count, default=None, help="batches (default train.eval_iters)")
            s.add_argument("--split", default="val", choices=("val", "train"), help="val | train")
            _add_eval_task_args(s)

    s = sub.add_parser("finetune", help="supervised fine-tuning on chat JSONL, fully or with LoRA "
                                        "(+ --train.key=value overrides)")
    s.add_argument("path", help="the base: a run directory or a checkpoint .h5 file")
    s.add_argument("--data", required=True, help="JSONL of {messages} or {prompt, completion} rows, "
                                                 "or a generated task (add2, add3, copy)")
    s.add_argument("--out", default="", help="run directory (default runs/<base run>_sft or _lora<rank>)")
    s.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (default 0: full fine-tuning)")
    s.add_argument("--lora-alpha", type=float, default=0.0, help="LoRA alpha (default 2 x rank)")
    s.add_argument("--lora-targets", default="attn.c_attn,attn.c_proj",
                   help="Linear layers to adapt: names, suffixes or patterns (default attention)")
    s.add_argument("--no-pack", action="store_true", help="one chat per row instead of packed rows")
    s.add_argument("--val-fraction", type=float, default=0.05, help="examples held out for val_loss")
    s.add_argument("--merge", action="store_true", help="LoRA: also save the merged full checkpoint")
    s.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    s.add_argument("--grpo", action="store_true", help="reinforcement learning instead of SFT: sample "
                   "answers, reward exact matches, group baseline (start from a fine-tuned model)")
    s.add_argument("--group", type=int, default=8, help="GRPO: answers sampled per prompt")
    s.add_argument("--prompts", type=int, default=16, help="GRPO: prompts per step")
    s.add_argument("--temperature", type=float, default=1.0, help="GRPO: sampling temperature")

    s = sub.add_parser("plot", help="PNG of loss, val loss, lr and grad norm (or the pipeline timeline)")
    s.add_argument("run_dir")
    s.add_argument("--timeline", action="store_true", help="draw the per-rank pipeline timeline")
    s.add_argument("--out", default=None, help="output PNG (default RUN_DIR/metrics.png)")

    s = sub.add_parser("inspect", help="describe a checkpoint: step, config, every tensor")
    s.add_argument("checkpoint")

    s = sub.add_parser("quantize", help="weight-only int8 / int4 copy of a checkpoint (HDF5)")
    s.add_argument("path", help="a run directory or a checkpoint .h5 file")
    s.add_argument("--bits", type=int, default=8, help="8 (per-channel int8) or 4 (int4 in groups)")
    s.add_argument("--group-size", type=int, default=None, help="inputs per int4 scale (default 32)")
    s.add_argument("--out", default=None, help="output file (default CKPT.int8.h5 / CKPT.int4-gG.h5)")
    s.add_argument("--eval", action="store_true", help="also print val loss before and after")

    s = sub.add_parser("serve", help="HTTP server: completions, streaming (SSE), a chat page at /")
    s.add_argument("path", help="a run directory, a checkpoint or a quantized .h5 file")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--device", default=None, choices=DEVICES,
                   help="cpu | gpu (default: the run's train.device, else MINILLM_DEVICE, else cpu)")
    s.add_argument("--max-batch", type=_count, default=8, help="requests decoded together")
    s.add_argument("--max-queue", type=int, default=16, help="requests waiting beyond the batch (more: 429)")
    s.add_argument("--max-prompt-tokens", type=_count, default=None, help="default: block_size")
    s.add_argument("--max-new-tokens", type=_count, default=512, help="the most a request may ask for")
    s.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for requests")

    s = sub.add_parser("bench", help="time forward / backward / optimizer of a config")
    s.add_argument("config", nargs="?", default=None)
    s.add_argument("--steps", type=_count, default=10)
    s.add_argument("--torch", action="store_true", help="also time the same model in PyTorch")
    s.add_argument("--threads", type=_count, default=None, help="BLAS / PyTorch threads (default: as set)")
    s.add_argument("--json", action="store_true", help="print the figures as one JSON line")

    s = sub.add_parser("memory", help="predict each rank's memory (the ledger); --measure checks it")
    s.add_argument("config", nargs="?", default=None)
    s.add_argument("--measure", action="store_true", help="also run a few steps and measure the peak")
    s.add_argument("--memory-limit", default=None, help="refuse layouts predicted above this, e.g. 16GiB")
    s.add_argument("--steps", type=_count, default=2, help="measured steps (after one warm-up)")
    s.add_argument("--json", action="store_true", help="print the ledger as JSON")
    return p


_PIPELINE_DEFAULTS = {}  # dest -> default of each pipeline option (filled by _add_pipeline_args)


def _add_pipeline_args(s):
    """The options of the sharded data pipeline (see minillm/data/pipeline.py)."""
    from minillm.choices import BAD_UTF8, DEDUP_MODES, DOC_SEPS
    g = s.add_argument_group("pipeline (any of these selects the sharded layout)")
    add = lambda *a, **k: _PIPELINE_DEFAULTS.setdefault(g.add_argument(*a, **k).dest, k.get("default"))  # noqa: E731
    add("--clean", action="store_true", default=False, help="Unicode NFC and white-space cleaning")
    add("--filter", action="store_true", default=False, help="Gopher/C4-style quality rules")
    add("--filter-rules", default=None, help="comma-separated subset of the rules (implies --filter)")
    add("--dedup", action="store_true", default=False, help="exact and MinHash near-duplicate removal")
    add("--dedup-mode", default=None, choices=DEDUP_MODES, help="implies --dedup (default both)")
    add("--dedup-threshold", type=float, default=None, help="estimated Jaccard of a near duplicate (0.8)")
    add("--dedup-bands", type=int, default=None, help="LSH bands (20)")
    add("--dedup-rows", type=int, default=None, help="MinHash values per band (6)")
    add("--dedup-ngram", type=int, default=None, help="words per shingle (5)")
    add("--report", action="store_true", default=False, help="print the data report table "
        "(OUT/report.json is always written)")
    add("--workers", type=int, default=None, help="worker processes (default 1)")
    add("--shard-tokens", type=int, default=None, help="tokens per shard (default 50,000,000)")
    add("--batch-mb", type=float, default=None, help="MB of documents per task (default 4)")
    add("--doc-sep", default=None, choices=DOC_SEPS, help="eot (<|endoftext|>, default) | blank "
        "(blank lines)")
    add("--text-field", default=None, help="JSONL field holding the text (default text)")
    add("--bad-utf8", default=None, choices=BAD_UTF8, help="error (default) | skip documents with "
        "undecodable bytes")
    add("--max-doc-chars", type=int, default=None, help="cut longer documents (default 1,000,000)")
    add("--tokenizer-from", default=None, help="reuse a tokenizer.json (or a dataset dir's)")
    add("--tokenizer-sample-mb", type=float, default=None, help="MB of text BPE is trained on (64)")
    add("--keep-work", action="store_true", default=False, help="keep OUT/_work afterwards")
    add("--sharded", action="store_true", default=False, help="the sharded layout, no other option")


def _pipeline_asked(args) -> bool:
    return any(getattr(args, k) != v for k, v in _PIPELINE_DEFAULTS.items())


def _train(args, overrides, state):
    from minillm.config import load_config
    from minillm.distributed.comm import get_world_comm
    from minillm.distributed.launch import install_abort_handler
    comm = get_world_comm()
    state["comm"] = comm
    cfg = load_config(args.config, overrides)  # the same on every rank: errors are reported once
    from minillm.config import check_layout
    from minillm.distributed.comm import require_mpi
    par = cfg.parallel
    world = par.dp * par.tp * par.pp
    if world > 1:
        require_mpi(f"parallel.dp={par.dp} x parallel.tp={par.tp} x parallel.pp={par.pp}", world)
    check_layout(cfg, comm.size)
    if comm.size > 1:
        install_abort_handler(comm)
    state["phase"] = "run"
    from minillm.train.trainer import train
    train(cfg, resume=args.resume, comm=comm, overwrite=args.overwrite)
    return 0


def _prepare(args):
    from minillm.data import default_dataset_dir, prepare_dataset
    from minillm.data.dataset import is_corpus
    if len(args.source) > 1 or is_corpus(args.source[0]) or _pipeline_asked(args):
        from minillm.data.pipeline import config_from_args, prepare_sharded
        prepare_sharded(config_from_args(args), verbose=True, print_report=args.report)
        return 0
    source = args.source[0]
    out = args.out or str(default_dataset_dir(source, args.tokenizer, args.vocab_size))
    prepare_dataset(source, out, args.tokenizer, args.vocab_size, args.val_fraction, verbose=True)
    return 0


_PREPARE_HELP = """Tokenize text for training.

One source without pipeline options writes the single-file layout (train.bin, val.bin). Several
sources, a directory, a JSONL file or any pipeline option (--clean, --filter, --dedup, --report,
--workers, --shard-tokens, ...) run the streaming pipeline instead: documents -> clean -> filter
-> dedup -> tokenize -> fixed-size shards + manifest.json (+ report.json), resumable after a
kill (run the same command again), split into train/val by document.

examples:
  minillm prepare shakespeare --tokenizer bpe --vocab-size 1024
  minillm prepare corpus/ more.jsonl --clean --filter --dedup --report --workers 2 \\
      --tokenizer gpt2 --out data/web
  minillm train configs/pydocs_char.toml --data.dir=data/web --data.tokenizer=gpt2
"""


def _sample(args):
    from minillm.train.inference import load_model, load_run_tokenizer, sample_text
    if args.temperature < 0:
        raise UserError(f"--temperature={args.temperature} must be >= 0 (0 = always the likeliest token)")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k={args.top_k} must be >= 1")
    if args.seed < 0:
        raise UserError(f"--seed={args.seed} must be >= 0")
    model, cfg, ckpt = load_model(args.path, args.device)
    tok = load_run_tokenizer(ckpt, cfg)
    for i in range(args.num_samples):
        print(sample_text(model, tok, args.prompt, args.max_new_tokens, args.temperature,
                          args.top_k, args.seed + i))
        if i < args.num_samples - 1:
            print("-" * 40)
    return 0


def _eval(args):
    if args.task:
        from minillm.evals.cli import eval_tasks
        return eval_tasks(args)
    from minillm.train.inference import evaluate, load_model
    model, cfg, ckpt = load_model(args.path, args.device)
    r = evaluate(model, cfg, args.iters, args.split)
    print(f"{ckpt}: {r['split']} loss {r['loss']:.4f} | perplexity {r['perplexity']:.2f} | "
          f"{r['batches']} batches of {cfg.train.batch_size}x{cfg.model.block_size} tokens")
    return 0


def _finetune(args, overrides, state):
    from minillm.distributed.comm import get_world_comm
    from minillm.finetune.loop import FinetuneOptions, Finetuner
    comm = state["comm"] = get_world_comm()  # a config error: every rank says it, rank 0 prints it
    if comm.size > 1:
        raise UserError(f"minillm finetune runs in one process; run it without mpirun (this job has "
                        f"{comm.size} ranks)")
    opts = FinetuneOptions(args.data, args.out, args.lora_rank, args.lora_alpha, args.lora_targets,
                           not args.no_pack, args.val_fraction, args.merge, args.overwrite)
    if args.grpo:
        from minillm.finetune.grpo import GroupRL
        GroupRL(args.path, opts, overrides, group=args.group, prompts=args.prompts,
                temperature=args.temperature).run()
    else:
        Finetuner(args.path, opts, overrides).run()
    return 0


def _plot(args):
    from minillm.fileio import check_writable_file
    from minillm.train.plots import plot_metrics, plot_timeline
    if args.out:
        check_writable_file(args.out, "plot", "choose another --out")
    out = plot_timeline(args.run_dir, args.out) if args.timeline else plot_metrics(args.run_dir, args.out)
    print(f"wrote {out}")
    return 0


def _inspect(args):
    from minillm.checkpoint import inspect_checkpoint
    print(inspect_checkpoint(args.checkpoint))
    return 0


def _quantize(args):
    from minillm.infer.commands import quantize_command
    quantize_command(args.path, args.bits, args.group_size, args.out, args.eval)
    return 0


def _serve(args):
    from minillm.infer.server import serve_command
    return serve_command(args)


def _bench(args, overrides):
    from minillm.perf.bench import run_bench
    run_bench(args.config, overrides, steps=args.steps, with_torch=args.torch, threads=args.threads,
              as_json=args.json)
    return 0


def _memory(args, overrides, state):
    from minillm.distributed.comm import get_world_comm
    from minillm.distributed.launch import install_abort_handler
    from minillm.perf.memory_cmd import memory_command
    comm = state["comm"] = get_world_comm()  # under mpirun rank 0 prints; --measure measures every rank
    if comm.size > 1:
        install_abort_handler(comm)
    return memory_command(args.config, overrides, measure=args.measure, limit=args.memory_limit,
                          steps=args.steps, as_json=args.json, comm=comm)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    state = {"comm": None, "phase": "config"}
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if extra and args.command not in ("train", "bench", "memory", "finetune"):
            raise UserError(f"minillm {args.command}: unrecognized arguments: {' '.join(extra)}")
        if args.command == "train":
            return _train(args, extra, state)
        if args.command == "bench":
            return _bench(args, extra)
        if args.command == "memory":
            return _memory(args, extra, state)
        if args.command == "finetune":
            return _finetune(args, extra, state)
        return {"prepare": _prepare, "sample": _sample, "eval": _eval, "plot": _plot,
                "inspect": _inspect, "quantize": _quantize, "serve": _serve}[args.command](args)
    except UserError as e:
        comm = state["comm"]
        if comm is not None and comm.size > 1 and state["phase"] == "run" and not e.on_every_rank:
            from minillm.distributed.launch import exit_with_error
            exit_with_error(comm, e)  # other ranks may be waiting on this one: end them all
        if comm is None or comm.rank == 0:  # config errors are the same on every rank: say it once
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        comm = state["comm"]
        if comm is not None and comm.size > 1:
            from minillm.distributed.launch import exit_with_error
            exit_with_error(comm, e)
        raise


def entry():
    sys.exit(main())
