"""The two per-batch stages of the data pipeline, run in worker processes, and their files.

``scan_batch`` (stage 1): documents -> cleaned -> filtered -> content hash, MinHash signature and
LSH band keys -> a spool part on disk (the surviving documents' text plus those numbers).
``tokenize_part`` (stage 4): a spool part -> the kept documents' token ids, each document
followed by the end-of-text id, routed to train or val by its hash -> two token files.

Each part is written under temporary names and completed by renaming its small ``.json`` last, so
a part whose ``.json`` exists is whole; a killed run redoes only parts without one. Parts are a
function of their input documents and the options, never of the worker count or timing.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from minillm.data.clean import clean_text
from minillm.data.filters import FilterConfig, first_failure
from minillm.data.minhash import MinHasher
from minillm.errors import UserError

HIST_BINS = 32                        # document lengths in bytes: bin b holds [2**b, 2**(b+1))
_STATE: dict = {}                     # per-process: options, MinHasher, tokenizer (set by init_*)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _save_npy(path: Path, array) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    _atomic(path, write)


def _save_json(path: Path, obj) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(obj), encoding="utf-8"))


def length_histogram(nbytes) -> list[int]:
    b = np.clip(np.log2(np.maximum(np.asarray(nbytes, dtype=np.float64), 1)).astype(int),
                0, HIST_BINS - 1)
    return np.bincount(b, minlength=HIST_BINS).tolist()


def doc_hash(data: bytes) -> int:
    """The 64-bit content hash used for exact dedup and the train/val split."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def is_val(hashes: np.ndarray, val_fraction: float) -> np.ndarray:
    """Document -> val split iff its hash, read as a number in [0, 1), is below val_fraction:
    a property of the text alone (not of its position), so copies share a split."""
    return (np.asarray(hashes, dtype=np.uint64) >> np.uint64(11)) * 2.0 ** -53 < val_fraction


# ---------------------------------------------------------------- stage 1: scan

def init_scan(options: dict, work: str) -> None:
    _STATE.clear()
    _STATE.update(options=options, work=Path(work),
                  filter=FilterConfig(**options["filter"]) if options["filter"] else None)
    d = options["dedup"]
    if d:
        _STATE["minhash"] = MinHasher(d["bands"], d["rows"], d["ngram"], d["seed"])


def part_path(work: Path, k: int, suffix: str) -> Path:
    return work / "parts" / f"{k:06d}{suffix}"


def scan_batch(task):
    """Stage 1 on one batch ``(k, texts, origins)``; ``texts is None``: the part exists already,
    return its stats. Returns the part's stats dict."""
    k, texts, origins = task
    work, opt = _STATE["work"], _STATE["options"]
    done = part_path(work, k, ".json")
    if texts is None:
        return json.loads(done.read_text(encoding="utf-8"))
    t = {"clean": 0.0, "filter": 0.0, "hash": 0.0, "minhash": 0.0}
    raw_bytes = [len(d.encode("utf-8")) for d in texts]
    st = {"docs_in": len(texts), "bytes_in": sum(raw_bytes), "hist_in": length_histogram(raw_bytes),
          "empty": [0, 0], "clean_bytes_out": 0, "rules": {}}
    keep_text, keep_origin = [], []
    for doc, nb, origin in zip(texts, raw_bytes, origins):
        if opt["clean"]:
            t0 = time.process_time()
            doc = clean_text(doc)
            t["clean"] += time.process_time() - t0
            if not doc:
                st["empty"][0] += 1
                st["empty"][1] += nb
                continue
            st["clean_bytes_out"] += len(doc.encode("utf-8"))
        if _STATE["filter"] is not None:
            t0 = time.process_time()
            rule = first_failure(doc, _STATE["filter"])
            t["filter"] += time.process_time() - t0
            if rule is not None:
                r = st["rules"].setdefault(rule, [0, 0])
                r[0] += 1
                r[1] += len(doc.encode("utf-8"))
                continue
        keep_text.append(doc)
        keep_origin.append(origin)
    t0 = time.process_time()
    data = [d.encode("utf-8") for d in keep_text]
    hashes = np.array([doc_hash(b) for b in data], dtype=np.uint64)
    offsets = np.concatenate(([0], np.cumsum([len(b) for b in data], dtype=np.int64)))
    t["hash"] = time.process_time() - t0
    if "minhash" in _STATE:
        t0 = time.process_time()
        sig = _STATE["minhash"].signatures(keep_text)
        _save_npy(part_path(work, k, ".sig.npy"), sig)
        _save_npy(part_path(work, k, ".keys.npy"), _STATE["minhash"].band_keys(sig))
        t["minhash"] = time.process_time() - t0
    _atomic(part_path(work, k, ".txt"), lambda tmp: tmp.write_bytes(b"".join(data)))
    _save_npy(part_path(work, k, ".idx.npy"), np.stack([offsets[:-1], offsets[1:]], axis=1))
    _save_npy(part_path(work, k, ".hash.npy"), hashes)
    _save_npy(part_path(work, k, ".origin.npy"), np.array(keep_origin, dtype=np.int64).reshape(-1, 2))
    st.update(docs_out=len(data), bytes_out=int(offsets[-1]), times=t,
              chars="".join(sorted(set().union(*keep_text))) if opt["chars"] else "")
    _save_json(done, st)                                        # last: the part is complete
    return st


def read_part_docs(work: Path, k: int):
    """The documents of spool part ``k`` as a list of str."""
    data = part_path(work, k, ".txt").read_bytes()
    idx = np.load(part_path(work, k, ".idx.npy"))
    return [data[a:b].decode("utf-8") for a, b in idx]


# ---------------------------------------------------------------- stage 4: tokenize

def init_tokenize(work: str, val_fraction: float, dtype: str) -> None:
    from minillm.data.tokenizers import load_tokenizer
    _STATE.clear()
    _STATE.update(work=Path(work), val_fraction=val_fraction, dtype=np.dtype(dtype).newbyteorder("<"),
                  tok=load_tokenizer(Path(work) / "tokenizer.json"))


def tok_path(work: Path, k: int, suffix: str) -> Path:
    return work / "tok" / f"{k:06d}{suffix}"


def tokenize_part(task):
    """Stage 4 on spool part ``k`` with keep mask ``keep`` (None: the part is done already)."""
    k, keep = task
    work = _STATE["work"]
    done = tok_path(work, k, ".json")
    if keep is None:
        return json.loads(done.read_text(encoding="utf-8"))
    tok, t0 = _STATE["tok"], time.process_time()
    docs = read_part_docs(work, k)
    val = is_val(np.load(part_path(work, k, ".hash.npy")), _STATE["val_fraction"])
    ids = {"train": [], "val": []}
    st = {s: {"docs": 0, "bytes": 0, "tokens": 0} for s in ids}
    kept_bytes = []
    for doc, keep_it, v in zip(docs, keep, val):
        if not keep_it:
            continue
        split = "val" if v else "train"
        try:
            out = tok.encode_ordinary(doc)
        except UserError as e:
            raise UserError(f"a document of {work.parent} cannot be tokenized ({e}); use a bpe "
                            "or gpt2 tokenizer, or a char tokenizer trained on this corpus") from None
        out.append(tok.eot_id)
        ids[split].append(np.asarray(out, dtype=_STATE["dtype"]))
        nb = len(doc.encode("utf-8"))
        kept_bytes.append(nb)
        st[split]["docs"] += 1
        st[split]["bytes"] += nb
        st[split]["tokens"] += len(out)
    for split, arrays in ids.items():
        def write(tmp, arrays=arrays):
            with open(tmp, "wb") as f:
                for a in arrays:
                    f.write(a)
        _atomic(tok_path(work, k, f".{split}.bin"), write)
    st["hist_out"] = length_histogram(kept_bytes)
    st["seconds"] = time.process_time() - t0
    _save_json(done, st)
    return st
