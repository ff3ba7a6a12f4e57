"""The fake CuPy's core: the device array (``ndarray``), ufuncs, wrapping NumPy results, counters.

See ``cupy/__init__.py`` for what the fake is and enforces.
"""
from __future__ import annotations

import builtins as _b  # (the package's namespace shadows bool, sum, max, ...: spelled _b.NAME)
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
    device = property(lambda self: __import__("cupy._cuda", fromlist=["Device"]).Device(_fake.current_device))

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


ndarray.__module__ = "cupy"  # as real CuPy reports it (cupy.ndarray)


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

