"""Launch real MPI jobs from tests: ``run_mpi(2, ["-m", "minillm", "train", ...])``.

Every rank runs ``python -m mpi4py ARGS...`` (an uncaught exception on one rank aborts the job)
with one BLAS thread, output captured. A job that outlives its timeout is killed, process group
and all, and the test fails showing what the ranks printed: a broken job never hangs the suite.
The test is skipped when mpirun or mpi4py is not installed.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SINGLE_THREAD_ENV = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}


def find_mpirun() -> str | None:
    """The mpirun next to this Python (the venv's MPICH), else one on PATH."""
    local = Path(sys.executable).parent / "mpirun"
    if local.exists():
        return str(local)
    return shutil.which("mpirun")


def run_mpi(nprocs: int, args: list[str], timeout: float = 120, env: dict | None = None,
            cwd=None, *, mpi4py_runner: bool = True, check: bool = False) -> subprocess.CompletedProcess:
    """Run ``mpirun -np nprocs python -m mpi4py *args`` and return the finished process
    (``returncode``, ``stdout``, ``stderr`` as text).

    ``args`` is what follows ``python`` on a normal command line: a script path and its
    arguments, or ``["-m", "minillm", ...]``, or ``["-c", code]``. ``env`` entries are added to
    the current environment. ``mpi4py_runner=False`` runs ``python *args`` without mpi4py's
    abort-on-exception wrapper. ``check=True`` fails the test (with the output) on a non-zero exit.
    """
    mpirun = find_mpirun()
    if mpirun is None:
        pytest.skip("mpirun not found (pip install 'minillm[mpi]')")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py not installed (pip install 'minillm[mpi]')")

    child_env = dict(os.environ)
    child_env.update(SINGLE_THREAD_ENV)
    # the package is importable by the ranks even when it is not pip-installed
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), child_env.get("PYTHONPATH", "")) if p)
    child_env.update({k: str(v) for k, v in (env or {}).items()})

    runner = ["-m", "mpi4py"] if mpi4py_runner else []
    cmd = [mpirun, "-np", str(nprocs), sys.executable, *runner, *[str(a) for a in args]]
    # A new session makes mpirun and every rank it spawns one process group we can kill at once.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd, env=child_env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{_format(out, err)}")
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C in pytest): do not leave ranks behind
            _kill_group(proc)
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and result.returncode != 0:
        pytest.fail(f"exit code {result.returncode}: {' '.join(cmd)}\n{_format(out, err)}")
    return result


def output(result: subprocess.CompletedProcess) -> str:
    """stdout and stderr of a finished job, labelled, for assertion messages."""
    return _format(result.stdout, result.stderr)


def _format(out, err) -> str:
    return f"--- stdout ---\n{out or ''}\n--- stderr ---\n{err or ''}"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
