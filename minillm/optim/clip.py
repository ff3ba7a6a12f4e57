"""Gradient clipping by global L2 norm, as ``torch.nn.utils.clip_grad_norm_``.

The norm is taken over all gradients as if they were one long vector, before clipping; when it
exceeds ``max_norm`` every gradient is multiplied by ``max_norm / (norm + 1e-6)``, which keeps
the update's direction and caps its length.

Accuracy without copies: each gradient is cut into chunks (views, no copies) whose sums of
squares are float32 dot products, short enough that float32 accumulation is accurate; only those
per-chunk sums are added up in float64.

No host round trip: the norm stays a 0-d device array and the clipping factor is computed on the
device (``min(1, max_norm / norm)``, 1 for a non-finite norm), so ``clip_grad_norm_device`` never
makes a GPU wait; the trainer reads the norm only on logged steps. ``clip_grad_norm`` returns a
Python float (one read).

For pipeline parallelism, where each process holds different parameters, pass ``reduce`` (e.g.
a sum all-reduce over stages) to combine the local sums of squares into the global one.
"""
from collections.abc import Mapping

from minillm import backend
from minillm.backend import xp

# float32 dot products over 2^16 elements are good to ~1e-8 relative on the CPU; cuBLAS sums
# with a tree, which is accurate at any length, so on the GPU bigger chunks mean fewer launches.
_CPU_CHUNK = 1 << 16
_GPU_CHUNK = 1 << 24
_EPS = 1e-6  # PyTorch's guard against dividing by a zero norm


def _unique_params(params):
    """Parameters from params, (name, param) pairs or a mapping, each object once."""
    items = params.values() if isinstance(params, Mapping) else params
    seen, out = set(), []
    for it in items:
        p = it[1] if isinstance(it, tuple) else it
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def grad_square_sum(params):
    """Sum of squares of all gradients (None skipped), this process's parameters only: a 0-d
    float64 array on the device."""
    chunk = _GPU_CHUNK if backend.is_gpu() else _CPU_CHUNK
    parts = []
    for p in _unique_params(params):
        g = p.grad
        if g is None:
            continue
        flat = g.reshape(-1)  # a view for contiguous gradients
        half = flat.dtype.itemsize < 4  # float16 / bfloat16 would overflow and round: use float32
        for i in range(0, flat.size, chunk):
            c = flat[i:i + chunk]
            if half:
                c = c.astype(xp.float32)
            parts.append(xp.vdot(c, c))
    if not parts:
        return xp.zeros((), dtype=xp.float64)
    return xp.stack(parts).astype(xp.float64).sum()


def _norm(params, reduce):
    sq = grad_square_sum(params)
    if reduce is not None:
        sq = reduce(sq)
    return xp.sqrt(xp.asarray(sq, dtype=xp.float64))


def global_grad_norm(params, reduce=None) -> float:
    """The L2 norm of all gradients together; ``reduce`` combines sums of squares across
    processes holding different parameters."""
    return float(_norm(_unique_params(params), reduce))


def scale_grads(params, scale: float) -> None:
    """Multiply every gradient by ``scale`` in place."""
    scale = float(scale)  # a Python float keeps float32 gradients float32
    for p in _unique_params(params):
        if p.grad is not None:
            p.grad *= scale


def clip_grad_norm(params, max_norm: float, reduce=None) -> float:
    """Scale gradients in place so their global norm is at most ``max_norm``; return the norm
    measured before clipping.

    ``max_norm <= 0`` disables clipping (the norm is still returned, for logging). A non-finite
    norm (an overflow under mixed precision) leaves the gradients alone so the loss scaler can
    see the inf/nan and skip the step.
    """
    return float(clip_grad_norm_device(params, max_norm, reduce))


def clip_grad_norm_device(params, max_norm: float, reduce=None):
    """``clip_grad_norm`` without reading anything on the host: returns the norm as a 0-d
    float64 device array, and every gradient is multiplied by the (device) clipping factor, which
    is exactly 1.0 when the norm is within ``max_norm`` or not finite."""
    params = _unique_params(params)
    norm = _norm(params, reduce)
    if max_norm > 0:
        clip = xp.isfinite(norm) & (norm > max_norm)
        coef = xp.where(clip, max_norm / (norm + _EPS), 1.0)       # float64, as a Python float was
        by_dtype = {}
        for p in params:
            if p.grad is not None:
                c = by_dtype.get(p.grad.dtype)
                if c is None:  # one cast per dtype, not one per parameter
                    c = by_dtype[p.grad.dtype] = coef.astype(p.grad.dtype)
                p.grad *= c
    return norm
