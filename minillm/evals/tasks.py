"""Evaluation tasks: what is asked, what counts as right. Built-in ones need no download.

Three kinds of task:

    text     loss, perplexity and bits per byte of a text (any text file, or the run's val split)
    choice   multiple choice, rows {"context", "choices", "answer": index}: each choice scored by
             its log-likelihood after the context, divided by its length in bytes (HellaSwag's
             acc_norm), so long choices are not punished for having more tokens to pay for
    exact    generation, rows {"prompt", "answer"}: greedy decoding up to a stop string; right
             when the text before the stop equals the answer

Built-in tasks, generated from a seed (the same rows on every machine):

    add2, add3   "47+38=" -> "85": n-digit addition. All pairs are shuffled once; the first
                 TEST_ROWS are the test split, the rest the train split, so fine-tuning on
                 ``train`` never sees a test question.
    copy         "copy kqzv: " -> "kqzv": repeat a random lowercase string (train/test disjoint)
    pydocs-cloze a word blanked out of held-out documents of the embedded Python docs (the last
                 tenth of the text, the validation split of the pydocs datasets), the right word
                 against three words of similar length from the same text
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from minillm.data.chat import read_jsonl
from minillm.errors import UserError

TEST_ROWS = 500
KINDS = ("text", "choice", "exact")


@dataclass
class Task:
    name: str
    kind: str                      # "text" | "choice" | "exact"
    rows: list = field(default_factory=list)
    text: str = ""                 # kind "text": the text itself ("" with tokens set)
    tokens: object = None          # kind "text": a token array instead of text (the run's val split)
    stop: str = "\n"               # kind "exact": where a generated answer ends (plain prompts)


# ------------------------------------------------------------------ generated tasks
def addition_rows(digits, split="test", n=None, seed=0):
    """n-digit addition problems of one split (see the module docstring)."""
    size = 10 ** digits
    rng = numpy.random.default_rng([seed, digits])
    order = rng.permutation(size * size)
    picked = order[:TEST_ROWS] if split == "test" else order[TEST_ROWS:]
    if n is not None:
        picked = picked[:n]
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in (divmod(int(i), size) for i in picked)]


def copy_rows(split="test", n=None, seed=0, letters="abcdefghijklmnopqrstuvwxyz"):
    """Copy a random 3-8 letter string; the train split skips every test string."""
    def strings(stream, count, avoid=frozenset()):
        rng = numpy.random.default_rng([seed, stream])
        out = []
        while len(out) < count:
            s = "".join(rng.choice(list(letters), int(rng.integers(3, 9))))
            if s not in avoid:
                out.append(s)
        return out
    test = strings(0, TEST_ROWS)
    picked = test[:n] if split == "test" else strings(1, n or 20000, frozenset(test))
    return [{"prompt": f"copy {s}: ", "answer": s} for s in picked]


def heldout_pydocs(fraction=0.1):
    """The last ``fraction`` of the embedded pydocs text, from the first paragraph that starts
    inside it (so no held-out paragraph was partly in the training split)."""
    from minillm.data.sources import pydocs_text
    text = pydocs_text()
    cut = text.index("\n\n", int(len(text) * (1 - fraction))) + 2
    return text[cut:]


def cloze_rows(n=None, seed=0, context_chars=120):
    """Multiple-choice cloze rows from held-out pydocs text (see the module docstring)."""
    import re
    text = heldout_pydocs()
    words = [(m.start(), m.group()) for m in re.finditer(r"(?<=[ (])[A-Za-z]{4,12}(?=[ .,;:)])", text)]
    pool = sorted({w for _, w in words})
    rng = numpy.random.default_rng([seed, 3])
    rows = []
    for k in rng.permutation(len(words)):
        start, word = words[int(k)]
        if start < context_chars:
            continue
        near = [w for w in pool if abs(len(w) - len(word)) <= 1 and w.lower() != word.lower()]
        wrong = [near[int(i)] for i in rng.choice(len(near), 3, replace=False)]
        answer = int(rng.integers(0, 4))
        rows.append({"context": text[start - context_chars:start], "choices": wrong[:answer] + [word] + wrong[answer:],
                     "answer": answer})
        if len(rows) == (n or TEST_ROWS):
            break
    return rows


GENERATED = {"add2": lambda split, n, seed: addition_rows(2, split, n, seed),
             "add3": lambda split, n, seed: addition_rows(3, split, n, seed),
             "copy": copy_rows}
BUILTIN = ("val", "add2", "add3", "copy", "pydocs-cloze")
FROM_FILE = ("text", "choice", "exact")


def train_rows(name, n=None, seed=0):
    """Training rows (prompt/completion) of a generated task, disjoint from its test rows."""
    if name not in GENERATED:
        raise UserError(f"{name!r} is not a generated task; choose one of {', '.join(GENERATED)}")
    return [{"prompt": r["prompt"], "completion": r["answer"]} for r in GENERATED[name]("train", n, seed)]


# ------------------------------------------------------------------ from files
def _check_rows(rows, kind):
    """Rows of a choice or exact JSONL file, each checked; a bad one is named by file and line."""
    out = []
    for where, r in rows:
        if kind == "choice":
            ok = (isinstance(r, dict) and isinstance(r.get("context"), str) and isinstance(r.get("choices"), list)
                  and len(r["choices"]) >= 2 and all(isinstance(c, str) and c for c in r["choices"])
                  and isinstance(r.get("answer"), int) and 0 <= r["answer"] < len(r["choices"]))
            need = "'context' (string), 'choices' (2 or more non-empty strings), 'answer' (index of the right one)"
        else:
            ok = isinstance(r, dict) and isinstance(r.get("prompt"), str) and isinstance(r.get("answer"), str)
            need = "'prompt' and 'answer' (strings)"
        if not ok:
            keys = sorted(r) if isinstance(r, dict) else type(r).__name__
            raise UserError(f"{where}: a {kind} row needs {need}; it has {keys}")
        out.append(r)
    return out


def load_task(name, data=None, n=None, seed=0, val_tokens=None, stop="\n") -> Task:
    """The Task called ``name``: a built-in, or text / choice / exact read from ``data`` (or
    spelled ``text:FILE``, so several file tasks fit in one command)."""
    kind, colon, path = name.partition(":")
    if colon and kind in FROM_FILE:
        name, data = kind, path
    if name in FROM_FILE:
        if not data:
            raise UserError(f"--task {name} reads its rows from a file: add --data FILE (or --task {name}:FILE)")
        if name == "text":
            from minillm.data.sources import read_text_file
            return Task("text:" + Path(data).name, "text", text=read_text_file(data))
        rows = _check_rows(read_jsonl(data), name)
        return Task(f"{name}:{Path(data).name}", name, rows=rows[:n] if n else rows, stop=stop)
    if name == "val":
        return Task("val", "text", tokens=val_tokens)
    if name in GENERATED:
        return Task(name, "exact", rows=GENERATED[name]("test", n, seed), stop=stop)
    if name == "pydocs-cloze":
        return Task(name, "choice", rows=cloze_rows(n, seed))
    raise UserError(f"unknown task {name!r}; built in: {', '.join(BUILTIN)}; from a file: "
                    f"{', '.join(FROM_FILE)} (with --data)")
