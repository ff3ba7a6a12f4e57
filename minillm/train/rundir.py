"""The run directory belongs to one run: ownership, a lock while the run lives, its files.

- A directory that holds a run (``config.toml``, ``metrics.jsonl`` or a checkpoint) is never
  silently reused: a fresh start there is an error that offers ``--resume auto``, a free
  ``--train.out_dir``, or ``--overwrite`` (which removes the old run's files, and only those).
  ``--resume PATH`` may continue a checkpoint of another directory only into one holding no run.
- ``RunLock``: an exclusive ``flock`` on ``run.lock`` for as long as the run is alive, so a
  second run started on the same directory fails at once, naming the holder's PID. The kernel
  drops the lock when the process ends, ``kill -9`` included; a clean end removes the file.
- ``resume_command``: the exact command line that continues the run (under ``mpirun`` too).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from minillm.checkpoint import checkpoint_step, list_checkpoints
from minillm.errors import UserError
from minillm.fileio import check_writable_dir, write_error

LOCK_FILE = "run.lock"
# What a run writes into its directory (what --overwrite removes); nothing else is touched.
RUN_FILES = ("config.toml", "metrics.jsonl", "tokenizer.json", "metrics.png", "timeline.png",
             "finetune.json", "summary.json")  # the last two: a fine-tune's
RUN_PATTERNS = ("ckpt_*.h5", ".ckpt_*.h5.tmp-*", "timeline_rank*.json", ".*.tmp[0-9]*", "lora_*.h5")
_MARKS = ("config.toml", "metrics.jsonl")  # with a checkpoint: the signs that a run lives here
_HINT = "choose another --train.out_dir"


def run_files(run_dir) -> list[Path]:
    """The files of a run found in ``run_dir`` (sorted)."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    found = {d / name for name in RUN_FILES if (d / name).is_file()}
    for pattern in RUN_PATTERNS:
        found.update(p for p in d.glob(pattern) if p.is_file())
    return sorted(found)


def holds_run(run_dir) -> bool:
    d = Path(run_dir)
    return any((d / m).exists() for m in _MARKS) or bool(list_checkpoints(d))


def describe_run(run_dir) -> str:
    """'3 checkpoints, the newest at step 1500' / 'no checkpoint'."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return "no checkpoint"
    n = len(ckpts)
    return f"{n} checkpoint{'s' if n > 1 else ''}, the newest at step {checkpoint_step(ckpts[0])}"


def free_name(run_dir) -> Path:
    """``run_dir-2``, ``-3``, ...: the first that does not exist."""
    d = Path(run_dir)
    i = 2
    while d.with_name(f"{d.name}-{i}").exists():
        i += 1
    return d.with_name(f"{d.name}-{i}")


def check_ownership(run_dir, resume=None, overwrite=False, out_option="--train.out_dir",
                    resumable=True) -> None:
    """UserError unless starting this run in ``run_dir`` keeps every run whole (see module doc).
    ``out_option``: the option that names the directory; ``resumable``: whether the command can
    continue a run (a fine-tune cannot, so its error offers only a new directory or --overwrite)."""
    d = Path(run_dir)
    inside = resume not in (None, "auto") and Path(resume).resolve().parent == d.resolve()
    if overwrite and (resume == "auto" or inside):
        raise UserError(f"--overwrite starts a new run in {d}, which would delete the checkpoint "
                        f"--resume {resume} continues from; drop one of the two")
    if overwrite or resume == "auto" or inside or not holds_run(d):
        return
    what = f"{out_option.lstrip('-')} {d} already holds a run ({describe_run(d)})"
    if resume is None:
        go_on = "continue it with --resume auto, " if resumable else ""
        raise UserError(f"{what}; {go_on}start a new run with {out_option}={free_name(d)}, "
                        f"or replace it with --overwrite")
    raise UserError(f"{what}; to continue {resume} choose a new {out_option} "
                    f"(e.g. {free_name(d)}), or replace the run in {d} with --overwrite")


def remove_run(run_dir) -> list[Path]:
    """Delete the previous run's files (``--overwrite``); returns them."""
    removed = run_files(run_dir)
    for p in removed:
        try:
            p.unlink(missing_ok=True)
        except OSError as e:
            raise UserError(f"--overwrite cannot remove {p}: {e.strerror}") from None
    return removed


class RunLock:
    """An exclusive lock on ``run_dir/run.lock`` held while a run is alive.

    ``acquire()`` creates the directory if needed and either takes the lock (writing
    ``PID@host`` into the file) or raises a UserError naming the holder. ``release()`` removes
    the file, and the directory too if ``acquire`` made it and it is still empty. Both are
    idempotent; one process may hold one lock per directory.
    """

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd, self._made = None, False

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        check_writable_dir(self.run_dir, "run directory", _HINT)
        try:
            self._made = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            while self._fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise UserError(f"run directory {self.run_dir} is in use by another run "
                                    f"({holder}); wait for it to end or {_HINT}") from None
                if _same_file(fd, self.path):  # not a file a finishing run just unlinked
                    self._fd = fd
                else:
                    os.close(fd)
            os.ftruncate(self._fd, 0)
            os.write(self._fd, f"{os.getpid()}@{socket.gethostname()}\n".encode())
        except OSError as e:
            self.release()
            raise write_error("run directory", self.run_dir, e, _HINT) from None
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still locked: a waiter that opened it sees it is stale
        os.close(self._fd)
        self._fd = None
        if self._made:  # a run that ended before writing anything leaves no empty directory
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()

    @property
    def held(self) -> bool:
        return self._fd is not None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_holder(fd: int) -> str:
    """'pid 1234' (and the host when it is another machine), read from a held lock file."""
    text = ""
    for _ in range(50):  # the holder writes its PID just after taking the lock
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if text:
            break
        time.sleep(0.01)
    pid, _, host = text.partition("@")
    if not pid:
        return "pid unknown"
    if pid == str(os.getpid()):
        return f"pid {pid}, this process: an earlier Trainer on it was not closed"
    return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def claim_run_dir(run_dir, resume=None, overwrite=False, **ownership) -> RunLock:
    """Lock ``run_dir`` and check the run may start there (removing the old run's files under
    ``overwrite``); returns the held lock. The lock comes first, so a concurrent second run is
    told who holds the directory rather than that it holds a run. ``ownership``: the options of
    ``check_ownership`` (the directory's option, whether the command resumes)."""
    lock = RunLock(run_dir).acquire()
    try:
        check_ownership(run_dir, resume, overwrite, **ownership)
        if overwrite:
            remove_run(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


# ------------------------------------------------------------------ the command that continues

_LAUNCHERS = ("mpirun", "mpiexec", "mpiexec.hydra", "orterun", "prterun", "srun")


def _cmdline(pid) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _parent(pid) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def launcher_prefix(world_size: int) -> list[str]:
    """The launcher part of this job's command line (``mpirun -np 2 --oversubscribe``), read from
    the ``mpirun`` process above this one (Linux /proc), else ``mpirun -np N``; [] for one process."""
    if world_size <= 1:
        return []
    pid = os.getppid()
    for _ in range(8):  # rank <- hydra proxy / orted <- mpirun
        argv = _cmdline(pid)
        if argv and os.path.basename(argv[0]) in _LAUNCHERS:
            exe = os.path.basename(sys.executable)
            for i, arg in enumerate(argv[1:], 1):  # the launcher's own options end at the program
                if os.path.basename(arg) == exe or arg == sys.executable:
                    return argv[:i]
            break
        pid = _parent(pid)
        if pid <= 1:
            break
    return ["mpirun", "-np", str(world_size)]


def resume_command(run_dir, world_size: int = 1) -> str:
    """The command line that continues the run in ``run_dir`` from its newest checkpoint."""
    tail = ["train", str(Path(run_dir) / "config.toml"), "--resume", "auto"]
    if world_size <= 1:
        return shlex.join(["minillm", *tail])
    runner = ["-m", "mpi4py"] if "mpi4py" in getattr(sys, "orig_argv", ["mpi4py"]) else []
    return shlex.join([*launcher_prefix(world_size), sys.executable, *runner, "-m", "minillm", *tail])
