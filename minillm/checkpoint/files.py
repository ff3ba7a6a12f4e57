"""Checkpoints in a run directory: naming, discovery (newest that verifies), pruning.

A run directory holds ``ckpt_{step:07d}.h5`` files; the zero padding makes ``ls`` sort them by
step. An interrupted save leaves at most a hidden ``.ckpt_XXXXXXX.h5.tmp-<pid>`` file, which
discovery ignores and pruning removes once the process that wrote it is gone. ``make_room``
prunes before a save, so a full disk gets the old checkpoints' space first.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from minillm.checkpoint.hdf5 import verify_checkpoint
from minillm.errors import UserError

_CKPT_RE = re.compile(r"^ckpt_(\d{7,})\.h5$")
_TMP_RE = re.compile(r"^\..+\.h5\.tmp-(\d+)$")


def checkpoint_path(run_dir, step: int) -> Path:
    """``run_dir/ckpt_0000120.h5`` for step 120."""
    if int(step) < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return Path(run_dir) / f"ckpt_{int(step):07d}.h5"


def checkpoint_step(path) -> int | None:
    """The step encoded in a checkpoint file name, or None if the name is not one of ours."""
    m = _CKPT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir) -> list[Path]:
    """Checkpoint files in ``run_dir``, newest (highest step) first; [] if none or no directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in run_dir.iterdir() if p.is_file()]
    return [p for step, p in sorted((x for x in found if x[0] is not None), reverse=True)]


def find_latest_checkpoint(run_dir, warn=None) -> Path | None:
    """The newest checkpoint that opens and fully verifies (structure and every checksum).

    Each newer one that fails is skipped with a one-line warning on stderr (or ``warn(msg)``),
    so a run killed while a disk was failing resumes from the last good state.
    """
    warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    for path in list_checkpoints(run_dir):
        try:
            verify_checkpoint(path)
        except UserError as e:
            warn(f"warning: skipping unusable checkpoint {path.name}: {e}")
            continue
        return path
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_temp_files(run_dir) -> list[Path]:
    """Temp files of saves whose writing process no longer runs (on this machine)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    stale = []
    for p in run_dir.iterdir():
        m = _TMP_RE.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            stale.append(p)
    return sorted(stale)


def prune_checkpoints(run_dir, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (<= 0 keeps all) and stale temp files.

    Returns the paths removed.
    """
    removed = stale_temp_files(run_dir)
    if keep_last > 0:
        removed += list_checkpoints(run_dir)[keep_last:]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def make_room(run_dir, keep_last: int, path) -> list[Path]:
    """Before writing checkpoint ``path``: delete the checkpoints that pruning to ``keep_last``
    would delete once it exists, so their space is free for it; but never the newest one there,
    which stays the last good state should this write fail. Returns the paths removed."""
    if keep_last <= 0:
        return []
    others = [p for p in list_checkpoints(run_dir) if p.name != Path(path).name]
    removed = stale_temp_files(run_dir) + others[max(keep_last - 1, 1):]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed
