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
- ``RawModule`` kernels run on the CPU when g++ is there (``_emulator.py``: a fiber per GPU
  thread, barriers for ``__syncthreads``), and ``cuda.cublas`` GEMMs with NumPy, so the kernels
  of ``minillm/kernels`` can be tested here; other kernel kinds can be built but not run.

Layout: ``_core.py`` (the device array, ufuncs, counters), ``_cuda.py`` (``cupy.cuda``),
``_emulator.py`` (CUDA C and cuBLAS on the CPU), ``_names.py`` (which names CuPy exports), and
this file, which assembles the namespace.
"""
from __future__ import annotations

import builtins as _b
import sys as _sys
import types

import numpy

from cupy._core import (_ALIASES, _FUNCTION_NAMES, _FUNCTIONS, _UFUNCS, __version__, _fake,  # noqa: F401
                        _matmul, _unwrap, _unwrap_kw, _wrap, ndarray, ufunc)
from cupy._cuda import (cuda, get_default_memory_pool, get_default_pinned_memory_pool,  # noqa: F401
                        is_available)

# NumPy's names exported below (bool, sum, max, round, ...) shadow the builtins in this module:
# the code here spells those builtins as _b.NAME.


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
_this = _sys.modules[__name__]
__all__ = _exported()


def __dir__():
    return list(__all__)