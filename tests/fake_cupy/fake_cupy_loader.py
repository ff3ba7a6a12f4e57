"""Make the fake CuPy the active device of this process for a while (tests, lesson checks).

The fake is imported once per process and kept aside: between uses ``import cupy`` fails again
(as it does on a machine without CuPy), and every use gets the same module objects, so arrays
that minillm caches per device (masks, tables) stay arrays of the one fake module. Both
``tests/conftest.py`` (the ``fake_gpu`` fixture) and ``lessons/lessonkit/fakegpu.py`` import
this file, so they share that one module.
"""
import contextlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
_MODULES = {}


def modules() -> dict:
    """{name: module} of the fake ``cupy`` and ``cupyx`` (imported on the first call)."""
    if not _MODULES:
        sys.path.insert(0, str(HERE))
        try:
            import cupy  # noqa: F401
            import cupyx  # noqa: F401
        finally:
            sys.path.remove(str(HERE))
        for name in [m for m in sys.modules if m.split(".")[0] in ("cupy", "cupyx")]:
            _MODULES[name] = sys.modules.pop(name)
    return _MODULES


@contextlib.contextmanager
def active(kernels_on: bool = False):
    """The fake as minillm's device inside (the fused kernels off unless ``kernels_on``: they run
    in a slow CPU emulator); yields the fake ``cupy``. When the process already runs on the GPU
    (the fake CI pass), it yields that module and changes nothing."""
    from minillm import backend, kernels
    if backend.is_gpu():
        yield backend.array_module()
        return
    mods = modules()
    before = {name: sys.modules.get(name) for name in mods}
    sys.modules.update(mods)
    prev_kernels = kernels.set_enabled(kernels_on)
    try:
        backend.set_device("gpu")
        yield mods["cupy"]
    finally:
        backend.set_device("cpu")
        kernels.set_enabled(prev_kernels)
        for name, module in before.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
