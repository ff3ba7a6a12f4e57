"""Launching a job and ending it on an error: one bad rank ends every rank, never a hang.

Under ``mpirun`` the ranks wait on each other in collectives, so an exception that ends one
process would leave the others blocked forever. ``install_abort_handler(comm)`` makes an uncaught
exception on any rank, in any thread, print its message (one ``error:`` line for a mistake in the
input, exit code 2; the traceback for a bug, exit code 1) and then end the whole job through
``comm.abort``. The CLI calls ``exit_with_error`` itself for errors it catches.
"""
import os
import sys
import threading
import time
import traceback

from minillm.errors import UserError


def _flush_std():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def format_error(comm, exc: BaseException, tb=None) -> tuple[str, int]:
    """(text for stderr, exit code): a one-line ``error: ...`` (code 2) for a UserError, else the
    traceback (code 1). With several ranks, every line but rank 0's user error names its rank."""
    tag = f"[rank {comm.rank}] " if comm.size > 1 else ""
    if isinstance(exc, UserError):
        one_line = " ".join(str(exc).split())
        return f"{tag if comm.rank != 0 else ''}error: {one_line}\n", 2
    if isinstance(exc, KeyboardInterrupt):
        return f"{tag}interrupted\n", 130
    text = "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))
    return "".join(tag + line for line in text.splitlines(keepends=True)), 1


def exit_with_error(comm, exc: BaseException, tb=None):
    """Print ``exc`` (see ``format_error``) and end the job: MPI_Abort when there are several
    ranks (the others may be blocked in a collective; only an abort frees them), else exit."""
    text, code = format_error(comm, exc, tb)
    _flush_std()
    sys.stderr.write(text)
    _flush_std()
    if comm.size > 1:
        # mpiexec forwards our stderr through a pipe; MPI_Abort tears the job down at once, and
        # the last message (the error just printed) was sometimes lost: let it drain first
        time.sleep(0.25)
        comm.abort(code)
    os._exit(code)


def install_abort_handler(comm) -> None:
    """Make an uncaught exception on any rank, in any thread, end the whole job (never a hang).

    A world of one keeps Python's own handling of bugs (exit code 1) and only turns a UserError
    into the one-line message with exit code 2.
    """
    def hook(exc_type, exc, tb):
        if comm.size == 1 and not isinstance(exc, UserError):
            sys.__excepthook__(exc_type, exc, tb)
            return
        exit_with_error(comm, exc, tb)

    def thread_hook(args):
        if args.exc_type is SystemExit:
            return
        hook(args.exc_type, args.exc_value, args.exc_traceback)

    sys.excepthook = hook
    threading.excepthook = thread_hook
