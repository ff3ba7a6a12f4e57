"""Running tasks on a model: load it (checkpoint, run directory or LoRA adapter file), score each
task, and report the results as JSON and as a table."""
import datetime
import json
import time
from pathlib import Path

from minillm import __version__
from minillm.data.chat import END, has_template, prompt_ids, require_template
from minillm.errors import UserError
from minillm.fileio import write_atomic
from minillm.evals.scoring import continuation_logprobs, greedy_answers, text_loss, byte_length

FORMATS = ("auto", "plain", "chat")


def load_for_eval(path, device=None):
    """(model, tokenizer, source path) from a run directory, a checkpoint or a LoRA adapter file
    (its base checkpoint loaded and the adapters merged in)."""
    from minillm.finetune.adapters import find_adapter, is_adapter_file, load_adapted
    p = Path(path)
    adapter = p if p.is_file() and is_adapter_file(p) else find_adapter(p) if p.is_dir() else None
    if adapter is not None:
        model, _, tok = load_adapted(adapter, device)
        return model, tok, adapter
    from minillm.train.inference import load_model, load_run_tokenizer
    model, cfg, ckpt = load_model(path, device)
    return model, load_run_tokenizer(ckpt, cfg), ckpt


def use_chat(tok, fmt, where="--format chat"):
    if fmt not in FORMATS:
        raise UserError(f"--format={fmt!r} must be one of {', '.join(FORMATS)}")
    if fmt == "chat":
        require_template(tok, where)
    return fmt == "chat" or (fmt == "auto" and has_template(tok))


def _encode(tok, text, where):
    try:
        return tok.encode_plain(text) if hasattr(tok, "encode_plain") else tok.encode(text)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def run_task(model, tok, task, fmt="auto", max_new_tokens=None, examples=5) -> dict:
    """Score ``task`` (a tasks.Task); returns its metrics, row count, seconds and a few examples."""
    t0 = time.perf_counter()
    if task.kind == "text":
        ids = task.tokens if task.tokens is not None else _encode(tok, task.text, task.name)
        out = text_loss(model, tok, ids)
    elif task.kind == "choice":
        out = _choice(model, tok, task, examples)
    else:
        out = _exact(model, tok, task, use_chat(tok, fmt), max_new_tokens, examples)
    return dict(task=task.name, kind=task.kind, **out, seconds=time.perf_counter() - t0)


def _choice(model, tok, task, examples):
    pairs, spans = [], []
    for i, r in enumerate(task.rows):
        ctx = _encode(tok, r["context"], f"{task.name} row {i}")
        spans.append((len(pairs), len(r["choices"])))
        pairs += [(ctx, _encode(tok, c, f"{task.name} row {i}")) for c in r["choices"]]
    scores = continuation_logprobs(model, pairs, n_valid=tok.vocab_size)
    right = right_norm = 0
    shown = []
    for r, (start, k) in zip(task.rows, spans):
        raw = scores[start:start + k]
        norm = [s / byte_length(tok, pairs[start + j][1]) for j, s in enumerate(raw)]
        pick, pick_norm = max(range(k), key=raw.__getitem__), max(range(k), key=norm.__getitem__)
        right += pick == r["answer"]
        right_norm += pick_norm == r["answer"]
        if len(shown) < examples:
            shown.append({"context": r["context"][-60:], "answer": r["choices"][r["answer"]],
                          "picked": r["choices"][pick_norm]})
    n = len(task.rows)
    return {"n": n, "acc_norm": right_norm / n, "acc": right / n, "chance": sum(1 / k for _, k in spans) / n,
            "examples": shown}


def _exact(model, tok, task, chat, max_new_tokens, examples):
    if chat:
        prompts = [prompt_ids(tok, [{"role": "user", "content": r["prompt"]}], f"{task.name} row {i}")
                   for i, r in enumerate(task.rows)]
        stop_id = tok.token_id(END)
    else:
        prompts = [_encode(tok, r["prompt"], f"{task.name} row {i}") for i, r in enumerate(task.rows)]
        stop_id = None
    longest = max(len(_encode(tok, r["answer"], task.name)) for r in task.rows)
    answers = greedy_answers(model, prompts, max_new_tokens or longest + 2, stop_id)
    right, shown = 0, []
    for r, ids in zip(task.rows, answers):
        text = tok.decode(ids)
        got = text if chat else text.split(task.stop)[0] if task.stop else text
        ok = got.strip() == r["answer"].strip()
        right += ok
        if len(shown) < examples:
            shown.append({"prompt": r["prompt"], "answer": r["answer"], "got": got, "ok": bool(ok)})
    return {"n": len(task.rows), "exact_match": right / len(task.rows), "format": "chat" if chat else "plain",
            "examples": shown}


MAIN_METRIC = {"text": "bits_per_byte", "choice": "acc_norm", "exact": "exact_match"}


def results_table(results) -> str:
    """One line per task: its main metric, the others, rows and seconds."""
    lines = [f"{'task':<22} {'metric':<14} {'value':>8} {'n':>7} {'seconds':>8}  other"]
    for r in results:
        main = MAIN_METRIC[r["kind"]]
        n = r.get("n", r.get("tokens"))
        other = {"text": ("loss", "perplexity"), "choice": ("acc", "chance"), "exact": ("format",)}[r["kind"]]
        rest = "  ".join(f"{k} {r[k]:.4f}" if isinstance(r[k], float) else f"{k} {r[k]}" for k in other)
        lines.append(f"{r['task']:<22} {main:<14} {r[main]:>8.4f} {n:>7} {r['seconds']:>8.1f}  {rest}")
    return "\n".join(lines)


def write_results(path, source, results) -> Path:
    doc = {"checkpoint": str(source), "minillm_version": __version__,
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "results": results}
    return write_atomic(path, json.dumps(doc, indent=1) + "\n", "results file", "choose another --out")
