"""The array module ``xp``: NumPy on the CPU, CuPy on the GPU, and which GPU a process uses.

Every op writes ``xp.something(...)`` and so runs on either device. ``xp`` is a namespace
object whose attributes are copied from the active module, so switching device with
``set_device`` is seen everywhere and an attribute lookup costs no more than a module's.

Which device: one rule, ``resolve_device`` (the command line, then the config's
``train.device``, then ``MINILLM_DEVICE``, then ``cpu``), applied once by whoever starts a run;
at import ``xp`` follows ``MINILLM_DEVICE``. Under mpirun each process takes the GPU
``local rank mod GPUs on the node`` (``use_gpu_for_rank``).

With ``kernels/`` this is the only code that imports cupy. Special functions NumPy lacks are in
``autograd/special.py``, host-memory tuning in ``perf/allocator.py``.
"""
import os
import types

import numpy

from minillm.errors import UserError

xp = types.SimpleNamespace()
_state = {"device": "cpu", "module": numpy}


def _load_cupy():
    try:
        import cupy  # noqa: F401  (the one place outside kernels/ that cupy is imported)
    except ImportError as e:
        raise UserError("device 'gpu' needs CuPy: pip install 'minillm[gpu]' (cupy-cuda12x; "
                        f"cupy-cuda13x for CUDA 13), or use --train.device=cpu ({e})") from None
    n = gpu_count(cupy)
    if n == 0:
        raise UserError("device 'gpu' but no CUDA GPU was found (CuPy sees none); "
                        "use --train.device=cpu")
    return cupy


def gpu_count(cupy=None) -> int:
    """GPUs CuPy sees on this node (0 without a driver or device)."""
    cupy = cupy or _state["module"]
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # CUDARuntimeError: no driver, no device
        return 0


_SOURCES = ("command line", "config", "MINILLM_DEVICE")


def resolve_device(command_line=None, config="auto"):
    """(device, where it came from): the command line's choice, else the config's
    ``train.device`` unless it is ``auto``, else ``MINILLM_DEVICE``, else ``cpu``."""
    env = os.environ.get("MINILLM_DEVICE", "").strip().lower()
    for value, source in zip((command_line, None if config == "auto" else config, env), _SOURCES):
        if value:
            return value, source
    return "cpu", "default"


def set_device(device: str):
    """Make ``xp`` NumPy (``cpu``) or CuPy (``gpu``)."""
    if device not in ("cpu", "gpu"):
        raise UserError(f"unknown device {device!r}; choose 'cpu' or 'gpu'")
    module = numpy if device == "cpu" else _load_cupy()
    xp.__dict__.clear()
    xp.__dict__.update({k: getattr(module, k) for k in dir(module) if not k.startswith("__")})
    _state.update(device=device, module=module)
    _deferred.clear()
    return module


def device() -> str:
    return _state["device"]


def device_key():
    """What a cache of device arrays is keyed by: ``("cpu",)`` or ``("gpu", gpu index)``."""
    if _state["device"] == "cpu":
        return ("cpu",)
    return ("gpu", _state["module"].cuda.runtime.getDevice())


def use_gpu_for_rank(local_rank: int, local_size: int) -> str:
    """Make this process use GPU ``local_rank mod (GPUs on the node)``; returns one line saying
    which (with a warning when more processes than GPUs share the node's devices)."""
    n = gpu_count()
    gpu = local_rank % n
    _state["module"].cuda.Device(gpu).use()
    line = f"GPU {gpu} of {n} (local rank {local_rank} of {local_size} on this node)"
    if local_size > n:
        line += (f"; warning: {local_size} processes share {n} GPU(s), each GPU runs "
                 f"{-(-local_size // n)} of them (fine for tests, slow for training)")
    return line


def cupy_version() -> str:
    """The CuPy version string ('' on the CPU)."""
    return getattr(_state["module"], "__version__", "") if is_gpu() else ""


def is_gpu() -> bool:
    return _state["device"] == "gpu"


def array_module():
    """The real module behind ``xp`` (numpy or cupy)."""
    return _state["module"]


# ------------------------------------------------------------------ reading device values
# On the GPU every read of a device value by the host waits for all queued work (a "sync").
# The training step reads nothing; the values it reports (loss, grad norm) and the checks that
# would need the host (ids in range) are read together, once per logged step, by ``fetch``.
_deferred = {}  # (error class, message) -> 0-d boolean device array, True when the check failed


def check(failed, message: str, error=ValueError) -> None:
    """Raise ``error(message)`` when the 0-d boolean array ``failed`` is True: at once on the
    CPU; on the GPU at the next ``fetch`` (reading it now would stall the GPU every call)."""
    if not is_gpu():
        if bool(failed):
            raise error(message)
        return
    prev = _deferred.get((error, message))
    _deferred[(error, message)] = failed if prev is None else prev | failed


def fetch(*values) -> list:
    """Python floats of ``values`` (0-d arrays or numbers) with one device-to-host copy; any
    failed ``check`` is raised here."""
    items = list(_deferred.items())
    _deferred.clear()
    arrays = [v for v in values if is_array(v)] + [flag for _, flag in items]
    host = iter(to_numpy(xp.stack([a.reshape(()).astype(xp.float64) for a in arrays]))
                if arrays else ())
    out = [float(next(host)) if is_array(v) else float(v) for v in values]
    for (error, message), _ in items:
        if next(host):
            raise error(message)
    return out


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


try:  # importing never fails: a run that needs the GPU resolves its device and says what is wrong
    set_device(os.environ.get("MINILLM_DEVICE", "cpu").strip().lower() or "cpu")
except UserError:
    set_device("cpu")
