"""Fused CUDA kernels (CuPy RawKernels) for the hot non-matmul work of a training step.

The reference versions in ``autograd/fused.py`` are written with xp array operations: a layer
norm there is ~10 kernel launches and as many trips through memory. Here each op is one kernel
(two for a backward that also reduces over rows), llm.c style:

    gelu_fwd / gelu_bwd        elementwise; forward saves only x, backward recomputes tanh
    norm_fwd / norm_bwd_x      layer norm and RMS norm (no mean, no bias), one thread block per
                               row; forward saves x and each row's mean and 1/std
    norm_param_grads           dw (and db) summed over rows in chunks, then the chunks added
    xent_fwd / xent_bwd        softmax-cross-entropy per row; saves the row's logsumexp, not
                               the (N, V) probabilities the reference keeps
    embedding_bwd              the embedding's scatter-add over sorted ids: deterministic sums
    adamw                      every parameter of the model in one launch (pointer tables)

The CUDA C is in ``cuda_source.py``; this module compiles it (once per dtype, with CuPy's
RawModule), launches it, and wraps it in Functions with the reference's signatures. Parameters
(w, b) take the dtype of x (mixed precision keeps the model's copy 16-bit).

``tests/test_kernels.py`` compares each with the reference in float64, float32 and 16 bits, on a
GPU or in the fake CuPy's CPU emulator; ``kernels.enabled()`` decides when they are used.
"""
import numpy

from minillm import backend
from minillm.autograd.function import Function
from minillm.autograd.ops import acc_dtype
from minillm.kernels.cuda_source import source

_BLOCK = 256  # threads per block: a multiple of 32 (the reductions assume whole warps)

_modules = {}


def _kernel(name, dtype):
    """The compiled kernel ``name`` for inputs of ``dtype`` (compiled once per dtype, cached)."""
    key = str(dtype)
    if key not in _modules:
        cp = backend.array_module()
        _modules[key] = cp.RawModule(code=source(dtype))
    return _modules[key].get_function(name)


def _raw(a):
    """What a kernel gets for a T* argument: 16-bit arrays as their raw bits."""
    a = backend.array_module().ascontiguousarray(a)
    return a.view(numpy.uint16) if a.dtype.itemsize == 2 else a


def _acc(dtype):
    return numpy.float64 if dtype == numpy.float64 else numpy.float32


def _grid(n):
    return (int(min(max(-(-n // _BLOCK), 1), 65535)),)


# ---------------------------------------------------------------- Functions (as in autograd/fused.py)
class GELU(Function):
    """GELU in one kernel each way; forward saves only x (backward recomputes t)."""

    @staticmethod
    def forward(ctx, x, approximate="tanh"):
        if approximate not in ("tanh", "none"):
            raise ValueError(f"gelu: approximate={approximate!r} must be 'tanh' or 'none'")
        cp = backend.array_module()
        x = cp.ascontiguousarray(x)
        y = cp.empty_like(x)
        _kernel("gelu_fwd", x.dtype)(_grid(x.size), (_BLOCK,),
                                     (_raw(x), _raw(y), numpy.int64(x.size), numpy.int32(approximate == "none")))
        ctx.save_for_backward(x)
        ctx.exact = approximate == "none"
        return y

    @staticmethod
    def backward(ctx, g):
        cp = backend.array_module()
        (x,) = ctx.saved_tensors
        g = cp.ascontiguousarray(g.astype(x.dtype, copy=False))
        dx = cp.empty_like(x)
        _kernel("gelu_bwd", x.dtype)(_grid(x.size), (_BLOCK,),
                                     (_raw(x), _raw(g), _raw(dx), numpy.int64(x.size), numpy.int32(ctx.exact)))
        return dx


def _norm_forward(ctx, x, w, b, eps, rms):
    cp = backend.array_module()
    C = x.shape[-1]
    x = cp.ascontiguousarray(x)
    w = w.astype(x.dtype, copy=False)
    N = x.size // C
    acc = _acc(x.dtype)
    y = cp.empty_like(x)
    mean, rstd = cp.empty(N, dtype=acc), cp.empty(N, dtype=acc)
    bias = w if b is None else b.astype(x.dtype, copy=False)  # any valid pointer when unused
    if N:
        _kernel("norm_fwd", x.dtype)((N,), (_BLOCK,), (_raw(x), _raw(w), _raw(bias), _raw(y), mean, rstd,
                                                       numpy.int32(C), acc(eps), numpy.int32(rms),
                                                       numpy.int32(b is not None)))
    ctx.save_for_backward(x, w, mean, rstd)
    ctx.rms = rms
    return y


def _norm_backward(ctx, g):
    """(dx, dw, db) of layer/RMS norm: dx per row, dw and db over rows in chunks."""
    cp = backend.array_module()
    x, w, mean, rstd = ctx.saved_tensors
    C = x.shape[-1]
    N = x.size // C
    g = cp.ascontiguousarray(g.astype(x.dtype, copy=False))
    need = ctx.needs_input_grad + (False,)
    dx = dw = db = None
    if need[0]:
        dx = cp.empty_like(x)
        if N:
            _kernel("norm_bwd_x", x.dtype)((N,), (_BLOCK,), (_raw(x), _raw(w), _raw(g), mean, rstd, _raw(dx),
                                                             numpy.int32(C), numpy.int32(ctx.rms)))
    if need[1] or need[2]:
        acc = _acc(x.dtype)
        rows = max(64, -(-N // 65535))                    # rows per chunk (grid.y is at most 65535)
        chunks = max(-(-N // rows), 1)
        alloc = cp.empty if N else cp.zeros                # the kernel writes every element
        dw_part, db_part = alloc((chunks, C), dtype=acc), alloc((chunks, C), dtype=acc)
        if N:
            _kernel("norm_param_grads", x.dtype)((-(-C // _BLOCK), chunks), (_BLOCK,),
                                                 (_raw(x), _raw(g), mean, rstd, dw_part, db_part,
                                                  numpy.int64(N), numpy.int32(C), numpy.int64(rows)))
        dw = dw_part.sum(axis=0).astype(w.dtype, copy=False) if need[1] else None
        db = db_part.sum(axis=0).astype(w.dtype, copy=False) if need[2] else None
    return dx, dw, db


class LayerNorm(Function):
    """y = (x - mean) / sqrt(var + eps) * w + b over the last axis; saves x, mean and 1/std."""

    @staticmethod
    def forward(ctx, x, w, b=None, eps=1e-5):
        return _norm_forward(ctx, x, w, b, eps, rms=False)

    @staticmethod
    def backward(ctx, g):
        return _norm_backward(ctx, g)


class RMSNorm(Function):
    """y = x / sqrt(mean(x^2) + eps) * w over the last axis; saves x and 1/rms."""

    @staticmethod
    def forward(ctx, x, w, eps=1e-5):
        return _norm_forward(ctx, x, w, None, eps, rms=True)

    @staticmethod
    def backward(ctx, g):
        dx, dw, _ = _norm_backward(ctx, g)
        return dx, dw


class CrossEntropy(Function):
    """Mean over non-ignored rows of -log softmax(logits)[target]; saves the logits and each
    row's logsumexp (the reference keeps the full float32 probabilities)."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index=-100):
        cp = backend.array_module()
        V = logits.shape[-1]
        if targets.shape != logits.shape[:-1]:
            raise ValueError(f"cross_entropy: targets of shape {targets.shape} do not match logits "
                             f"of shape {logits.shape} (expected {logits.shape[:-1]})")
        x = cp.ascontiguousarray(logits).reshape(-1, V)                       # (N, V)
        t = targets.reshape(-1).astype(cp.int64)                              # (N,)
        valid = t != ignore_index
        backend.check((((t < 0) | (t >= V)) & valid).any(),
                      f"cross_entropy: target ids must be in [0, {V}) (or ignore_index)")
        t = cp.clip(cp.where(valid, t, 0), 0, V - 1)
        valid = valid.astype(cp.uint8)
        acc = _acc(x.dtype)
        N = x.shape[0]
        lse, losses = cp.empty(N, dtype=acc), cp.empty(N, dtype=acc)
        if N:
            _kernel("xent_fwd", x.dtype)((N,), (_BLOCK,), (_raw(x), t, valid, lse, losses, numpy.int32(V)))
        n = cp.maximum(valid.sum(), 1).astype(acc)
        ctx.save_for_backward(x, t, valid, lse)
        ctx.n, ctx.shape, ctx.dtype = n, logits.shape, logits.dtype
        return (losses.sum() / n).astype(acc_dtype(logits.dtype))

    @staticmethod
    def backward(ctx, g):
        cp = backend.array_module()
        x, t, valid, lse = ctx.saved_tensors
        N, V = x.shape
        scale = (g / ctx.n).astype(_acc(x.dtype)).reshape(1)                 # g / n, on the device
        dx = cp.empty_like(x)
        if N:
            _kernel("xent_bwd", x.dtype)(_grid(N * V), (_BLOCK,), (_raw(x), t, valid, lse, scale, _raw(dx),
                                                                  numpy.int64(N), numpy.int32(V)))
        return dx.reshape(ctx.shape).astype(ctx.dtype, copy=False), None


def embedding_backward(ids, rows, V):
    """(V, C) gradient of an embedding table: the rows (N, C) of each id summed, in the order of
    their positions (deterministic, unlike a scatter-add with atomics)."""
    cp = backend.array_module()
    N, C = rows.shape
    ids = ids.astype(cp.int64)
    order = cp.argsort(ids * N + cp.arange(N, dtype=cp.int64))          # by id, then position: unique keys
    starts = cp.searchsorted(ids[order], cp.arange(V + 1, dtype=cp.int64))  # (V + 1,) segment bounds
    rows = cp.ascontiguousarray(rows)
    gw = cp.empty((V, C), dtype=rows.dtype)
    _kernel("embedding_bwd", rows.dtype)(_grid(V * C), (_BLOCK,), (_raw(rows), order, starts, _raw(gw),
                                                                    numpy.int64(V), numpy.int32(C)))
    return gw


# ---------------------------------------------------------------- AdamW
def adamw_step(items, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt):
    """One AdamW update of every (param, grad, state, scratch, decay) in ``items`` (what
    ``Optimizer._grads`` yields), one launch per dtype: the same formula as ``AdamW.step``."""
    cp = backend.array_module()
    by_dtype = {}
    for p, g, st, _, decay in items:
        by_dtype.setdefault(str(p.data.dtype), []).append((p.data, g, st["m"], st["v"], decay))
    for dtype, group in by_dtype.items():
        for arrays in group:
            for a in arrays[:4]:
                if not a.flags.c_contiguous or str(a.dtype) != dtype:
                    raise ValueError("adamw kernel: weights, grads and moments must be contiguous "
                                     "arrays of one dtype")
        sizes = [w.size for w, *_ in group]
        tables = [cp.asarray(numpy.array([arrays[k].data.ptr for arrays in group], dtype=numpy.uint64))
                  for k in range(4)]                                       # w, g, m, v pointers
        offsets = cp.asarray(numpy.cumsum([0] + sizes, dtype=numpy.int64))
        decay = cp.asarray(numpy.array([d for *_, d in group], dtype=numpy.uint8))
        acc = _acc(numpy.dtype(dtype))
        _kernel("adamw", dtype)(_grid(sum(sizes)), (_BLOCK,),
                                (*tables, offsets, decay, numpy.int32(len(group)), acc(lr), acc(beta1),
                                 acc(beta2), acc(eps), acc(weight_decay), acc(step_size), acc(bc2_sqrt)))
