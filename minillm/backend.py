"""The array module ``xp``: NumPy on the CPU, CuPy on the GPU. The only file that imports cupy.

Every op writes ``xp.something(...)`` and so runs on either device. ``xp`` is a namespace
object whose attributes are copied from the active module, so switching device with
``set_device`` is seen everywhere and an attribute lookup costs no more than a module's.
The device comes from ``MINILLM_DEVICE`` (``cpu`` or ``gpu``) at import, or ``set_device``.
"""
import math
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


def erf(x):
    """Error function, elementwise, accurate to float64 rounding (NumPy has none built in).

    |x| < 3: erf(x) = 2/sqrt(pi) exp(-x^2) sum_n 2^n x^(2n+1) / (1*3*...*(2n+1))  (all terms
    positive, so no cancellation); |x| >= 3: erfc from its continued fraction.
    """
    if is_gpu():
        import cupyx.scipy.special  # part of CuPy
        return cupyx.scipy.special.erf(x)
    x = xp.asarray(x)
    ax = xp.abs(x).astype(xp.float64)
    small = xp.minimum(ax, 3.0)
    x2 = small * small
    term = small.copy()
    total = small.copy()
    for n in range(1, 80):
        term *= 2.0 * x2 / (2 * n + 1)
        total += term
    res_small = (2.0 / math.sqrt(math.pi)) * xp.exp(-x2) * total
    big = xp.maximum(ax, 3.0)
    frac = xp.zeros_like(big)
    for k in range(60, 0, -1):  # erfc(x) = exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...))))
        frac = (k / 2.0) / (big + frac)
    res_big = 1.0 - xp.exp(-big * big) / math.sqrt(math.pi) / (big + frac)
    res = xp.where(ax < 3.0, res_small, res_big)
    return (xp.sign(x) * res).astype(x.dtype if x.dtype.kind == "f" else xp.float64)


def tune_host_allocator():
    """Keep freed memory for reuse instead of handing it back to the OS after every array.

    A training step makes hundreds of temporaries of a few MB. glibc serves each allocation above
    its mmap threshold with a fresh mmap and unmaps it on free, so every temporary pays page
    faults on first touch: measured here, that made a GELU backward 8x slower and the whole
    shakespeare CPU step ~1.6x slower. Raising the mmap and trim thresholds (mallopt) lets freed
    blocks be reused. glibc only; elsewhere, or with MINILLM_MALLOC_TUNING=0, nothing changes.
    Returns True when the settings were applied."""
    if os.environ.get("MINILLM_MALLOC_TUNING", "1") == "0":
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 64 << 20) or libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        return bool(ok and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) and libc.mallopt(M_TOP_PAD, 64 << 20))
    except (OSError, AttributeError):
        return False


tune_host_allocator()
set_device(os.environ.get("MINILLM_DEVICE", "cpu").strip().lower() or "cpu")
