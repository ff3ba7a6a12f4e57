"""The test suite's fake CuPy as a lesson's "GPU": NumPy does the math, CuPy's rules are enforced
(a device array is not a NumPy array; the host reads it only explicitly), and it counts what a
real GPU pays for: kernel launches and the host's waits for the device ("syncs").

    with fake_gpu() as cp:          # minillm's device is now "gpu" (the fake)
        with counting(cp) as n:
            ...                     # minillm code
        print(n.launches, n.syncs)

The fake lives in ``tests/fake_cupy`` (``fake_cupy_loader.py`` makes it the device and back).
"""
import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

FAKE = Path(__file__).resolve().parents[2] / "tests" / "fake_cupy"


def _loader():
    sys.path.insert(0, str(FAKE))
    try:
        import fake_cupy_loader
    finally:
        sys.path.remove(str(FAKE))
    return fake_cupy_loader


def fake_gpu(kernels_on: bool = False):
    """Context: the fake CuPy as minillm's device (fused kernels emulated on the CPU if asked)."""
    return _loader().active(kernels_on)


def emulator_available() -> bool:
    """Whether the fake can run CUDA kernels (it compiles them for the CPU with g++)."""
    import shutil
    return shutil.which("g++") is not None


@dataclass
class Counts:
    launches: int = 0
    syncs: int = 0
    kinds: dict = field(default_factory=dict)


@contextlib.contextmanager
def counting(cp):
    """Counts the kernel launches and host syncs of the block inside (``Counts``)."""
    cp._fake.reset()
    counts = Counts()
    try:
        yield counts
    finally:
        counts.launches, counts.syncs = cp._fake.launches, cp._fake.total_syncs
        counts.kinds = dict(cp._fake.syncs)
