"""Float64 gradient checks of every op (primitive and fused), plus forward values against NumPy.

One helper, ``check(shapes, fn, ref)`` (the pattern of tinygrad's helper_test_op), builds seeded
float64 inputs of the given shapes, runs ``gradcheck`` on ``fn`` (central differences against
backward) and compares ``fn``'s forward with the plain NumPy float64 ``ref``. Each op test is one
line of shapes plus a function, parametrised over broadcasting, negative axes, keepdims,
non-contiguous views (made inside ``fn``: gradcheck perturbs contiguous inputs) and repeated indices.
"""
import math
import zlib

import numpy as np
import pytest

import minillm.functional as F
from minillm import backend
from minillm.autograd.gradcheck import gradcheck
from minillm.autograd.tensor import Tensor


def dev(index):
    """An index with NumPy arrays moved to the active device (a no-op on the CPU)."""
    if isinstance(index, tuple):
        return tuple(dev(i) for i in index)
    return backend.asarray(index) if isinstance(index, np.ndarray) else index


def check(shapes, fn, ref=None, low=-2.0, high=2.0, atol=1e-6, rtol=1e-4):
    """gradcheck ``fn`` on seeded float64 inputs of ``shapes`` (uniform in [low, high], per input
    when lists); compare ``fn``'s forward value with the NumPy function ``ref`` of the same inputs."""
    rng = np.random.default_rng(zlib.crc32(repr(shapes).encode()))
    lows = low if isinstance(low, list) else [low] * len(shapes)
    highs = high if isinstance(high, list) else [high] * len(shapes)
    host = [rng.uniform(lo, hi, s) for s, lo, hi in zip(shapes, lows, highs)]
    inputs = [Tensor(backend.asarray(h.copy()), requires_grad=True) for h in host]
    result = gradcheck(fn, inputs, atol=atol, rtol=rtol)
    assert result.ok, result
    for x in inputs:
        assert x.grad is None or x.grad.shape == x.shape, (x.grad.shape, x.shape)
    if ref is not None:
        out = fn(*[Tensor(backend.asarray(h)) for h in host])
        assert out.dtype == np.float64
        np.testing.assert_allclose(out.numpy(), ref(*host), rtol=1e-10, atol=1e-12)


def random_broadcast_pairs(n, seed=0):
    """(shape_a, shape_b) pairs that broadcast: b drops leading axes, either may have size-1 axes."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        full = tuple(int(s) for s in rng.integers(2, 4, rng.integers(0, 4)))
        a = tuple(1 if rng.random() < 0.3 else s for s in full)
        b = tuple(1 if rng.random() < 0.3 else s for s in full[rng.integers(0, len(full) + 1):])
        pairs.append((a, b))
    return pairs


BINARY = [((3,), (3,)), ((2, 3), (3,)), ((2, 1), (1, 3)), ((2, 3, 4), (3, 1)), ((), (2, 2)),
          ((2, 2), ())] + random_broadcast_pairs(6)
POS = dict(low=0.5, high=2.0)


# ------------------------------------------------------------------ elementwise arithmetic
@pytest.mark.parametrize("sa,sb", BINARY)
def test_add(sa, sb):
    check([sa, sb], lambda a, b: a + b, np.add)


@pytest.mark.parametrize("sa,sb", BINARY)
def test_sub(sa, sb):
    check([sa, sb], lambda a, b: a - b, np.subtract)


@pytest.mark.parametrize("sa,sb", BINARY)
def test_mul(sa, sb):
    check([sa, sb], lambda a, b: a * b, np.multiply)


@pytest.mark.parametrize("sa,sb", BINARY)
def test_div(sa, sb):
    check([sa, sb], lambda a, b: a / b, np.divide, low=[-2.0, 0.5], high=[2.0, 2.0])


SCALAR_FORMS = [
    (lambda a: a + 1.5, lambda a: a + 1.5), (lambda a: 1.5 + a, lambda a: 1.5 + a),
    (lambda a: 2.0 - a, lambda a: 2.0 - a), (lambda a: a * -3.0, lambda a: a * -3.0),
    (lambda a: 3 * a, lambda a: 3 * a), (lambda a: 2.0 / (a + 3.0), lambda a: 2.0 / (a + 3.0)),
    (lambda a: -a, np.negative), (lambda a: -(a.T), lambda a: -(a.T)),
    (lambda a: a.T * a.T, lambda a: a.T * a.T),
]


@pytest.mark.parametrize("fn,ref", SCALAR_FORMS)
def test_scalar_operands_neg_and_transposed_views(fn, ref):
    check([(2, 3)], fn, ref)


@pytest.mark.parametrize("p", [2, 3, 0.5, -1.5, 1.0, 0])
def test_pow_scalar(p):
    check([(2, 3)], lambda a: a ** p, lambda a: a ** p, **POS)


@pytest.mark.parametrize("p", [2, 3])
def test_pow_scalar_negative_base(p):
    check([(4,)], lambda a: a ** p, lambda a: a ** p)


@pytest.mark.parametrize("sa,sb", [((2, 3), (2, 3)), ((2, 3), (3,)), ((3,), (2, 3)), ((2, 3), ())])
def test_pow_tensor(sa, sb):
    check([sa, sb], lambda a, b: a ** b, np.power, low=[0.5, -2.0])


def test_rpow():
    check([(2, 3)], lambda a: 2.0 ** a, lambda a: 2.0 ** a)


# ------------------------------------------------------------------ matmul
MATMUL = [((2, 3), (3, 4)), ((2, 2, 3), (2, 3, 4)), ((2, 1, 2, 3), (3, 3, 2)), ((2, 3), (2, 3, 4)),
          ((2, 2, 3), (3, 4)), ((3,), (3, 4)), ((2, 3), (3,)), ((3,), (3,)), ((3,), (2, 3, 4)),
          ((2, 2, 3), (3,))]


@pytest.mark.parametrize("sa,sb", MATMUL)
def test_matmul(sa, sb):
    check([sa, sb], lambda a, b: a @ b, np.matmul)


def test_matmul_transposed_views():
    check([(3, 2), (4, 3)], lambda a, b: a.T @ b.T, lambda a, b: a.T @ b.T)


def test_matmul_batched_transposed_view():
    check([(2, 3, 4), (2, 3, 5)], lambda a, b: a.transpose(0, 2, 1) @ b,
          lambda a, b: a.transpose(0, 2, 1) @ b)


# ------------------------------------------------------------------ reductions
AXES = [(None, False), (None, True), (0, False), (-1, True), ((0, 2), False), ((-1, -3), True),
        (1, True), (-2, False)]


@pytest.mark.parametrize("axis,keepdims", AXES)
def test_sum(axis, keepdims):
    check([(2, 3, 4)], lambda a: a.sum(axis, keepdims), lambda a: a.sum(axis, keepdims=keepdims))


@pytest.mark.parametrize("axis,keepdims", AXES)
def test_mean(axis, keepdims):
    check([(2, 3, 4)], lambda a: a.mean(axis, keepdims), lambda a: a.mean(axis, keepdims=keepdims))


@pytest.mark.parametrize("axis,keepdims", AXES)
def test_max(axis, keepdims):
    check([(2, 3, 4)], lambda a: a.max(axis, keepdims), lambda a: a.max(axis, keepdims=keepdims))


def test_reduction_of_transposed_view():
    check([(3, 4)], lambda a: a.T.sum(-1), lambda a: a.T.sum(-1))


# ------------------------------------------------------------------ elementwise math
erf = np.vectorize(math.erf)
UNARY = {
    "exp": (lambda a: a.exp(), np.exp, {}),
    "log": (lambda a: a.log(), np.log, POS),
    "tanh": (lambda a: a.tanh(), np.tanh, {}),
    "sqrt": (lambda a: a.sqrt(), np.sqrt, POS),
    "relu": (lambda a: a.relu(), lambda a: np.maximum(a, 0), {}),
    "F.relu": (F.relu, lambda a: np.maximum(a, 0), {}),
    "gelu_tanh": (F.gelu, lambda a: 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3))),
                  dict(low=-4.0, high=4.0)),
    "gelu_erf": (lambda a: F.gelu(a, approximate="none"), lambda a: 0.5 * a * (1 + erf(a / math.sqrt(2))),
                 dict(low=-4.0, high=4.0)),
    "silu": (F.silu, lambda a: a / (1 + np.exp(-a)), dict(low=-4.0, high=4.0)),
    "F.exp_log_sqrt_tanh": (lambda a: F.tanh(F.sqrt(F.log(F.exp(a)))), lambda a: np.tanh(np.sqrt(a)), POS),
}


@pytest.mark.parametrize("name", list(UNARY))
def test_unary(name):
    fn, ref, domain = UNARY[name]
    check([(2, 3, 4)], fn, ref, **domain)


@pytest.mark.parametrize("name", ["exp", "tanh", "relu", "gelu_erf", "silu"])
def test_unary_on_transposed_view(name):
    fn, ref, domain = UNARY[name]
    check([(3, 4)], lambda a: fn(a.T), lambda a: ref(a.T), **domain)


# ------------------------------------------------------------------ shape ops
RESHAPE = [((2, 3, 4), (6, 4)), ((2, 3, 4), (-1,)), ((2, 3, 4), (4, -1, 2)), ((6,), (1, 6, 1))]


@pytest.mark.parametrize("shape,new", RESHAPE)
def test_reshape(shape, new):
    check([shape], lambda a: a.reshape(new), lambda a: a.reshape(new))


def test_reshape_of_transposed_view():
    check([(2, 3)], lambda a: a.T.reshape(6), lambda a: a.T.reshape(6))


TRANSPOSE = [
    (lambda a: a.T, lambda a: a.T), (lambda a: a.transpose(2, 0, 1), lambda a: a.transpose(2, 0, 1)),
    (lambda a: a.transpose(-1, -3), lambda a: a.swapaxes(-1, -3)),
    (lambda a: a.transpose(1, 2), lambda a: a.swapaxes(1, 2)),
    (lambda a: a.permute(0, 2, 1), lambda a: a.transpose(0, 2, 1)),
    (lambda a: a.permute(-1, 0, 1), lambda a: a.transpose(2, 0, 1)),
]


@pytest.mark.parametrize("fn,ref", TRANSPOSE)
def test_transpose_permute(fn, ref):
    check([(2, 3, 4)], fn, ref)


GETITEM = [
    ((4, 5), (slice(1, 3), slice(None, None, 2))), ((4, 5), -1), ((4, 5), (slice(None, None, -1), 1)),
    ((4, 5), (Ellipsis, slice(1, None))), ((4, 5), (None, 2)), ((2, 3, 4), (1, slice(None), -2)),
    ((3, 4), np.array([0, 2, 0, 0])),                          # repeated rows: scatter-add
    ((3, 4), (slice(None), np.array([3, 3, 1]))),
    ((3, 4), (np.array([0, 1, 1, 2]), np.array([2, 2, 2, 0]))),  # repeated (row, col) pairs
    ((3, 4), (np.array([[0, 0], [2, 0]]), slice(1, 3))),
    ((3, 4), np.array([True, False, True])),
    ((3, 4), np.array([[True, False, True, True]] * 3)),
]


@pytest.mark.parametrize("shape,index", GETITEM)
def test_getitem(shape, index):
    check([shape], lambda a: a[dev(index)], lambda a: a[index])


def test_getitem_list_and_tensor_index():
    check([(3, 4)], lambda a: a[[2, 2, 0]] * a[Tensor([1, 1, 1])])


def test_getitem_of_transposed_view():
    check([(3, 4)], lambda a: a.T[1:, np.array([0, 0, 2])[:1]])


CONCAT = [([(2, 3), (2, 2)], -1), ([(2, 3), (1, 3), (3, 3)], 0), ([(2, 1, 2), (2, 3, 2)], 1)]


@pytest.mark.parametrize("shapes,axis", CONCAT)
def test_concatenate(shapes, axis):
    check(shapes, lambda *xs: F.concatenate(xs, axis=axis), lambda *xs: np.concatenate(xs, axis=axis))


SPLIT = [((4, 3), 2, 0), ((2, 6), [1, 2, 3], -1), ((2, 6, 2), 3, 1)]


@pytest.mark.parametrize("shape,sections,axis", SPLIT)
def test_split(shape, sections, axis):
    bounds = np.cumsum(sections)[:-1] if isinstance(sections, list) else sections
    scaled = lambda pieces: [p * (i + 1) for i, p in enumerate(pieces)]  # noqa: E731  (distinct grads)
    check([shape], lambda a: F.concatenate(scaled(F.split(a, sections, axis)), axis),
          lambda a: np.concatenate(scaled(np.split(a, bounds, axis)), axis))


@pytest.mark.parametrize("axis", [0, 1, -1, 2])
def test_stack(axis):
    check([(2, 3), (2, 3)], lambda a, b: F.stack([a, b, a], axis), lambda a, b: np.stack([a, b, a], axis))


COND = np.array([[True, False, True], [False, False, True]])


SELECT = [
    ([(2, 3), (2, 3)], lambda a, b: F.where(dev(COND), a, b), lambda a, b: np.where(COND, a, b)),
    ([(3,), (2, 3)], lambda a, b: F.where(dev(COND), a, b), lambda a, b: np.where(COND, a, b)),
    ([(2, 3), (2, 1)], lambda a, b: F.where(dev(COND), a, b), lambda a, b: np.where(COND, a, b)),
    ([(2, 3)], lambda a: F.where(dev(COND), a, 0.5), lambda a: np.where(COND, a, 0.5)),
    ([(2, 3)], lambda a: F.masked_fill(a, dev(COND), -7.0), lambda a: np.where(COND, -7.0, a)),
]


@pytest.mark.parametrize("shapes,fn,ref", SELECT)
def test_where_and_masked_fill(shapes, fn, ref):
    check(shapes, fn, ref)


IDS = np.array([[0, 3, 3, 1], [4, 0, 0, 3]])


def test_embedding():
    check([(5, 3)], lambda w: F.embedding(dev(IDS), w), lambda w: w[IDS])


# ------------------------------------------------------------------ fused: softmax and losses
def np_log_softmax(x, axis=-1):
    s = x - x.max(axis=axis, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=axis, keepdims=True))


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax(axis):
    check([(2, 3, 4)], lambda a: F.softmax(a, axis), lambda a: np.exp(np_log_softmax(a, axis)))


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_log_softmax(axis):
    check([(2, 3, 4)], lambda a: F.log_softmax(a, axis), lambda a: np_log_softmax(a, axis))


def test_softmax_of_transposed_view():
    check([(4, 3)], lambda a: F.softmax(a.T), lambda a: np.exp(np_log_softmax(a.T)))


CAUSAL = np.triu(np.ones((4, 4), dtype=bool), k=1)  # each row keeps at least its diagonal


def test_masked_softmax_rows():
    check([(2, 4, 4)], lambda a: F.softmax(F.masked_fill(a, dev(CAUSAL), -np.inf)),
          lambda a: np.exp(np_log_softmax(np.where(CAUSAL, -np.inf, a))))


def np_cross_entropy(x, t, ignore_index=-100):
    logp = np_log_softmax(x.reshape(-1, x.shape[-1]))
    t = t.reshape(-1)
    valid = t != ignore_index
    return -logp[np.arange(t.size)[valid], t[valid]].sum() / max(valid.sum(), 1)


CE = [((4, 5), np.array([0, 4, 4, 2]), -100), ((2, 3, 5), np.array([[1, -100, 3], [0, 0, -100]]), -100),
      ((3, 4), np.array([2, 1, 2]), 2), ((3, 4), np.array([-100, -100, -100]), -100)]


@pytest.mark.parametrize("shape,targets,ignore", CE)
def test_cross_entropy(shape, targets, ignore):
    check([shape], lambda x: F.cross_entropy(x, dev(targets), ignore_index=ignore),
          lambda x: np_cross_entropy(x, targets, ignore))


def test_cross_entropy_matches_log_softmax_composition():
    t = np.array([1, 0, 3])
    check([(3, 4)], lambda x: -(F.log_softmax(x)[dev(np.arange(3)), dev(t)]).mean(),
          lambda x: np_cross_entropy(x, t))


# ------------------------------------------------------------------ fused: layers
def np_layer_norm(x, w, b=0.0, eps=1e-5):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b


def np_rms_norm(x, w, eps=1e-5):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


NORMS = [
    ([(2, 3, 4), (4,), (4,)], F.layer_norm, np_layer_norm),
    ([(3, 5), (5,)], F.layer_norm, np_layer_norm),                                        # no bias
    ([(4, 3), (4,), (4,)], lambda x, w, b: F.layer_norm(x.T, w, b), lambda x, w, b: np_layer_norm(x.T, w, b)),
    ([(2, 3, 4), (4,)], F.rms_norm, np_rms_norm),
    ([(4, 3), (4,)], lambda x, w: F.rms_norm(x.T, w), lambda x, w: np_rms_norm(x.T, w)),
]


@pytest.mark.parametrize("shapes,fn,ref", NORMS)
def test_layer_norm_and_rms_norm(shapes, fn, ref):
    check(shapes, fn, ref)


LINEAR = [[(2, 3, 4), (5, 4), (5,)], [(3, 4), (2, 4)], [(4,), (3, 4), (3,)]]


@pytest.mark.parametrize("shapes", LINEAR)
def test_linear(shapes):
    check(shapes, F.linear, lambda x, w, b=0.0: x @ w.T + b)


def test_linear_transposed_input():
    check([(2, 4, 3), (5, 4), (5,)], lambda x, w, b: F.linear(x.transpose(0, 2, 1), w, b),
          lambda x, w, b: x.transpose(0, 2, 1) @ w.T + b)


def np_attention(q, k, v):
    tq, tk = q.shape[-2], k.shape[-2]
    att = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
    future = np.arange(tk)[None, :] > np.arange(tq)[:, None] + (tk - tq)  # query i sits at i + Tk - Tq
    return np.exp(np_log_softmax(np.where(future, -np.inf, att))) @ v


ATTENTION = [[(1, 2, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4)],   # Tq == Tk
             [(2, 1, 2, 3), (2, 1, 5, 3), (2, 1, 5, 3)],   # Tq < Tk: new queries over a KV cache
             [(1, 1, 1, 2), (1, 1, 4, 2), (1, 1, 4, 2)]]   # one new token sees every key


@pytest.mark.parametrize("shapes", ATTENTION)
def test_causal_attention(shapes):
    check(shapes, F.scaled_dot_product_attention, np_attention)


def test_attention_from_transposed_views():  # (B, T, nh, hs) -> (B, nh, T, hs), as in the model
    check([(1, 3, 2, 2)] * 3, lambda q, k, v: F.scaled_dot_product_attention(
        *(t.transpose(0, 2, 1, 3) for t in (q, k, v))),
        lambda q, k, v: np_attention(*(t.transpose(0, 2, 1, 3) for t in (q, k, v))))


def rope_tables(T, hs, start=0):
    inv = 1.0 / 10000.0 ** (np.arange(0, hs, 2) / hs)
    ang = np.arange(start, start + T)[:, None] * inv[None, :]     # (T, hs/2)
    ang = np.concatenate([ang, ang], axis=-1)                     # (T, hs), halves layout
    return np.cos(ang), np.sin(ang)


def np_rope(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., h:], x[..., :h]], axis=-1) * sin


COS, SIN = rope_tables(3, 4, start=2)


def test_rope():
    check([(1, 2, 3, 4)], lambda x: F.rope(x, dev(COS), dev(SIN)), lambda x: np_rope(x, COS, SIN))


def test_rope_transposed_view():
    check([(1, 3, 2, 4)], lambda x: F.rope(x.transpose(0, 2, 1, 3), dev(COS), dev(SIN)),
          lambda x: np_rope(x.transpose(0, 2, 1, 3), COS, SIN))


def test_rope_keeps_norms():  # a rotation of each pair: lengths of (x_i, x_{i+h}) do not change
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    y = F.rope(Tensor(backend.asarray(x)), dev(COS), dev(SIN)).numpy()
    np.testing.assert_allclose(y[..., :2] ** 2 + y[..., 2:] ** 2, x[..., :2] ** 2 + x[..., 2:] ** 2)


# ------------------------------------------------------------------ dropout
def test_dropout_gradcheck():  # a fresh Generator with the same seed per call: the same mask each time
    check([(3, 4)], lambda a: F.dropout(a, 0.4, np.random.default_rng(7)))
