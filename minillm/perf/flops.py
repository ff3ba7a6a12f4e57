"""Counting FLOPs and measuring the machine's matmul peak, for MFU (model FLOPs utilisation).

A training step of a Transformer costs about 6N FLOPs per token for the N weights that take part
in matmuls (2 forward, 4 backward) plus the attention scores and their weighted sum,
12 * n_layer * T * C per token (PaLM, appendix B). MFU divides the FLOPs the model needed by the
FLOPs the hardware could have done: the peak of a large float32 matmul measured on this machine.
"""
import time

from minillm import backend
from minillm.backend import xp


def matmul_params(model):
    """Weights that multiply activations: everything but the position table (a lookup)."""
    n = model.num_parameters()
    if getattr(model.transformer, "wpe", None) is not None:
        n -= model.transformer.wpe.weight.size
    return n


def flops_per_token(config, n_matmul_params):
    """Training FLOPs (forward + backward) per token at full context length."""
    return 6 * n_matmul_params + 12 * config.n_layer * config.block_size * config.n_embd


def measure_matmul_peak(n=1024, seconds=0.3, dtype="float32"):
    """FLOP/s of an n x n matmul in ``dtype`` on the active device and thread count."""
    rng = xp.random.default_rng(0) if hasattr(xp.random, "default_rng") else None
    a = (rng.standard_normal((n, n)) if rng is not None else xp.random.standard_normal((n, n))).astype(dtype)
    b = a.T.copy()
    a @ b  # warm-up (BLAS thread start, GPU kernel selection)
    backend.synchronize()
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        backend.synchronize()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and reps >= 3:
            break
    return 2.0 * n ** 3 * reps / elapsed
