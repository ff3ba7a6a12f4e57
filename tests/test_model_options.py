"""Llama-style model options and per-group weight decay: model.d_ff (explicit MLP width),
model.rope_theta (RoPE base), and train.no_decay (which parameters weight decay spares)."""
import numpy as np
import pytest

from minillm.autograd.tensor import no_grad
from minillm.backend import asarray as dev
from minillm.backend import to_numpy as host
from minillm.config import Config, TrainConfig, load_config
from minillm.distributed.comm import SerialComm
from minillm.distributed.zero import ZeroAdamW
from minillm.errors import ConfigError
from minillm.model import GPT, GPTConfig
from minillm.optim import SGD, AdamW, param_groups
from minillm.train.build import build_engine

SMALL = dict(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16)


# ------------------------------------------------------------------ model.d_ff
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_d_ff_sets_the_mlp_width_and_zero_keeps_the_derived_one(mlp):
    derived = GPT(GPTConfig(**SMALL, mlp=mlp), seed=0)
    zero = GPT(GPTConfig(**SMALL, mlp=mlp, d_ff=0), seed=0)
    for (n, a), (_, b) in zip(derived.named_parameters(), zero.named_parameters()):
        np.testing.assert_array_equal(host(a.data), host(b.data), err_msg=n)  # existing checkpoints still load
    wide = GPT(GPTConfig(**SMALL, mlp=mlp, d_ff=40), seed=0)
    shapes = dict((n, p.shape) for n, p in wide.named_parameters())
    assert shapes["transformer.h.0.mlp.c_fc.weight"] == (40, 16)
    assert shapes["transformer.h.1.mlp.c_proj.weight"] == (16, 40)
    assert ("transformer.h.0.mlp.c_gate.weight" in shapes) == (mlp == "swiglu")
    logits, loss = wide(dev(np.zeros((2, 8), np.int64)), dev(np.ones((2, 8), np.int64)))
    loss.backward()
    assert logits.shape == (2, 8, 13)


def test_d_ff_and_rope_theta_from_toml_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\nd_ff = 96\nrope_theta = 500000\npos = 'rope'\n")
    cfg = load_config(path, ["--model.d_ff=48"])
    assert cfg.model.d_ff == 48 and cfg.model.rope_theta == 500000.0 and cfg.model.mlp_hidden == 48


@pytest.mark.parametrize("kw,words", [(dict(d_ff=-1), "model.d_ff=-1"), (dict(d_ff=2.5), "model.d_ff"),
                                      (dict(rope_theta=0.0), "model.rope_theta=0 must be > 0"),
                                      (dict(rope_theta=float("nan")), "model.rope_theta")])
def test_bad_options_are_named(kw, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        GPTConfig(**SMALL, **kw)


# ------------------------------------------------------------------ model.rope_theta
def test_rope_theta_changes_the_rotation_and_the_default_is_10000():
    idx = np.random.default_rng(0).integers(0, 13, (1, 8))
    out = {}
    for theta in (None, 10000.0, 100.0):
        cfg = GPTConfig(**SMALL, pos="rope", **({} if theta is None else {"rope_theta": theta}))
        with no_grad():
            out[theta] = GPT(cfg, seed=0)(dev(idx))[0].numpy()
    np.testing.assert_array_equal(out[None], out[10000.0])
    assert np.abs(out[100.0] - out[10000.0]).max() > 1e-6  # small init: attention is near uniform
    cos, _ = GPT(GPTConfig(**SMALL, pos="rope", rope_theta=100.0)).rope_for(8)
    hs = 8  # n_embd / n_head; the slowest pair turns by 100 ** (-(hs - 2) / hs) radians a step
    np.testing.assert_allclose(host(cos)[1, hs // 2 - 1], np.cos(100.0 ** (-(hs - 2) / hs)), rtol=1e-6)


# ------------------------------------------------------------------ train.no_decay
def _decayed(opt):
    return {n for n, d in zip(opt.names, opt._decay) if d}


def _step_with_zero_grads(opt, model):
    for p in model.parameters():
        p.grad = dev(np.zeros(p.shape, np.float32))
    opt.step()


def test_default_rule_decays_matrices_only_and_groups_equal_the_plain_list():
    a, b = GPT(GPTConfig(**SMALL), seed=1), GPT(GPTConfig(**SMALL), seed=1)
    plain = AdamW(a.named_parameters(), lr=0.1, weight_decay=0.5)
    grouped = AdamW(param_groups(b.named_parameters()), lr=0.1, weight_decay=0.5)
    assert plain.names == grouped.names  # the model's order: state and checkpoints laid out alike
    assert _decayed(grouped) == {n for n, p in b.named_parameters() if p.data.ndim >= 2}
    rng = np.random.default_rng(0)
    for _ in range(2):
        for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            p.grad = dev(rng.standard_normal(p.shape).astype(np.float32))
            q.grad = p.grad.copy()
        plain.step()
        grouped.step()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(host(p.data), host(q.data), err_msg=n)


@pytest.mark.parametrize("opt_cls", [AdamW, SGD])
def test_no_decay_patterns_spare_exactly_the_named_parameters(opt_cls):
    model = GPT(GPTConfig(**SMALL), seed=2)
    before = {n: host(p.data).copy() for n, p in model.named_parameters()}
    groups = param_groups(model.named_parameters(), "ndim<2, transformer.wte.weight, *.c_proj.*")
    opt = opt_cls(groups, lr=0.1, weight_decay=0.5)
    _step_with_zero_grads(opt, model)  # zero gradients: only decay can move a weight
    for n, p in model.named_parameters():
        spared = p.data.ndim < 2 or n == "transformer.wte.weight" or ".c_proj." in n
        want = before[n] if spared else before[n] * np.float32(1 - 0.1 * 0.5)
        np.testing.assert_allclose(host(p.data), want, rtol=1e-6, err_msg=n)
    everything = AdamW(param_groups(model.named_parameters(), ""), lr=0.1)
    assert _decayed(everything) == set(everything.names)


def test_the_engine_builds_its_optimizer_with_train_no_decay_and_zero_adamw_follows_the_groups():
    model_cfg = GPTConfig(**SMALL)
    cfg = Config(model=model_cfg, train=TrainConfig(no_decay="ndim<2,transformer.wte.weight"))
    model = GPT(model_cfg, seed=0)
    named = list(model.named_parameters())
    opt = build_engine(cfg, model, SerialComm()).make_optimizer(cfg.train)
    assert dict(zip(opt.names, opt._decay)) == {n: p.data.ndim >= 2 and n != "transformer.wte.weight"
                                                for n, p in named}
    one = list(GPT(model_cfg, seed=0).named_parameters())
    ref = list(GPT(model_cfg, seed=0).named_parameters())
    z = ZeroAdamW(param_groups(one, "ndim<2,*.c_fc.weight"), SerialComm(), lr=0.1, weight_decay=0.5)
    a = AdamW(param_groups(ref, "ndim<2,*.c_fc.weight"), lr=0.1, weight_decay=0.5)
    for (_, p), (_, q) in zip(one, ref):
        p.grad = dev(np.full(p.shape, 0.01, np.float32))
        q.grad = p.grad.copy()
    z.step()
    a.step()
    for (n, p), (_, q) in zip(one, ref):
        np.testing.assert_array_equal(host(p.data), host(q.data), err_msg=n)


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_zero_optimizers_decay_each_piece_as_train_no_decay_says(zero):
    """ZeRO-2/3 hold flat pieces of parameters (all 1-D): the rule applies to the parameter a piece
    comes from (its name and shape), not to the piece."""
    from minillm.amp import make_precision
    from minillm.distributed.zero import ZeroSync
    from minillm.distributed.zero2 import Zero2Sync
    from minillm.distributed.zero3 import Zero3Sync
    model = GPT(GPTConfig(**SMALL), seed=0)
    named = list(model.named_parameters())
    sync = {1: lambda: ZeroSync(named, SerialComm()), 2: lambda: Zero2Sync(named, SerialComm()),
            3: lambda: Zero3Sync(model, named, SerialComm())}[zero]()
    t = TrainConfig(no_decay="ndim<2,transformer.wte.weight")
    opt = sync.make_optimizer(t, make_precision(t, sync.owned(named)).master_params)
    want = {n: p.data.ndim >= 2 and n != "transformer.wte.weight" for n, p in named}
    got = {name.split("[")[0]: d for name, d in zip(opt.names, opt._decay)}
    assert got == want and any(want.values()) and not all(want.values())


def test_a_run_with_a_pattern_matching_nothing_stops_before_training(char_data, tmp_path):
    from minillm.train.trainer import train
    cfg = load_config(None, [f"--data.dir={char_data}", f"--train.out_dir={tmp_path}", "--model.n_layer=1",
                             "--train.no_decay=ndim<2,*.c_atn.weight"])
    with pytest.raises(ConfigError, match=r"pattern '\*\.c_atn\.weight' matches no parameter"):
        train(cfg, log=lambda msg: None)
    assert not list(tmp_path.glob("ckpt_*"))


def test_a_pattern_matching_nothing_is_an_error():
    model = GPT(GPTConfig(**SMALL), seed=0)
    with pytest.raises(ConfigError, match=r"train\.no_decay: pattern 'transformer\.wtee\.weight'"):
        param_groups(model.named_parameters(), "ndim<2,transformer.wtee.weight")
    assert param_groups(model.named_parameters(), "nothing.here", strict=False)  # a pipeline stage
