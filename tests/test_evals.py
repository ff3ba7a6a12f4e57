"""The evaluation harness: bits per byte against its definition, log-likelihood scoring with
right padding, length-normalised multiple choice, exact match with a stop string, the built-in
tasks (seeded, train and test disjoint), and `minillm eval --task` end to end."""
import json
import math

import numpy as np
import pytest

import minillm.functional as F
from minillm import backend
from minillm.autograd.tensor import Tensor, no_grad
from minillm.data.tokenizers import BPETokenizer, CharTokenizer
from minillm.errors import UserError
from minillm.evals import continuation_logprobs, load_task, run_task, text_loss
from minillm.evals.tasks import Task, addition_rows, cloze_rows, copy_rows, train_rows
from minillm.model import GPT, GPTConfig

TEXT = "Größe: naïve café. " * 6 + "the end"


def test_bits_per_byte_is_loss_over_ln2_times_bytes_per_token():
    for tok in (CharTokenizer.train(TEXT), BPETokenizer.train(TEXT * 3, vocab_size=270)):
        ids = tok.encode(TEXT)
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16), seed=0)
        r = text_loss(model, tok, ids, batch_size=3)
        # the definition, computed here independently: every token after the first, in windows of 16
        nll = 0.0
        with no_grad():
            for s in range(0, len(ids) - 1, 16):
                x, y = ids[s:s + 16], ids[s + 1:s + 17]
                logits = model(np.asarray([x[:len(y)]]))[0]
                nll += float(F.cross_entropy(logits, np.asarray([y])).data) * len(y)
        n_bytes = len(tok.decode(ids[1:]).encode("utf-8"))
        assert r["tokens"] == len(ids) - 1 and r["bytes"] == n_bytes
        assert r["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-6)
        assert r["bits_per_byte"] == pytest.approx(r["loss"] / (math.log(2) * n_bytes / (len(ids) - 1)), rel=1e-12)
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert r["bytes_per_token"] > 1.5  # the BPE case really has several bytes per token


def test_a_padded_vocabulary_gets_no_probability_as_in_minillm_eval():
    """A model whose vocabulary is padded past the tokenizer's (tensor parallelism, round sizes):
    the padded ids are masked before the softmax, exactly as `minillm eval` scores."""
    tok = CharTokenizer.train(TEXT)
    ids = tok.encode(TEXT)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size + 5, block_size=16, n_layer=1, n_head=2, n_embd=16), seed=0)
    r = text_loss(model, tok, ids, batch_size=3)
    nll = 0.0
    with no_grad():
        for s in range(0, len(ids) - 1, 16):
            x, y = ids[s:s + 16], ids[s + 1:s + 17]
            logits = model(np.asarray([x[:len(y)]]))[0][..., :tok.vocab_size]  # the real ids only
            nll += float(F.cross_entropy(logits, np.asarray([y])).data) * len(y)
    assert r["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-6)


def test_continuation_logprobs_equal_a_direct_sum_with_padding_and_truncation():
    model = GPT(GPTConfig(vocab_size=9, block_size=8, n_layer=1, n_head=1, n_embd=8), seed=1)
    rng = np.random.default_rng(0)
    pairs = [(list(rng.integers(0, 9, n)), list(rng.integers(0, 9, k))) for n, k in ((3, 2), (6, 1), (12, 3))]
    batched = continuation_logprobs(model, pairs, batch_size=3)   # padded on the right together
    for (ctx, cont), got in zip(pairs, batched):
        seq = (ctx + cont)[-9:]                                       # the context cut on the left to fit
        with no_grad():
            logp = F.log_softmax(model(np.asarray([seq[:-1]]))[0]).numpy()[0]
        want = sum(logp[len(seq) - 1 - len(cont) + j, t] for j, t in enumerate(cont))
        assert got == pytest.approx(want, rel=1e-6)


class Unigram:
    """A stand-in model whose next-token distribution ignores the context: p(a) = 0.5,
    p(b) = 0.1, the rest shared; it lets the test know every score exactly."""

    def __init__(self, tok):
        self.config = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=1, n_embd=4)
        p = np.full(tok.vocab_size, 0.4 / (tok.vocab_size - 2))
        p[tok.encode("a")[0]], p[tok.encode("b")[0]] = 0.5, 0.1
        self.logits = np.log(p)

    def __call__(self, idx, targets=None, **kw):
        idx = backend.to_numpy(idx)
        return Tensor(backend.asarray(np.broadcast_to(self.logits, idx.shape + self.logits.shape).copy())), None


def test_multiple_choice_normalises_by_length():
    tok = CharTokenizer.train("abcxyz ")
    task = Task("mc", "choice", rows=[{"context": "xyz ", "choices": ["aaaa", "b"], "answer": 0}] * 3)
    r = run_task(Unigram(tok), tok, task)
    # raw: 4 ln 0.5 = -2.77 < ln 0.1 = -2.30 picks "b"; per byte: -0.69 > -2.30 picks "aaaa"
    assert r["acc"] == 0.0 and r["acc_norm"] == 1.0 and r["chance"] == 0.5


class Adder:
    """A stand-in model that answers "a+b=" prompts by arithmetic (off by ``error``), then a newline."""

    def __init__(self, tok, error=0):
        self.tok, self.error = tok, error
        self.config = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=1, n_embd=4)

    def generate(self, idx, max_new_tokens, temperature=1.0, **kw):
        assert temperature == 0
        rows = []
        for row in idx.tolist():
            a, b = self.tok.decode(row).rstrip("=").split("+")
            rows.append(row + self.tok.encode(f"{int(a) + int(b) + self.error}\nxx")[:max_new_tokens])
        return np.asarray(rows)


def test_exact_match_cuts_at_the_stop_string():
    tok = CharTokenizer.train("0123456789+=\nx")
    task = load_task("add2", n=40)
    assert run_task(Adder(tok), tok, task, fmt="plain")["exact_match"] == 1.0
    assert run_task(Adder(tok, error=1), tok, task, fmt="plain")["exact_match"] == 0.0
    no_stop = run_task(Adder(tok), tok, load_task("add2", n=40, stop=""), fmt="plain")
    assert no_stop["exact_match"] == 0.0 and no_stop["examples"][0]["got"].endswith("\nxx")


def test_builtin_tasks_are_seeded_and_train_never_sees_test():
    assert addition_rows(2) == addition_rows(2) != addition_rows(2, seed=1)
    test = {r["prompt"] for r in addition_rows(2)}
    train = {r["prompt"] for r in train_rows("add2")}
    assert len(test) == 500 and len(train) == 9500 and not test & train
    assert all(int(r["prompt"][:-1].split("+")[0]) + int(r["prompt"][:-1].split("+")[1]) == int(r["answer"])
               for r in addition_rows(3, n=50))
    assert not {r["prompt"] for r in copy_rows()} & {r["prompt"] for r in copy_rows("train", n=3000)}
    rows = cloze_rows(n=20)
    assert len(rows) == 20 and all(r["context"] and r["choices"][r["answer"]] not in r["choices"][:r["answer"]]
                                   for r in rows)


def test_bad_task_files_are_named(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"context": "x", "choices": ["a", "b"], "answer": 1}) + "\n"
                    + json.dumps({"context": "x", "choices": ["a"], "answer": 0}) + "\n")
    with pytest.raises(UserError, match=r"mc\.jsonl line 2: a choice row needs"):
        load_task("choice", str(path))
    with pytest.raises(UserError, match="unknown task 'add5'"):
        load_task("add5")
    with pytest.raises(UserError, match="add --data FILE"):
        load_task("exact")


def test_eval_tasks_from_the_command_line(tiny_run, tmp_path, minillm_cli, capsys):  # tiny_run: conftest.py
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    exact = tmp_path / "ex.jsonl"
    exact.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    out = tmp_path / "res.json"
    r = minillm_cli("eval", tiny_run, "--task", "text", "--data", text, "--task", "add2", "--task", "copy",
                    "--task", "pydocs-cloze", "--task", "val", "--task", f"exact:{exact}", "--n", "20",
                    "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    got = {x["task"]: x for x in doc["results"]}
    assert set(got) == {"text:t.txt", "add2", "copy", "pydocs-cloze", "val", "exact:ex.jsonl"}
    assert got["add2"]["n"] == 20 and got["add2"]["format"] == "plain"
    assert got["text:t.txt"]["bits_per_byte"] == pytest.approx(got["text:t.txt"]["loss"] / math.log(2))  # 1 byte/char
    for name in got:
        assert name in r.stdout
    latin1 = tmp_path / "l1.jsonl"
    latin1.write_bytes(json.dumps({"prompt": "caf\u00e9", "answer": "1"}, ensure_ascii=False).encode("latin-1"))
    from minillm.cli import main
    for args, words in [(("--task", "exact"), "add --data FILE"),
                        (("--task", "add2", "--format", "chat"), "no chat template tokens"),
                        (("--task", "nope"), "unknown task 'nope'"),
                        (("--task", f"choice:{exact}"), "ex.jsonl line 1: a choice row needs"),
                        (("--task", f"exact:{latin1}"), "l1.jsonl: not UTF-8"),
                        (("--task", "add2", "--stop", "\\x"), "--stop="),
                        (("--task", "add2", "--out", str(text / "r.json")), "choose another --out")]:
        assert main(["eval", str(tiny_run), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
