"""Tests of minillm.nn: layers against NumPy and gradcheck, Module bookkeeping (names, tied
parameters, train/eval, zero_grad, state dicts) and a small MLP that learns two spirals."""
import numpy as np
import pytest

import minillm.functional as F
from minillm import Tensor, backend
from minillm.autograd.gradcheck import gradcheck
from minillm.nn import Dropout, Embedding, LayerNorm, Linear, Module, ModuleList, Parameter, RMSNorm


def host(a):
    return backend.to_numpy(a.data if isinstance(a, Tensor) else a)


def f64(module):
    """Switch a module's parameters to float64 in place (gradcheck needs float64)."""
    for p in module.parameters():
        p.data = p.data.astype(np.float64)
    return module


def x64(shape, seed=0):
    return Tensor(backend.asarray(np.random.default_rng(seed).standard_normal(shape)), requires_grad=True)


# ------------------------------------------------------------------ layers
def test_linear_shapes_init_and_forward():
    lin = Linear(4, 3, rng=np.random.default_rng(0))
    assert lin.weight.shape == (3, 4) and lin.bias.shape == (3,) and lin.weight.dtype == np.float32
    assert np.abs(host(lin.weight)).max() <= 0.5 and (host(lin.bias) == 0).all()  # U(-1/sqrt(4), 1/sqrt(4))
    again = Linear(4, 3, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(host(again.weight), host(lin.weight))
    x = np.random.default_rng(1).standard_normal((2, 5, 4)).astype(np.float32)
    y = lin(Tensor(backend.asarray(x)))
    assert y.shape == (2, 5, 3) and y.dtype == np.float32
    np.testing.assert_allclose(host(y), x @ host(lin.weight).T + host(lin.bias), rtol=1e-5, atol=1e-6)
    assert Linear(4, 3, bias=False).bias is None
    std = Linear(64, 64, rng=np.random.default_rng(0), std=0.02)
    assert abs(host(std.weight).std() - 0.02) < 0.002


def test_embedding_layernorm_rmsnorm_forward():
    emb = Embedding(7, 3, rng=np.random.default_rng(0))
    ids = np.array([[1, 6, 1]])
    np.testing.assert_array_equal(host(emb(backend.asarray(ids))), host(emb.weight)[ids])
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32) * 3 + 1
    y = host(LayerNorm(8)(Tensor(backend.asarray(x))))
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-3)
    r = host(RMSNorm(8)(Tensor(backend.asarray(x))))
    np.testing.assert_allclose((r * r).mean(-1), 1, rtol=1e-3)


@pytest.mark.parametrize("make,shape", [
    (lambda: Linear(3, 4, rng=np.random.default_rng(0)), (2, 3)),
    (lambda: Linear(3, 2, bias=False, rng=np.random.default_rng(0)), (2, 2, 3)),
    (lambda: LayerNorm(5), (3, 5)),
    (lambda: RMSNorm(5), (2, 5)),
])
def test_layer_gradcheck(make, shape):
    layer = f64(make())
    for p in layer.parameters():  # move away from ones/zeros so every term of the backward matters
        p.data += backend.asarray(np.random.default_rng(2).uniform(-0.5, 0.5, p.shape))
    params = layer.parameters()
    gradcheck(lambda x, *ps: layer(x), [x64(shape)] + params)


def test_embedding_gradcheck_with_repeated_ids():
    emb = f64(Embedding(5, 3, rng=np.random.default_rng(0)))
    ids = backend.asarray(np.array([[0, 4, 4], [4, 1, 0]]))
    gradcheck(lambda w: emb(ids), [emb.weight])


def test_fused_layer_norm_matches_primitive_composition():
    x, w, b = x64((3, 6)), x64((6,), 1), x64((6,), 2)

    def composed(x, w, b):
        mu = x.mean(axis=-1, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
        return (x - mu) / (var + 1e-5).sqrt() * w + b

    g = backend.asarray(np.random.default_rng(3).standard_normal((3, 6)))
    grads = []
    for fn in (F.layer_norm, composed):
        for p in (x, w, b):
            p.grad = None
        out = fn(x, w, b)
        out.backward(g)
        grads.append([host(out)] + [host(p.grad) for p in (x, w, b)])
    for fused, prim in zip(*grads):
        np.testing.assert_allclose(fused, prim, rtol=1e-10, atol=1e-12)


def test_dropout_layer_train_eval_and_seed():
    x = Tensor(backend.asarray(np.ones((20, 20), np.float32)))
    d = Dropout(0.5, rng=np.random.default_rng(5))
    y1 = host(d(x))
    assert (y1 == 0).any() and set(np.unique(y1)) <= {0.0, 2.0}
    y2 = host(Dropout(0.5, rng=np.random.default_rng(5))(x))
    np.testing.assert_array_equal(y1, y2)
    d.eval()
    assert d(x) is x
    with pytest.raises(ValueError, match="p=1"):
        Dropout(1.0)


# ------------------------------------------------------------------ Module bookkeeping
class Block(Module):
    def __init__(self, rng):
        super().__init__()
        self.ln = LayerNorm(4)
        self.fc = Linear(4, 4, rng=rng)
        self.drop = Dropout(0.5, rng=rng)

    def forward(self, x):
        return x + self.drop(self.fc(self.ln(x)))


class Tiny(Module):
    """An embedding, two blocks and an output layer tied to the embedding (as GPT-2 ties them)."""

    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.wte = Embedding(6, 4, rng=rng)
        self.h = ModuleList([Block(rng) for _ in range(2)])
        self.ln_f = LayerNorm(4)
        self.head = Linear(4, 6, bias=False, rng=rng)
        self.head.weight = self.wte.weight

    def forward(self, ids):
        x = self.wte(ids)
        for block in self.h:
            x = block(x)
        return self.head(self.ln_f(x))


NAMES = ["wte.weight", "h.0.ln.weight", "h.0.ln.bias", "h.0.fc.weight", "h.0.fc.bias",
         "h.1.ln.weight", "h.1.ln.bias", "h.1.fc.weight", "h.1.fc.bias", "ln_f.weight", "ln_f.bias"]


def test_named_parameters_order_is_deterministic_and_tied_params_appear_once():
    m = Tiny()
    assert [n for n, _ in m.named_parameters()] == NAMES
    assert [n for n, _ in Tiny(seed=1).named_parameters()] == NAMES
    assert len(m.parameters()) == len(NAMES) and m.head.weight is m.wte.weight
    assert m.num_parameters() == 6 * 4 + 2 * (4 + 4 + 16 + 4) + 8
    assert list(m.state_dict()) == NAMES + ["head.weight"]  # a tied array is saved under each name
    assert all(isinstance(p, Parameter) and p.requires_grad for p in m.parameters())


def test_tied_parameter_gets_both_gradients():
    m = f64(Tiny()).eval()  # eval: dropout off, so every call is the same function
    gradcheck(lambda w: m(backend.asarray(np.array([[0, 3, 3]]))).sum(), [m.wte.weight])


def test_train_eval_propagate_and_zero_grad():
    m = Tiny()
    assert all(mod.training for mod in m.modules())
    assert m.eval() is m and not any(mod.training for mod in m.modules())
    ids = backend.asarray(np.array([[1, 2, 3]]))
    np.testing.assert_array_equal(host(m(ids)), host(m(ids)))  # no dropout in eval: deterministic
    m.train()
    assert m.h[1].drop.training
    m(ids).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_state_dict_round_trip_in_place():
    a, b = Tiny(seed=0), Tiny(seed=1)
    fc_data = b.h[0].fc.weight.data
    b.load_state_dict(a.state_dict())
    assert b.h[0].fc.weight.data is fc_data  # copied in place: optimizers keep their references
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(host(p), host(q), err_msg=n)


def test_load_state_dict_lists_every_problem_in_one_line():
    m = Tiny()
    state = dict(m.state_dict())
    del state["h.1.fc.bias"]
    state["h.2.fc.weight"] = np.zeros((4, 4), np.float32)
    state["ln_f.weight"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError) as e:
        m.load_state_dict(state)
    msg = str(e.value)
    assert "\n" not in msg
    assert "missing keys: h.1.fc.bias" in msg and "unexpected keys: h.2.fc.weight" in msg
    assert "ln_f.weight: checkpoint (5,) vs model (4,)" in msg
    del state["ln_f.weight"]
    m.load_state_dict(state, strict=False)  # the shared names load; missing/unexpected are allowed


def test_module_must_call_super_init():
    class Broken(Module):
        def __init__(self):
            self.fc = Linear(2, 2)

    with pytest.raises(RuntimeError, match=r"Broken.__init__ must call super\(\).__init__\(\)"):
        Broken()


# ------------------------------------------------------------------ a small MLP learns
def two_spirals(n, rng):
    """n points per class on two interleaved one-turn spirals in 2-D, labels 0 and 1."""
    t = np.sqrt(rng.uniform(0, 1, n)) * 2 * np.pi
    xs, ys = [], []
    for c in (0, 1):
        xy = np.stack([np.cos(t + c * np.pi), np.sin(t + c * np.pi)], 1) * (t / (2 * np.pi))[:, None]
        xs.append(xy + rng.normal(0, 0.02, (n, 2)))
        ys.append(np.full(n, c))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


class MLP(Module):
    def __init__(self, hidden, rng):
        super().__init__()
        self.fc1, self.ln = Linear(2, hidden, rng=rng), LayerNorm(hidden)
        self.fc2, self.out = Linear(hidden, hidden, rng=rng), Linear(hidden, 2, rng=rng)

    def forward(self, x):
        return self.out(F.gelu(self.fc2(F.gelu(self.ln(self.fc1(x))))))


def test_mlp_learns_two_spirals_with_plain_gradient_steps():
    x, y = two_spirals(100, np.random.default_rng(0))
    x, y = Tensor(backend.asarray(x)), backend.asarray(y)
    model, lr = MLP(64, np.random.default_rng(1)), 0.2
    losses = []
    for _ in range(300):
        loss = F.cross_entropy(model(x), y)
        model.zero_grad()
        loss.backward()
        for p in model.parameters():
            p.data -= lr * p.grad
        losses.append(loss.item())
    assert losses[0] > 0.6                 # chance level is log 2 = 0.69
    assert losses[-1] < 0.05, losses[::50]  # the threshold: a near-perfect fit of 200 points
    assert (host(model(x)).argmax(-1) == host(y)).mean() >= 0.99
