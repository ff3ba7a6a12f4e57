"""Where training text comes from: the embedded Python docs, Tiny Shakespeare, or a file.

- ``pydocs`` (the default): the Python language reference that ships inside CPython as
  ``pydoc_data.topics`` (what ``help("if")`` prints), ~465 KB of English and code, no network.
  Its exact text depends on the Python version.
- ``shakespeare``: Karpathy's Tiny Shakespeare (1.1 MB), downloaded once and cached; a local
  ``tinyshakespeare.txt`` next to the dataset, in it, or in a folder named by $MINILLM_DATA is
  used instead (offline machines).
- anything else: a path to a UTF-8 text file.
"""
from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from minillm.choices import NAMED_SOURCES
from minillm.errors import UserError
from minillm.fileio import write_atomic

SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                   "tinyshakespeare/input.txt")
SHAKESPEARE_FILE = "tinyshakespeare.txt"
DATA_PATH_VAR = "MINILLM_DATA"  # folders holding local copies of downloadable sources


def pydocs_text() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise UserError("source 'pydocs' needs the standard module pydoc_data, which this Python "
                        "lacks; pass a path to a text file instead") from None
    return "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"


def download(url: str, dest: Path, timeout: float = 60.0, hint: str = "") -> Path:
    """Fetch ``url`` into ``dest`` atomically (a partial download is never left as ``dest``)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = r.read()
        if not data:
            raise OSError("empty response")
    except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
        raise UserError(f"could not download {url} ({getattr(e, 'reason', None) or e}); "
                        + (hint or "download it yourself and pass the local file path as the source")
                        ) from None
    return write_atomic(dest, data, "download")


def data_search_path() -> list[Path]:
    """The folders named by $MINILLM_DATA (``os.pathsep``-separated): local copies of sources."""
    return [Path(p) for p in os.environ.get(DATA_PATH_VAR, "").split(os.pathsep) if p]


def shakespeare_text(cache_dir=".", search=()) -> str:
    """Tiny Shakespeare: a local ``tinyshakespeare.txt`` in ``cache_dir``, one of ``search`` or
    a $MINILLM_DATA folder if there is one, else downloaded into ``cache_dir``."""
    dest = Path(cache_dir) / SHAKESPEARE_FILE
    for place in [Path(cache_dir), *map(Path, search), *data_search_path()]:
        if (place / SHAKESPEARE_FILE).is_file():
            return read_text_file(place / SHAKESPEARE_FILE)
    hint = (f"without network, save the file as {dest} (or in a folder named by ${DATA_PATH_VAR}) "
            "and run again, or pass the local file path as the source")
    return read_text_file(download(SHAKESPEARE_URL, dest, hint=hint))


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


def load_source(source: str, cache_dir=".", search=()) -> str:
    """The text of ``source`` ('pydocs', 'shakespeare' or a file path).

    ``cache_dir`` is where the Shakespeare download is kept; ``search``: more folders that may
    hold a local copy (see ``shakespeare_text``).
    """
    source = str(source)
    if source == "pydocs":
        return pydocs_text()
    if source == "shakespeare":
        return shakespeare_text(cache_dir, search)
    return read_text_file(source)


def source_id(source: str) -> str:
    """A stable name for a source, stored in meta.json: named sources as is, files absolute."""
    source = str(source)
    return source if source in NAMED_SOURCES else str(Path(source).resolve())
