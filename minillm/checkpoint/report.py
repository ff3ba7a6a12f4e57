"""Human-readable views of a checkpoint: the ``inspect`` report and config comparison for resume."""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np

from minillm.checkpoint.hdf5 import file_header, open_checkpoint, read_dataset, read_group, tensor_infos
from minillm.errors import ConfigError


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower() if v is not None else "none"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):
        return " ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v)


def inspect_checkpoint(path) -> str:
    """A readable report: header, progress, config, every model tensor, optimizer summary."""
    path = Path(path)
    lines = []
    with open_checkpoint(path) as f:
        meta = read_group(f, "meta")
        config = read_group(f, "config")
        head = {k: "?" for k in ("format_version", "minillm_version", "created")} | file_header(f)
        lines += [f"checkpoint     {path} ({_size(path.stat().st_size)})",
                  f"format         version {head['format_version']}, written by minillm "
                  f"{head['minillm_version']} at {head['created']}"]
        for key, label in (("step", "step"), ("tokens_seen", "tokens seen"),
                           ("best_val_loss", "best val loss"), ("layout", "layout")):
            lines.append(f"{label:<15}{_fmt(meta[key]) if key in meta else '-'}")
        for key, v in meta.items():
            if key not in ("step", "tokens_seen", "best_val_loss", "layout"):
                lines.append(f"{key:<15}{_fmt(v)}")

        lines.append("config")
        for section, values in config.items():
            if isinstance(values, dict):
                lines += textwrap.wrap(" ".join(f"{k}={v!r}" for k, v in values.items()), 100,
                                       initial_indent=f"  [{section}] ",
                                       subsequent_indent=" " * (len(section) + 5),
                                       break_on_hyphens=False) or [f"  [{section}]"]
            else:
                lines.append(f"  {section} = {values!r}")

        tensors = tensor_infos(f, "model")
        rows = []
        total = 0
        for name, ds in tensors:  # one tensor in memory at a time
            a = read_dataset(ds, f"model/{name}")
            norm = math.sqrt(float(np.sum(np.square(a, dtype=np.float64)))) if a.size else 0.0
            rows.append((name, str(tuple(a.shape)), str(a.dtype), f"{norm:.6g}"))
            total += a.size
        w = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(("name", "shape",
                                                                              "dtype"))]
        lines.append(f"model tensors ({len(rows)})")
        lines.append(f"  {'name':<{w[0]}}  {'shape':<{w[1]}}  {'dtype':<{w[2]}}  L2 norm")
        lines += [f"  {n:<{w[0]}}  {s:<{w[1]}}  {d:<{w[2]}}  {norm}" for n, s, d, norm in rows]
        lines.append(f"total parameters  {total:,}")

        opt = tensor_infos(f, "optimizer")
        nbytes = sum(ds.size * ds.dtype.itemsize for _, ds in opt)
        leaves = _json_leaves(f["optimizer"]) if "optimizer" in f else {}
        extra = "".join(f", {k} {_fmt(leaves[k])}" for k in ("step", "lr") if k in leaves)
        lines.append(f"optimizer state   {len(opt)} tensors, {_size(nbytes)}{extra}")
        others = [k for k in f if k not in ("meta", "config", "model", "optimizer")
                  and not k.startswith("__")]
        if others:
            lines.append("other sections    " + ", ".join(others))
    return "\n".join(lines)


def _json_leaves(g) -> dict:
    return {k: json.loads(v) for k, v in g.attrs.items() if not k.startswith("__")}


def _flatten(d, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


_MISSING = object()


def _differences(saved: dict, current: dict, sections) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, current value) for each key whose values differ."""
    diffs = []
    for section in sections:
        a = _flatten(saved.get(section) or {}, f"{section}.")
        b = _flatten(current.get(section) or {}, f"{section}.")
        for key in list(a) + [k for k in b if k not in a]:
            x, y = a.get(key, _MISSING), b.get(key, _MISSING)
            if x != y:
                diffs.append((key, x, y))
    return diffs


def _show(v, cli: bool = False) -> str:
    if v is _MISSING:
        return "(absent)"
    if cli:
        return str(v).lower() if isinstance(v, bool) else str(v)
    return repr(v)


def compare_config(saved: dict, current: dict, sections=("model",)) -> list[str]:
    """Differences in the given config sections: ``["model.n_layer: checkpoint 4, config 6"]``."""
    return [f"{k}: checkpoint {_show(x)}, config {_show(y)}"
            for k, x, y in _differences(saved, current, sections)]


def check_config(path, saved: dict, current: dict, sections=("model",)) -> None:
    """Raise ConfigError saying how to resume when ``current`` differs from the saved config."""
    diffs = _differences(saved, current, sections)
    if not diffs:
        return
    was = ", ".join(f"{k}={_show(x, cli=True)}" for k, x, _ in diffs)
    has = ", ".join(_show(y, cli=True) for _, _, y in diffs)
    fix = " ".join(f"--{k}={_show(x, cli=True)}" for k, x, _ in diffs if x is not _MISSING)
    raise ConfigError(f"checkpoint {path} was written with {was} but the config has {has}; "
                      f"resume with {fix or 'the saved config'} or start a new out_dir")
