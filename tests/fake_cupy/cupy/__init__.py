"""A strict fake CuPy for machines without a GPU: NumPy underneath, CuPy's rules on top.

The GPU path of minillm is tested on every CI run with this module standing in for ``cupy``
(``MINILLM_FAKE_CUPY=1`` puts ``tests/fake_cupy`` first on the path: see ``tests/conftest.py``).
It computes with NumPy, so results are those of the CPU, but it refuses what real CuPy refuses
and counts what costs a real GPU a synchronisation:

- a device array (``cupy.ndarray``) is not a ``numpy.ndarray``; ``numpy.asarray`` on it raises
  (CuPy's "Implicit conversion to a NumPy array is not allowed"): use ``.get()``;
- NumPy arrays passed to cupy functions or mixed into arithmetic raise ``TypeError`` (only
  ``asarray``/``array`` take host data, as in CuPy);
- only names CuPy exports exist (``cupy.errstate`` is an AttributeError);
- ``ufunc.at`` only for the ufuncs and dtypes CuPy supports (``add.at`` rejects bfloat16);
- reductions and scalar indexing return 0-d arrays, never Python or NumPy scalars;
- 16-bit matmuls accumulate in float32 and round once, as cuBLAS does;
- ``MINILLM_FAKE_CUPY_VERSION=13.6.0`` is a CuPy 13 without bfloat16;
  ``MINILLM_FAKE_CUPY_GPUS=N`` (default 1) is the number of GPUs, 0 for none;
- host waits are counted in ``cupy._fake.syncs`` (a Counter: ``float``, ``int``, ``bool``, ``item``,
  ``get``, ``tolist``, ``synchronize``, ...), uploads in ``cupy._fake.uploads``, and kernel launches
  in ``cupy._fake.launches`` (one per operation that computes or writes an array; views,
  reshapes and ``empty`` launch nothing; a cuBLAS GEMM or a RawModule kernel is one);
- ``RawModule`` kernels run on the CPU when g++ is there (``_emulator.py``: a thread per GPU
  thread, barriers for ``__syncthreads``), and ``cuda.cublas`` GEMMs with NumPy, so the kernels
  of ``minillm/kernels`` can be tested here; other kernel kinds can be built but not run.
"""
from __future__ import annotations

import builtins as _b
import collections
import os
import types

import numpy

__version__ = os.environ.get("MINILLM_FAKE_CUPY_VERSION", "14.2.0")
_MAJOR = int(__version__.split(".")[0])


class _FakeState:
    """What the tests read: host waits and uploads, the devices used."""

    def __init__(self):
        self.syncs = collections.Counter()
        self.uploads = 0
        self.launches = 0
        self.device_count = int(os.environ.get("MINILLM_FAKE_CUPY_GPUS", "1"))
        self.current_device = 0
        self.used_devices = []

    def reset(self):
        self.syncs.clear()
        self.uploads = 0
        self.launches = 0

    @property
    def total_syncs(self):
        return _b.sum(self.syncs.values())


_fake = _FakeState()

try:
    import ml_dtypes
    _BF16 = numpy.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _BF16 = None


def _sync(kind):
    _fake.syncs[kind] += 1


# NumPy's names exported below (bool, sum, max, round, ...) shadow the builtins in this module:
# the code here spells those builtins as _b.NAME.

# ------------------------------------------------------------------ wrapping and unwrapping
def _check_dtype(dt):
    if dt.kind in "OUSMm" or (dt.kind == "V" and dt != _BF16):
        raise ValueError(f"Unsupported dtype {dt}")
    if dt == _BF16 and _MAJOR < 14:
        raise ValueError(f"Unsupported dtype {dt} (CuPy {__version__} has no bfloat16)")


def _wrap(r):
    """NumPy results -> device arrays (NumPy scalars become 0-d arrays, as CuPy returns)."""
    if isinstance(r, numpy.ndarray):
        _check_dtype(r.dtype)
        out = object.__new__(ndarray)
        out._a = r
        return out
    if isinstance(r, numpy.generic):
        return _wrap(numpy.asarray(r))
    if isinstance(r, tuple):
        return tuple(_wrap(x) for x in r)
    if isinstance(r, list):
        return [_wrap(x) for x in r]
    return r


def _host_error(x):
    return TypeError(f"Unsupported type {type(x)}")


def _unwrap(x):
    """Device arrays -> their NumPy storage; a NumPy array here is a host array passed to a
    device function, which CuPy refuses."""
    if type(x) is ndarray:
        return x._a
    if isinstance(x, numpy.ndarray):
        raise _host_error(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    return x


def _unwrap_kw(kw):
    return {k: _unwrap(v) for k, v in kw.items()}


def _unwrap_index(key):
    """Indices may be device arrays, lists, slices, ints; CuPy copies NumPy index arrays over."""
    if type(key) is ndarray:
        return key._a
    if isinstance(key, tuple):
        return tuple(_unwrap_index(k) for k in key)
    return key


_NO_LAUNCH = {"empty", "empty_like"}


def _launched(r, kwargs=None, inputs=()):
    """Count a kernel launch when an operation wrote an array (a new one, or ``out=``); returning
    an input as it is (``astype(copy=False)``, ``ascontiguousarray``) launches nothing."""
    if (kwargs and kwargs.get("out") is not None) or isinstance(r, numpy.generic) or \
            (isinstance(r, numpy.ndarray) and r.base is None and not _b.any(r is a for a in inputs)):
        _fake.launches += 1
    return r


def _function(name, np_fn):
    def fn(*args, **kwargs):
        args = _unwrap(args)
        r = np_fn(*args, **_unwrap_kw(kwargs))
        return _wrap(r if name in _NO_LAUNCH else _launched(r, kwargs, args))
    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = "cupy"
    return fn


# ------------------------------------------------------------------ ufuncs
# CuPy's ufunc.at: which ufuncs, and the dtypes each accepts (cupy/_core/_routines_indexing.pyx).
_AT_DTYPES = {
    "add": ("int32", "int64", "float16", "float32", "float64", "uint32", "uint64"),
    "subtract": ("int32", "uint32"),
    "maximum": ("int32", "int64", "float32", "float64", "uint32", "uint64"),
    "minimum": ("int32", "int64", "float32", "float64", "uint32", "uint64"),
    "bitwise_and": ("int32", "int64", "uint32", "uint64"),
    "bitwise_or": ("int32", "int64", "uint32", "uint64"),
    "bitwise_xor": ("int32", "int64", "uint32", "uint64"),
}


class ufunc:
    """A NumPy ufunc that takes device arrays only (and Python/NumPy scalars)."""

    def __init__(self, np_ufunc):
        self._u = np_ufunc
        self.__name__ = np_ufunc.__name__
        self.nin, self.nout, self.nargs = np_ufunc.nin, np_ufunc.nout, np_ufunc.nargs

    def __repr__(self):
        return f"<ufunc 'cupy_{self.__name__}'>"

    def __call__(self, *args, **kwargs):
        if self._u is numpy.matmul:
            return _matmul(*args, **kwargs)
        _fake.launches += 1
        return _wrap(self._u(*_unwrap(args), **_unwrap_kw(kwargs)))

    def at(self, a, indices, b=None):
        allowed = _AT_DTYPES.get(self.__name__)
        if allowed is None:
            raise NotImplementedError(f"`cupy_{self.__name__}.at` is not supported yet")
        if type(a) is not ndarray:
            raise _host_error(a)
        if str(a.dtype) not in allowed:
            raise TypeError(f"cupy.{self.__name__}.at only supports {', '.join(allowed)} as data type")
        args = (a._a, _unwrap_index(indices)) + (() if b is None else (_unwrap(b),))
        _fake.launches += 1
        self._u.at(*args)

    def reduce(self, array, axis=0, dtype=None, out=None, keepdims=False):
        if self.__name__ not in ("add", "multiply"):
            raise NotImplementedError(f"`cupy_{self.__name__}.reduce` is not supported yet")
        return _wrap(self._u.reduce(_unwrap(array), axis=axis, dtype=dtype, out=_unwrap(out),
                                    keepdims=keepdims))

    def outer(self, a, b, **kwargs):
        return _wrap(self._u.outer(_unwrap(a), _unwrap(b), **_unwrap_kw(kwargs)))


def _half_matmul(a, b):
    """cuBLAS multiplies 16-bit inputs with a float32 accumulator and rounds the result once."""
    dt = numpy.result_type(a.dtype, b.dtype)
    if dt.itemsize == 2:
        return (a.astype(numpy.float32) @ b.astype(numpy.float32)).astype(dt)
    return a @ b


def _matmul(a, b, out=None, **kwargs):
    a, b = _unwrap(a), _unwrap(b)
    if kwargs:
        raise TypeError(f"cupy.matmul: unsupported arguments {sorted(kwargs)}")
    _fake.launches += 1
    r = _half_matmul(a, b)
    if out is not None:
        out._a[...] = r
        return out
    return _wrap(r)


# ------------------------------------------------------------------ the device array
class _Pointer:
    def __init__(self, ptr):
        self.ptr = ptr


class ndarray:
    """A device array: a NumPy array the host may not touch implicitly."""

    __slots__ = ("_a", "_base")
    __array_priority__ = 100
    __hash__ = None

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        self._a = numpy.empty(shape, dtype=dtype, order=order)
        _check_dtype(self._a.dtype)

    # ---- refusing the host ----
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, uf, method, *inputs, **kwargs):
        mine = _UFUNCS.get(uf.__name__)
        if mine is None:
            return NotImplemented
        if "out" in kwargs:
            out = kwargs["out"]
            kwargs["out"] = out[0] if isinstance(out, tuple) else out
        return getattr(mine, method)(*inputs, **kwargs) if method != "__call__" else mine(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        mine = _FUNCTIONS.get(func.__name__)
        if mine is None:
            return NotImplemented
        return mine(*args, **kwargs)

    # ---- explicit transfers and host reads (each one a synchronisation) ----
    def get(self, stream=None, order="C", out=None, blocking=True):
        if blocking:
            _sync("get")
        if out is not None:
            if not isinstance(out, numpy.ndarray):
                raise TypeError("Only numpy.ndarray can be obtained from cupy.ndarray")
            if out.dtype != self._a.dtype or out.shape != self._a.shape:
                raise ValueError(f"out of shape {out.shape} {out.dtype} does not match "
                                 f"{self._a.shape} {self._a.dtype}")
            out[...] = self._a
            return out
        return numpy.array(self._a, order=order)

    def set(self, arr, stream=None):
        if not isinstance(arr, numpy.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if arr.dtype != self._a.dtype or arr.shape != self._a.shape:
            raise ValueError(f"cannot set {arr.shape} {arr.dtype} into {self._a.shape} {self._a.dtype}")
        _fake.uploads += 1
        self._a[...] = arr

    def item(self):
        _sync("item")
        return self._a.item()

    def tolist(self):
        _sync("tolist")
        return self._a.tolist()

    def __float__(self):
        _sync("float")
        return float(self._a)

    def __int__(self):
        _sync("int")
        return int(self._a)

    def __bool__(self):
        _sync("bool")
        return _b.bool(self._a)

    def __complex__(self):
        _sync("complex")
        return _b.complex(self._a)

    def __repr__(self):
        _sync("repr")
        return repr(self._a)

    def __str__(self):
        _sync("repr")
        return str(self._a)

    def __format__(self, spec):
        _sync("format")
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    # ---- attributes ----
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: _wrap(self._a.T))
    mT = property(lambda self: _wrap(numpy.swapaxes(self._a, -1, -2)))
    real = property(lambda self: _wrap(self._a.real))
    imag = property(lambda self: _wrap(self._a.imag))
    @property
    def base(self):
        mine = getattr(self, "_base", None)
        if mine is not None:
            return mine
        return None if self._a.base is None else _wrap(self._a.base)
    data = property(lambda self: _Pointer(self._a.ctypes.data))
    device = property(lambda self: cuda.Device(_fake.current_device))

    @property
    def __cuda_array_interface__(self):
        # The "device" pointer is host memory; MPI (mpi4py) can read it, which lets the tests
        # run the CUDA-aware code path on this fake.
        a = self._a
        return {"shape": a.shape, "typestr": a.dtype.str, "version": 3, "data": (a.ctypes.data, False),
                "strides": None if a.flags.c_contiguous else a.strides, "descr": [("", a.dtype.str)]}

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(r) for r in self._a)

    def __getitem__(self, key):
        out = _wrap(_launched(self._a[_unwrap_index(key)]))
        if type(out) is ndarray and out._a.base is not None:  # a view: its base is this array's
            out._base = self if self._a.base is None else self.base
        return out

    def __setitem__(self, key, value):
        if isinstance(value, numpy.ndarray):  # CuPy refuses assignment from CPU arrays (gh-2079)
            raise _host_error(value)
        _fake.launches += 1
        self._a[_unwrap_index(key)] = _unwrap(value)

    def __matmul__(self, other):
        return _matmul(self, other)

    def __rmatmul__(self, other):
        return _matmul(other, self)

    def __imatmul__(self, other):
        return _matmul(self, other, out=self)


def _method(name):
    def m(self, *args, **kwargs):
        return _wrap(_launched(getattr(self._a, name)(*_unwrap(args), **_unwrap_kw(kwargs)), kwargs,
                               (self._a,)))
    m.__name__ = name
    return m


# cupy.ndarray's array methods (those minillm or its tests may touch)
for _name in ("all", "any", "argmax", "argmin", "argsort", "astype", "clip", "conj", "copy",
              "cumsum", "cumprod", "diagonal", "dot", "fill", "flatten", "max", "mean", "min",
              "nonzero", "prod", "ravel", "repeat", "reshape", "round", "sort", "squeeze", "std",
              "sum", "swapaxes", "take", "tobytes", "trace", "transpose", "var", "view"):
    setattr(ndarray, _name, _method(_name))


def _operator(name):
    np_op = getattr(numpy.ndarray, name)

    def op(self, *args):
        r = np_op(self._a, *_unwrap(args))
        if r is not NotImplemented:
            _fake.launches += 1
        return _wrap(r)
    op.__name__ = name
    return op


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
              "__rtruediv__", "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__", "__pow__",
              "__rpow__", "__and__", "__rand__", "__or__", "__ror__", "__xor__", "__rxor__",
              "__lshift__", "__rlshift__", "__rshift__", "__rrshift__", "__lt__", "__le__",
              "__gt__", "__ge__", "__eq__", "__ne__", "__neg__", "__pos__", "__abs__", "__invert__",
              "__divmod__"):
    setattr(ndarray, _name, _operator(_name))


def _inplace(name):
    np_op = getattr(numpy.ndarray, name)

    def op(self, other):
        _fake.launches += 1
        np_op(self._a, _unwrap(other))
        return self
    op.__name__ = name
    return op


for _name in ("__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
              "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"):
    setattr(ndarray, _name, _inplace(_name))


# ------------------------------------------------------------------ the module's names
from cupy._names import FUNCTIONS as _FUNCTION_NAMES, NUMPY_ALIASES as _ALIASES  # noqa: E402

_UFUNCS = {n: ufunc(getattr(numpy, n)) for n in _FUNCTION_NAMES
           if isinstance(getattr(numpy, n, None), numpy.ufunc)}
_FUNCTIONS = {n: _function(n, getattr(numpy, n)) for n in _FUNCTION_NAMES
              if n not in _UFUNCS and callable(getattr(numpy, n, None))}


def _host_in(x, dtype=None, **kwargs):
    if type(x) is ndarray:
        return x._a if dtype is None else x._a.astype(dtype, copy=False)
    _fake.uploads += 1  # a copy to the device: never the host's memory itself
    return numpy.array(_unwrap_nested_device(x), dtype=dtype, copy=True)


def _unwrap_nested_device(x):
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap_nested_device(v) for v in x)
    if type(x) is ndarray:  # a list of device arrays: CuPy stacks them on the device
        return x._a
    return x


def asarray(a, dtype=None, order=None, *, blocking=False):
    """Host data (lists, NumPy arrays, scalars) is copied to the device; device arrays pass."""
    r = _host_in(a, dtype)
    return _wrap(r if order is None else numpy.asarray(r, order=order))


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    return _wrap(numpy.array(_host_in(obj), dtype=dtype, copy=copy, order=order, ndmin=ndmin))


asanyarray = asarray


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    if type(a) is ndarray:
        return a.get(stream=stream, order=order, out=out, blocking=blocking)
    return numpy.asarray(a, order=order)


def get_array_module(*args):
    return _this if _b.any(type(a) is ndarray for a in args) else numpy


def matmul(a, b, out=None, **kwargs):
    return _matmul(a, b, out=out, **kwargs)


def fuse(*args, **kwargs):
    raise NotImplementedError("the fake CuPy cannot compile kernels (cupy.fuse)")


class _Kernel:
    """ElementwiseKernel / ReductionKernel / RawKernel: built, never run (no compiler here)."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"the fake CuPy cannot compile CUDA ({type(self).__name__})")


class ElementwiseKernel(_Kernel):
    pass


class ReductionKernel(_Kernel):
    pass


class RawKernel(_Kernel):
    pass


class RawModule:
    """CUDA C compiled for the CPU (``_emulator.py``: g++, a thread per GPU thread), so kernels'
    code can be tested without a GPU; without g++, built but never run."""

    def __init__(self, code=None, options=(), name_expressions=None, **kwargs):
        self.code, self._module = code, None

    def get_function(self, name):
        from cupy import _emulator
        if not _emulator.available():
            raise NotImplementedError("the fake CuPy needs g++ to run CUDA kernels")
        if self._module is None:
            self._module = _emulator.Module(self.code)
        kernel = self._module.get_function(name)

        def launch(*args, **kwargs):
            _fake.launches += 1
            return kernel(*args, **kwargs)
        return launch


# ------------------------------------------------------------------ cupy.cuda
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

# ------------------------------------------------------------------ cupy.random (host generator, device results)
class _Generator:
    def __init__(self, seed=None):
        self._g = numpy.random.default_rng(seed)

    def __getattr__(self, name):
        fn = getattr(self._g, name)
        return lambda *args, **kwargs: _wrap(numpy.asarray(fn(*_unwrap(args), **_unwrap_kw(kwargs))))


random = types.SimpleNamespace(default_rng=_Generator,
                               standard_normal=lambda size=None: _wrap(numpy.random.standard_normal(size)))

# ------------------------------------------------------------------ the namespace
_this = None  # set below: this module object


def _exported():
    names = set(_FUNCTION_NAMES) | set(_ALIASES) | {
        "ndarray", "ufunc", "asarray", "array", "asanyarray", "asnumpy", "get_array_module",
        "matmul", "fuse", "ElementwiseKernel", "ReductionKernel", "RawKernel", "RawModule", "cuda",
        "get_default_memory_pool", "get_default_pinned_memory_pool", "is_available", "random"}
    return sorted(n for n in names if n in globals())


globals().update(_UFUNCS)
globals().update({n: f for n, f in _FUNCTIONS.items() if n not in globals()})
globals().update({n: getattr(numpy, n) for n in _ALIASES if hasattr(numpy, n)})
if _BF16 is not None and _MAJOR >= 14:
    pass  # bfloat16 arrays are made with ml_dtypes.bfloat16, as with real CuPy 14

import sys as _sys  # noqa: E402

_this = _sys.modules[__name__]
__all__ = _exported()


def __dir__():
    return list(__all__)
