"""Fused CUDA kernels for the GPU, and the switch that selects them.

On the GPU the hot non-matmul work of a step (GELU, layer/RMS norm forward and backward, the
softmax-cross-entropy, AdamW, the embedding's scatter-add) is written as CuPy kernels in ``cuda.py`` (one launch where the
NumPy-style code in ``autograd/fused.py`` launches one kernel per array operation), and 16-bit
matmuls with a float32 result call cuBLAS directly (``gemm.py``). They are used when the device
is the GPU and ``MINILLM_KERNELS`` is not ``0``; everywhere else (the CPU, or a GPU with the
kernels off) the reference implementations in ``autograd/fused.py`` and ``optim/adamw.py`` run,
and the kernels are tested against them (``tests/test_kernels.py``, on a real GPU only).

This package and ``backend.py`` are the only code that imports cupy.
"""
import os

from minillm import backend

_ENABLED = os.environ.get("MINILLM_KERNELS", "1").strip() != "0"


def enabled() -> bool:
    """Whether the fused CUDA kernels are used now (the GPU, and MINILLM_KERNELS != 0)."""
    return _ENABLED and backend.is_gpu()


def set_enabled(on: bool) -> bool:
    """Turn the kernels on or off (tests, benchmarks); returns the previous setting."""
    global _ENABLED
    prev, _ENABLED = _ENABLED, bool(on)
    return prev


def fused():
    """The module whose ``GELU``, ``LayerNorm``, ``RMSNorm`` and ``CrossEntropy`` Functions run
    on the active device: ``kernels.cuda`` or the reference ``autograd.fused``."""
    if enabled():
        from minillm.kernels import cuda
        return cuda
    from minillm.autograd import fused as reference
    return reference


def matmul(a, b, out_dtype):
    """a @ b for two 16-bit arrays with a float32 accumulator, the result in ``out_dtype``."""
    from minillm.kernels.gemm import matmul as gemm
    return gemm(a, b, out_dtype)


def embedding_backward(ids, rows, V):
    """Deterministic scatter-add of ``rows`` (N, C) into a (V, C) gradient by ``ids`` (N,)."""
    from minillm.kernels.cuda import embedding_backward as scatter
    return scatter(ids, rows, V)


def adamw_step(items, **hyper):
    """AdamW over all (param, grad, state, scratch, decay) items in a few launches (``cuda.py``)."""
    from minillm.kernels.cuda import adamw_step as step
    return step(items, **hyper)
