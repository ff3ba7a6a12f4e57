"""Fused ops with hand-written backward: the hot spots of a Transformer.

Each is one Function whose forward computes the whole formula and caches what backward needs
(llm.c style: forward -> cache, backward(dout, cache)). Composing them from primitives would be
correct too, but slower and hungrier: a layer norm from primitives keeps ~8 intermediate arrays
alive, the fused one keeps 2. Statistics (softmax, normalisation, the loss) are computed in
float32 even when activations are float16/bfloat16 (mixed precision).
"""
import math

from minillm import backend
from minillm.autograd.function import Function
from minillm.autograd.ops import acc_dtype, mm, mm_operand, upcast
from minillm.autograd.special import erf
from minillm.backend import xp


def _f32(a):
    """float32 view of a half-precision array (statistics are never taken in 16 bits)."""
    return upcast(a)


class Linear(Function):
    """y = x @ W.T + b with W stored (out_features, in_features), as in PyTorch/GPT-2."""

    @staticmethod
    def forward(ctx, x, w, b=None):
        if x.shape[-1] != w.shape[1]:
            raise ValueError(f"linear: input of shape {x.shape} has {x.shape[-1]} features but the "
                             f"weight of shape {w.shape} expects {w.shape[1]}")
        x2 = x.reshape(-1, x.shape[-1])                      # (N, in), N = B*T: one big GEMM
        y = mm(x2, w.T, dtype=acc_dtype(x.dtype))             # (N, out), the fp32 accumulator for 16-bit x
        if b is not None:
            y += b                                            # added before rounding, as a GEMM epilogue
        ctx.save_for_backward(x2, w)
        ctx.x_shape = x.shape
        return y.astype(x.dtype, copy=False).reshape(x.shape[:-1] + (w.shape[0],))  # (..., out)

    @staticmethod
    def backward(ctx, g):
        x2, w = ctx.saved_tensors
        need_x, need_w, need_b = (ctx.needs_input_grad + (False,))[:3]
        g2 = mm_operand(g.reshape(-1, g.shape[-1]))           # (N, out), cast once for both products
        gx = mm(g2, w, dtype=g.dtype).reshape(ctx.x_shape) if need_x else None
        gw = mm(g2.T, x2, dtype=g.dtype) if need_w else None  # (out, in)
        gb = g2.sum(axis=0, dtype=acc_dtype(g.dtype)).astype(g.dtype, copy=False) if need_b else None
        return gx, gw, gb

    # The same backward cut in two, for zero-bubble pipelines: dX is on the critical path (the
    # previous stage waits for it), dW and db are not and can run later, in the bubble.
    weight_inputs = (1, 2)

    @staticmethod
    def backward_input(ctx, g):
        x2, w = ctx.saved_tensors
        g2 = mm_operand(g.reshape(-1, g.shape[-1]))           # (N, out)
        gx = mm(g2, w, dtype=g.dtype).reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return gx, None, None

    @staticmethod
    def backward_weight(ctx, g):
        x2, _ = ctx.saved_tensors
        need_w, need_b = (ctx.needs_input_grad + (False,))[1:3]
        g2 = mm_operand(g.reshape(-1, g.shape[-1]))           # (N, out)
        gw = mm(g2.T, x2, dtype=g.dtype) if need_w else None  # (out, in)
        gb = g2.sum(axis=0, dtype=acc_dtype(g.dtype)).astype(g.dtype, copy=False) if need_b else None
        return gw, gb


class Softmax(Function):
    @staticmethod
    def forward(ctx, x, axis=-1):
        out = _f32(x) - x.max(axis=axis, keepdims=True)
        xp.exp(out, out=out)
        out /= out.sum(axis=axis, keepdims=True)
        out = out.astype(x.dtype, copy=False)
        ctx.save_for_backward(out)
        ctx.axis = axis
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return out * (g - (g * out).sum(axis=ctx.axis, keepdims=True))


class LogSoftmax(Function):
    @staticmethod
    def forward(ctx, x, axis=-1):
        shifted = _f32(x) - x.max(axis=axis, keepdims=True)
        out = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        out = out.astype(x.dtype, copy=False)
        ctx.save_for_backward(out)
        ctx.axis = axis
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return g - xp.exp(out) * g.sum(axis=ctx.axis, keepdims=True)


class CrossEntropy(Function):
    """Mean over non-ignored rows of -log softmax(logits)[target], in one stable pass.

    logits (..., V), targets (...) integers; rows whose target == ignore_index count for nothing.
    Backward is (softmax - onehot) / n_valid: no log-probabilities are ever materialised twice.
    """

    @staticmethod
    def forward(ctx, logits, targets, ignore_index=-100):
        V = logits.shape[-1]
        if targets.shape != logits.shape[:-1]:
            raise ValueError(f"cross_entropy: targets of shape {targets.shape} do not match logits "
                             f"of shape {logits.shape} (expected {logits.shape[:-1]})")
        x = _f32(logits).reshape(-1, V)                       # (N, V)
        t = targets.reshape(-1)                               # (N,)
        valid = t != ignore_index
        # Checked without stalling a GPU (raised at the next backend.fetch there), and clipped so
        # that a bad id can never index outside the logits.
        backend.check((((t < 0) | (t >= V)) & valid).any(),
                      f"cross_entropy: target ids must be in [0, {V}) (or ignore_index)")
        t_safe = xp.clip(xp.where(valid, t, 0), 0, V - 1)
        probs = x - x.max(axis=1, keepdims=True)              # shifted logits, (N, V)
        rows = xp.arange(t.shape[0])
        target = probs[rows, t_safe]                          # shifted logit of each target, (N,)
        xp.exp(probs, out=probs)
        sums = probs.sum(axis=1, keepdims=True)               # (N, 1)
        probs /= sums
        # log-prob of each target, (N,), from the shifted logit: log(probs[target]) would be
        # log(0) = -inf once a target's probability underflows (logits ~1e3 apart)
        logp = target - xp.log(sums[:, 0])
        n = xp.maximum(valid.sum(), 1).astype(x.dtype)        # rows that count, on the device
        loss = -(logp * valid).sum() / n
        ctx.save_for_backward(probs, t_safe, valid)
        ctx.n, ctx.shape, ctx.dtype = n, logits.shape, logits.dtype
        return xp.asarray(loss, dtype=x.dtype)  # float32, or float64 in gradchecks

    @staticmethod
    def backward(ctx, g):
        probs, t, valid = ctx.saved_tensors
        d = probs.copy()                                      # (N, V)
        d[xp.arange(t.shape[0]), t] -= 1
        d *= (valid * (g / ctx.n)).astype(d.dtype)[:, None]
        return d.reshape(ctx.shape).astype(ctx.dtype, copy=False), None


def _check_norm(name, x, w, b=None):
    for what, p in (("weight", w), ("bias", b)):
        if p is not None and p.shape != x.shape[-1:]:
            raise ValueError(f"{name}: {what} of shape {p.shape} does not match the last axis of the "
                             f"input of shape {x.shape} (expected ({x.shape[-1]},))")


class LayerNorm(Function):
    """y = (x - mean) / sqrt(var + eps) * w + b over the last axis."""

    @staticmethod
    def forward(ctx, x, w, b=None, eps=1e-5):
        _check_norm("layer_norm", x, w, b)
        xf = _f32(x)
        xhat = xf - xf.mean(axis=-1, keepdims=True)           # centred, (..., C)
        y = xhat * xhat                                       # (..., C) scratch, reused for y
        rstd = y.mean(axis=-1, keepdims=True)                 # variance, (..., 1)
        rstd += eps
        xp.sqrt(rstd, out=rstd)
        xp.divide(1.0, rstd, out=rstd)
        xhat *= rstd
        xp.multiply(xhat, w, out=y)
        if b is not None:
            y += b
        ctx.save_for_backward(xhat, rstd, w)
        return y.astype(x.dtype, copy=False)

    @staticmethod
    def backward(ctx, g):
        # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = g * w
        xhat, rstd, w = ctx.saved_tensors
        need_x, need_w, need_b = (ctx.needs_input_grad + (False,))[:3]
        gf = _f32(g)
        C = g.shape[-1]
        tmp = gf * xhat                                       # (..., C) scratch
        gw = tmp.reshape(-1, C).sum(axis=0).astype(w.dtype, copy=False) if need_w else None
        gb = gf.reshape(-1, C).sum(axis=0).astype(w.dtype, copy=False) if need_b else None
        gx = None
        if need_x:
            gx = gf * w                                       # dxhat
            xp.multiply(gx, xhat, out=tmp)
            m2 = tmp.mean(axis=-1, keepdims=True)
            gx -= gx.mean(axis=-1, keepdims=True)
            xp.multiply(xhat, m2, out=tmp)
            gx -= tmp
            gx *= rstd
            gx = gx.astype(g.dtype, copy=False)
        return gx, gw, gb


class RMSNorm(Function):
    """y = x / sqrt(mean(x^2) + eps) * w over the last axis (Llama)."""

    @staticmethod
    def forward(ctx, x, w, eps=1e-5):
        _check_norm("rms_norm", x, w)
        xf = _f32(x)
        rstd = 1.0 / xp.sqrt((xf * xf).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
        xhat = xf * rstd
        ctx.save_for_backward(xhat, rstd, w)
        return (xhat * w).astype(x.dtype, copy=False)

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, w = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        gf = _f32(g)
        gw = (gf * xhat).sum(axis=tuple(range(g.ndim - 1))).astype(w.dtype) if need_w else None
        gx = None
        if need_x:
            dxhat = gf * w
            gx = (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)) * rstd
            gx = gx.astype(g.dtype, copy=False)
        return gx, gw


_GELU_K = math.sqrt(2.0 / math.pi)


class GELU(Function):
    """GELU, tanh approximation (GPT-2) or exact with erf (approximate='none')."""

    # 16-bit inputs are computed in float32 and rounded once: NumPy's float16 arithmetic is slow
    # and a Python float times a bfloat16 array gives float32; what is saved stays 16-bit.
    # Written as in-place passes over one or two buffers: a GPT's biggest activations go through
    # here, and every temporary of that size costs a full trip through memory.
    @staticmethod
    def forward(ctx, x, approximate="tanh"):
        ctx.approximate = approximate
        xf = _f32(x)
        if approximate == "tanh":
            t = xf * xf                                       # x^2
            t *= 0.044715 * _GELU_K
            t += _GELU_K
            t *= xf                                           # k (x + 0.044715 x^3)
            xp.tanh(t, out=t)
        elif approximate == "none":
            t = erf(xf * (1.0 / math.sqrt(2.0)))
        else:
            raise ValueError(f"gelu: approximate={approximate!r} must be 'tanh' or 'none'")
        y = t + 1.0
        y *= xf
        y *= 0.5                                              # 0.5 x (1 + t)
        ctx.save_for_backward(x, t.astype(x.dtype, copy=False))
        return y.astype(x.dtype, copy=False)

    @staticmethod
    def backward(ctx, g):
        x, t = (_f32(a) for a in ctx.saved_tensors)
        if ctx.approximate == "tanh":
            # d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 * 0.044715 x^2)
            d = x * x
            d *= 3 * 0.044715 * _GELU_K
            d += _GELU_K
            d *= x
            d *= 0.5
            tmp = t * t
            xp.subtract(1.0, tmp, out=tmp)                    # 1 - t^2
            d *= tmp
        else:
            # d/dx = 0.5 (1 + erf(x / sqrt 2)) + x pdf(x)
            d = x * x
            d *= -0.5
            xp.exp(d, out=d)
            d *= x
            d *= 1.0 / math.sqrt(2.0 * math.pi)
            tmp = xp.empty_like(d)
        xp.add(t, 1.0, out=tmp)
        tmp *= 0.5
        d += tmp
        d *= _f32(g)
        return d.astype(g.dtype, copy=False)


_MASKS = {}


def _causal_mask(tq, tk, dtype):
    """Additive mask (Tq, Tk): 0 where query i may see key j, -inf after it. Query i sits at
    position i + (Tk - Tq), so with a KV cache new queries see every cached key. Cached per
    device: an array of one device cannot be added to another's."""
    key = (backend.device_key(), tq, tk, str(dtype))
    if key not in _MASKS:
        i = xp.arange(tq)[:, None] + (tk - tq)
        j = xp.arange(tk)[None, :]
        _MASKS[key] = xp.where(j > i, -xp.inf, 0.0).astype(dtype)
    return _MASKS[key]


def _check_attention(q, k, v):
    if q.shape[-1] != k.shape[-1] or k.shape[:-1] != v.shape[:-1] or q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"scaled_dot_product_attention: q {q.shape}, k {k.shape} and v {v.shape} "
                         f"do not fit: expected q (B, nh, Tq, hs), k (B, nh, Tk, hs), "
                         f"v (B, nh, Tk, hs_v)")


def _scores(q, k):
    """(q scaled by 1/sqrt(hs), scale, float32 scores q k^T / sqrt(hs) of shape (B, nh, Tq, Tk))."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    qs = q * xp.asarray(scale, dtype=q.dtype)            # scale q, not the (Tq, Tk) scores: less work
    return qs, scale, mm(qs, k.swapaxes(-1, -2), dtype=acc_dtype(q.dtype))  # (B, nh, Tq, Tk), fp32


def _attention_backward(ctx, g):
    """Shared by both attention Functions: the gradients of softmax(s) v through the saved att."""
    qs, k, v, att = ctx.saved_tensors
    dv = mm(att.swapaxes(-1, -2), g)                      # (B, nh, Tk, hs)
    datt = mm(g, v.swapaxes(-1, -2), dtype=acc_dtype(g.dtype))  # (B, nh, Tq, Tk)
    # softmax backward: ds = att * (datt - sum_j datt_j att_j); einsum sums the products
    # without materialising them
    datt -= xp.einsum("...ij,...ij->...i", datt, att)[..., None]
    datt *= att
    ds = datt.astype(qs.dtype, copy=False)
    dq = mm(ds, k)                                        # (B, nh, Tq, hs)
    dq *= xp.asarray(ctx.scale, dtype=dq.dtype)
    dk = mm(ds.swapaxes(-1, -2), qs)                      # (B, nh, Tk, hs)
    return dq, dk, dv


class CausalAttention(Function):
    """softmax(q k^T / sqrt(hs) + causal mask) v for q (B, nh, Tq, hs) and k, v (B, nh, Tk, hs)."""

    @staticmethod
    def forward(ctx, q, k, v):
        _check_attention(q, k, v)
        qs, scale, att = _scores(q, k)
        att += _causal_mask(q.shape[-2], k.shape[-2], att.dtype)
        att -= att.max(axis=-1, keepdims=True)
        xp.exp(att, out=att)
        att /= att.sum(axis=-1, keepdims=True)
        att = att.astype(q.dtype, copy=False)
        ctx.save_for_backward(qs, k, v, att)
        ctx.scale = scale
        return mm(att, v)                                     # (B, nh, Tq, hs)

    backward = staticmethod(_attention_backward)


def _check_mask(mask, q, k):
    """The boolean mask as an xp array that broadcasts to (B, nh, Tq, Tk), or a ValueError."""
    mask = xp.asarray(mask)
    full = q.shape[:-1] + (k.shape[-2],)                  # (B, nh, Tq, Tk)
    if mask.dtype != xp.bool_:
        raise ValueError(f"scaled_dot_product_attention: attn_mask must be boolean (True = may "
                         f"attend), got {mask.dtype}")
    if mask.ndim > len(full) or any(m not in (1, f) for m, f in zip(mask.shape[::-1], full[::-1])):
        raise ValueError(f"scaled_dot_product_attention: attn_mask of shape {mask.shape} does not "
                         f"broadcast to (B, nh, Tq, Tk) = {full}")
    return mask


class MaskedAttention(Function):
    """softmax(q k^T / sqrt(hs) + mask) v with a boolean ``mask`` (True = may attend) that
    broadcasts to (B, nh, Tq, Tk), and with ``causal`` the causal mask too (query i sits at
    position i + Tk - Tq, as in CausalAttention). ``mask=None, causal=False``: full attention.

    A query row that may attend to no key at all (fully masked: a padding token, say) has no
    softmax; it is defined here as all-zero weights, so its output is zero and no gradient flows
    through it (never NaN). Backward is CausalAttention's: the mask lives in the saved weights.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask=None, causal=True):
        _check_attention(q, k, v)
        qs, scale, att = _scores(q, k)
        if causal:
            att += _causal_mask(q.shape[-2], k.shape[-2], att.dtype)
        if mask is not None:
            # additive form of the mask's own shape: (B, 1, Tq, Tk) stays small next to att
            att += xp.where(_check_mask(mask, q, k), 0.0, -xp.inf).astype(att.dtype)
        top = att.max(axis=-1, keepdims=True)             # (B, nh, Tq, 1)
        dead = top == -xp.inf                             # rows with nothing to attend to
        top[dead] = 0.0                                   # so exp(-inf - 0) = 0, not exp(nan)
        att -= top
        xp.exp(att, out=att)
        total = att.sum(axis=-1, keepdims=True)
        total[dead] = 1.0                                 # 0 / 1: the dead row's weights are zero
        att /= total
        att = att.astype(q.dtype, copy=False)
        ctx.save_for_backward(qs, k, v, att)
        ctx.scale = scale
        return mm(att, v)                                     # (B, nh, Tq, hs)

    backward = staticmethod(_attention_backward)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return xp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


class Rope(Function):
    """Rotary position embedding: y = x cos + rotate_half(x) sin (halves layout, as GPT-NeoX/Llama).
    cos, sin: (T, hs) constants for the positions of x's T axis. rotate_half is a rotation, so its
    transpose is its inverse: dx = g cos - rotate_half(g sin)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        try:
            return x * cos + _rotate_half(x) * sin
        except ValueError:
            raise ValueError(f"rope: cos/sin of shapes {cos.shape}, {sin.shape} do not broadcast "
                             f"against the input of shape {x.shape} "
                             f"(expected (T, hs) = {x.shape[-2:]})") from None

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return g * cos - _rotate_half(g * sin)
