"""CountingComm: a communicator that counts what goes through it, for benchmarks and tests.

``CountingComm(comm)`` has the ``Comm`` interface and forwards every call to ``comm``, adding up
per operation the number of calls and the *payload*: the bytes of the array handed to the
collective (an all-reduce of n bytes, an all-gather whose result is n bytes, a reduce-scatter of
an n-byte input, a message of n bytes). Communicators made by ``split`` count too, each on its
own, so after ``make_topology`` the tp, dp and pipeline groups can be read apart. Counting the
calls themselves, not estimating them, is what lets a test compare the traffic of a real step
with a formula, byte for byte.

``seconds[op]`` adds up the wall time spent inside those calls (for a non-blocking call only
its start). ``wire_bytes()`` turns payloads into what one rank sends with ring algorithms: an
all-reduce 2 (p-1)/p n, an all-gather or reduce-scatter (p-1)/p n, a point-to-point message n.
"""
from __future__ import annotations

import time
from collections import defaultdict

_WIRE = {"allreduce": lambda p: 2 * (p - 1) / p, "allgather": lambda p: (p - 1) / p,
         "reduce_scatter": lambda p: (p - 1) / p, "bcast": lambda p: (p - 1) / p,
         "send": lambda p: 1.0, "recv": lambda p: 0.0, "allreduce_scalar": lambda p: 2 * (p - 1) / p}



def wire_bytes(payload: dict, size: int) -> float:
    """Bytes one rank of ``size`` sends for these payloads with ring algorithms (0 alone)."""
    return sum(_WIRE[op](size) * n for op, n in payload.items()) if size > 1 else 0.0


class CountingComm:
    """``comm`` with a tally: ``calls[op]``, ``payload[op]`` (bytes) and ``seconds[op]`` since the
    last ``reset``."""

    def __init__(self, comm):
        self.inner = comm
        self.rank, self.size = comm.rank, comm.size
        self.calls, self.payload, self.seconds = defaultdict(int), defaultdict(int), defaultdict(float)
        self.children = []

    def __repr__(self):
        return f"CountingComm({self.inner!r})"

    def __getattr__(self, name):  # anything not counted (abort, ...) goes straight through
        return getattr(self.inner, name)

    def _run(self, op, nbytes, fn, *args):
        self.calls[op] += 1
        self.payload[op] += int(nbytes)
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds[op] += time.perf_counter() - t0

    def reset(self):
        for tally in (self.calls, self.payload, self.seconds):
            tally.clear()

    def wire_bytes(self) -> float:
        """Bytes this rank sent, with ring algorithms for the collectives."""
        return wire_bytes(self.payload, self.size)

    # ---- counted -------------------------------------------------------------------------------
    def allreduce_(self, a, op="sum"):
        return self._run("allreduce", a.nbytes, self.inner.allreduce_, a, op)

    def iallreduce_(self, a, op="sum"):
        return self._run("allreduce", a.nbytes, self.inner.iallreduce_, a, op)

    def reduce_scatter_(self, a, counts, op="sum"):
        return self._run("reduce_scatter", a.nbytes, self.inner.reduce_scatter_, a, counts, op)

    def allgather_(self, a, counts):
        return self._run("allgather", a.nbytes, self.inner.allgather_, a, counts)

    def allreduce_scalar(self, x, op="sum"):
        return self._run("allreduce_scalar", 8, self.inner.allreduce_scalar, x, op)

    def bcast_(self, a, root=0):
        return self._run("bcast", a.nbytes, self.inner.bcast_, a, root)

    def send(self, a, dest, tag=0):
        return self._run("send", a.nbytes, self.inner.send, a, dest, tag)

    def isend(self, a, dest, tag=0):
        return self._run("send", a.nbytes, self.inner.isend, a, dest, tag)

    def recv(self, a, source, tag=0):
        return self._run("recv", a.nbytes, self.inner.recv, a, source, tag)

    def irecv(self, a, source, tag=0):
        return self._run("recv", a.nbytes, self.inner.irecv, a, source, tag)

    def sendrecv(self, send, dest, recv, source, sendtag=0, recvtag=None):
        self.calls["recv"] += 1
        self.payload["recv"] += int(recv.nbytes)
        return self._run("send", send.nbytes, self.inner.sendrecv, send, dest, recv, source, sendtag, recvtag)

    def split(self, color, key=0):
        child = CountingComm(self.inner.split(color, key))
        self.children.append(child)
        return child
