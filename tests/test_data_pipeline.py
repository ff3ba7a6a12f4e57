"""The sharded data pipeline end to end: reading rules, the report, shards and manifest, equality
across worker counts and shard sizes, training on shards, a real kill -9 and resume, bounded
memory, and one-line errors for bad input."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import minillm_env
from minillm.cli import main as cli
from minillm.data import BatchSampler, TokenDataset, ensure_dataset, read_meta
from minillm.data import documents as documents_mod
from minillm.data.clean import clean_text
from minillm.data.dedup import DedupConfig
from minillm.data.documents import ReadConfig, ReadStats, iter_documents, list_sources
from minillm.data.filters import FilterConfig, first_failure
from minillm.data.pipeline import PrepareConfig, prepare_sharded
from minillm.data.shards import ShardedTokens, verify_shards
from minillm.data.stages import doc_hash, is_val
from minillm.data.synth import CorpusSpec, generate
from minillm.data.tokenizers import load_tokenizer
from minillm.errors import UserError

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A directory: planted copies and junk in an <|endoftext|>-separated .txt, a .jsonl and a
    .txt.gz; plus the labelled documents in reading order."""
    root = tmp_path_factory.mktemp("corpus")
    docs = list(generate(CorpusSpec(n_docs=500, mean_words=150, exact_rate=0.06, near_rate=0.06,
                                    junk_rate=0.08, seed=11)))
    a, b, c = docs[:300], docs[300:420], docs[420:]
    (root / "a.txt").write_text(EOT.join(d for d, _ in a) + EOT, encoding="utf-8")
    (root / "b.jsonl").write_text("".join(json.dumps({"id": i, "text": d}) + "\n"
                                          for i, (d, _) in enumerate(b)), encoding="utf-8")
    with gzip.open(root / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write(EOT.join(d for d, _ in c))
    (root / ".hidden.txt").write_text("never read")
    (root / "notes.csv").write_text("never read")
    return root, docs


def config(corpus_dir, out, **kw):
    base = dict(sources=(str(corpus_dir),), out_dir=str(out), clean=True, filter=FilterConfig(),
                dedup=DedupConfig(), batch_mb=0.05, shard_tokens=20_000)
    base.update(kw)
    return PrepareConfig(**base)


def stream(data_dir, split):
    return np.asarray(TokenDataset(data_dir, split).tokens)


# ---------------------------------------------------------------- reading

def test_reading_rules(corpus, tmp_path, monkeypatch):
    root, docs = corpus
    entries = list_sources([root])
    assert [p.name for p in entries] == ["a.txt", "b.jsonl", "c.txt.gz"]
    got = [d for d, _, _ in iter_documents(entries, ReadConfig(), ReadStats())]
    assert got == [d for d, _ in docs]
    monkeypatch.setattr(documents_mod, "_BLOCK", 7)          # separators across block edges
    assert [d for d, _, _ in iter_documents(entries, ReadConfig(), ReadStats())] == got

    f = tmp_path / "p.txt"
    f.write_text("one\ntwo\n\n  \nthree\n\n\n" + "x" * 2500 + "\nlast")
    stats = ReadStats()
    paragraphs = [d for d, _, _ in iter_documents([f], ReadConfig("blank", max_doc_chars=1000), stats)]
    assert paragraphs[:2] == ["one\ntwo", "three"]
    assert "".join(paragraphs[2:]) == "x" * 2500 + "\nlast"
    assert [len(p) for p in paragraphs[2:]] == [1000, 1000, 505] and stats.cuts == 2


# ---------------------------------------------------------------- the report, shards, manifest

def test_pipeline_report_shards_and_manifest(corpus, tmp_path, capsys):
    root, docs = corpus
    out = tmp_path / "ds"
    manifest = prepare_sharded(config(root, out), print_report=True)
    table = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    names = [s["stage"] for s in report["stages"]]
    assert names == ["read", "clean", "filter", "exact_dedup", "near_dedup", "tokenize"]
    for prev, nxt in zip(report["stages"], report["stages"][1:]):
        assert (prev["docs_out"], prev["bytes_out"]) == (nxt["docs_in"], nxt["bytes_in"])
    # per-rule counts: recomputed here from the documents themselves
    cleaned = [clean_text(d) for d, _ in docs]
    expect = Counter(first_failure(d) for d in cleaned if d)
    assert {r: v["docs"] for r, v in report["rules"].items()} == \
        {r: n for r, n in expect.items() if r is not None}
    kept_by_filter = [d for d in cleaned if d and first_failure(d) is None]
    assert stages["filter"]["docs_out"] == len(kept_by_filter)
    exact = len(kept_by_filter) - len(set(kept_by_filter))
    assert stages["exact_dedup"]["docs_in"] - stages["exact_dedup"]["docs_out"] == exact
    assert stages["near_dedup"]["docs_out"] < stages["near_dedup"]["docs_in"]
    assert report["duplicate_clusters"] and "largest duplicate clusters" in table
    assert sum(report["length_histogram"]["read"]) == len(docs)
    assert sum(report["length_histogram"]["kept"]) == stages["tokenize"]["docs_out"]
    # shards: fixed size, checksums, counts; the split is by document hash
    sizes = [e["tokens"] for e in manifest["shards"]["train"]]
    assert all(n == 20_000 for n in sizes[:-1]) and 0 < sizes[-1] <= 20_000
    assert sum(sizes) == manifest["n_train"] == len(stream(out, "train"))
    assert verify_shards(out) == [] and not (out / "_work").exists()
    tok = load_tokenizer(out)
    for split in ("train", "val"):
        ids = stream(out, split)
        texts = tok.decode(ids.tolist()).split(EOT)[:-1]
        assert len(texts) == manifest[f"docs_{split}"]
        hashes = np.array([doc_hash(t.encode()) for t in texts], dtype=np.uint64)
        assert is_val(hashes, 0.1).all() == (split == "val") and is_val(hashes, 0.1).any() == (split == "val")
    assert read_meta(out)["vocab_size"] == tok.vocab_size


def test_workers_and_shard_sizes_change_nothing(corpus, tmp_path):
    root, _ = corpus
    a = prepare_sharded(config(root, tmp_path / "a", workers=1), verbose=False)
    b = prepare_sharded(config(root, tmp_path / "b", workers=2, batch_mb=0.2), verbose=False)
    c = prepare_sharded(config(root, tmp_path / "c", shard_tokens=7_777), verbose=False)
    assert a["shards"] == b["shards"]                       # same files, same checksums
    assert len(c["shards"]["train"]) > len(a["shards"]["train"])
    for split in ("train", "val"):
        assert (stream(tmp_path / "a", split) == stream(tmp_path / "c", split)).all()
    samplers = [BatchSampler(TokenDataset(tmp_path / d, "train").tokens, 64, 8, seed=3)
                for d in ("a", "c")]
    flat = BatchSampler(stream(tmp_path / "a", "train"), 64, 8, seed=3)
    for step in range(5):
        x = [s.get_batch(step, 2, 4) for s in samplers + [flat]]
        assert all((x[0][0] == o[0]).all() and (x[0][1] == o[1]).all() for o in x[1:])


def test_sharded_tokens_index_like_an_array(tmp_path):
    parts = [np.arange(s, s + n, dtype="<u2") for s, n in ((0, 5), (5, 1), (6, 9))]
    for i, p in enumerate(parts):
        p.tofile(tmp_path / f"p{i}.bin")
    st = ShardedTokens([tmp_path / f"p{i}.bin" for i in range(3)], [5, 1, 9], "uint16")
    flat = np.arange(15)
    assert len(st) == 15 and st[5] == 5 and st[-1] == 14
    assert (st[3:12] == flat[3:12]).all() and (st[::4] == flat[::4]).all()
    idx = np.array([[0, 4, 5, 6], [14, 6, 5, 0]])
    assert (st[idx] == flat[idx]).all()
    with pytest.raises(IndexError):
        st[np.array([15])]


# ---------------------------------------------------------------- training on shards

def test_training_on_shards_equals_training_on_one_file(corpus, tmp_path):
    """The same token stream as shards and as one file trains the same run, bit for bit."""
    from minillm.config import load_config
    from minillm.train.metrics import read_metrics
    from minillm.train.trainer import train
    root, _ = corpus
    shards = tmp_path / "shards"
    cfg = config(root, shards, shard_tokens=3_000, filter=None, dedup=None)
    manifest = prepare_sharded(cfg, verbose=False)
    tok = load_tokenizer(shards)
    # the expected stream, made independently: each document's ids and the end-of-text id
    single = tmp_path / "single"
    single.mkdir()
    for split in ("train", "val"):
        ids = []
        for doc, _, _ in iter_documents(list_sources([root]), ReadConfig(), ReadStats()):
            doc = clean_text(doc)
            if doc and is_val(np.array([doc_hash(doc.encode())], dtype=np.uint64), 0.1)[0] == (split == "val"):
                ids += tok.encode_ordinary(doc) + [tok.eot_id]
        np.asarray(ids, dtype="<u2").tofile(single / f"{split}.bin")
        assert (stream(shards, split) == np.asarray(ids)).all()
    tok.save(single)
    (single / "meta.json").write_text(json.dumps({       # as prepare_dataset("pydocs") writes it
        "format": 1, "source": "pydocs", "tokenizer": "char", "requested_vocab_size": None,
        "val_fraction": 0.1, "vocab_size": tok.vocab_size, "dtype": "uint16",
        "n_train": manifest["n_train"], "n_val": manifest["n_val"], "eot_id": tok.eot_id}))
    runs = []
    for name, data in (("a", shards), ("b", single)):
        over = [f"--data.dir={data}", f"--train.out_dir={tmp_path / name}", "--model.n_layer=1",
                "--model.n_embd=32", "--model.n_head=2", "--model.block_size=32",
                "--train.batch_size=4", "--train.max_steps=6", "--train.eval_interval=6",
                "--train.eval_iters=2", "--train.log_interval=1", "--train.sample_tokens=0"]
        train(load_config(None, over), log=lambda m: None)
        runs.append([(r["loss"], r.get("val_loss")) for r in read_metrics(tmp_path / name)])
    assert runs[0] == runs[1] and len(runs[0]) == 6


def test_a_config_naming_a_directory_prepares_it_as_shards(corpus, tmp_path, capsys):
    root, _ = corpus
    meta = ensure_dataset(str(root), tmp_path / "auto", "char")
    assert meta["layout"] == "shards" and read_meta(tmp_path / "auto") == meta
    assert ensure_dataset(str(root), tmp_path / "auto", "char") == meta        # reused
    assert ensure_dataset("pydocs", tmp_path / "auto", "char") == meta         # as prepared
    assert "holds a sharded dataset" in _error(capsys, "pydocs", "--out", tmp_path / "auto")


# ---------------------------------------------------------------- kill -9 and resume

def _prepare_cmd(root, out, *extra):
    return [sys.executable, "-m", "minillm", "prepare", str(root), "--out", str(out), "--clean",
            "--filter", "--dedup", "--batch-mb", "0.02", "--shard-tokens", "5000", *extra]


def _kill_when(cmd, path_glob, out):
    proc = subprocess.Popen(cmd, env=minillm_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(out.glob(path_glob)):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()            # it really was killed midway


def test_killed_prepare_resumes_to_identical_shards(corpus, tmp_path):
    root, _ = corpus
    ref = tmp_path / "ref"                                  # the same options, uninterrupted
    prepare_sharded(config(root, ref, batch_mb=0.02, shard_tokens=5000), verbose=False)
    out = tmp_path / "out"
    _kill_when(_prepare_cmd(root, out), "_work/parts/000004.json", out)       # while scanning
    _kill_when(_prepare_cmd(root, out, "--workers", "2"), "_work/tok/000003.json", out)
    done = subprocess.run(_prepare_cmd(root, out), env=minillm_env(), capture_output=True,
                          text=True)
    assert done.returncode == 0 and "resuming" in done.stdout, done.stderr
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (ref, out))
    assert a["shards"] == b["shards"] and len(a["shards"]["train"]) > 3
    for e in a["shards"]["train"] + a["shards"]["val"]:
        assert (ref / e["file"]).read_bytes() == (out / e["file"]).read_bytes()


def test_resume_keeps_finished_shards(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "ds"
    cfg = config(root, out, keep_work=True, shard_tokens=4_000)
    first = prepare_sharded(cfg, verbose=False)
    files = [out / e["file"] for e in first["shards"]["train"]]
    stamp = {f: f.stat().st_mtime_ns for f in files}
    (out / "manifest.json").unlink()                        # as if killed while writing shards
    files[1].unlink()
    with open(files[2], "r+b") as f:
        f.truncate(100)
    again = prepare_sharded(cfg, verbose=False)
    assert again["shards"] == first["shards"]
    assert all(f.stat().st_mtime_ns == stamp[f] for f in files if f not in files[1:3])
    assert verify_shards(out) == []


# ---------------------------------------------------------------- bounded memory

def test_memory_stays_bounded_on_a_file_larger_than_the_cap(tmp_path):
    """10 MB of documents streamed through read, clean, exact dedup, tokenize and shards, in
    this process, with traced memory held under 2.5 MB (4x smaller than the input)."""
    base = [d for d, _ in generate(CorpusSpec(n_docs=40, mean_words=200, junk_rate=0, seed=2))]
    path, size = tmp_path / "big.txt", 0
    with open(path, "w", encoding="utf-8") as f:
        i = 0
        while size < 10_000_000:
            doc = f"{base[i % len(base)]} number {i}{EOT}"
            f.write(doc)
            size += len(doc)
            i += 1
    cfg = PrepareConfig(sources=(str(path),), out_dir=str(tmp_path / "ds"), clean=True,
                        dedup=DedupConfig(near=False), batch_mb=0.25, shard_tokens=1_000_000)
    tracemalloc.start()
    manifest = prepare_sharded(cfg, verbose=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert manifest["n_train"] + manifest["n_val"] > 9_000_000
    assert peak < 2_500_000, f"peak traced memory {peak / 1e6:.1f} MB"


# ---------------------------------------------------------------- bad input: one line, exit 2

def _error(capsys, *argv) -> str:
    assert cli(["prepare", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_input_is_one_line(corpus, tmp_path, capsys):
    root, _ = corpus
    good = "A line of text that is fine. " * 20
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes((good + EOT + "caf\xe9 latin-1\n" + EOT + good).encode("latin-1"))
    err = _error(capsys, mixed, "--out", tmp_path / "o1", "--clean")
    assert "mixed.txt" in err and "line 1, byte" in err and "--bad-utf8 skip" in err
    mixed.write_bytes(EOT.join([f"{i} {good}" for i in range(20)] + ["caf\xe9 latin-1"])
                      .encode("latin-1"))
    assert cli(["prepare", str(mixed), "--out", str(tmp_path / "o2"), "--bad-utf8", "skip",
                "--report", "--val-fraction", "0.5"]) == 0
    assert "invalid_utf8_docs" in (tmp_path / "o2" / "report.json").read_text()
    assert json.loads((tmp_path / "o2" / "report.json").read_text())["stages"][0]["invalid_utf8_docs"] == 1

    broken = tmp_path / "broken.txt.gz"
    broken.write_bytes(gzip.compress(good.encode())[:-12])
    assert "cannot read" in _error(capsys, broken, "--out", tmp_path / "o3")
    if os.geteuid() != 0:                                 # root reads any file
        locked = tmp_path / "locked.txt"
        locked.write_text(good)
        locked.chmod(0)
        assert "cannot read" in _error(capsys, locked, "--clean", "--out", tmp_path / "o4")

    short = tmp_path / "short.txt"
    short.write_text(EOT.join(["too short"] * 30))
    assert "no documents left" in _error(capsys, short, "--filter", "--out", tmp_path / "o6")

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    assert "line 2 has no string field 'text'" in _error(capsys, bad_json, "--out", tmp_path / "o7")
    bad_json.write_text('{"text": "ok"}\n{not json\n')
    assert "line 2 is not valid JSON" in _error(capsys, bad_json, "--out", tmp_path / "o8")
    assert "does not exist" in _error(capsys, tmp_path / "nope", "--clean")
    assert "is a file" in _error(capsys, root, "--clean", "--out", short / "o10")  # --out under a file
    assert "--dedup-threshold" in _error(capsys, root, "--dedup-threshold", "2", "--out", tmp_path / "o9")


def test_tokenizer_mismatch_is_one_line(corpus, tmp_path, minillm_cli):
    root, _ = corpus
    out = tmp_path / "ds"
    prepare_sharded(config(root, out, filter=None, dedup=None), verbose=False)
    r = minillm_cli("train", f"--data.dir={out}", "--data.tokenizer=gpt2",
                    f"--train.out_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "manifest.json was made with the char tokenizer" in r.stderr
    assert "--data.tokenizer=char" in r.stderr
    (out / "tokenizer.json").write_text(json.dumps({"kind": "char", "chars": ["a", "b"]}))
    with pytest.raises(UserError, match="tokenizer.json is not the tokenizer the shards were made"):
        TokenDataset(out, "train")
