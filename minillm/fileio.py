"""Writing files so that a failure loses nothing: whole-or-absent files and one-line errors.

Every file minillm writes (configs, metrics, tokenizers, token files, downloads) goes through
``write_atomic``: the bytes go to a hidden temporary name next to the target, then
``os.replace`` puts them in place, so a reader sees the old file or the whole new one. Any
``OSError`` on the way (disk full, read-only file system, a path through a file, no permission)
becomes a ``UserError`` that names the file and the cause, and the temporary file is removed.
(HDF5 checkpoints follow the same recipe in ``checkpoint/hdf5.py``.)
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from minillm.errors import UserError


def write_error(what: str, path, err: BaseException, hint: str = "") -> UserError:
    """``cannot write <what> <path>: <cause>[; hint]``, the cause without the errno noise."""
    cause = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return UserError(f"cannot write {what} {path}: {cause}" + (f"; {hint}" if hint else ""))


def temp_path(path: Path) -> Path:
    """The hidden temporary name ``write_atomic`` uses next to ``path``."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_atomic(path, data: bytes | str, what: str = "file", hint: str = "") -> Path:
    """Write ``data`` (str as UTF-8) to ``path`` whole or not at all; parent directories are
    created. Raises ``UserError`` naming ``what`` and ``path`` when the disk refuses."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise write_error(what, path, e, hint) from None
    return path


def append_line(path, line: str, what: str = "file") -> None:
    """Append one line to ``path`` (a log such as metrics.jsonl); UserError when the disk refuses."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        raise write_error(what, path, e) from None


def _unwritable(path: Path) -> str | None:
    """Why no directory can be written at ``path`` (creating nothing), or None if one can."""
    place = path
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        return "not a directory" + ("" if place == path else f" ({place} is a file)")
    if not os.access(place, os.W_OK | os.X_OK):
        cause = "read-only file system" if _read_only_mount(place) else "permission denied"
        return cause + ("" if place == path else f" ({place} is not writable)")
    return None


def check_writable_dir(path, what: str = "directory", hint: str = "") -> Path:
    """Check, creating nothing, that ``path`` is (or can be made as) a directory we may write in:
    UserError naming the file in the way or the read-only place otherwise. ``os.access`` answers
    for this process (root may write through a chmod, never onto a read-only mount)."""
    path = Path(path)
    why = _unwritable(path)
    if why is None:
        return path
    tail = f"; {hint}" if hint else ""
    if why.startswith("not a directory"):
        raise UserError(f"{what} {path} is {why}{tail}")
    raise UserError(f"cannot write {what} {path}: {why}{tail}")


def check_writable_file(path, what: str = "file", hint: str = "") -> Path:
    """Check, creating nothing, that a file may be written at ``path``; UserError otherwise."""
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; give a file name{tail}")
    why = _unwritable(path.parent)
    if why is not None:
        raise UserError(f"cannot write {what} {path}: {why}{tail}")
    return path


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def file_sha256(path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes (hex), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
