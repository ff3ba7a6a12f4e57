"""The array module ``xp``: NumPy on the CPU, CuPy on the GPU. The only file that imports cupy.

Every op writes ``xp.something(...)`` and so runs on either device. ``xp`` is a namespace
object whose attributes are copied from the active module, so switching device with
``set_device`` is seen everywhere and an attribute lookup costs no more than a module's.
The device comes from ``MINILLM_DEVICE`` (``cpu`` or ``gpu``) at import, or ``set_device``.
This file only chooses the array module; special functions NumPy lacks are in
``autograd/special.py`` and host-memory tuning in ``perf/allocator.py``.
"""
import os
import types

import numpy

from minillm.errors import UserError

xp = types.SimpleNamespace()
_state = {"device": "cpu", "module": numpy}


def _load_cupy():
    try:
        import cupy  # noqa: F401  (the one place cupy is imported)
    except ImportError as e:
        raise UserError("device 'gpu' needs CuPy: pip install 'minillm[gpu]' (cupy-cuda12x), "
                        f"or use --train.device=cpu ({e})") from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, no device
        raise UserError(f"device 'gpu' but no usable CUDA GPU was found ({e}); "
                        "use --train.device=cpu") from None
    if n == 0:
        raise UserError("device 'gpu' but no CUDA GPU was found; use --train.device=cpu")
    return cupy


def set_device(device: str):
    """Make ``xp`` NumPy (``cpu``) or CuPy (``gpu``)."""
    if device not in ("cpu", "gpu"):
        raise UserError(f"unknown device {device!r}; choose 'cpu' or 'gpu'")
    module = numpy if device == "cpu" else _load_cupy()
    xp.__dict__.clear()
    xp.__dict__.update({k: getattr(module, k) for k in dir(module) if not k.startswith("__")})
    _state.update(device=device, module=module)
    return module


def device() -> str:
    return _state["device"]


def is_gpu() -> bool:
    return _state["device"] == "gpu"


def array_module():
    """The real module behind ``xp`` (numpy or cupy)."""
    return _state["module"]


def to_numpy(a):
    """A NumPy copy (or the array itself when it already is one)."""
    if isinstance(a, numpy.ndarray) or numpy.isscalar(a):
        return numpy.asarray(a)
    return a.get()  # cupy


def asarray(a, dtype=None):
    """Move host data (lists, NumPy arrays) to the active device."""
    return _state["module"].asarray(a, dtype=dtype)


def is_array(a) -> bool:
    return isinstance(a, _state["module"].ndarray)


def check_array(a, what="array"):
    """Raise a clear error when ``a`` belongs to the other device's array module."""
    mod = _state["module"]
    if isinstance(a, mod.ndarray):
        return a
    kind = type(a).__module__.split(".")[0]
    if kind in ("numpy", "cupy"):
        raise TypeError(f"{what} is a {kind} array but the active device is {device()!r} "
                        f"({mod.__name__}): mixing numpy and cupy arrays is not allowed; "
                        f"move it with minillm.backend.asarray / to_numpy")
    raise TypeError(f"{what} must be an array, got {type(a).__name__}")


def synchronize():
    """Wait for the GPU to finish queued work (no-op on the CPU). Use before timing or MPI."""
    if is_gpu():
        _state["module"].cuda.get_current_stream().synchronize()


set_device(os.environ.get("MINILLM_DEVICE", "cpu").strip().lower() or "cpu")
