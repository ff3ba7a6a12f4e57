"""The data pipeline: sources -> documents -> clean -> filter -> dedup -> tokenize -> shards.

``prepare_sharded(PrepareConfig(...))`` (the CLI: ``minillm prepare SOURCE... --clean --filter
--dedup``) streams a corpus of any size through five stages, holding a few batches of documents
in memory, never the corpus:

1. scan (parallel over batches of documents): read, clean, filter, hash, MinHash -> spool parts;
2. dedup (one process, on arrays: a few numbers per document): exact copies, then near copies;
3. tokenizer: ``gpt2`` as is, a tokenizer file (``tokenizer_from``), or one trained here:
   ``char`` on every character the kept documents use, ``bpe`` on the first
   ``tokenizer_sample_mb`` MB of kept documents;
4. tokenize (parallel over spool parts): each kept document -> its ids + the end-of-text id,
   into the train or val split by its content hash (a document is never cut in two);
5. shards: the two token streams cut into files of ``shard_tokens`` tokens + manifest.json.

Everything intermediate lives in ``OUT/_work`` and is written atomically; a killed run started
again with the same options and inputs redoes only what was not finished (finished shards are
kept) and produces byte-identical files. Different options or changed inputs start afresh.
Results never depend on ``workers`` (tests check byte equality).
"""
from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minillm import __version__
from minillm.choices import DEDUP_MODES, Tokenizer
from minillm.data import stages
from minillm.data.dedup import DedupConfig, exact_duplicates, near_duplicates
from minillm.data.documents import ReadConfig, ReadStats, iter_documents, list_sources, source_fingerprint
from minillm.data.filters import FilterConfig
from minillm.data.pool import ordered_map
from minillm.data.report import build_report, format_report
from minillm.data.shards import LAYOUT, MANIFEST_FILE, file_sha256, read_manifest, write_shards
from minillm.data.tokenizers import (DEFAULT_BPE_VOCAB, ENDOFTEXT, TOKENIZER_FILE, BPETokenizer,
                                     CharTokenizer, _check_kind, get_tokenizer, load_tokenizer)
from minillm.errors import UserError
from minillm.fileio import check_writable_dir, write_error

WORK = "_work"
FORMAT = 1


@dataclass
class PrepareConfig:
    sources: tuple = ("pydocs",)
    out_dir: str = "data/corpus"
    tokenizer: Tokenizer = "char"
    vocab_size: int | None = None          # bpe only (default 512)
    tokenizer_from: str | None = None      # a tokenizer.json (or a dataset dir holding one)
    tokenizer_sample_mb: float = 64.0      # bpe: text it is trained on
    val_fraction: float = 0.1
    clean: bool = False
    filter: FilterConfig | None = None     # None: no quality filtering
    dedup: DedupConfig | None = None       # None: no deduplication
    read: ReadConfig = field(default_factory=ReadConfig)
    shard_tokens: int = 50_000_000
    batch_mb: float = 4.0                  # documents per stage-1 task (and spool part)
    workers: int = 1
    keep_work: bool = False                # keep OUT/_work afterwards (for inspection)

    def __post_init__(self):
        self.sources = tuple(str(s) for s in self.sources)
        _check_kind(self.tokenizer)
        if self.vocab_size and self.tokenizer != "bpe":
            raise UserError(f"--vocab-size applies to the bpe tokenizer only; drop it for "
                            f"--tokenizer {self.tokenizer}")
        if not 0.0 < float(self.val_fraction) < 1.0:
            raise UserError(f"--val-fraction {self.val_fraction} must be between 0 and 1 (e.g. 0.1)")
        for name, low in (("shard_tokens", 1), ("workers", 1)):
            if int(getattr(self, name)) < low:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= {low}")
        if not self.batch_mb > 0 or not self.tokenizer_sample_mb > 0:
            raise UserError("--batch-mb and --tokenizer-sample-mb must be > 0")

    def request(self) -> dict:
        """Every option that changes the output (not workers, not where it goes)."""
        d = dataclasses.asdict(self)
        for k in ("out_dir", "workers", "keep_work", "batch_mb"):
            d.pop(k)
        d["tokenizer_from"] = str(Path(self.tokenizer_from).resolve()) if self.tokenizer_from else None
        if self.tokenizer == "bpe" and not self.tokenizer_from:
            d["vocab_size"] = int(self.vocab_size or DEFAULT_BPE_VOCAB)
        return json.loads(json.dumps(d))


def _log(verbose, msg):
    if verbose:
        print(msg, flush=True)


class _Run:
    """One prepare: the paths, the options handed to workers, the timings, resumable state."""

    def __init__(self, cfg: PrepareConfig, verbose: bool):
        self.cfg, self.verbose = cfg, verbose
        self.out = Path(cfg.out_dir)
        self.work = self.out / WORK
        self.entries = list_sources(cfg.sources)
        self.times: dict[str, float] = {}

    def start(self) -> dict | None:
        """Reuse a finished dataset, resume a matching unfinished one, or start afresh."""
        check_writable_dir(self.out, "dataset directory", "choose another --out")
        if (self.out / "meta.json").exists() or (self.out / "train.bin").exists():
            raise UserError(f"{self.out} holds a single-file dataset; choose another --out or "
                            "delete it")
        fingerprint = {"format": FORMAT, "request": self.cfg.request(),
                       "inputs": source_fingerprint(self.entries), "batch_mb": self.cfg.batch_mb}
        manifest = read_manifest(self.out)
        if manifest is not None and manifest.get("fingerprint") == fingerprint:
            _log(self.verbose, f"{self.out} is up to date ({MANIFEST_FILE} matches); nothing to do")
            return manifest
        saved = self.work / "fingerprint.json"
        if saved.is_file() and json.loads(saved.read_text()) == fingerprint:
            _log(self.verbose, f"resuming the unfinished prepare in {self.work}")
        else:
            for p in [self.out / MANIFEST_FILE, *self.out.glob("train_*.bin"),
                      *self.out.glob("val_*.bin")]:
                p.unlink(missing_ok=True)
            shutil.rmtree(self.work, ignore_errors=True)
            for sub in ("parts", "tok"):
                (self.work / sub).mkdir(parents=True, exist_ok=True)
            stages._save_json(saved, fingerprint)
        (self.out / MANIFEST_FILE).unlink(missing_ok=True)
        for tmp in self.out.rglob("*.tmp*"):                     # left by a killed run
            tmp.unlink(missing_ok=True)
        self.fingerprint = fingerprint
        return None

    def timed(self, name, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
        return out

    # ------------------------------------------------------------ stage 1
    def scan(self) -> tuple[ReadStats, list[dict]]:
        done = self.work / "scan.json"
        if done.is_file():
            saved = json.loads(done.read_text())
            return ReadStats(**saved["read"]), saved["parts"]
        cfg, read = self.cfg, ReadStats()
        opts = {"clean": cfg.clean, "chars": cfg.tokenizer == "char" and not cfg.tokenizer_from,
                "filter": dataclasses.asdict(cfg.filter) if cfg.filter else None,
                "dedup": dataclasses.asdict(cfg.dedup) if cfg.dedup and cfg.dedup.near else None}
        tasks = self._batches(read, int(cfg.batch_mb * 1e6))
        t0 = time.perf_counter()
        parts = []
        for st in ordered_map(stages.scan_batch, tasks, cfg.workers,
                              initializer=stages.init_scan, initargs=(opts, str(self.work))):
            parts.append(st)
            if len(parts) % 25 == 0:
                _log(self.verbose, f"  scanned {len(parts)} batches "
                     f"({sum(p['bytes_in'] for p in parts) / 1e6:,.0f} MB)")
        self.times["scan"] = time.perf_counter() - t0
        if read.docs == 0:
            raise UserError(f"the sources hold no documents ({', '.join(cfg.sources)}); "
                            "pass files with text in them")
        stages._save_json(done, {"read": dataclasses.asdict(read), "parts": parts})
        return read, parts

    def _batches(self, read: ReadStats, batch_chars: int):
        texts, origins, size, k = [], [], 0, 0
        docs = iter_documents(self.entries, self.cfg.read, read, cache_dir=self.out.parent)
        for doc, fi, n in docs:
            texts.append(doc)
            origins.append((fi, n))
            size += len(doc)
            if size >= batch_chars:
                yield self._task(k, texts, origins)
                texts, origins, size, k = [], [], 0, k + 1
        if texts:
            yield self._task(k, texts, origins)

    def _task(self, k, texts, origins):
        if stages.part_path(self.work, k, ".json").is_file():
            return k, None, None                               # finished before a kill
        return k, texts, origins

    # ------------------------------------------------------------ stage 2
    def dedup(self, parts) -> dict:
        path = self.work / "dedup.npz"
        counts = [p["docs_out"] for p in parts]
        n = sum(counts)
        if path.is_file():
            z = np.load(path)
            return {k: z[k] for k in z.files}
        d = self.cfg.dedup
        exact_of = near_of = np.full(n, -1, dtype=np.int64)
        info = {"candidate_pairs": 0, "verified_pairs": 0}
        if d is not None and n:
            load = lambda suffix: [np.load(stages.part_path(self.work, k, suffix))  # noqa: E731
                                   for k in range(len(parts))]
            if d.exact:
                exact_of = exact_duplicates(np.concatenate(load(".hash.npy")))
            if d.near:
                near_of, info = near_duplicates(_BandKeys(self.work, counts, d.bands),
                                                _SignatureStore(self.work, counts),
                                                d.threshold, alive=exact_of < 0)
        out = {"keep": (exact_of < 0) & (near_of < 0), "exact_of": exact_of, "near_of": near_of,
               "candidate_pairs": np.int64(info["candidate_pairs"]),
               "verified_pairs": np.int64(info["verified_pairs"])}
        with open(self.work / "dedup.tmp.npz", "wb") as f:
            np.savez(f, **out)
        (self.work / "dedup.tmp.npz").replace(path)
        return out

    # ------------------------------------------------------------ stage 3
    def tokenizer(self, parts, keep):
        path = self.work / TOKENIZER_FILE
        if path.is_file():
            return load_tokenizer(path)
        cfg = self.cfg
        if cfg.tokenizer_from:
            tok = load_tokenizer(cfg.tokenizer_from)
            if tok.name != cfg.tokenizer:
                raise UserError(f"{cfg.tokenizer_from} holds a {tok.name} tokenizer but "
                                f"--tokenizer is {cfg.tokenizer}; pass --tokenizer {tok.name}")
            if tok.eot_id is None:
                raise UserError(f"{cfg.tokenizer_from} has no {ENDOFTEXT} token to end documents "
                                "with; train one here instead (drop --tokenizer-from)")
        elif cfg.tokenizer == "char":
            chars = sorted(set().union(*(p["chars"] for p in parts)))
            tok = CharTokenizer(chars, {ENDOFTEXT: len(chars)})
        elif cfg.tokenizer == "bpe":
            tok = BPETokenizer.train(self._sample(parts, keep), int(cfg.vocab_size or DEFAULT_BPE_VOCAB),
                                     workers=cfg.workers)
        else:
            tok = get_tokenizer("gpt2")
        tok.save(self.work)
        return tok

    def _sample(self, parts, keep) -> str:
        budget, out, start = self.cfg.tokenizer_sample_mb * 1e6, [], 0
        for k, p in enumerate(parts):
            docs = stages.read_part_docs(self.work, k)
            for doc, kept in zip(docs, keep[start:start + len(docs)]):
                if kept and budget > 0:
                    out.append(doc)
                    budget -= len(doc.encode("utf-8"))
            start += len(docs)
            if budget <= 0:
                break
        return ENDOFTEXT.join(out)        # documents apart: BPE never merges across them

    # ------------------------------------------------------------ stage 4
    def tokenize(self, parts, keep, dtype) -> list[dict]:
        bounds = np.concatenate(([0], np.cumsum([p["docs_out"] for p in parts])))
        def tasks():
            for k in range(len(parts)):
                done = stages.tok_path(self.work, k, ".json").is_file()
                yield k, None if done else keep[bounds[k]:bounds[k + 1]]
        out = []
        for st in ordered_map(stages.tokenize_part, tasks(), self.cfg.workers,
                              initializer=stages.init_tokenize,
                              initargs=(str(self.work), self.cfg.val_fraction, dtype)):
            out.append(st)
        return out


class _BandKeys:
    """The (N, bands) LSH keys of all spool parts, read one band (column) at a time, so dedup
    holds 8 bytes per document, not 8 * bands."""

    def __init__(self, work: Path, counts, bands: int):
        self.paths = [stages.part_path(work, k, ".keys.npy") for k in range(len(counts))]
        self.shape = (int(sum(counts)), bands)

    def __len__(self) -> int:
        return self.shape[0]

    def column(self, band: int) -> np.ndarray:
        return np.concatenate([np.load(p, mmap_mode="r")[:, band] for p in self.paths]) \
            if self.paths else np.empty(0, dtype=np.uint64)


class _SignatureStore:
    """Signature rows of documents by global index, read from the spool parts (plain reads of
    one part at a time: memory for the rows asked for, not for the mapped files)."""

    def __init__(self, work: Path, counts):
        self.starts = np.concatenate(([0], np.cumsum(counts)))
        self.paths = [stages.part_path(work, k, ".sig.npy") for k in range(len(counts))]

    def __call__(self, idx):
        idx = np.asarray(idx, dtype=np.int64)
        part = np.searchsorted(self.starts, idx, side="right") - 1
        out = None
        for k in np.unique(part):
            rows = np.load(self.paths[k])
            if out is None:
                out = np.empty((len(idx), rows.shape[1]), dtype=np.uint32)
            pick = part == k
            out[pick] = rows[idx[pick] - self.starts[k]]
        return out if out is not None else np.empty((0, 0), dtype=np.uint32)


def config_from_args(args) -> PrepareConfig:
    """The PrepareConfig of ``minillm prepare``'s parsed arguments (unset options: defaults)."""
    def given(**kw):
        return {k: v for k, v in kw.items() if v is not None}
    filt = None
    if args.filter or args.filter_rules:
        rules = [r.strip() for r in args.filter_rules.split(",") if r.strip()] \
            if args.filter_rules else None
        filt = FilterConfig(**given(rules=rules))
    dedup = None
    if args.dedup or args.dedup_mode or any(v is not None for v in (
            args.dedup_threshold, args.dedup_bands, args.dedup_rows, args.dedup_ngram)):
        mode = args.dedup_mode or "both"
        if mode not in DEDUP_MODES:
            raise UserError(f"--dedup-mode {mode!r} is not one of: {', '.join(DEDUP_MODES)}")
        dedup = DedupConfig(exact=mode != "near", near=mode != "exact", **given(
            threshold=args.dedup_threshold, bands=args.dedup_bands, rows=args.dedup_rows,
            ngram=args.dedup_ngram))
    read = ReadConfig(**given(doc_sep=args.doc_sep, text_field=args.text_field,
                              bad_utf8=args.bad_utf8, max_doc_chars=args.max_doc_chars))
    out = args.out
    if out is None:
        from minillm.data.dataset import default_dataset_dir
        out = f"{default_dataset_dir(args.source[0], args.tokenizer, args.vocab_size)}_shards"
    return PrepareConfig(sources=tuple(args.source), out_dir=out, tokenizer=args.tokenizer,
                         vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                         clean=args.clean, filter=filt, dedup=dedup, read=read,
                         keep_work=args.keep_work, **given(
                             tokenizer_from=args.tokenizer_from,
                             tokenizer_sample_mb=args.tokenizer_sample_mb,
                             shard_tokens=args.shard_tokens, batch_mb=args.batch_mb,
                             workers=args.workers))


def prepare_sharded(cfg: PrepareConfig, verbose: bool = True, print_report: bool = False) -> dict:
    """Run (or resume, or reuse) the pipeline into ``cfg.out_dir``; returns the manifest. A disk
    that refuses a write (full, read-only) is one error line; running again resumes."""
    try:
        return _prepare_sharded(cfg, verbose, print_report)
    except OSError as e:
        raise write_error("dataset", cfg.out_dir, e, "free space or choose another --out; running "
                          "the same command again resumes") from None


def _prepare_sharded(cfg: PrepareConfig, verbose: bool, print_report: bool) -> dict:
    from minillm.data.dataset import token_dtype
    run = _Run(cfg, verbose)
    done = run.start()
    if done is not None:
        return done
    t_all = time.perf_counter()
    _log(verbose, f"prepare: {len(run.entries)} input(s) -> {run.out} (workers={cfg.workers})")
    read, parts = run.scan()
    dd = run.timed("dedup", run.dedup, parts)
    keep = dd["keep"]
    if not keep.any():
        raise UserError(f"no documents left after cleaning/filtering/dedup ({read.docs:,} read); "
                        "relax --filter-rules or drop --filter, or use more text")
    tok = run.timed("tokenizer", run.tokenizer, parts, keep)
    dtype = token_dtype(tok.vocab_size)
    t0 = time.perf_counter()
    tok_stats = run.tokenize(parts, keep, dtype)
    run.times["tokenize"] = time.perf_counter() - t0
    for split in ("train", "val"):
        n = sum(s[split]["tokens"] for s in tok_stats)
        if n < 2:
            raise UserError(f"the {split} split would hold {n} tokens: too few documents reach it "
                            f"({int(keep.sum())} kept); use more documents or change --val-fraction")
    t0 = time.perf_counter()
    shards = {}
    for split in ("train", "val"):
        files = [stages.tok_path(run.work, k, f".{split}.bin") for k in range(len(parts))]
        shards[split] = write_shards(files, [s[split]["tokens"] for s in tok_stats], run.out,
                                     split, cfg.shard_tokens, dtype)
    run.times["shards"] = time.perf_counter() - t0
    run.times["total"] = time.perf_counter() - t_all
    tok.save(run.out)
    report = build_report(cfg, read, parts, dd, tok_stats, run.times, run.work)
    stages._save_json(run.out / "report.json", report)
    manifest = {
        "layout": LAYOUT, "format": FORMAT, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
        "dtype": dtype, "eot_id": tok.eot_id, "tokenizer_sha256": file_sha256(run.out / TOKENIZER_FILE),
        "val_fraction": cfg.val_fraction, "shard_tokens": cfg.shard_tokens,
        "n_train": sum(e["tokens"] for e in shards["train"]),
        "n_val": sum(e["tokens"] for e in shards["val"]),
        "docs_train": sum(s["train"]["docs"] for s in tok_stats),
        "docs_val": sum(s["val"]["docs"] for s in tok_stats),
        "shards": shards, "request": cfg.request(), "fingerprint": run.fingerprint,
        "created_with": f"minillm {__version__}", "python": platform.python_version()}
    stages._save_json(run.out / MANIFEST_FILE, manifest)                     # last
    if not cfg.keep_work:
        shutil.rmtree(run.work, ignore_errors=True)
    if print_report:
        print(format_report(report))
    _log(verbose, f"wrote {run.out}: {manifest['n_train']:,} train + {manifest['n_val']:,} val "
         f"tokens in {len(shards['train'])} + {len(shards['val'])} shard(s), vocab_size "
         f"{tok.vocab_size} ({tok.name}), {dtype}, {run.times['total']:.1f} s")
    return manifest

