"""Primitive ops: one Function class each, forward and backward side by side.

Conventions: forward gets xp arrays, returns one array; backward gets dL/d(out) and returns one
gradient per input (None where no gradient is needed). Gradients may keep a broadcast shape: the
engine (tensor.py) sums them back to the input's shape.
"""
import functools

from minillm import backend, kernels
from minillm.autograd.function import Function
from minillm.autograd.tensor import Tensor
from minillm.backend import xp


def acc_dtype(dtype):
    """The dtype sums and products of ``dtype`` values accumulate in: float32 for the 16-bit
    formats (float16, bfloat16), the dtype itself otherwise (float64 gradchecks stay float64)."""
    return xp.float32 if dtype.itemsize < 4 else dtype


@functools.lru_cache(maxsize=None)
def _float16_table(device_key):
    """bits -> value of every float16, on the device ``device_key`` names (a cache per device)."""
    return xp.arange(65536, dtype=xp.uint16).view(xp.float16).astype(xp.float32)


def upcast(a):
    """float32 copy of a 16-bit array (exact); wider arrays are returned as they are.

    On the CPU float16 goes through a 65536-entry table indexed by the bits: NumPy converts
    float16 one element at a time, several times slower than this gather."""
    if a.dtype.itemsize >= 4:
        return a
    if a.dtype == xp.float16 and not backend.is_gpu():
        return xp.take(_float16_table(backend.device_key()), a.view(xp.uint16))
    return a.astype(xp.float32)


def mm_operand(a):
    """``a`` in the form a matmul multiplies it: on the CPU a 16-bit array is cast up to float32
    (exact), so an operand used by several products is cast once; on the GPU it stays 16-bit for
    the tensor cores."""
    return a if backend.is_gpu() else upcast(a)


def mm(a, b, dtype=None):
    """Matrix product with 16-bit inputs and float32 accumulation, as GPU tensor cores do.

    The result has ``dtype``, by default the 16-bit input's (the product is rounded once); pass
    float32 to keep the accumulator unrounded (attention scores, a bias added before rounding).
    On the CPU the 16-bit inputs are cast up and multiplied in float32: NumPy's own float16
    matmul is ~200x slower, and bfloat16 has none. On the GPU cuBLAS multiplies 16-bit inputs
    with a float32 accumulator; CuPy's ``@`` rounds the result to 16 bits, so a float32 result
    comes from ``kernels/gemm.py`` (a cuBLAS GEMM writing float32), or, with the kernels off, from
    a float32 product of the cast-up inputs (the same numbers, without tensor cores)."""
    half = a.dtype if a.dtype.itemsize == 2 else b.dtype if b.dtype.itemsize == 2 else None
    if half is None:
        out = a @ b
        return out if dtype is None else out.astype(dtype, copy=False)
    out_dtype = xp.dtype(dtype or half)
    if not backend.is_gpu():
        return (mm_operand(a) @ mm_operand(b)).astype(out_dtype, copy=False)
    if kernels.enabled() and a.dtype == b.dtype:
        return kernels.matmul(a, b, out_dtype)
    if out_dtype.itemsize == 2 and a.dtype == b.dtype:
        return a @ b                                      # cuBLAS: float32 accumulator, rounded once
    return (upcast(a) @ upcast(b)).astype(out_dtype, copy=False)


def _swap(a):
    return a.swapaxes(-1, -2)


def _binary(name, fn, a, b):
    try:
        return fn(a, b)
    except ValueError:
        raise ValueError(f"{name}: shapes {getattr(a, 'shape', ())} and {getattr(b, 'shape', ())} "
                         f"cannot be broadcast together") from None


# ------------------------------------------------------------------ elementwise arithmetic
class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        return _binary("add", xp.add, a, b)

    @staticmethod
    def backward(ctx, g):
        return g, g


class Sub(Function):
    @staticmethod
    def forward(ctx, a, b):
        return _binary("sub", xp.subtract, a, b)

    @staticmethod
    def backward(ctx, g):
        return g, -g


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _binary("mul", xp.multiply, a, b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad
        return (g * b if need_a else None), (g * a if need_b else None)


class Div(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _binary("div", xp.divide, a, b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad
        ga = g / b if need_a else None
        gb = -g * a / (b * b) if need_b else None
        return ga, gb


class Neg(Function):
    @staticmethod
    def forward(ctx, a):
        return -a

    @staticmethod
    def backward(ctx, g):
        return -g


class PowScalar(Function):
    """a ** p for a constant Python number p."""

    @staticmethod
    def forward(ctx, a, exponent):
        ctx.save_for_backward(a)
        ctx.p = exponent
        return a ** exponent

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return g * ctx.p * a ** (ctx.p - 1)


class Pow(Function):
    """a ** b for two tensors (b differentiable too: d/db a^b = a^b log a)."""

    @staticmethod
    def forward(ctx, a, b):
        out = a ** b
        ctx.save_for_backward(a, b, out)
        return out

    @staticmethod
    def backward(ctx, g):
        a, b, out = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad
        ga = g * b * a ** (b - 1) if need_a else None
        gb = g * out * xp.log(xp.where(a > 0, a, 1)) if need_b else None
        return ga, gb


# ------------------------------------------------------------------ matmul
class MatMul(Function):
    """(..., n, k) @ (..., k, m) -> (..., n, m), batch dims broadcast as in NumPy."""

    @staticmethod
    def forward(ctx, a, b):
        if a.shape[-1] != b.shape[-2]:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not line up "
                             f"(last dim of the first {a.shape[-1]} != second-to-last of the second "
                             f"{b.shape[-2]})")
        ctx.save_for_backward(a, b)
        try:
            return mm(a, b)
        except ValueError:
            raise ValueError(f"matmul: the batch dims of shapes {a.shape} and {b.shape} cannot be "
                             f"broadcast together") from None

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad
        ga = mm(g, _swap(b)) if need_a else None
        gb = None
        if need_b:
            if b.ndim == 2 and a.ndim > 2:  # a shared weight: one big 2-D matmul instead of a batch + sum
                gb = mm(a.reshape(-1, a.shape[-1]).T, g.reshape(-1, g.shape[-1]))  # (k, N) @ (N, m)
            else:
                gb = mm(_swap(a), g)
        return ga, gb


def matmul(a, b):
    """NumPy matmul semantics, 1-D operands included (promoted to 2-D, then squeezed)."""
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: scalar operands are not allowed (shapes {a.shape} and {b.shape}); use *")
    k_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if a.shape[-1] != k_b:  # checked before promoting 1-D operands: the message shows the user's shapes
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not line up (last dim of the "
                         f"first {a.shape[-1]} != {'only' if b.ndim == 1 else 'second-to-last'} dim "
                         f"of the second {k_b})")
    squeeze_a, squeeze_b = a.ndim == 1, b.ndim == 1
    if squeeze_a:
        a = a.reshape(1, a.shape[0])  # (k,) -> (1, k)
    if squeeze_b:
        b = b.reshape(b.shape[0], 1)  # (k,) -> (k, 1)
    out = MatMul.apply(a, b)
    if squeeze_a or squeeze_b:
        shape = out.shape[:-2] + ((out.shape[-2],) if not squeeze_a else ()) + \
            ((out.shape[-1],) if not squeeze_b else ())
        out = out.reshape(shape)
    return out


# ------------------------------------------------------------------ reductions
def _norm_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def _expand(g, shape, axes, keepdims):
    """Put the reduced axes back into g (as size 1) so it broadcasts against the input."""
    if not keepdims:
        for ax in axes:
            g = xp.expand_dims(g, ax)
    return g


class Sum(Function):
    @staticmethod
    def forward(ctx, a, axis=None, keepdims=False):
        ctx.shape, ctx.axes, ctx.keepdims = a.shape, _norm_axes(axis, a.ndim), keepdims
        return a.sum(axis=axis, keepdims=keepdims)

    @staticmethod
    def backward(ctx, g):
        return xp.broadcast_to(_expand(g, ctx.shape, ctx.axes, ctx.keepdims), ctx.shape)


class Mean(Function):
    @staticmethod
    def forward(ctx, a, axis=None, keepdims=False):
        ctx.shape, ctx.axes, ctx.keepdims = a.shape, _norm_axes(axis, a.ndim), keepdims
        ctx.count = 1
        for ax in ctx.axes:
            ctx.count *= a.shape[ax]
        return a.mean(axis=axis, keepdims=keepdims)

    @staticmethod
    def backward(ctx, g):
        g = _expand(g, ctx.shape, ctx.axes, ctx.keepdims) / ctx.count
        return xp.broadcast_to(g, ctx.shape)


class Max(Function):
    """Gradient goes to the maximal entries (split equally between ties)."""

    @staticmethod
    def forward(ctx, a, axis=None, keepdims=False):
        ctx.axes, ctx.keepdims = _norm_axes(axis, a.ndim), keepdims
        out = a.max(axis=axis, keepdims=True)
        mask = (a == out).astype(a.dtype)
        mask /= mask.sum(axis=ctx.axes, keepdims=True)
        ctx.save_for_backward(mask)
        return out if keepdims else out.squeeze(axis=ctx.axes)

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return _expand(g, mask.shape, ctx.axes, ctx.keepdims) * mask


# ------------------------------------------------------------------ elementwise math
class Exp(Function):
    @staticmethod
    def forward(ctx, a):
        out = xp.exp(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return g * out


class Log(Function):
    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return xp.log(a)

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return g / a


class Tanh(Function):
    @staticmethod
    def forward(ctx, a):
        out = xp.tanh(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return g * (1 - out * out)


class Sqrt(Function):
    @staticmethod
    def forward(ctx, a):
        out = xp.sqrt(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return g / (2 * out)


class ReLU(Function):
    @staticmethod
    def forward(ctx, a):
        mask = a > 0
        ctx.save_for_backward(mask)
        return a * mask

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return g * mask


class SiLU(Function):
    """x * sigmoid(x) (the gate of SwiGLU)."""

    @staticmethod
    def forward(ctx, a):
        sig = 1 / (1 + xp.exp(-a))
        ctx.save_for_backward(a, sig)
        return a * sig

    @staticmethod
    def backward(ctx, g):
        a, sig = ctx.saved_tensors
        return g * sig * (1 + a * (1 - sig))


class Cast(Function):
    """Change dtype; the gradient is cast back to the input's dtype."""

    @staticmethod
    def forward(ctx, a, dtype):
        ctx.in_dtype = a.dtype
        return a.astype(dtype)

    @staticmethod
    def backward(ctx, g):
        return g.astype(ctx.in_dtype)


# ------------------------------------------------------------------ shape ops
class Reshape(Function):
    @staticmethod
    def forward(ctx, a, shape):
        ctx.shape = a.shape
        try:
            return a.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape {a.shape} ({a.size} elements) to {shape}") from None

    @staticmethod
    def backward(ctx, g):
        return g.reshape(ctx.shape)


class Transpose(Function):
    """Permute axes (None reverses them, as in NumPy)."""

    @staticmethod
    def forward(ctx, a, axes=None):
        if axes is not None and sorted(ax % a.ndim for ax in axes) != list(range(a.ndim)):
            raise ValueError(f"transpose: axes {axes} are not a permutation of a {a.ndim}-d "
                             f"array of shape {a.shape}")
        ctx.axes = axes
        return a.transpose(axes)

    @staticmethod
    def backward(ctx, g):
        if ctx.axes is None:
            return g.transpose()
        inverse = [0] * g.ndim
        for i, ax in enumerate(ctx.axes):
            inverse[ax % g.ndim] = i
        return g.transpose(inverse)


def _has_array_index(index):
    parts = index if isinstance(index, tuple) else (index,)
    return any(backend.is_array(p) or isinstance(p, (list,)) or
               (hasattr(p, "dtype") and getattr(p, "ndim", 0) > 0) for p in parts)


class GetItem(Function):
    """a[index]: basic slices, integers and integer/boolean arrays. Backward scatters the gradient
    back with add.at, so repeated indices accumulate (a[[0, 0]] sends two gradients to row 0)."""

    @staticmethod
    def forward(ctx, a, index):
        ctx.shape, ctx.dtype, ctx.index = a.shape, a.dtype, index
        ctx.advanced = _has_array_index(index)
        return a[index]

    @staticmethod
    def backward(ctx, g):
        if not ctx.advanced:
            out = xp.zeros(ctx.shape, dtype=g.dtype)
            out[ctx.index] = g
            return out
        # Repeated indices add up in float32 for 16-bit gradients: more accurate, and CuPy's
        # add.at has no bfloat16 (atomics exist for float16/32/64 only).
        out = xp.zeros(ctx.shape, dtype=acc_dtype(g.dtype))
        xp.add.at(out, ctx.index, g.astype(out.dtype, copy=False))
        return out.astype(g.dtype, copy=False)


def getitem(a, index):
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    elif isinstance(index, list):
        index = xp.asarray(index)
    return GetItem.apply(a, index=index)


def _joined(name, fn, arrays, axis):
    try:
        return fn(arrays, axis=axis)
    except ValueError:
        raise ValueError(f"{name}: shapes {[x.shape for x in arrays]} do not fit together along "
                         f"axis {axis}") from None


class Concatenate(Function):
    @staticmethod
    def forward(ctx, *arrays, axis=0):
        ctx.axis = axis
        ctx.sizes = [x.shape[axis] for x in arrays]
        return _joined("concatenate", xp.concatenate, arrays, axis)

    @staticmethod
    def backward(ctx, g):
        bounds = []
        total = 0
        for n in ctx.sizes[:-1]:
            total += n
            bounds.append(total)
        return tuple(xp.split(g, bounds, axis=ctx.axis))


class Stack(Function):
    @staticmethod
    def forward(ctx, *arrays, axis=0):
        ctx.axis = axis
        return _joined("stack", xp.stack, arrays, axis)

    @staticmethod
    def backward(ctx, g):
        return tuple(xp.moveaxis(g, ctx.axis, 0))


class Where(Function):
    """where(cond, a, b): cond is a constant boolean array."""

    @staticmethod
    def forward(ctx, a, b, cond):
        ctx.save_for_backward(cond)
        try:
            return xp.where(cond, a, b)
        except ValueError:
            raise ValueError(f"where: condition of shape {cond.shape} and values of shapes {a.shape} "
                             f"and {b.shape} cannot be broadcast together") from None

    @staticmethod
    def backward(ctx, g):
        (cond,) = ctx.saved_tensors
        zero = xp.zeros((), dtype=g.dtype)
        return xp.where(cond, g, zero), xp.where(cond, zero, g)


class MaskedFill(Function):
    """a with ``value`` wherever mask is True (the filled places get no gradient)."""

    @staticmethod
    def forward(ctx, a, mask, value):
        ctx.save_for_backward(mask)
        return xp.where(mask, xp.asarray(value, dtype=a.dtype), a)

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return xp.where(mask, xp.zeros((), dtype=g.dtype), g)


class Embedding(Function):
    """weight[idx] for integer ids; backward adds each row's gradient into the rows it came from."""

    @staticmethod
    def forward(ctx, weight, idx):
        if idx.dtype.kind not in "iu":
            raise TypeError(f"embedding: ids must be integers, got {idx.dtype}")
        ctx.save_for_backward(idx)
        ctx.shape = weight.shape
        return weight[idx]

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        V, C = ctx.shape
        ids = idx.reshape(-1)                                 # (N,), N = B*T
        rows = upcast(g).reshape(-1, C)                       # (N, C); a frequent token sums many rows: not in 16 bits
        if ids.size * V <= 1 << 22:  # small vocabulary: one matmul with a one-hot matrix beats a scatter
            onehot = (ids[None, :] == xp.arange(V)[:, None]).astype(rows.dtype)  # (V, N)
            gw = onehot @ rows                                # (V, C)
        elif kernels.enabled():  # the GPU: sorted segments, not atomics, so the sums are deterministic
            gw = kernels.embedding_backward(ids, rows, V)
        else:
            gw = xp.zeros(ctx.shape, dtype=rows.dtype)
            xp.add.at(gw, ids, rows)
        return gw.astype(g.dtype, copy=False), None


class Dropout(Function):
    """Zero each element with probability p, scale the rest by 1/(1-p). ``masks.mask(shape, p)``
    gives the boolean keep-mask (``functional.dropout`` adapts a numpy Generator to that), so
    runs are reproducible and resumable."""

    @staticmethod
    def forward(ctx, a, p, masks):
        mask = masks.mask(a.shape, p).astype(a.dtype)
        mask *= xp.asarray(1.0 / (1.0 - p), dtype=a.dtype)  # a Python float would turn bfloat16 into float32
        ctx.save_for_backward(mask)
        return a * mask

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return g * mask
