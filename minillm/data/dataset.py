"""Datasets on disk: text -> token ids -> ``train.bin`` / ``val.bin``, read back by memory map.

Two layouts share this API (``TokenDataset``, ``read_meta``, ``ensure_dataset``): the single-file
layout below, made by ``prepare_dataset`` from one text, and the sharded layout made by the data
pipeline (``minillm.data.pipeline``, ``minillm.data.shards``): fixed-size token shards and a
``manifest.json``, split by document. ``TokenDataset.tokens`` is then a ``ShardedTokens``, which a
``BatchSampler`` indexes exactly as it indexes a memory map.

A single-file dataset directory holds

    train.bin, val.bin   the token stream as raw little-endian uint16 (vocab <= 65536) or uint32
    tokenizer.json       the tokenizer that made them (``load_tokenizer(dir)``)
    meta.json            what was asked for and what came out; written last

The split is by position: the first ``1 - val_fraction`` of the token stream trains, the last
part validates, so validation text is text the model never saw (not a random shuffle of
overlapping windows). Every file is written to a temporary name and renamed into place, and
meta.json goes last, so a directory with a meta.json is always complete: an interrupted
prepare is redone, never half-used.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np

from minillm import __version__
from minillm.data.shards import MANIFEST_FILE, ShardedTokens, file_sha256, read_manifest
from minillm.data.sources import load_source, source_id
from minillm.data.tokenizers import (DEFAULT_BPE_VOCAB, TOKENIZER_FILE, get_tokenizer,
                                     load_tokenizer, _check_kind)
from minillm.errors import UserError
from minillm.fileio import check_writable_dir, write_atomic, write_error

META_FILE = "meta.json"
FORMAT = 1
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned dtype that holds every id (ids go up to vocab_size - 1)."""
    if vocab_size <= 2 ** 16:
        return "uint16"
    if vocab_size <= 2 ** 32:
        return "uint32"
    raise UserError(f"vocab_size={vocab_size} does not fit in uint32 token files; "
                    "use a vocab_size of at most 4294967296")


def _request(source, tokenizer, vocab_size, val_fraction) -> dict:
    """The normalised request; a dataset is reused when its meta holds the same one."""
    _check_kind(tokenizer)
    if not 0.0 < float(val_fraction) < 1.0:
        raise UserError(f"val_fraction={val_fraction} must be between 0 and 1 (e.g. 0.1)")
    if tokenizer == "bpe":
        vocab_size = int(vocab_size or DEFAULT_BPE_VOCAB)
        token_dtype(vocab_size)
    else:
        vocab_size = int(vocab_size) if vocab_size else None
    return {"format": FORMAT, "source": source_id(source), "tokenizer": tokenizer,
            "requested_vocab_size": vocab_size, "val_fraction": float(val_fraction)}


def is_corpus(source) -> bool:
    """A source only the sharded pipeline reads: a directory, a JSONL file, a gzip file."""
    p = Path(str(source))
    return p.is_dir() or p.name.endswith((".jsonl", ".gz"))


def read_meta(data_dir) -> dict | None:
    """meta.json of a single-file dataset, or manifest.json of a sharded one; None if neither."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        return read_manifest(data_dir)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def _complete(data_dir: Path, meta: dict) -> bool:
    itemsize = np.dtype(meta["dtype"]).itemsize
    return ((data_dir / TOKENIZER_FILE).is_file()
            and all((data_dir / f"{s}.bin").is_file()
                    and (data_dir / f"{s}.bin").stat().st_size == meta[f"n_{s}"] * itemsize
                    for s in SPLITS))


def find_dataset(out_dir, source="pydocs", tokenizer="char", vocab_size=None,
                 val_fraction=0.1) -> dict | None:
    """The meta of a complete dataset in ``out_dir`` made by this same request, else None."""
    out_dir = Path(out_dir)
    want = _request(source, tokenizer, vocab_size, val_fraction)
    manifest = read_manifest(out_dir)
    if manifest is not None and not (out_dir / META_FILE).exists():
        return check_sharded(out_dir, manifest, tokenizer, vocab_size, val_fraction)
    meta = read_meta(out_dir)
    if meta is None or any(meta.get(k) != v for k, v in want.items()):
        return None
    return meta if _complete(out_dir, meta) else None


def check_sharded(data_dir, manifest: dict, tokenizer, vocab_size=None, val_fraction=None) -> dict:
    """A prepared sharded dataset named by a config: its tokenizer must be the one the config asks
    for (``vocab_size`` None or 0: any size); one line naming the file and what to change if not."""
    where = Path(data_dir) / MANIFEST_FILE
    kind, size = manifest["tokenizer"], int(manifest["vocab_size"])
    if tokenizer != kind or (vocab_size and int(vocab_size) != size):
        fix = f"--data.tokenizer={kind}" + (f" --data.vocab_size={size}" if kind == "bpe" else "")
        asked = f"{tokenizer!r}" + (f" (vocab_size {vocab_size})" if vocab_size else "")
        raise UserError(f"{where} was made with the {kind} tokenizer (vocab_size {size}) but the "
                        f"config asks for {asked}; set {fix}, or prepare the data again with "
                        f"--tokenizer {tokenizer}")
    if val_fraction is not None and float(val_fraction) != float(manifest["val_fraction"]):
        raise UserError(f"{where} was split with val_fraction {manifest['val_fraction']} but the "
                        f"config asks for {val_fraction}; set --data.val_fraction="
                        f"{manifest['val_fraction']} or prepare the data again")
    return manifest


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name, then rename: the file is absent or whole, never partial."""
    write_atomic(path, data, "dataset file", "choose a writable dataset directory (--out / data.dir)")


def prepare_dataset(source="pydocs", out_dir="data/pydocs_char", tokenizer="char",
                    vocab_size=None, val_fraction=0.1, force=False, cache_dir=None,
                    verbose=False) -> dict:
    """Tokenize ``source`` into ``out_dir`` and return its meta (reusing a matching dataset).

    ``cache_dir`` keeps the Shakespeare download (default: the parent of ``out_dir``).
    """
    out_dir = Path(out_dir)
    if is_corpus(source):                # a directory, JSONL or gzip: the sharded pipeline
        from minillm.data.pipeline import PrepareConfig, prepare_sharded
        return prepare_sharded(PrepareConfig(sources=(str(source),), out_dir=str(out_dir),
                                             tokenizer=tokenizer, vocab_size=vocab_size,
                                             val_fraction=val_fraction), verbose=verbose)
    request = _request(source, tokenizer, vocab_size, val_fraction)
    if read_manifest(out_dir) is not None and not (out_dir / META_FILE).exists():
        raise UserError(f"{out_dir} holds a sharded dataset ({MANIFEST_FILE}); choose another "
                        "--out or delete it")
    if not force:
        meta = find_dataset(out_dir, source, tokenizer, vocab_size, val_fraction)
        if meta is not None:
            return meta
    check_writable_dir(out_dir, "dataset directory", "choose another place (--out / data.dir)")

    text = load_source(source, cache_dir if cache_dir is not None else out_dir.parent, search=[out_dir])
    tok = get_tokenizer(tokenizer, text=text, vocab_size=request["requested_vocab_size"])
    dtype = token_dtype(tok.vocab_size)
    ids = np.asarray(tok.encode(text), dtype=dtype)
    n_train = int(len(ids) * (1.0 - request["val_fraction"]))
    n_val = len(ids) - n_train
    if n_train < 2 or n_val < 2:
        raise UserError(f"source text is too short: {len(ids)} tokens give n_train={n_train}, "
                        f"n_val={n_val}, and each split needs at least 2; use a longer text")

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / META_FILE).unlink(missing_ok=True)       # the dir is incomplete from here on
    except OSError as e:
        raise write_error("dataset directory", out_dir, e) from None
    tok.save(out_dir)
    little = np.dtype(dtype).newbyteorder("<")             # the files are little-endian everywhere
    _write_atomic(out_dir / "train.bin", ids[:n_train].astype(little).tobytes())
    _write_atomic(out_dir / "val.bin", ids[n_train:].astype(little).tobytes())
    meta = dict(request, vocab_size=tok.vocab_size, dtype=dtype, n_train=n_train, n_val=n_val,
                eot_id=tok.eot_id, text_chars=len(text), created_with=f"minillm {__version__}",
                python=platform.python_version())
    _write_atomic(out_dir / META_FILE, (json.dumps(meta, indent=1) + "\n").encode())  # last
    if verbose:
        print(f"wrote {out_dir}: {n_train:,} train + {n_val:,} val tokens, "
              f"vocab_size {tok.vocab_size} ({tokenizer}), {dtype}")
    return meta


def ensure_dataset(source="pydocs", out_dir="data/pydocs_char", tokenizer="char",
                   vocab_size=None, val_fraction=0.1, cache_dir=None, verbose=False) -> dict:
    """The dataset's meta, preparing it only when no matching complete dataset exists.

    A prepared sharded dataset in ``out_dir`` is used as it is, whatever ``source`` says, once
    its tokenizer matches (``check_sharded``)."""
    manifest = read_manifest(out_dir)
    if manifest is not None and not (Path(out_dir) / META_FILE).exists():
        return check_sharded(out_dir, manifest, tokenizer, vocab_size, val_fraction)
    return prepare_dataset(source, out_dir, tokenizer, vocab_size, val_fraction, force=False,
                           cache_dir=cache_dir, verbose=verbose)


def default_dataset_dir(source="pydocs", tokenizer="char", vocab_size=None, root="data") -> Path:
    """A conventional place for a dataset: ``data/pydocs_char``, ``data/shakespeare_bpe512``."""
    stem = str(source) if str(source) in ("pydocs", "shakespeare") else Path(str(source)).stem
    suffix = str(int(vocab_size or DEFAULT_BPE_VOCAB)) if tokenizer == "bpe" else ""
    return Path(root) / f"{stem}_{tokenizer}{suffix}"


class TokenDataset:
    """One split of a prepared dataset, memory-mapped read-only (nothing is loaded up front).

    ``tokens`` is a ``numpy.memmap`` (single-file layout) or a ``ShardedTokens`` (sharded
    layout); both have ``len`` and the indexing a ``BatchSampler`` needs."""

    def __init__(self, data_dir, split="train"):
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; choose 'train' or 'val'")
        self.data_dir = Path(data_dir)
        meta = read_meta(self.data_dir)
        if meta is None:
            raise UserError(f"no prepared dataset in {self.data_dir} (meta.json missing); "
                            "run `minillm prepare SOURCE --out DIR` first")
        self.meta, self.split = meta, split
        if not (self.data_dir / META_FILE).is_file():
            self._check_tokenizer_file()
            self.tokens = ShardedTokens.open(self.data_dir, meta, split)
            return
        n = int(meta[f"n_{split}"])
        path = self.data_dir / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != n * np.dtype(meta["dtype"]).itemsize:
            raise UserError(f"{path} is missing or has the wrong size; prepare the dataset again")
        self.tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]).newbyteorder("<"),
                                mode="r", shape=(n,))

    def _check_tokenizer_file(self):
        path = self.data_dir / TOKENIZER_FILE
        if not path.is_file() or file_sha256(path) != self.meta["tokenizer_sha256"]:
            raise UserError(f"{path} is not the tokenizer the shards were made with "
                            f"({MANIFEST_FILE} records another); restore it or prepare the data again")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def tokenizer(self):
        return load_tokenizer(self.data_dir)
