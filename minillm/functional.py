"""F.*: the functional API, thin wrappers that pick the right Function (import minillm.functional as F).

GELU, layer/RMS norm and cross-entropy come from ``kernels.fused()``: fused CUDA kernels on the
GPU, the reference Functions of ``autograd/fused.py`` elsewhere.
"""
from minillm import backend, kernels
from minillm.autograd import fused, ops
from minillm.autograd.tensor import Tensor
from minillm.backend import xp


def _t(x):
    return x if isinstance(x, Tensor) else Tensor(x)


def relu(x): return ops.ReLU.apply(x)
def silu(x): return ops.SiLU.apply(x)
def tanh(x): return ops.Tanh.apply(x)
def exp(x): return ops.Exp.apply(x)
def log(x): return ops.Log.apply(x)
def sqrt(x): return ops.Sqrt.apply(x)
def gelu(x, approximate="tanh"): return kernels.fused().GELU.apply(x, approximate=approximate)
def softmax(x, axis=-1): return fused.Softmax.apply(x, axis=axis)
def log_softmax(x, axis=-1): return fused.LogSoftmax.apply(x, axis=axis)
def matmul(a, b): return ops.matmul(_t(a), _t(b))
def linear(x, weight, bias=None): return fused.Linear.apply(x, weight, bias)
def embedding(ids, weight): return ops.Embedding.apply(weight, _ids(ids))
def layer_norm(x, weight, bias=None, eps=1e-5): return kernels.fused().LayerNorm.apply(x, weight, bias, eps=eps)
def rms_norm(x, weight, eps=1e-5): return kernels.fused().RMSNorm.apply(x, weight, eps=eps)
def rope(x, cos, sin): return fused.Rope.apply(x, _raw(cos), _raw(sin))


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean negative log-likelihood of integer ``targets`` under ``softmax(logits)``, fused and
    stable; rows with target == ignore_index are left out of the mean."""
    return kernels.fused().CrossEntropy.apply(logits, _ids(targets), ignore_index=ignore_index)


def scaled_dot_product_attention(q, k, v, is_causal=True, attn_mask=None):
    """softmax(q k^T / sqrt(hs)) v for q (B, nh, Tq, hs) and k, v (B, nh, Tk, hs).

    ``is_causal``: query i sees keys up to its own position (i + Tk - Tq, so new queries over a
    KV cache see every cached key). ``attn_mask``: a boolean array (or Tensor) broadcastable to
    (B, nh, Tq, Tk), True where a query may attend; with ``is_causal`` both apply. A query that
    may attend to nothing gets a zero output and passes no gradient (never NaN).
    Without a mask, causal attention takes the fused causal path (CausalAttention).
    """
    if attn_mask is None and is_causal:
        return fused.CausalAttention.apply(q, k, v)
    mask = None if attn_mask is None else _raw(attn_mask)
    return fused.MaskedAttention.apply(q, k, v, mask=mask, causal=is_causal)


def dropout(x, p, rng, training=True):
    """Inverted dropout; identity when p == 0 or not training. ``rng``: a numpy Generator (masks
    drawn on the host, then copied over) or anything with ``mask(shape, p)`` (a GPT's
    ``LayerDropoutRNG``: keyed by sample, drawn on the device)."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p={p} must be in [0, 1)")
    masks = rng if hasattr(rng, "mask") else _HostMasks(rng)
    return ops.Dropout.apply(x, p=p, masks=masks)


class _HostMasks:
    """Keep-masks from a numpy Generator (host), moved to the device."""

    def __init__(self, rng):
        self.rng = rng

    def mask(self, shape, p):
        return backend.asarray(self.rng.random(shape, dtype="float32") >= p)


def concatenate(tensors, axis=0): return ops.Concatenate.apply(*tensors, axis=axis)
def stack(tensors, axis=0): return ops.Stack.apply(*tensors, axis=axis)


cat = concatenate


def split(x, sizes_or_sections, axis=-1):
    """Split along ``axis`` into equal sections (an int) or pieces of the given sizes (a list)."""
    n = x.shape[axis]
    if isinstance(sizes_or_sections, int):
        if n % sizes_or_sections:
            raise ValueError(f"split: axis of length {n} does not divide into {sizes_or_sections} sections")
        sizes = [n // sizes_or_sections] * sizes_or_sections
    else:
        sizes = list(sizes_or_sections)
        if sum(sizes) != n:
            raise ValueError(f"split: sizes {sizes} do not add up to the axis length {n}")
    axis = axis % x.ndim
    pieces, start = [], 0
    for size in sizes:
        index = (slice(None),) * axis + (slice(start, start + size),)
        pieces.append(x[index])
        start += size
    return pieces


def where(cond, a, b):
    """Elementwise cond ? a : b (cond is a boolean array; a, b Tensors or numbers)."""
    cond = _raw(cond)
    like = a if isinstance(a, Tensor) else b
    a = a if isinstance(a, Tensor) else Tensor(xp.asarray(a, dtype=like.dtype), _check=False)
    b = b if isinstance(b, Tensor) else Tensor(xp.asarray(b, dtype=like.dtype), _check=False)
    return ops.Where.apply(a, b, cond)


def masked_fill(x, mask, value):
    return ops.MaskedFill.apply(x, _raw(mask), value)


def _raw(x):
    return x.data if isinstance(x, Tensor) else x


def _ids(ids):
    """Integer ids on the active device (a list, or a NumPy array on the GPU, is copied over)."""
    ids = _raw(ids)
    return ids if backend.is_array(ids) else backend.asarray(ids)
