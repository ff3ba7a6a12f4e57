"""The fake CuPy's ``cupy.cuda``: devices (MINILLM_FAKE_CUPY_GPUS of them), streams and events
(everything is already done), pinned host memory, a memory pool that holds nothing, and the two
cuBLAS GEMMs minillm calls (done with NumPy by ``_emulator.gemm_strided_batched``)."""
import builtins as _b
import types

from cupy._core import _fake, _sync


class _CUDARuntimeError(RuntimeError):
    pass


def _get_device_count():
    if _fake.device_count <= 0:
        raise _CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
    return _fake.device_count


def _set_device(i):
    if not 0 <= i < _fake.device_count:
        raise _CUDARuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {i}")
    _fake.current_device = i
    _fake.used_devices.append(i)


class _Device:
    def __init__(self, device=None):
        self.id = _fake.current_device if device is None else int(device)

    def use(self):
        _set_device(self.id)

    def synchronize(self):
        _sync("synchronize")

    @property
    def compute_capability(self):
        return "90"

    def __enter__(self):
        self._prev = _fake.current_device
        _set_device(self.id)
        return self

    def __exit__(self, *exc):
        _fake.current_device = self._prev

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


class _Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.done = True

    def record(self, stream=None):
        return self

    def synchronize(self):
        _sync("event")


class _Stream:
    _current = None

    def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
        self.ptr = 0 if null else id(self)

    def synchronize(self):
        _sync("synchronize")

    def record(self, event=None):
        return event if event is not None else _Event()

    def wait_event(self, event):
        pass

    @property
    def done(self):
        return True

    def use(self):
        _Stream._current = self
        return self

    def __enter__(self):
        self._prev, _Stream._current = _Stream._current, self
        return self

    def __exit__(self, *exc):
        _Stream._current = self._prev


_NULL_STREAM = _Stream(null=True)


def _get_current_stream():
    return _Stream._current or _NULL_STREAM


def _alloc_pinned_memory(nbytes):
    """Page-locked host memory: here plain host memory with the buffer protocol (as CuPy's has)."""
    return bytearray(_b.max(_b.int(nbytes), 1))


class _MemoryPool:
    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass

    def set_limit(self, size=None, fraction=None):
        pass


_POOL, _PINNED_POOL = _MemoryPool(), _MemoryPool()


def get_default_memory_pool():
    return _POOL


def get_default_pinned_memory_pool():
    return _PINNED_POOL


def is_available():
    return _fake.device_count > 0


def _gemm_ex(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,
             computeType, algo):
    from cupy import _emulator
    _fake.launches += 1
    _emulator.gemm_strided_batched(transa, transb, m, n, k, alpha, A, Atype, lda, 0, B, Btype, ldb, 0,
                                   beta, C, Ctype, ldc, 0, 1, computeType)


def _gemm_strided_batched_ex(handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb,
                             strideB, beta, C, Ctype, ldc, strideC, batchCount, computeType, algo):
    from cupy import _emulator
    _fake.launches += 1
    _emulator.gemm_strided_batched(transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb,
                                   strideB, beta, C, Ctype, ldc, strideC, batchCount, computeType)


cuda = types.SimpleNamespace(
    Device=_Device, Stream=_Stream, Event=_Event,
    device=types.SimpleNamespace(get_cublas_handle=lambda: 1),
    cublas=types.SimpleNamespace(gemmEx=_gemm_ex, gemmStridedBatchedEx=_gemm_strided_batched_ex),
    get_current_stream=_get_current_stream,
    alloc_pinned_memory=_alloc_pinned_memory,
    is_available=is_available,
    runtime=types.SimpleNamespace(
        getDeviceCount=_get_device_count, getDevice=lambda: _fake.current_device,
        setDevice=_set_device, CUDARuntimeError=_CUDARuntimeError,
        getDeviceProperties=lambda i: {"name": b"Fake GPU (NumPy)", "totalGlobalMem": 1 << 34},
        memGetInfo=lambda: (1 << 34, 1 << 34), deviceSynchronize=lambda: _sync("synchronize"),
        is_hip=False),
)

Device = _Device
