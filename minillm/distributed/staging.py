"""Device (GPU) arrays handed to MPI: directly when the library is CUDA-aware, else staged.

MPI moves bytes the host can address. A CUDA-aware MPI library also takes device pointers; the
PyPI MPICH wheel does not, so the default is staging: copy the device array into a host buffer,
let MPI work on that, copy the result back. Done naively (``a.get()``, then MPI, then
``asarray``) every message stalls the host until the GPU has finished everything queued before
it, and a data-parallel bucket started from inside backward would stop backward in its tracks.
Here instead:

- host buffers are pinned (page-locked: the GPU copies them by DMA, asynchronously) and reused,
  one pool per shape and dtype, so a step allocates nothing;
- the device-to-host copy is issued on a side stream, after an event on the compute stream (the
  kernels that wrote the array), and marked done by another event (``Staged.ready``): the host
  goes on queueing backward kernels, and MPI starts once that event has completed (a
  non-blocking ``Request`` polls it);
- the copy back is issued on the side stream too, and the compute stream waits for it on the
  device (``wait_event``), not the host.

With a CUDA-aware library (``MINILLM_CUDA_AWARE_MPI=1``, or detected: ``comm._cuda_aware``) MPI
gets the device array itself, once the kernels that wrote it are done (the same ``ready`` event).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy

from minillm import backend


@dataclass
class Staged:
    """What MPI works on for one device array: ``buf`` (the array itself, or a pinned host copy),
    ``ready`` (an event MPI must wait for, or None) and ``finish()`` (after MPI is done)."""
    buf: object
    ready: object = None
    finish: object = None

    def wait_ready(self):
        if self.ready is not None and not self.ready.done:
            self.ready.synchronize()


def _contiguous(a):
    if not a.flags.c_contiguous:
        raise ValueError("MPI buffers must be C-contiguous arrays (use xp.ascontiguousarray)")
    return a


class DeviceBuffers:
    """Prepares device arrays for one communicator's MPI calls (see the module docstring)."""

    def __init__(self, cuda_aware: bool):
        self.cp = backend.array_module()
        self.cuda_aware = cuda_aware
        self.stream = None if cuda_aware else self.cp.cuda.Stream(non_blocking=True)
        self._free = collections.defaultdict(list)   # (dtype, shape) -> [(pinned array, event)]
        self.allocated = 0                            # pinned buffers made so far (reuse shows here)

    def prepare(self, a, read: bool = True, write_back: bool = True) -> Staged:
        """``read``: MPI reads ``a``'s values; ``write_back``: MPI's result goes back into ``a``."""
        _contiguous(a)
        compute = self.cp.cuda.get_current_stream()
        if self.cuda_aware:  # MPI reads and writes device memory once the queued kernels are done
            return Staged(a, compute.record())
        host = self._acquire(a.shape, a.dtype)
        ready = None
        if read:
            self.stream.wait_event(compute.record())
            a.get(stream=self.stream, out=host, blocking=False)
            ready = self.stream.record()

        def finish():
            event = None
            if write_back:
                self.stream.wait_event(compute.record())
                a.set(host, stream=self.stream)
                event = self.stream.record()
                compute.wait_event(event)  # later kernels see the result; the host does not wait
            self._free[(host.dtype.str, host.shape)].append((host, event))

        return Staged(host, ready, finish)

    def _acquire(self, shape, dtype):
        dtype = numpy.dtype(dtype)
        free = self._free[(dtype.str, tuple(shape))]
        if free:
            host, event = free.pop()
            if event is not None and not event.done:  # its last copy back may still read it
                event.synchronize()
            return host
        n = int(numpy.prod(shape, dtype=numpy.int64))
        memory = self.cp.cuda.alloc_pinned_memory(max(n * dtype.itemsize, 1))
        self.allocated += 1
        return numpy.frombuffer(memory, dtype=dtype, count=n).reshape(shape)
