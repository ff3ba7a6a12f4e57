"""Tests of minillm.model: GPTConfig validation, the GPT forward pass for every option, parameter
names and shapes (the GPT-2 layout), initial loss, overfitting one batch, a float64 gradcheck of the
whole model, and sampling (seeds, temperature 0, top-k, the KV cache, train/eval mode)."""
import math

import numpy as np
import pytest

from minillm import Tensor, backend, no_grad
from minillm.autograd.gradcheck import gradcheck
from minillm.errors import ConfigError
from minillm.model import GPT, GPTConfig, KVCache
from minillm.optim import AdamW

V = 23  # a vocabulary size that is no power of two, so a transposed table cannot pass by luck

OPTIONS = {
    "default": {},
    "rmsnorm": {"norm": "rmsnorm"},
    "swiglu": {"mlp": "swiglu"},
    "rope": {"pos": "rope"},
    "no_bias": {"bias": False},
    "untied": {"tie_embeddings": False},
    "dropout": {"dropout": 0.1},
    "llama": {"norm": "rmsnorm", "mlp": "swiglu", "pos": "rope", "bias": False, "tie_embeddings": False},
}


def tiny(seed=0, **kw):
    args = dict(vocab_size=V, block_size=8, n_layer=2, n_head=2, n_embd=16)
    args.update(kw)
    return GPT(GPTConfig(**args), seed=seed)


def ids(shape, seed=0, high=V):
    return backend.asarray(np.random.default_rng(seed).integers(0, high, shape))


def host(a):
    return backend.to_numpy(a.data if isinstance(a, Tensor) else a)


def f64(model):
    for p in model.parameters():
        p.data = p.data.astype(np.float64)
    return model


# ------------------------------------------------------------------ forward and parameters

@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
def test_forward_shapes_and_every_parameter_gets_a_gradient(opts):
    m = tiny(**opts)
    x, y = ids((3, 8), 1), ids((3, 8), 2)
    logits, loss = m(x, y)
    assert logits.shape == (3, 8, V) and logits.dtype == np.float32
    assert loss.shape == () and np.isfinite(float(loss.data))
    logits, none = m(x[:, :5])  # shorter than block_size; no targets, no loss
    assert logits.shape == (3, 5, V) and none is None
    _, loss = m(x, y)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert np.abs(host(p.grad)).sum() > 0, f"{name} got a zero gradient"


def expected_shapes(C=16, V=V, T=8, L=2, H=64, bias=True, tie=True, learned=True, swiglu=False):
    out = {"transformer.wte.weight": (V, C)}
    if learned:
        out["transformer.wpe.weight"] = (T, C)
    for i in range(L):
        h = f"transformer.h.{i}."
        layers = [("ln_1", None, C), ("attn.c_attn", C, 3 * C), ("attn.c_proj", C, C), ("ln_2", None, C),
                  ("mlp.c_fc", C, H)]
        layers += [("mlp.c_gate", C, H)] if swiglu else []
        layers += [("mlp.c_proj", H, C)]
        for name, fan_in, fan_out in layers:
            out[h + name + ".weight"] = (fan_out,) if fan_in is None else (fan_out, fan_in)
            if bias:
                out[h + name + ".bias"] = (fan_out,)
    out["transformer.ln_f.weight"] = (C,)
    if bias:
        out["transformer.ln_f.bias"] = (C,)
    if not tie:
        out["lm_head.weight"] = (V, C)
    return out


def test_parameter_names_and_shapes_follow_gpt2():
    got = {n: p.shape for n, p in tiny().named_parameters()}
    assert got == expected_shapes()
    assert list(got)[:3] == ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight"]


def test_parameter_names_and_shapes_of_the_llama_options():
    m = tiny(**OPTIONS["llama"])
    hidden = m.config.mlp_hidden
    assert hidden % 8 == 0 and abs(hidden - 8 * 16 / 3) < 8  # ~2/3 of 4C, rounded up to a multiple of 8
    want = expected_shapes(H=hidden, bias=False, tie=False, learned=False, swiglu=True)
    assert {n: p.shape for n, p in m.named_parameters()} == want


def test_num_parameters_counts_each_tensor_once():
    m, u = tiny(), tiny(tie_embeddings=False)
    assert m.num_parameters() == sum(int(np.prod(s)) for s in expected_shapes().values())
    assert u.num_parameters() - m.num_parameters() == V * 16  # the untied lm_head


def test_tied_lm_head_is_the_token_embedding():
    m = tiny()
    assert m.lm_head.weight is m.transformer.wte.weight
    assert "lm_head.weight" not in dict(m.named_parameters())
    assert m.state_dict()["lm_head.weight"] is m.state_dict()["transformer.wte.weight"]
    # Token 0 never appears in the input, so its embedding row's gradient comes only from lm_head.
    x = ids((2, 8), 3, high=V - 1) + 1
    _, loss = m(x, x)
    loss.backward()
    assert np.abs(host(m.transformer.wte.weight.grad)[0]).sum() > 0
    u = tiny(tie_embeddings=False)
    assert u.lm_head.weight is not u.transformer.wte.weight
    _, loss = u(x, x)
    loss.backward()
    assert np.abs(host(u.transformer.wte.weight.grad)[0]).sum() == 0


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = tiny(seed=5), tiny(seed=5), tiny(seed=6)
    for (n, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert np.array_equal(host(pa), host(pb)), n
    assert not np.array_equal(host(a.transformer.wte.weight), host(c.transformer.wte.weight))


@pytest.mark.parametrize("opts", [{}, OPTIONS["llama"]], ids=["gpt2", "llama"])
def test_initial_loss_is_log_vocab_size(opts):
    m = tiny(vocab_size=97, n_embd=32, block_size=16, **opts)
    _, loss = m(ids((8, 16), 4, high=97), ids((8, 16), 5, high=97))
    assert abs(float(loss.data) - math.log(97)) < 0.1


def test_overfits_a_single_batch():
    m = tiny(n_layer=1, n_embd=32, block_size=16)
    x, y = ids((4, 16), 6), ids((4, 16), 7)  # random targets: only memorisation lowers this loss
    opt = AdamW(m.named_parameters(), lr=1e-2)
    for _ in range(300):
        _, loss = m(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if float(loss.data) < 0.1:
            break
    assert float(loss.data) < 0.1


@pytest.mark.parametrize("opts", [{}, OPTIONS["llama"]], ids=["gpt2", "llama"])
def test_gradcheck_whole_model_float64(opts):
    m = f64(tiny(vocab_size=7, block_size=5, n_embd=8, **opts))
    x, y = ids((2, 5), 8, high=7), ids((2, 5), 9, high=7)
    names = ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight",
             "transformer.h.1.mlp.c_fc.weight", "transformer.ln_f.weight"]
    params = dict(m.named_parameters())
    checked = [params[n] for n in names]
    assert all(p.dtype == np.float64 for p in checked)
    assert m(x, y)[1].dtype == np.float64
    gradcheck(lambda *ps: m(x, y)[1], checked)


# ------------------------------------------------------------------ sampling

def test_seeded_sampling_is_deterministic_and_seeds_differ():
    m = tiny()
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    a = m.generate(prompt, 12, seed=1)
    b = m.generate(prompt, 12, seed=1)
    c = m.generate(prompt, 12, seed=2)
    assert a.shape == (2, 15) and a.dtype == np.int64
    assert np.array_equal(a[:, :3], prompt) and ((a >= 0) & (a < V)).all()
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def greedy_by_hand(m, prompt, n):
    """The most likely next token each step, by full recompute over the last block_size tokens."""
    idx = np.array(prompt)
    with no_grad():
        for _ in range(n):
            logits, _ = m(backend.asarray(idx[:, -m.config.block_size:]))
            idx = np.concatenate([idx, host(logits)[:, -1].argmax(axis=1)[:, None]], axis=1)
    return idx


@pytest.mark.parametrize("opts", [{}, {"pos": "rope"}], ids=["learned", "rope"])
def test_temperature_zero_is_greedy_and_top_k_1_too(opts):
    m = tiny(**opts).eval()
    prompt = [[3, 1, 4]]
    want = greedy_by_hand(m, prompt, 10)  # 13 tokens: past block_size 8
    assert np.array_equal(m.generate(prompt, 10, temperature=0), want)
    assert np.array_equal(m.generate(prompt, 10, temperature=1.0, top_k=1, seed=3), want)
    assert np.array_equal(m.generate(prompt, 10, temperature=0, use_cache=False), want)


@pytest.mark.parametrize("opts", [{}, {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu"}],
                         ids=["learned", "rope"])
def test_kv_cache_and_recompute_give_the_same_tokens(opts):
    m = tiny(**opts)
    prompt = np.array([[1, 2], [3, 4]])
    for kw in ({"temperature": 1.0, "seed": 11}, {"temperature": 0.7, "top_k": 5, "seed": 12},
               {"temperature": 0}):
        cached = m.generate(prompt, 20, use_cache=True, **kw)   # 22 tokens: the window slides
        full = m.generate(prompt, 20, use_cache=False, **kw)
        assert np.array_equal(cached, full), kw


@pytest.mark.parametrize("opts", [{}, {"pos": "rope"}], ids=["learned", "rope"])
def test_kv_cache_logits_match_full_forward(opts):
    m = tiny(**opts).eval()
    x = ids((2, 8), 13)
    with no_grad():
        full = host(m(x)[0])
        cache = KVCache(m.config.n_layer)
        first = host(m(x[:, :3], cache=cache)[0])
        steps = [host(m(x[:, t:t + 1], cache=cache)[0]) for t in range(3, 8)]
    assert cache.length == 8
    inc = np.concatenate([first] + steps, axis=1)
    np.testing.assert_allclose(inc, full, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="block_size"):
        with no_grad():
            m(x[:, :1], cache=cache)  # position 8 does not exist


def test_generate_keeps_train_or_eval_mode():
    m = tiny(dropout=0.2)
    m.generate([[1]], 3, seed=0)
    assert m.training and all(mod.training for mod in m.modules())
    m.eval()
    m.generate([[1]], 3, seed=0)
    assert not any(mod.training for mod in m.modules())


def test_generate_rejects_bad_sampling_arguments():
    m = tiny()
    with pytest.raises(ValueError, match="temperature"):
        m.generate([[1]], 2, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        m.generate([[1]], 2, top_k=0)


def test_dropout_is_active_in_train_mode_only():
    m = tiny(dropout=0.5)
    x = ids((2, 8), 14)
    a, b = host(m(x)[0]), host(m(x)[0])
    assert not np.array_equal(a, b)
    m.eval()
    assert np.array_equal(host(m(x)[0]), host(m(x)[0]))


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("kw, words", [
    ({"n_embd": 30, "n_head": 4}, ["n_embd=30", "not divisible", "n_head=4"]),
    ({"dropout": 1.0}, ["dropout=1.0", "[0, 1)"]),
    ({"dropout": -0.1}, ["dropout=-0.1", "[0, 1)"]),
    ({"norm": "batchnorm"}, ["norm='batchnorm'", "layernorm", "rmsnorm"]),
    ({"mlp": "relu"}, ["mlp='relu'", "gelu", "swiglu"]),
    ({"pos": "alibi"}, ["pos='alibi'", "learned", "rope"]),
    ({"pos": "rope", "n_embd": 12, "n_head": 4}, ["rope", "even head size", "3"]),
    ({"n_layer": 0}, ["n_layer=0", "positive"]),
])
def test_config_errors_are_one_line(kw, words):
    with pytest.raises(ConfigError) as e:
        GPTConfig(vocab_size=V, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_model_needs_a_vocab_size():
    with pytest.raises(ConfigError, match="vocab_size"):
        GPT(GPTConfig())


def test_sequences_longer_than_block_size_raise():
    m = tiny()
    with pytest.raises(ValueError, match="longer than block_size 8"):
        m(ids((1, 9), 15))
    m(ids((1, 8), 15))  # exactly block_size is fine


# ------------------------------------------------------------------ dropout keys
class _Recorder:
    """Wraps a Dropout layer's mask source and records every mask it draws with its key."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def mask(self, shape, p):
        out = self.inner.mask(shape, p)
        self.log.append((self.inner.layer, self.inner.source.key[:2], host(out)))
        return out


def _record_masks(model):
    log = []
    for m in model.modules():
        if type(m).__name__ == "Dropout":
            m.rng = _Recorder(m.rng, log)
    return log


def test_dropout_masks_follow_the_sample_not_the_call_order():
    """The engine runs each micro-batch inside its (step, row0) key: any order, any split and any
    replay of the same samples draws the same masks (what recomputation and interleaved
    pipelines rely on)."""
    from minillm.engine import LocalEngine, Microbatch
    model = tiny(dropout=0.3)
    log = _record_masks(model)
    x, y = ids((12, 8), 1), ids((12, 8), 2)
    mbs = [Microbatch(x[r:r + 4], y[r:r + 4], step=7, row0=r) for r in (0, 4, 8)]
    engine = LocalEngine(model)

    def masks(order):
        log.clear()
        engine.forward_backward([mbs[i] for i in order])
        model.zero_grad()
        return {(layer, key): mask for layer, key, mask in log}

    in_order, shuffled, replayed = masks([0, 1, 2]), masks([2, 0, 1]), masks([1, 1])
    assert len(in_order) == 3 * 5  # 3 micro-batches x 5 dropout sites (embedding + 2 per block)
    assert set(in_order) == set(shuffled)
    for k in in_order:
        assert np.array_equal(in_order[k], shuffled[k]), k
    assert all(np.array_equal(replayed[k], in_order[k]) for k in replayed)  # the replay of mbs[1]
    engine.forward_backward([Microbatch(x, y, step=7, row0=0)])  # one micro-batch of all 12 rows
    whole = {layer: mask for layer, _, mask in log[-5:]}
    for (layer, (_, row0)), mask in in_order.items():
        assert np.array_equal(whole[layer][row0:row0 + 4], mask), (layer, row0)
    engine.forward_backward([Microbatch(x[:4], y[:4], step=8, row0=0)])  # another step: other masks
    assert not np.array_equal(log[-1][2], in_order[(log[-1][0], (7, 0))])
