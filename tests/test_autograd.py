"""Tests of the autograd engine itself: how backward walks and frees the graph, accumulates and
broadcasts gradients, fires grad-ready hooks, stays stable on huge logits, and explains misuse;
plus op behaviour a gradcheck cannot see (ties in max, repeated indices, dropout masks)."""
import numpy as np
import pytest

import minillm.functional as F
from minillm import Tensor, backend, no_grad
from minillm.autograd import Function, enable_grad, is_grad_enabled
from minillm.autograd.gradcheck import GradcheckError, gradcheck


def t(x, requires_grad=True, dtype=np.float64):
    return Tensor(backend.asarray(np.asarray(x, dtype=dtype)), requires_grad=requires_grad)


def host(a):
    return backend.to_numpy(a.data if isinstance(a, Tensor) else a)


# ------------------------------------------------------------------ accumulation and broadcasting
def test_tensor_used_twice_accumulates():
    x = t([1.0, -2.0, 3.0])
    (x * x + x).sum().backward()          # d/dx (x^2 + x) = 2x + 1
    np.testing.assert_allclose(host(x.grad), [3.0, -3.0, 7.0])


def test_intermediate_used_twice_accumulates():
    x = t([0.5, 2.0])
    h = x * 3.0
    (h * h + h).sum().backward()          # d/dx (9x^2 + 3x) = 18x + 3
    np.testing.assert_allclose(host(x.grad), [12.0, 39.0])


def test_grads_accumulate_across_backward_calls_until_cleared():
    x = t([1.0, 2.0])
    (x * 2.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_allclose(host(x.grad), [5.0, 5.0])


def test_broadcast_gradients_are_summed_back_to_each_shape():
    a, b, c = t(np.ones((3, 1))), t(np.ones(4)), t(2.0)
    out = a * b + c                       # (3, 4)
    assert out.shape == (3, 4)
    (out * t(np.arange(12.0).reshape(3, 4), False)).sum().backward()
    assert a.grad.shape == (3, 1) and b.grad.shape == (4,) and c.grad.shape == ()
    w = np.arange(12.0).reshape(3, 4)
    np.testing.assert_allclose(host(a.grad), w.sum(1, keepdims=True))
    np.testing.assert_allclose(host(b.grad), w.sum(0))
    np.testing.assert_allclose(host(c.grad), w.sum())


def test_numpy_and_python_operands_do_not_upcast_float32():
    x = t(np.ones((2, 2)), dtype=np.float32)
    for y in (x + 1.5, 2 * x, x / 3, 1 - x, x ** 2, backend.asarray(np.ones(2, np.float32)) + x):
        assert y.dtype == np.float32 and isinstance(y, Tensor)
    assert (x + 1).requires_grad


# ------------------------------------------------------------------ graph walking
def test_deep_chain_backward_is_iterative():
    x, c, n = t(0.5), 0.999, 2500
    y = x
    for _ in range(n):                    # 5000 ops: far past Python's recursion limit of ~1000
        y = y * c + x
    y.backward()
    expected = c ** n + (1 - c ** n) / (1 - c)
    np.testing.assert_allclose(host(x.grad), expected, rtol=1e-12)


def test_diamond_graph_visits_each_node_once():
    calls = []

    class Spy(Function):
        @staticmethod
        def forward(ctx, a):
            return a * 2.0

        @staticmethod
        def backward(ctx, g):
            calls.append(1)
            return g * 2.0

    x = t([1.0, 2.0])
    h = Spy.apply(x)
    (h * h + h.exp() + h).sum().backward()
    assert len(calls) == 1                # the gradients of h's three uses are summed first
    hv = 2 * np.array([1.0, 2.0])
    np.testing.assert_allclose(host(x.grad), 2 * (2 * hv + np.exp(hv) + 1))


def test_no_grad_and_enable_grad():
    x = t([1.0, 2.0])
    with no_grad():
        y = x * 2.0
        assert not is_grad_enabled()
        with enable_grad():
            z = x * 2.0
        assert not is_grad_enabled()
    assert is_grad_enabled()
    assert not y.requires_grad and y._ctx is None
    assert z.requires_grad and z._ctx is not None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()
    with pytest.raises(ZeroDivisionError), no_grad():
        1 / 0
    assert is_grad_enabled()              # restored after an exception


def test_detach_cuts_the_graph_but_shares_data():
    x = t([1.0, 2.0])
    d = (x * 3.0).detach()
    assert not d.requires_grad and d._ctx is None
    (x * d).sum().backward()
    np.testing.assert_allclose(host(x.grad), [3.0, 6.0])  # d counted as a constant
    x2 = t([4.0])
    assert x2.detach().data is x2.data


def test_graph_is_freed_after_backward():
    x = t([1.0, 2.0])
    y = (x.exp() * x).sum()
    ctx = y._ctx.parents[0]._ctx          # the Mul node, which saved exp(x) and x
    assert len(ctx.saved_tensors) == 2
    y.backward()
    assert ctx.saved_tensors == () and ctx.parents == () and y._ctx is None
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        y.backward()
    np.testing.assert_allclose(host(x.grad), np.exp([1.0, 2.0]) * (1 + np.array([1.0, 2.0])))


def test_backward_through_a_freed_intermediate_raises():
    x = t([1.0, 2.0])
    h = x * x
    (h * 2.0).sum().backward()
    with pytest.raises(RuntimeError, match="already freed"):
        (h * 3.0).sum().backward()        # not silently treating h as a leaf


def test_retain_graph_allows_a_second_backward_that_doubles_grads():
    x = t([1.0, -1.0, 2.0])
    y = (x * x * x).sum()
    y.backward(retain_graph=True)
    first = host(x.grad).copy()
    y.backward()
    np.testing.assert_allclose(host(x.grad), 2 * first)
    np.testing.assert_allclose(first, 3 * np.array([1.0, 1.0, 4.0]))


def test_backward_with_explicit_gradient_and_on_a_leaf():
    x = t(np.ones((2, 3)))
    (x * 2.0).backward(backend.asarray(np.full((2, 3), 0.5)))
    np.testing.assert_allclose(host(x.grad), np.ones((2, 3)))
    leaf = t(3.0)
    leaf.backward()
    assert float(host(leaf.grad)) == 1.0


# ------------------------------------------------------------------ grad-ready hooks
def test_post_accumulate_grad_hook_fires_once_with_the_final_grad():
    w, x = t([1.0, 2.0, 3.0]), t([0.5, -1.0, 2.0])
    seen = []
    w.register_post_accumulate_grad_hook(lambda p: seen.append(host(p.grad).copy()))
    loss = (w * x).sum() + (w * w).sum() + w.sum() + (x * 2.0).sum()   # w feeds four op inputs
    loss.backward()
    assert len(seen) == 1
    np.testing.assert_allclose(seen[0], host(w.grad))
    np.testing.assert_allclose(host(w.grad), host(x) + 2 * host(w) + 1)
    (w * 2.0).sum().backward()            # once per backward, seeing the accumulated grad
    assert len(seen) == 2
    np.testing.assert_allclose(seen[1], host(x) + 2 * host(w) + 3)


def test_hooks_fire_from_the_output_side_first_and_can_be_removed():
    x, w1, w2 = t(np.ones((1, 2)), False), t(np.full((2, 2), 0.1)), t(np.full((2, 2), 0.2))
    order = []
    h1 = w1.register_post_accumulate_grad_hook(lambda p: order.append(("w1", host(p.grad).copy())))
    w2.register_post_accumulate_grad_hook(lambda p: order.append(("w2", host(p.grad).copy())))
    loss = ((x @ w1).tanh() @ w2).sum()
    loss.backward()
    assert [n for n, _ in order] == ["w2", "w1"]   # the last layer's grad is ready first
    np.testing.assert_allclose(order[0][1], host(w2.grad))
    np.testing.assert_allclose(order[1][1], host(w1.grad))
    h1.remove()
    ((x @ w1).tanh() @ w2).sum().backward()
    assert [n for n, _ in order] == ["w2", "w1", "w2"]


# ------------------------------------------------------------------ op semantics beyond gradcheck
def test_max_splits_gradient_between_ties():
    a = t([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]])
    a.max(axis=1).sum().backward()
    np.testing.assert_allclose(host(a.grad), [[0, 0.5, 0.5], [0.5, 0, 0.5]])


def test_repeated_indices_accumulate():
    a = t(np.arange(3.0))
    a[backend.asarray(np.array([0, 0, 2, 0]))].sum().backward()
    np.testing.assert_array_equal(host(a.grad), [3.0, 0.0, 1.0])


def test_dropout_mask_applies_in_backward_and_seed_fixes_it():
    x = t(np.ones((50, 40)))
    y = F.dropout(x, 0.25, np.random.default_rng(3))
    y.sum().backward()
    out = y.numpy()
    np.testing.assert_array_equal(host(x.grad), out)   # d(x*mask)/dx = mask, with x = 1
    assert set(np.unique(out)) == {0.0, 1 / 0.75}
    assert 0.2 < (out == 0).mean() < 0.3
    again = F.dropout(t(np.ones((50, 40)), False), 0.25, np.random.default_rng(3)).numpy()
    np.testing.assert_array_equal(again, out)         # same seed, same mask
    other = F.dropout(t(np.ones((50, 40)), False), 0.25, np.random.default_rng(4)).numpy()
    assert (other != out).any()


def test_dropout_identity_when_off():
    x = t(np.ones((2, 3)))
    assert F.dropout(x, 0.5, np.random.default_rng(0), training=False) is x
    assert F.dropout(x, 0.0, np.random.default_rng(0)) is x
    with pytest.raises(ValueError, match="p=1.0"):
        F.dropout(x, 1.0, np.random.default_rng(0))


# ------------------------------------------------------------------ numerical stability
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_softmax_log_softmax_cross_entropy_stable_on_huge_logits(dtype, rtol):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6)) * 1e3
    targets = np.array([0, 5, 2, 3])
    s = x - x.max(-1, keepdims=True)
    ref_logp = s - np.log(np.exp(s).sum(-1, keepdims=True))     # float64 reference
    ref_ce = -ref_logp[np.arange(4), targets].mean()
    xt = t(x.astype(dtype), dtype=dtype)
    sm, lsm = F.softmax(xt), F.log_softmax(xt)
    ce = F.cross_entropy(xt, backend.asarray(targets))
    for out in (sm, lsm, ce):
        assert np.isfinite(out.numpy()).all() and out.dtype == dtype
    np.testing.assert_allclose(sm.numpy(), np.exp(ref_logp), rtol=rtol, atol=1e-30)
    np.testing.assert_allclose(lsm.numpy(), ref_logp, rtol=rtol)
    np.testing.assert_allclose(ce.item(), ref_ce, rtol=rtol)
    assert ce.item() > 100                # the targets are far from the maximum: a large, finite loss
    ce.backward()
    assert np.isfinite(host(xt.grad)).all()


# ------------------------------------------------------------------ gradcheck itself
class WrongSquare(Function):
    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a * a

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return g * a                      # should be 2 a g


def test_gradcheck_catches_a_wrong_backward():
    x = t(np.random.default_rng(0).standard_normal((2, 3)))
    with pytest.raises(GradcheckError, match="FAILED"):
        gradcheck(WrongSquare.apply, [x])
    result = gradcheck(WrongSquare.apply, [x], raise_exception=False)
    assert not result.ok and abs(result.analytic * 2 - result.numeric) < 1e-6


def test_gradcheck_demands_float64_and_contiguous_inputs():
    with pytest.raises(TypeError, match="float64"):
        gradcheck(lambda a: a * 2.0, [t(np.ones(3), dtype=np.float32)])
    view = Tensor(backend.asarray(np.ones((3, 2))).T, requires_grad=True)
    with pytest.raises(ValueError, match="contiguous"):
        gradcheck(lambda a: a * 2.0, [view])


# ------------------------------------------------------------------ misuse explains itself
@pytest.mark.parametrize("fn,words", [
    (lambda: t(np.ones((2, 3))) + t(np.ones(4)), ["add", "(2, 3)", "(4,)"]),
    (lambda: t(np.ones((2, 3))) * t(np.ones((3, 2))), ["mul", "(2, 3)", "(3, 2)"]),
    (lambda: t(np.ones((2, 3))) @ t(np.ones((2, 3))), ["matmul", "(2, 3)"]),
    (lambda: t(np.ones(3)) @ t(np.ones(4)), ["matmul", "(3,)", "(4,)"]),
    (lambda: t(np.ones((2, 2, 3))) @ t(np.ones((3, 3, 4))), ["matmul", "(2, 2, 3)", "(3, 3, 4)"]),
    (lambda: F.layer_norm(t(np.ones((2, 3))), t(np.ones(4))), ["layer_norm", "(4,)", "(2, 3)"]),
    (lambda: F.layer_norm(t(np.ones((2, 3))), t(np.ones(3)), t(np.ones(2))), ["layer_norm", "bias", "(2,)"]),
    (lambda: F.rms_norm(t(np.ones((2, 3))), t(np.ones(4))), ["rms_norm", "(4,)", "(2, 3)"]),
    (lambda: F.concatenate([t(np.ones((2, 3))), t(np.ones((3, 2)))]), ["concatenate", "(2, 3)", "(3, 2)"]),
    (lambda: F.stack([t(np.ones(2)), t(np.ones(3))]), ["stack", "(2,)", "(3,)"]),
    (lambda: F.where(backend.asarray(np.ones(4, bool)), t(np.ones(3)), 0.0), ["where", "(4,)", "(3,)"]),
    (lambda: F.scaled_dot_product_attention(*(t(np.ones((1, 1, 2, hs))) for hs in (3, 4, 4))),
     ["attention", "(1, 1, 2, 3)", "(1, 1, 2, 4)"]),
    (lambda: F.rope(t(np.ones((1, 1, 3, 4))), *[backend.asarray(np.ones((2, 4)))] * 2),
     ["rope", "(2, 4)", "(1, 1, 3, 4)"]),
    (lambda: F.linear(t(np.ones((2, 3))), t(np.ones((4, 5)))), ["linear", "(2, 3)", "(4, 5)"]),
    (lambda: t(np.ones((2, 3))).reshape(4, 2), ["reshape", "(2, 3)", "(4, 2)"]),
    (lambda: t(np.ones((2, 3))).transpose(0, 0, 1), ["transpose", "(2, 3)"]),
    (lambda: F.cross_entropy(t(np.ones((2, 3))), backend.asarray(np.zeros(3, int))),
     ["cross_entropy", "(3,)", "(2, 3)"]),
    # an id out of range: raised at once on the CPU, at the next read on the GPU (no sync per call)
    (lambda: backend.fetch(F.cross_entropy(t(np.ones((2, 3))), backend.asarray(np.array([0, 3]))).data),
     ["[0, 3)"]),
    (lambda: F.split(t(np.ones((2, 5))), 2), ["split", "5"]),
])
def test_shape_errors_name_the_op_and_shapes(fn, words):
    with pytest.raises(ValueError) as e:
        fn()
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert "\n" not in str(e.value)


def test_backward_misuse_messages():
    y = t(np.ones((2, 3))) * 2.0
    with pytest.raises(RuntimeError, match=r"non-scalar.*\(2, 3\)"):
        y.backward()
    with pytest.raises(ValueError, match=r"\(3,\).*\(2, 3\)"):
        y.backward(backend.asarray(np.ones(3)))
    with pytest.raises(TypeError, match="floating point"):
        Tensor(backend.asarray(np.arange(3)), requires_grad=True)


class FakeCupyArray:
    """Stands in for a cupy.ndarray on a machine without CuPy: only its module name matters."""
    shape, dtype = (2,), np.dtype("float32")


FakeCupyArray.__module__ = "cupy._core.core"


@pytest.mark.skipif(backend.is_gpu(), reason="simulates a cupy array reaching the CPU backend")
def test_mixing_numpy_and_cupy_arrays_is_explained():
    x = t(np.ones(2), dtype=np.float32)
    for fn in (lambda: Tensor(FakeCupyArray()), lambda: x + FakeCupyArray(),
               lambda: (x * 2.0).backward(FakeCupyArray())):
        with pytest.raises(TypeError, match="mixing numpy and cupy"):
            fn()
