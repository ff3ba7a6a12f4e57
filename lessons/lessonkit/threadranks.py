"""Ranks as threads: run a function on p simulated ranks of one process, for exercise checks.

A notebook kernel cannot start an MPI job around a function the learner just wrote, so the checks
of collective algorithms run it on p threads instead, each with a ``ThreadComm`` that has the
parts of ``minillm.distributed.comm.Comm`` such algorithms use: ``rank``, ``size`` and a blocking
``sendrecv``. Messages are copied (a rank never sees another's memory), counted (elements and
messages per rank, to check an algorithm's traffic), and a receive that waits too long raises
instead of hanging (a wrong ring deadlocks).
"""
from __future__ import annotations

import queue
import threading

import numpy as np

TIMEOUT_S = 10.0


class ThreadComm:
    """Rank ``rank`` of ``size`` threads sharing ``boxes``: one FIFO per (source, dest) pair."""

    def __init__(self, rank: int, size: int, boxes: dict):
        self.rank, self.size, self._boxes = rank, size, boxes
        self.sent_messages = 0
        self.sent_elements = 0

    def sendrecv(self, send, dest: int, recv, source: int, sendtag: int = 0, recvtag=None):
        """Send a copy of ``send`` to ``dest`` and receive the next message from ``source`` into
        ``recv`` (same shape); returns ``recv``, as ``Comm.sendrecv``."""
        for who, peer in (("dest", dest), ("source", source)):
            if not 0 <= peer < self.size:
                raise AssertionError(f"rank {self.rank}: {who}={peer} is not a rank of 0..{self.size - 1}")
        send = np.array(send, copy=True)
        self.sent_messages += 1
        self.sent_elements += send.size
        self._boxes[self.rank, dest].put(send)
        try:
            got = self._boxes[source, self.rank].get(timeout=TIMEOUT_S)
        except queue.Empty:
            raise AssertionError(f"rank {self.rank} waited {TIMEOUT_S:.0f} s for a message from rank "
                                 f"{source} that never came (do all ranks send and receive the same "
                                 "number of times?)") from None
        if np.shape(got) != np.shape(recv):
            raise AssertionError(f"rank {self.rank} received {got.size} elements from rank {source} "
                                 f"into a buffer of {np.size(recv)}: the chunk sizes do not match")
        recv[...] = got
        return recv


def run_ranks(p: int, fn, arrays):
    """``fn(comm, arrays[r])`` on p threads, rank r getting ``arrays[r]``; returns
    ``(results, comms)``. The first error of any rank is raised (with its rank) after all end."""
    boxes = {(s, d): queue.Queue() for s in range(p) for d in range(p)}
    comms = [ThreadComm(r, p, boxes) for r in range(p)]
    results, errors = [None] * p, [None] * p

    def body(r):
        try:
            results[r] = fn(comms[r], arrays[r])
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            errors[r] = e

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(p)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S * 3)
    for r, e in enumerate(errors):
        if e is not None:
            if isinstance(e, (AssertionError, NotImplementedError)):
                raise e
            raise AssertionError(f"rank {r}: {type(e).__name__}: {e}") from e
    if any(t.is_alive() for t in threads):
        raise AssertionError("some ranks never finished (a deadlock?)")
    return results, comms
