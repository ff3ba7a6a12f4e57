"""Host-memory tuning for training processes: keep freed blocks for reuse (glibc ``mallopt``).

Applied by whoever runs training steps (the trainer, ``minillm bench``), never at import: a
library import should not change a process's allocator behind its back.
"""
import os


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
