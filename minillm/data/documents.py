"""Reading a corpus as a stream of documents: files, directories, JSONL, gzip, named sources.

Sources are read in the order given; a directory is walked recursively in sorted path order,
taking files ending in .txt, .md, .text or .jsonl (optionally .gz), skipping hidden ones. A file
named directly is read whatever its suffix (JSONL if it ends in .jsonl or .jsonl.gz). ``pydocs``
and ``shakespeare`` name the built-in sources.

What a document is (the stated rule):
- JSONL: one document per non-blank line, the string in field ``text_field`` (default "text");
- text, ``doc_sep="eot"`` (default): documents are separated by the string ``<|endoftext|>``
  (the GPT-2 convention of corpus dumps); a file without one is one document;
- text, ``doc_sep="blank"``: documents are separated by one or more blank lines (paragraphs);
- never across files; a document longer than ``max_doc_chars`` is cut into pieces at the last
  newline before the limit (or at the limit if there is none), each then a document of its own.
  This also bounds the memory one document can take.

Files are read in blocks of 256 KiB and decoded as UTF-8. Bytes that are not UTF-8 (a Latin-1 file,
a mix of encodings) stop the run with the file, line and byte offset, unless
``bad_utf8="skip"``, which drops the documents that contain them (counted in the report).
"""
from __future__ import annotations

import codecs
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from minillm.choices import BAD_UTF8, DOC_SEPS, NAMED_SOURCES, BadUTF8, DocSep
from minillm.data.sources import load_source
from minillm.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl",)
_SEP = {"eot": re.compile(re.escape("<|endoftext|>")), "blank": re.compile(r"\n(?:[ \t]*\n)+")}
_BAD = re.compile("[\ud800-\udfff]")          # undecodable bytes (surrogateescape) or lone surrogates
_BLOCK = 1 << 18


@dataclass
class ReadConfig:
    doc_sep: DocSep = "eot"
    text_field: str = "text"
    bad_utf8: BadUTF8 = "error"
    max_doc_chars: int = 1_000_000

    def __post_init__(self):
        if self.doc_sep not in DOC_SEPS:
            raise UserError(f"--doc-sep {self.doc_sep!r} is not one of: {', '.join(DOC_SEPS)}")
        if self.bad_utf8 not in BAD_UTF8:
            raise UserError(f"--bad-utf8 {self.bad_utf8!r} is not one of: {', '.join(BAD_UTF8)}")
        if int(self.max_doc_chars) < 1000:
            raise UserError(f"--max-doc-chars {self.max_doc_chars} must be >= 1000")


@dataclass
class ReadStats:
    files: int = 0
    docs: int = 0                           # documents read (including skipped ones)
    invalid_docs: int = 0                   # dropped for undecodable bytes (bad_utf8="skip")
    invalid_chars: int = 0
    cuts: int = 0                           # places a long document was cut (max_doc_chars)
    file_names: list = field(default_factory=list)


def _is_gz(p: Path) -> bool:
    return p.suffix == ".gz"


def _base_suffix(p: Path) -> str:
    return Path(p.stem).suffix if _is_gz(p) else p.suffix


def list_sources(sources) -> list:
    """The inputs in reading order: file Paths and named-source strings."""
    out, seen = [], set()
    for src in sources:
        src = str(src)
        if src in NAMED_SOURCES:
            out.append(src)
            continue
        path = Path(src)
        if not path.exists():
            raise UserError(f"source {src} does not exist; pass text or JSONL files, directories, "
                            f"or one of: {', '.join(NAMED_SOURCES)}")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts)
                           and _base_suffix(p) in TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not files:
                raise UserError(f"directory {src} holds no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}"
                                " files (optionally .gz); pass the files themselves")
        else:
            files = [path]
        for f in files:
            if f.resolve() not in seen:     # a file named twice is read once
                seen.add(f.resolve())
                out.append(f)
    if not out:
        raise UserError("no sources given; pass text or JSONL files or directories")
    return out


def source_fingerprint(entries) -> list:
    """What identifies the input: each file's absolute path, size and modification time."""
    fp = []
    for e in entries:
        if isinstance(e, Path):
            st = e.stat()
            fp.append([str(e.resolve()), st.st_size, st.st_mtime_ns])
        else:
            fp.append([e])
    return fp


def _blocks(path: Path, name: str):
    """``(text, byte offset)`` blocks of a file, decoded; undecodable bytes become lone
    surrogates (checked later)."""
    try:
        f = gzip.open(path, "rb") if _is_gz(path) else open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {name} ({e.strerror or e}); fix its permissions or leave "
                        "it out") from None
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    consumed = 0                                  # bytes decoded so far
    with f:
        while True:
            try:
                raw = f.read(_BLOCK)
            except (OSError, EOFError) as e:  # a damaged gzip stream, an I/O error
                raise UserError(f"cannot read {name} ({e}); fix or leave out that file") from None
            pending = len(decoder.getstate()[0])
            text = decoder.decode(raw, final=not raw)
            if text:
                yield text, consumed
            consumed += pending + len(raw) - len(decoder.getstate()[0])
            if not raw:
                return


def _bad_input(name: str, where: str) -> UserError:
    return UserError(f"{name}: bytes that are not UTF-8 at {where}; convert the file to UTF-8 "
                     "(e.g. iconv -f latin1 -t utf-8) or pass --bad-utf8 skip to drop such documents")


def _cut(doc: str, limit: int, stats: ReadStats):
    """``doc`` in pieces of at most ``limit`` characters, cut after a newline where possible."""
    while len(doc) > limit:
        stats.cuts += 1
        cut = doc.rfind("\n", 0, limit) + 1 or limit
        yield doc[:cut]
        doc = doc[cut:]
    yield doc


def _text_documents(blocks, name: str, cfg: ReadConfig, stats: ReadStats):
    sep, buf, lines = _SEP[cfg.doc_sep], "", 1
    for block, offset in blocks:
        if cfg.bad_utf8 == "error":
            m = _BAD.search(block)
            if m:
                head = block[:m.start()]
                raise _bad_input(name, f"line {lines + head.count(chr(10))}, byte "
                                       f"{offset + len(head.encode('utf-8', 'surrogateescape'))}")
            lines += block.count("\n")
        start, buf = 0, buf + block
        for m in sep.finditer(buf, max(0, len(buf) - len(block) - 64)):
            if m.end() == len(buf):
                break                       # a separator may go on in the next block
            yield from _cut(buf[start:m.start()], cfg.max_doc_chars, stats)
            start = m.end()
        buf = buf[start:]
        while len(buf) > 2 * cfg.max_doc_chars:         # one document longer than memory should hold
            cut = buf.rfind("\n", 0, cfg.max_doc_chars) + 1 or cfg.max_doc_chars
            stats.cuts += 1
            yield buf[:cut]
            buf = buf[cut:]
    m = sep.search(buf)
    while m:                                 # a separator that ended the last block
        yield from _cut(buf[:m.start()], cfg.max_doc_chars, stats)
        buf = buf[m.end():]
        m = sep.search(buf)
    yield from _cut(buf, cfg.max_doc_chars, stats)


def _jsonl_documents(blocks, name: str, cfg: ReadConfig, stats: ReadStats):
    buf, lineno = "", 0
    for block, _ in blocks:
        buf += block
        *lines, buf = buf.split("\n")
        for line in lines:
            lineno += 1
            yield from _jsonl_line(line, lineno, name, cfg, stats)
    if buf:
        yield from _jsonl_line(buf, lineno + 1, name, cfg, stats)


def _jsonl_line(line: str, lineno: int, name: str, cfg: ReadConfig, stats: ReadStats):
    if not line.strip():
        return
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise UserError(f"{name}: line {lineno} is not valid JSON ({e}); fix or remove that "
                        "line") from None
    text = obj.get(cfg.text_field) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{name}: line {lineno} has no string field {cfg.text_field!r} (it has: "
                        f"{keys}); pass --text-field NAME")
    if cfg.bad_utf8 == "error" and _BAD.search(text):   # raw bytes, or a \ud800 JSON escape
        raise _bad_input(name, f"line {lineno}")
    yield from _cut(text, cfg.max_doc_chars, stats)


def iter_documents(entries, cfg: ReadConfig, stats: ReadStats, cache_dir="."):
    """Yield ``(text, file_index, doc_number)`` for every document of ``entries`` in order
    (``list_sources`` output); ``stats`` counts what was read and dropped."""
    for fi, entry in enumerate(entries):
        name = str(entry)
        stats.files += 1
        stats.file_names.append(name)
        if isinstance(entry, Path):
            jsonl = _base_suffix(entry) in JSONL_SUFFIXES
            blocks = _blocks(entry, name)
        else:
            jsonl, blocks = False, iter([(load_source(entry, cache_dir), 0)])
        docs = (_jsonl_documents if jsonl else _text_documents)(blocks, name, cfg, stats)
        n = 0
        for doc in docs:
            if not doc.strip():
                continue                    # separators in a row, blank lines: no document
            stats.docs += 1
            n += 1
            if cfg.bad_utf8 == "skip" and _BAD.search(doc):
                stats.invalid_docs += 1
                stats.invalid_chars += len(doc)
                continue
            yield doc, fi, n
