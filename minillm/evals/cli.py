"""`minillm eval PATH --task NAME ...`: load once, run every task, print a table, write JSON."""
from pathlib import Path

from minillm.errors import UserError
from minillm.fileio import check_writable_file
from minillm.evals.runner import load_for_eval, results_table, run_task, use_chat, write_results
from minillm.evals.tasks import load_task


def _val_tokens(source, split):
    """The token stream of the run's dataset split (for --task val)."""
    from minillm.checkpoint import load_checkpoint
    from minillm.config import config_from_dict, data_dir
    from minillm.data import TokenDataset
    cfg = config_from_dict(load_checkpoint(source, exclude=("model", "optimizer", "adapters"))["config"])
    return TokenDataset(data_dir(cfg), split).tokens


def _unescape_stop(text: str) -> str:
    """``--stop`` with backslash escapes read ("\\n" from the command line is a newline); any
    other character, non-ASCII included, stays as typed."""
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise UserError(f"--stop={text!r}: bad backslash escape ({e.reason}); write a newline as \\n") from None


def eval_tasks(args) -> int:
    stop = _unescape_stop(args.stop)
    if args.out:
        check_writable_file(args.out, "results file", "choose another --out")
    model, tok, source = load_for_eval(args.path, args.device)
    use_chat(tok, args.format)  # a bad --format fails before any work
    results = []
    for name in args.task:
        tokens = _val_tokens(source, args.split) if name == "val" else None
        task = load_task(name, args.data, args.n, args.seed, val_tokens=tokens, stop=stop)
        results.append(run_task(model, tok, task, args.format, args.max_new_tokens))
    print(f"{source}")
    print(results_table(results))
    out = write_results(args.out or Path(source).parent / "eval_results.json", source, results)
    print(f"wrote {out}")
    return 0
