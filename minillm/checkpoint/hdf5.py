"""Save and load a training state (a plain nested dict) as one self-describing HDF5 file.

The mapping is deliberately boring, so ``h5ls -r`` / ``h5dump`` show exactly what was saved:

- dict               -> group; keys kept as-is (``transformer.h.0.attn.c_attn.weight`` is a fine
                        HDF5 name: it has no "/"), their order in a ``__order__`` attribute
- array (NumPy/CuPy) -> dataset, chunked, with the fletcher32 checksum filter, so a flipped bit
                        on disk is caught on read instead of silently becoming a weight
                        (chunks.py computes the checksums fast)
- any other leaf     -> JSON in an attribute: Python ints of any size (PCG64 state is 128-bit),
                        floats by repr (inf/nan included), str, bool, None, lists: nothing is lost.
                        JSON longer than 2 KiB goes in a checksummed uint8 dataset instead.
- NumPy scalar       -> 1-element dataset marked ``scalar`` (keeps its exact dtype)
- list holding arrays-> group marked ``list`` with children "0", "1", ...
Tuples come back as lists (as with JSON).

Writes are atomic: a temp file next to the target is written, fsynced, then ``os.replace``d onto
the final name, so a crash at any moment leaves every earlier checkpoint intact.
"""
from __future__ import annotations

import datetime
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from minillm.backend import to_numpy
from minillm.checkpoint.chunks import ArrayWriter
from minillm.errors import UserError

CHECKPOINT_VERSION = 1

# Attribute names with a meaning of their own; a state key may not use them.
_ORDER = "__order__"
_KIND = "__kind__"
_DTYPE = "__dtype__"
_ROOT_ATTRS = ("format_version", "minillm_version", "created")
_RESERVED = {_ORDER, _KIND, _DTYPE}
# JSON up to this size goes in a fixed-length attribute, stored inside the object header, which
# HDF5 checksums (v110 format); longer JSON goes in a fletcher32 dataset. (Variable-length
# strings would live in the global heap, which has no checksum: a flipped bit there can silently
# change a digit, or hang the reader.)
_ATTR_MAX = 2048


def _is_array(v) -> bool:
    """NumPy arrays and anything that looks like a device array (CuPy: shape, dtype, .get())."""
    if isinstance(v, np.ndarray):
        return True
    return hasattr(v, "shape") and hasattr(v, "dtype") and callable(getattr(v, "get", None))


def _holds_arrays(v) -> bool:
    if _is_array(v) or isinstance(v, (np.generic, bytes)):
        return True
    if isinstance(v, dict):
        return any(_holds_arrays(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_holds_arrays(x) for x in v)
    return False


def _json_default(v):
    if isinstance(v, np.generic):  # NumPy scalars nested inside a JSON list
        return v.item()
    raise TypeError(f"cannot store a {type(v).__name__} in a checkpoint")


def attr_text(v) -> str:
    """An attribute value as str (fixed-length strings come back from h5py as bytes)."""
    return v.decode() if isinstance(v, bytes) else str(v)


def _put_json(w: ArrayWriter, g: h5py.Group, name: str, text: str):
    data = text.encode("ascii")  # json.dumps escapes everything else
    if len(data) <= _ATTR_MAX:
        g.attrs[name] = np.bytes_(data)
    else:
        _write_array(w, g, name, np.frombuffer(data, np.uint8), kind="json")


def _get_json(g: h5py.Group, name: str, where: str):
    if name in g.attrs:
        return json.loads(g.attrs[name])
    return read_dataset(g[name], where)


def _write_array(w: ArrayWriter, g: h5py.Group, name: str, a: np.ndarray,
                 kind: str | None = None):
    if a.ndim == 0:  # a scalar dataset cannot be chunked, and fletcher32 needs chunks
        a, kind = a.reshape(1), kind or "0d"
    a = np.ascontiguousarray(a)
    ml_dtype = None
    if a.dtype.kind == "V" and a.dtype.names is None and a.dtype.itemsize in (1, 2, 4, 8):
        # HDF5 has no bfloat16/float8: store such ml_dtypes arrays as raw unsigned ints + a tag
        a, ml_dtype = a.view(f"u{a.dtype.itemsize}"), a.dtype.name
    ds = w.write(g, name, a)
    if kind:
        ds.attrs[_KIND] = np.bytes_(kind)
    if ml_dtype:
        ds.attrs[_DTYPE] = np.bytes_(ml_dtype)


def _write_group(w: ArrayWriter, g: h5py.Group, d: dict, where: str):
    for key in d:
        if not isinstance(key, str):
            raise TypeError(f"checkpoint keys must be strings; {where} has key {key!r}")
        if not key or "/" in key or key == "." or key in _RESERVED:
            raise ValueError(f"{key!r} at {where} cannot be an HDF5 name (empty, '.', contains '/' "
                             f"or reserved)")
    for key, v in d.items():
        _write_item(w, g, key, v, f"{where}/{key}" if where else key)
    _put_json(w, g, _ORDER, json.dumps(list(d)))


def _write_item(w: ArrayWriter, g: h5py.Group, key: str, v, where: str):
    if isinstance(v, dict):
        _write_group(w, g.create_group(key, track_order=True), v, where)
    elif isinstance(v, (list, tuple)) and _holds_arrays(v):
        sub = g.create_group(key, track_order=True)
        sub.attrs[_KIND] = np.bytes_("list")
        _write_group(w, sub, {str(i): x for i, x in enumerate(v)}, where)
    elif isinstance(v, np.generic):
        _write_array(w, g, key, np.asarray(v), kind="scalar")
    elif isinstance(v, bytes):
        _write_array(w, g, key, np.frombuffer(v, dtype=np.uint8), kind="bytes")
    elif _is_array(v):
        _write_array(w, g, key, to_numpy(v))  # one device array at a time on the host
    else:
        try:
            text = json.dumps(v, default=_json_default, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise TypeError(f"cannot save {where}: {e}") from None
        _put_json(w, g, key, text)


def _fsync_path(path: Path, directory: bool = False):
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` (nested dict of arrays and plain values) atomically to ``path``."""
    import minillm  # at call time: the package may still be importing this module

    if not isinstance(state, dict):
        raise TypeError(f"save_checkpoint expects a dict, got {type(state).__name__}")
    for name in _ROOT_ATTRS:
        if name in state:
            raise ValueError(f"{name!r} is reserved for the checkpoint header; rename that key")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(tmp, "w", libver=("v110", "latest"), track_order=True) as f:
            # v110+ object headers carry checksums too, so damaged metadata is caught as well
            f.attrs["format_version"] = CHECKPOINT_VERSION
            f.attrs["minillm_version"] = np.bytes_(minillm.__version__)
            f.attrs["created"] = np.bytes_(datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"))
            _write_group(ArrayWriter(), f, state, "")
            f.flush()
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent, directory=True)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # disk full, permissions, read-only file system
            raise UserError(f"cannot write checkpoint {path}: {e}") from None
        raise
    return path


# ----------------------------------------------------------------------------------- reading

class _Corrupt(Exception):
    """Internal: a problem inside an opened file, turned into a UserError naming the file."""


@contextmanager
def open_checkpoint(path) -> Iterator[h5py.File]:
    """Open a checkpoint for reading, with every failure turned into a one-line UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; check the path "
                        f"(checkpoints are named ckpt_XXXXXXX.h5 in the run directory)")
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory; pass a ckpt_XXXXXXX.h5 file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        msg = str(e)
        if "signature not found" in msg:
            raise UserError(f"checkpoint {path} is not an HDF5 file; "
                            f"pass a ckpt_XXXXXXX.h5 written by minillm") from None
        if "truncated" in msg:
            m = re.search(r"stored_eof = (\d+)", msg)
            want = f" of the {m.group(1)} its header records" if m else ""
            raise UserError(f"checkpoint {path} is truncated (it has {path.stat().st_size} bytes"
                            f"{want}); use an earlier checkpoint") from None
        raise UserError(f"cannot open checkpoint {path}: {msg}") from None
    try:
        try:
            _check_version(f, path)
            yield f
        except (_Corrupt, OSError, RuntimeError, KeyError) as e:  # how h5py reports bad metadata
            msg = " ".join(str(e).split())
            raise UserError(f"checkpoint {path} is corrupt: {msg}; "
                            f"use an earlier checkpoint") from None
    finally:
        f.close()


def _check_version(f: h5py.File, path: Path):
    import minillm

    version = f.attrs.get("format_version")
    if version is None:
        raise UserError(f"{path} is an HDF5 file but not a minillm checkpoint "
                        f"(no format_version attribute)")
    if int(version) != CHECKPOINT_VERSION:
        raise UserError(f"checkpoint {path} has format version {int(version)} but this minillm "
                        f"({minillm.__version__}) reads version {CHECKPOINT_VERSION}; "
                        f"use the minillm version that wrote it")


def read_dataset(ds: h5py.Dataset, name: str, keep: bool = True):
    """The array (or JSON value, bytes, scalar) stored in dataset ``ds``, checksums verified;
    ``name`` is its path for error messages. ``keep=False`` only verifies."""
    try:
        a = ds[()]
    except OSError as e:
        if "filter" in str(e):  # fletcher32 is our only filter: its failure is a bad checksum
            raise _Corrupt(f"checksum mismatch in dataset {name}") from None
        raise _Corrupt(f"cannot read dataset {name} ({e})") from None
    if not keep:
        return None
    kind, ml_dtype = attr_text(ds.attrs.get(_KIND, "")), attr_text(ds.attrs.get(_DTYPE, ""))
    if ml_dtype:
        import ml_dtypes
        a = a.view(getattr(ml_dtypes, ml_dtype))
    if kind == "0d":
        return a.reshape(())
    if kind == "scalar":
        return a.reshape(())[()]
    if kind == "bytes":
        return a.tobytes()
    if kind == "json":
        return json.loads(a.tobytes())
    return a


def _walk(g: h5py.Group, where: str, keep: bool, skip=frozenset()):
    """Rebuild the dict (or list) stored in group ``g``; ``keep=False`` only verifies."""
    try:
        order = _get_json(g, _ORDER, f"{where}/{_ORDER}")
    except (KeyError, OSError, ValueError) as e:
        raise _Corrupt(f"group /{where} has no readable key list ({e})") from None
    out = {}
    for key in order:
        name = f"{where}/{key}" if where else key
        if name in skip:
            continue
        try:
            if key in g:
                obj = g[key]
                out[key] = (_walk(obj, name, keep, skip) if isinstance(obj, h5py.Group)
                            else read_dataset(obj, name, keep))
            elif key in g.attrs:
                out[key] = json.loads(g.attrs[key])
            else:
                raise _Corrupt(f"entry {name} is missing")
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise _Corrupt(f"cannot read {name} ({e})") from None
    if attr_text(g.attrs.get(_KIND, "")) == "list":
        return [out[str(i)] for i in range(len(order))]
    return out


def read_group(f: h5py.File, name: str) -> dict:
    """The nested dict stored under top-level group ``name`` of an open file ({} if absent)."""
    return _walk(f[name], name, keep=True) if name in f else {}


def file_header(f: h5py.File) -> dict:
    """The root attributes of an open file: format_version, minillm_version, created."""
    return {k: (int(v) if k == "format_version" else attr_text(v))
            for k, v in f.attrs.items() if k in _ROOT_ATTRS}


def load_checkpoint(path, exclude=()) -> dict:
    """Read a whole checkpoint back as the nested dict that was saved (NumPy arrays).

    ``exclude`` names entries to leave out by path, e.g. ``("model", "optimizer/state")``, so a
    GPU caller can load the small parts here and stream the tensors with ``iter_tensors``.
    """
    with open_checkpoint(path) as f:
        return _walk(f, "", keep=True, skip=frozenset(exclude))


def verify_checkpoint(path) -> None:
    """Read every entry and dataset (verifying checksums) without keeping them; UserError if bad."""
    with open_checkpoint(path) as f:
        _walk(f, "", keep=False)


def checkpoint_header(path) -> dict:
    """The root attributes: format_version, minillm_version, created."""
    with open_checkpoint(path) as f:
        return file_header(f)


def _datasets(g: h5py.Group, prefix: str = "") -> Iterator[tuple[str, h5py.Dataset]]:
    for key in _get_json(g, _ORDER, prefix + _ORDER):
        if key not in g:
            continue  # a JSON leaf
        obj = g[key]
        name = f"{prefix}{key}"
        if isinstance(obj, h5py.Group):
            yield from _datasets(obj, name + "/")
        elif attr_text(obj.attrs.get(_KIND, "")) != "json":
            yield name, obj


def iter_tensors(path, group: str = "model") -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, array)`` for each dataset under ``group``, one at a time, in saved order.

    Names below ``group`` are relative, nested ones joined by "/" (``optimizer/state`` yields
    ``"transformer.wte.weight/m"``), so a caller can copy tensors to the GPU one by one.
    """
    with open_checkpoint(path) as f:
        if group not in f or not isinstance(f[group], h5py.Group):
            raise UserError(f"checkpoint {path} has no group {group!r}")
        for name, ds in _datasets(f[group]):
            yield name, read_dataset(ds, f"{group}/{name}")


def read_tensor(path, name: str, group: str = "model") -> np.ndarray:
    """One dataset, e.g. ``read_tensor(p, "transformer.wte.weight")``."""
    with open_checkpoint(path) as f:
        full = f"{group}/{name}" if group else name
        if full not in f or not isinstance(f[full], h5py.Dataset):
            raise UserError(f"checkpoint {path} has no tensor {full!r}; "
                            f"see `minillm inspect {path}` for the names it holds")
        return read_dataset(f[full], full)


def tensor_infos(f: h5py.File, group: str) -> list[tuple[str, h5py.Dataset]]:
    """The datasets under ``group`` of an open file (for reports; nothing read)."""
    if group not in f or not isinstance(f[group], h5py.Group):
        return []
    return list(_datasets(f[group]))
