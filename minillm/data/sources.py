"""Where training text comes from: the embedded Python docs, Tiny Shakespeare, or a file.

- ``pydocs`` (the default): the Python language reference that ships inside CPython as
  ``pydoc_data.topics`` (what ``help("if")`` prints), ~465 KB of English and code, no network.
  Its exact text depends on the Python version.
- ``shakespeare``: Karpathy's Tiny Shakespeare (1.1 MB), downloaded once and cached.
- anything else: a path to a UTF-8 text file.
"""
from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from minillm.choices import NAMED_SOURCES
from minillm.errors import UserError

SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                   "tinyshakespeare/input.txt")
SHAKESPEARE_FILE = "tinyshakespeare.txt"


def pydocs_text() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise UserError("source 'pydocs' needs the standard module pydoc_data, which this Python "
                        "lacks; pass a path to a text file instead") from None
    return "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"


def download(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Fetch ``url`` into ``dest`` atomically (a partial download is never left as ``dest``)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = r.read()
        if not data:
            raise OSError("empty response")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    except (OSError, ValueError) as e:  # URLError is an OSError
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not download {url} ({e}); download it yourself and pass the "
                        "local file path as the source instead") from None
    return dest


def shakespeare_text(cache_dir=".") -> str:
    path = Path(cache_dir) / SHAKESPEARE_FILE
    if not path.is_file():
        download(SHAKESPEARE_URL, path)
    return read_text_file(path)


def read_text_file(path) -> str:
    path = Path(path)
    if not path.exists():
        raise UserError(f"source file {path} does not exist; pass 'pydocs', 'shakespeare' "
                        "or the path of a UTF-8 text file")
    if not path.is_file():
        raise UserError(f"source {path} is not a file; pass the path of a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"source file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                        "convert it to UTF-8") from None
    if not text.strip():
        raise UserError(f"source file {path} is empty; pass a file with text in it")
    return text


def load_source(source: str, cache_dir=".") -> str:
    """The text of ``source`` ('pydocs', 'shakespeare' or a file path).

    ``cache_dir`` is where the Shakespeare download is kept.
    """
    source = str(source)
    if source == "pydocs":
        return pydocs_text()
    if source == "shakespeare":
        return shakespeare_text(cache_dir)
    return read_text_file(source)


def source_id(source: str) -> str:
    """A stable name for a source, stored in meta.json: named sources as is, files absolute."""
    source = str(source)
    return source if source in NAMED_SOURCES else str(Path(source).resolve())
