"""Communication: the one file that imports mpi4py.

``Comm`` wraps an mpi4py communicator with the few operations training needs, all on arrays
(the fast, upper-case buffer methods) plus a couple for small Python objects. ``SerialComm`` has
the same interface for a world of one process, so a trainer written against ``Comm`` runs
unchanged without MPI. The communicator is always passed explicitly; nothing here is global.

Arrays may live on the GPU (CuPy). When the MPI library is CUDA-aware their device memory goes
straight to MPI; otherwise it is staged through reused pinned host buffers, copied on a side
stream (``staging.py``). NumPy arrays are always handed to MPI as they are (zero-copy), so they
must be C-contiguous.
"""
from __future__ import annotations

import collections
import ctypes
import os

import numpy

from minillm.distributed.staging import DeviceBuffers, Staged
from minillm.errors import UserError

_OPS = ("sum", "max", "min", "prod")


def _import_mpi():
    """The mpi4py ``MPI`` module, or None. Imported lazily: ``import minillm`` never loads MPI."""
    try:
        from mpi4py import MPI  # the one place mpi4py is imported
    except (ImportError, RuntimeError):  # not installed, or no MPI library found behind it
        return None
    return MPI


def mpi_available() -> bool:
    return _import_mpi() is not None


def require_mpi(reason: str, nprocs: int | None = None) -> None:
    """Raise a one-line UserError when mpi4py cannot be imported. ``reason``: e.g. ``"dp=2"``."""
    if not mpi_available():
        n = nprocs if nprocs is not None else "N"
        raise UserError(f"{reason} needs MPI: pip install 'minillm[mpi]' (mpi4py + mpich) and launch "
                        f"with mpirun -np {n} python -m mpi4py -m minillm ...")


def get_world_comm() -> "Comm | SerialComm":
    """``Comm(MPI.COMM_WORLD)`` when mpi4py imports (a world of one is fine), else ``SerialComm``."""
    MPI = _import_mpi()
    return SerialComm() if MPI is None else Comm(MPI.COMM_WORLD)


def _check_op(op: str) -> str:
    if op not in _OPS:
        raise ValueError(f"unknown reduction op {op!r}; expected one of {_OPS}")
    return op


def _part(a, counts, rank: int, size: int) -> tuple[int, int]:
    """[lo, hi) of ``rank``'s part when the 1-D array ``a`` is cut into ``counts`` (one per rank)."""
    if a.ndim != 1 or len(counts) != size or sum(counts) != a.size or min(counts) < 0:
        raise ValueError(f"counts {list(counts)} must give each of the {size} ranks a part of the "
                         f"1-D array of {a.size} elements")
    lo = int(sum(counts[:rank]))
    return lo, lo + int(counts[rank])


def _cuda_aware(MPI) -> bool:
    """Can this MPI library read and write CUDA device memory?

    ``MINILLM_CUDA_AWARE_MPI=0|1`` overrides. Otherwise ask the library: mpi4py may expose
    ``Query_cuda_support``; if not, look the MPIX query up in the loaded libmpi with ctypes
    (Open MPI and MPICH both export ``MPIX_Query_cuda_support``). Anything unknown means no.
    """
    env = os.environ.get("MINILLM_CUDA_AWARE_MPI", "").strip()
    if env in ("0", "1"):
        return env == "1"
    query = getattr(MPI, "Query_cuda_support", None)
    if query is not None:
        try:
            return bool(query())
        except Exception:
            return False
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "libmpi" in line and "/" in line})
        for path in libs:
            fn = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support", None)
            if fn is not None:
                return bool(fn())
    except OSError:
        pass
    return False


def _both(first, second):
    """One ``finish`` for a request that staged two buffers (either may have none)."""
    if first is None or second is None:
        return first or second
    return lambda: (first(), second())


class _Ready:
    """Done when every staged buffer's copy is done (the event ``Request`` waits for)."""

    def __init__(self, events):
        self.events = events

    @property
    def done(self) -> bool:
        return all(e.done for e in self.events)

    def synchronize(self) -> None:
        for e in self.events:
            e.synchronize()


def _ready(*staged):
    events = [st.ready for st in staged if st.ready is not None]
    return None if not events else events[0] if len(events) == 1 else _Ready(events)


class Request:
    """A pending non-blocking operation. ``wait()`` blocks until it is complete (calling it again
    does nothing); ``finish`` then copies a staged host buffer back to the device, if any.

    A device array's operation may have to wait for its copy to the host (staging) or for the
    kernels that wrote it: then ``start`` (which begins the MPI operation) runs once the event
    ``ready`` is done, from ``test()`` when it finds it done or from ``wait()``.
    """

    def __init__(self, mpi_request=None, finish=None, keep=None, start=None, ready=None):
        self._req = mpi_request
        self._finish = finish
        self._start, self._ready = start, ready
        self._keep = keep  # buffers MPI is still reading or writing must stay alive until done
        self.done = mpi_request is None and finish is None and start is None
        if start is not None:
            self._begin(block=False)  # at once, unless it must wait for a device copy first

    @property
    def started(self) -> bool:
        """Whether the MPI operation has begun (it has, unless it waits for a device copy)."""
        return self._start is None

    def _begin(self, block: bool) -> bool:
        if self._start is None:
            return True
        if self._ready is not None and not self._ready.done:
            if not block:
                return False
            self._ready.synchronize()
        self._req, self._start, self._ready = self._start(), None, None
        return True

    def wait(self) -> None:
        if self.done:
            return
        self._begin(block=True)
        if self._req is not None:
            self._req.Wait()
        if self._finish is not None:
            self._finish()
        self.done = True
        self._req = self._finish = self._keep = None

    def test(self) -> bool:
        """True (and finished) when the operation has completed; never blocks."""
        if not self.done and self._begin(block=False) and (self._req is None or self._req.Test()):
            self._req = None
            self.wait()
        return self.done


def wait_all(requests) -> None:
    for r in requests:
        r.wait()


class Comm:
    """An mpi4py communicator with in-place array collectives and point-to-point messages.

    Methods ending in ``_`` work in place on their array argument and return it.
    """

    def __init__(self, mpi_comm):
        self._MPI = _import_mpi()
        self._comm = mpi_comm
        self.rank: int = mpi_comm.Get_rank()
        self.size: int = mpi_comm.Get_size()
        self._device = None  # DeviceBuffers, made on the first device array

    def __repr__(self):
        return f"Comm(rank={self.rank}, size={self.size})"

    # --- buffers ------------------------------------------------------------------------------
    def _stage(self, a, read: bool = True, write_back: bool = True) -> Staged:
        """What MPI works on for ``a``: a NumPy array as it is (zero-copy); a device array
        directly (CUDA-aware MPI) or through a pinned host buffer (``staging.py``)."""
        if isinstance(a, numpy.ndarray):
            if not a.flags.c_contiguous:
                raise ValueError("MPI buffers must be C-contiguous arrays (use xp.ascontiguousarray)")
            return Staged(a)
        if self._device is None:  # asked once, on the first device array
            self._device = DeviceBuffers(_cuda_aware(self._MPI))
        return self._device.prepare(a, read, write_back)

    def _blocking(self, st: Staged, call):
        st.wait_ready()
        call(st.buf)
        if st.finish:
            st.finish()

    def _nonblocking(self, st: Staged, call) -> Request:
        return Request(finish=st.finish, keep=st.buf, start=lambda: call(st.buf), ready=st.ready)

    @staticmethod
    def _movable(a):
        """``a`` as MPI can move it: bfloat16 (unknown to MPI and DLPack) as its 16-bit pattern.
        Only for collectives that copy data; reductions need a type MPI can add."""
        return a.view(numpy.uint16) if a.dtype.kind == "V" and a.dtype.itemsize == 2 else a

    def _op(self, op):
        MPI = self._MPI
        return {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD}[_check_op(op)]

    # --- collectives --------------------------------------------------------------------------
    def barrier(self) -> None:
        self._comm.Barrier()

    def bcast_(self, a, root: int = 0):
        self._blocking(self._stage(a), lambda buf: self._comm.Bcast(buf, root=root))
        return a

    def allreduce_(self, a, op: str = "sum"):
        mpi_op = self._op(op)
        self._blocking(self._stage(a), lambda buf: self._comm.Allreduce(self._MPI.IN_PLACE, buf, op=mpi_op))
        return a

    def iallreduce_(self, a, op: str = "sum") -> Request:
        """Start an in-place all-reduce; ``a`` holds the result once ``.wait()`` returns. For a
        device array the copy to the host (staging) runs on a side stream and MPI starts once it
        is done: call ``test()`` now and then, or ``wait()``."""
        mpi_op = self._op(op)
        return self._nonblocking(self._stage(a), lambda buf: self._comm.Iallreduce(
            self._MPI.IN_PLACE, buf, op=mpi_op))

    def reduce_scatter_(self, a, counts, op: str = "sum"):
        """Reduce the 1-D array ``a`` over the ranks, keeping only this rank's part.

        ``a`` is cut into consecutive parts of ``counts[0], counts[1], ...`` elements; afterwards
        rank r's part ``a[lo:lo + counts[r]]`` (``lo = sum(counts[:r])``) holds the reduction of
        every rank's part r, and the rest of ``a`` is left as it was. Returns that part (a view).
        Half the traffic of an all-reduce: nobody receives the parts it does not need.
        """
        lo, hi = _part(a, counts, self.rank, self.size)
        mpi_op = self._op(op)
        send = self._stage(a, write_back=False)
        out = a[lo:hi].copy()  # MPI needs a receive buffer apart from the send buffer
        recv = self._stage(out, read=False)
        send.wait_ready()
        self._blocking(recv, lambda rbuf: self._comm.Reduce_scatter(send.buf, rbuf,
                                                                    recvcounts=list(counts), op=mpi_op))
        if send.finish:
            send.finish()
        a[lo:hi] = out
        return a[lo:hi]

    def allgather_(self, a, counts):
        """In place: rank r contributes its part ``a[lo:lo + counts[r]]`` of the 1-D array ``a``
        (as in ``reduce_scatter_``); afterwards every rank's ``a`` holds every rank's part."""
        _part(a, counts, self.rank, self.size)
        displs = numpy.cumsum([0, *counts[:-1]]).tolist()
        self._blocking(self._stage(a), lambda buf: self._comm.Allgatherv(
            self._MPI.IN_PLACE, [buf, (list(counts), displs)]))
        return a

    def ireduce_scatter(self, send, recv, counts, op: str = "sum") -> Request:
        """Start a reduce-scatter: ``recv`` (``counts[rank]`` elements) receives the reduction over
        the ranks of part ``rank`` of the 1-D ``send`` (cut as in ``reduce_scatter_``) once
        ``.wait()`` returns. ``send`` must stay unchanged until then."""
        _part(send, counts, self.rank, self.size)
        if recv.size != counts[self.rank]:
            raise ValueError(f"recv has {recv.size} elements, rank {self.rank}'s part {counts[self.rank]}")
        s = self._stage(send, write_back=False)
        r = self._stage(recv, read=False)
        mpi_op = self._op(op)
        return Request(finish=_both(s.finish, r.finish), keep=(s.buf, r.buf), ready=_ready(s, r),
                       start=lambda: self._comm.Ireduce_scatter(s.buf, r.buf, recvcounts=list(counts),
                                                                op=mpi_op))

    def iallgather_(self, a, counts, part=None) -> Request:
        """Start an all-gather into the 1-D array ``a`` (cut into ``counts`` as in
        ``allgather_``): once ``.wait()`` returns, ``a`` holds every rank's part. This rank
        contributes ``part`` (``counts[rank]`` elements), or by default its own slot of ``a``."""
        lo, hi = _part(a, counts, self.rank, self.size)
        displs = numpy.cumsum([0, *counts[:-1]]).tolist()
        a = self._movable(a)
        part = None if part is None else self._movable(part)
        whole = self._stage(a, read=part is None)
        if part is None:
            return Request(finish=whole.finish, keep=whole.buf, ready=whole.ready,
                           start=lambda: self._comm.Iallgatherv(self._MPI.IN_PLACE,
                                                                [whole.buf, (list(counts), displs)]))
        if part.size != hi - lo:
            raise ValueError(f"part has {part.size} elements, rank {self.rank}'s slot {hi - lo}")
        mine = self._stage(part, write_back=False)
        return Request(finish=_both(mine.finish, whole.finish), keep=(mine.buf, whole.buf),
                       ready=_ready(mine, whole),
                       start=lambda: self._comm.Iallgatherv(mine.buf, [whole.buf, (list(counts), displs)]))

    def allreduce_scalar(self, x, op: str = "sum") -> float:
        buf = numpy.array([float(x)], dtype=numpy.float64)
        self._comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._op(op))
        return float(buf[0])

    def bcast_obj(self, obj, root: int = 0):
        """Broadcast a small picklable Python object (configs, paths, flags)."""
        return self._comm.bcast(obj, root=root)

    def allgather_obj(self, obj) -> list:
        """Every rank's small picklable object, in rank order."""
        return self._comm.allgather(obj)

    # --- point to point -----------------------------------------------------------------------
    def send(self, a, dest: int, tag: int = 0) -> None:
        self._blocking(self._stage(a, write_back=False), lambda buf: self._comm.Send(buf, dest=dest, tag=tag))

    def recv(self, a, source: int, tag: int = 0):
        """Receive into the preallocated array ``a`` (shape and dtype must match the message)."""
        self._blocking(self._stage(a, read=False), lambda buf: self._comm.Recv(buf, source=source, tag=tag))
        return a

    def isend(self, a, dest: int, tag: int = 0) -> Request:
        return self._nonblocking(self._stage(a, write_back=False),
                                 lambda buf: self._comm.Isend(buf, dest=dest, tag=tag))

    def irecv(self, a, source: int, tag: int = 0) -> Request:
        return self._nonblocking(self._stage(a, read=False),
                                 lambda buf: self._comm.Irecv(buf, source=source, tag=tag))

    def sendrecv(self, send, dest: int, recv, source: int, sendtag: int = 0, recvtag: int | None = None):
        """Send ``send`` to ``dest`` while receiving into ``recv`` from ``source`` (no deadlock
        when every rank does this at once, as in a ring). Returns ``recv``."""
        s = self._stage(send, write_back=False)
        r = self._stage(recv, read=False)
        s.wait_ready()
        self._blocking(r, lambda rbuf: self._comm.Sendrecv(
            s.buf, dest=dest, sendtag=sendtag, recvbuf=rbuf, source=source,
            recvtag=sendtag if recvtag is None else recvtag))
        if s.finish:
            s.finish()
        return recv

    # --- structure and failure ----------------------------------------------------------------
    def split(self, color: int, key: int = 0) -> "Comm":
        """Sub-communicators: ranks with the same ``color`` end up together, ordered by ``key``."""
        return Comm(self._comm.Split(color, key))

    def node_rank_and_size(self) -> tuple[int, int]:
        """(this process's rank among the processes on its node, how many there are), from MPI
        itself: a shared-memory ``Split_type`` communicator. Collective."""
        node = self._comm.Split_type(self._MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            return node.Get_rank(), node.Get_size()
        finally:
            node.Free()

    def abort(self, code: int = 1) -> None:
        """End every process of the job now (MPI_Abort), with exit status ``code``. Printing the
        reason first, and letting it drain, is ``launch.exit_with_error``'s job."""
        self._comm.Abort(code)


class SerialComm:
    """The ``Comm`` interface for a world of one: collectives leave arrays as they are,
    messages to oneself (rank 0) are copied through a mailbox."""

    rank = 0
    size = 1

    def __init__(self):
        self._mailbox = collections.defaultdict(collections.deque)  # tag -> queued copies

    def __repr__(self):
        return "SerialComm(rank=0, size=1)"

    @staticmethod
    def _peer(r):
        if r != 0:
            raise ValueError(f"SerialComm has only rank 0, not rank {r}")

    def barrier(self) -> None:
        pass

    def bcast_(self, a, root: int = 0):
        self._peer(root)
        return a

    def allreduce_(self, a, op: str = "sum"):
        _check_op(op)
        return a

    def iallreduce_(self, a, op: str = "sum") -> Request:
        _check_op(op)
        return Request()

    def reduce_scatter_(self, a, counts, op: str = "sum"):
        _check_op(op)
        lo, hi = _part(a, counts, 0, 1)
        return a[lo:hi]

    def allgather_(self, a, counts):
        _part(a, counts, 0, 1)
        return a

    def ireduce_scatter(self, send, recv, counts, op: str = "sum") -> Request:
        _check_op(op)
        lo, hi = _part(send, counts, 0, 1)
        recv[...] = send[lo:hi]
        return Request()

    def iallgather_(self, a, counts, part=None) -> Request:
        lo, hi = _part(a, counts, 0, 1)
        if part is not None:
            a[lo:hi] = part
        return Request()

    def allreduce_scalar(self, x, op: str = "sum") -> float:
        _check_op(op)
        return float(x)

    def bcast_obj(self, obj, root: int = 0):
        self._peer(root)
        return obj

    def allgather_obj(self, obj) -> list:
        return [obj]

    def send(self, a, dest: int, tag: int = 0) -> None:
        self._peer(dest)
        self._mailbox[tag].append(a.copy())

    def recv(self, a, source: int, tag: int = 0):
        self._peer(source)
        if not self._mailbox[tag]:
            raise RuntimeError(f"SerialComm.recv: nothing was sent with tag {tag} (would deadlock)")
        a[...] = self._mailbox[tag].popleft()
        return a

    def isend(self, a, dest: int, tag: int = 0) -> Request:
        self.send(a, dest, tag)
        return Request()

    def irecv(self, a, source: int, tag: int = 0) -> Request:
        self._peer(source)
        return Request(None, lambda: self.recv(a, source, tag))

    def sendrecv(self, send, dest: int, recv, source: int, sendtag: int = 0, recvtag: int | None = None):
        self._peer(dest)
        self._peer(source)
        recv[...] = send
        return recv

    def split(self, color: int, key: int = 0) -> "SerialComm":
        return SerialComm()

    def node_rank_and_size(self) -> tuple[int, int]:
        return 0, 1

    def abort(self, code: int = 1) -> None:
        os._exit(code)
