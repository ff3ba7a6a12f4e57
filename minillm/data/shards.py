"""Sharded token datasets: fixed-size token files plus a manifest, read back as one sequence.

A sharded dataset directory holds

    train_000000.bin, ...   the train split's token stream cut into files of ``shard_tokens``
    val_000000.bin, ...     tokens each (the last one shorter), raw little-endian uint16 / uint32
    tokenizer.json          the tokenizer that made them
    manifest.json           written last: every shard (file, tokens, sha256), token and document
                            counts, dtype, vocab_size, eot_id, the tokenizer's sha256, the request
    report.json             what the pipeline did (``minillm.data.report``)

A split's stream is its shards concatenated in manifest order. Readers see that stream only
(``ShardedTokens``), so how it was cut into files changes nothing a sampler draws: a batch is a
function of (seed, step) and the stream, as for a single-file dataset. Shards are written to a
temporary name and renamed, so a shard file with its final name and size is complete, and a
prepare that was killed keeps it (``write_shards``).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from minillm.errors import UserError
from minillm.fileio import file_sha256

MANIFEST_FILE = "manifest.json"
LAYOUT = "shards"
_COPY = 1 << 18                     # tokens per copy step: bounds the memory of writing a shard
_OPEN_MAPS = 64                     # memory maps kept open at once (each holds a file descriptor)


def read_manifest(data_dir) -> dict | None:
    path = Path(data_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return meta if isinstance(meta, dict) and meta.get("layout") == LAYOUT else None


def shard_name(split: str, i: int) -> str:
    return f"{split}_{i:06d}.bin"


class _Stream:
    """Token files read back to back as one sequence: through memory maps opened on demand
    (random access, for training), or with plain reads (``mapped=False``: a sequential pass
    whose pages should not stay in the process's resident memory)."""

    def __init__(self, paths, counts, dtype, mapped: bool = True):
        self.paths = [Path(p) for p in paths]
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate(([0], np.cumsum(self.counts)))      # starts[k] .. starts[k+1]
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.mapped = mapped
        self._maps: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _map(self, k: int) -> np.ndarray:
        m = self._maps.pop(k, None)
        if m is None:
            if int(self.counts[k]) == 0:
                m = np.empty(0, dtype=self.dtype)
            else:
                m = np.memmap(self.paths[k], dtype=self.dtype, mode="r", shape=(int(self.counts[k]),))
            if len(self._maps) >= _OPEN_MAPS:
                self._maps.popitem(last=False)
        self._maps[k] = m
        return m

    def range(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as a new array (crossing files as needed)."""
        out = np.empty(max(0, stop - start), dtype=self.dtype)
        k, pos = int(np.searchsorted(self.starts, start, side="right") - 1), start
        while pos < stop:
            take, lo = min(stop, int(self.starts[k + 1])) - pos, pos - int(self.starts[k])
            if take > 0:
                out[pos - start:pos - start + take] = self._map(k)[lo:lo + take] if self.mapped \
                    else np.fromfile(self.paths[k], self.dtype, take, offset=lo * self.dtype.itemsize)
            pos += take
            k += 1
        return out


class ShardedTokens(_Stream):
    """One split of a sharded dataset as a read-only token sequence: ``len``, integer and slice
    indexing, and integer-array indexing (what ``BatchSampler`` does), all through memory maps."""

    def __getitem__(self, idx):
        n = len(self)
        if isinstance(idx, slice):
            start, stop, step = idx.indices(n)
            if step == 1:
                return self.range(start, max(start, stop))
            return self[np.arange(start, stop, step)]
        if isinstance(idx, (int, np.integer)):
            i = int(idx) + (n if idx < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"token index {idx} out of range for {n} tokens")
            k = int(np.searchsorted(self.starts, i, side="right") - 1)
            return self._map(k)[i - int(self.starts[k])]
        idx = np.asarray(idx)
        flat = idx.ravel().astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            raise IndexError(f"token indices must lie in [0, {n})")
        owner = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        for k in np.unique(owner):
            pick = owner == k
            out[pick] = self._map(int(k))[flat[pick] - self.starts[k]]
        return out.reshape(idx.shape)

    def __array__(self, dtype=None, copy=None):
        out = self.range(0, len(self))          # the whole split in memory: for small datasets
        return out if dtype is None else out.astype(dtype)

    @classmethod
    def open(cls, data_dir, manifest: dict, split: str) -> "ShardedTokens":
        data_dir = Path(data_dir)
        entries = manifest["shards"][split]
        itemsize = np.dtype(manifest["dtype"]).itemsize
        for e in entries:
            path = data_dir / e["file"]
            if not path.is_file() or path.stat().st_size != e["tokens"] * itemsize:
                raise UserError(f"{path} is missing or has the wrong size for {MANIFEST_FILE}; "
                                "prepare the dataset again (a resumed prepare keeps good shards)")
        return cls([data_dir / e["file"] for e in entries], [e["tokens"] for e in entries],
                   manifest["dtype"])


def write_shards(parts, counts, out_dir, split: str, shard_tokens: int, dtype) -> list[dict]:
    """Cut the concatenation of the token files ``parts`` (``counts`` tokens each) into shards
    of ``shard_tokens`` tokens in ``out_dir``; returns the manifest entries.

    A shard file that already has its final name and size is kept as it is (its checksum is
    read back); anything else is written afresh.
    """
    out_dir = Path(out_dir)
    stream = _Stream(parts, counts, dtype, mapped=False)
    total, entries = len(stream), []
    itemsize = stream.dtype.itemsize
    for i, start in enumerate(range(0, total, shard_tokens)):
        stop = min(total, start + shard_tokens)
        path = out_dir / shard_name(split, i)
        if path.is_file() and path.stat().st_size == (stop - start) * itemsize:
            entries.append({"file": path.name, "tokens": stop - start, "sha256": file_sha256(path)})
            continue
        h = hashlib.sha256()
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            for s in range(start, stop, _COPY):
                block = stream.range(s, min(stop, s + _COPY))
                h.update(block)                                   # (buffers, no copies)
                f.write(block)
        os.replace(tmp, path)
        entries.append({"file": path.name, "tokens": stop - start, "sha256": h.hexdigest()})
    return entries


def verify_shards(data_dir) -> list[str]:
    """The shard files whose sha256 differs from the manifest's (empty when all are intact)."""
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise UserError(f"no {MANIFEST_FILE} in {data_dir}; it is not a sharded dataset")
    return [e["file"] for split in manifest["shards"] for e in manifest["shards"][split]
            if file_sha256(Path(data_dir) / e["file"]) != e["sha256"]]
