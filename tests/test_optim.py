"""Tests for minillm.optim: AdamW and SGD against hand-computed values, LR schedules at key steps,
gradient clipping, state-dict round trips that resume bit for bit, and error messages."""
import math
import tracemalloc
from dataclasses import dataclass

import numpy as np
import pytest

from minillm import backend
from minillm.errors import ConfigError, UserError
from minillm.optim import (SCHEDULES, SGD, AdamW, clip_grad_norm, constant_lr, cosine_lr,
                           get_lr, global_grad_norm, inv_sqrt_lr, wsd_lr)
from minillm.optim.adamw import _reference_step


class P:
    """Stand-in for nn.Parameter: ``.data`` and ``.grad``."""

    def __init__(self, data, grad=None):
        self.data = data
        self.grad = grad


def arr(x, dtype=np.float64):
    return backend.asarray(np.asarray(x, dtype=dtype))


def host(a):
    return backend.to_numpy(a)


W0 = [[0.5, -1.0], [2.0, 0.25]]
B0 = [0.1, -0.2]
GW = [[[0.3, -0.2], [0.05, 1.0]], [[-0.1, 0.4], [0.2, -0.5]], [[0.7, 0.1], [-0.3, 0.2]]]
GB = [[0.5, -0.05], [0.2, 0.1], [-0.4, 0.3]]


# ---- AdamW ------------------------------------------------------------------------------

def test_adamw_three_steps_match_float64_formula():
    lr, (b1, b2), eps, wd = 0.01, (0.9, 0.95), 1e-8, 0.1
    w, b = P(arr(W0)), P(arr(B0))
    opt = AdamW([("w", w), ("b", b)], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    # The formula, written out here independently of the library.
    ref = {"w": [np.array(W0), 0.0, 0.0], "b": [np.array(B0), 0.0, 0.0]}
    for t in range(1, 4):
        w.grad, b.grad = arr(GW[t - 1]), arr(GB[t - 1])
        opt.step()
        for name, g, decay in (("w", np.array(GW[t - 1]), True), ("b", np.array(GB[t - 1]), False)):
            p, m, v = ref[name]
            if decay:
                p = p - lr * wd * p
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g ** 2
            p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
            ref[name] = [p, m, v]
        np.testing.assert_allclose(host(w.data), ref["w"][0], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(host(b.data), ref["b"][0], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(host(opt.state["w"]["m"]), ref["w"][1], rtol=1e-13)
        np.testing.assert_allclose(host(opt.state["b"]["v"]), ref["b"][2], rtol=1e-13)
    assert opt.step_count == 3


def test_adamw_first_step_is_lr_times_sign():
    # At t=1 bias correction makes m_hat = g and v_hat = g^2: the step is lr * g / (|g| + eps).
    g = np.array([[0.3, -2.0], [1e-3, -5.0]])
    w = P(arr(W0), arr(g))
    AdamW([w], lr=0.1, eps=1e-8).step()
    np.testing.assert_allclose(host(w.data), np.array(W0) - 0.1 * g / (np.abs(g) + 1e-8), rtol=1e-14)


def test_adamw_matches_reference_step_and_decays_matrices_only():
    w, b = P(arr(W0)), P(arr(B0))
    opt = AdamW([w, b], lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.3)
    refs = [(np.array(W0), 0.0, 0.0, True), (np.array(B0), 0.0, 0.0, False)]
    for t in range(1, 4):
        w.grad, b.grad = arr(GW[t - 1]), arr(GB[t - 1])
        opt.step()
        refs = [(*_reference_step(p, g, m, v, t, 0.05, (0.8, 0.99), 1e-6, 0.3, decay), decay)
                for (p, m, v, decay), g in zip(refs, (np.array(GW[t - 1]), np.array(GB[t - 1])))]
    np.testing.assert_allclose(host(w.data), refs[0][0], rtol=1e-13)
    np.testing.assert_allclose(host(b.data), refs[1][0], rtol=1e-13)


def test_weight_decay_only_on_ndim_ge_2():
    # Zero gradients: the Adam part of the update is 0 / (0 + eps) = 0, so only decay moves p.
    w, b, gain = P(arr(W0), arr(np.zeros((2, 2)))), P(arr(B0), arr(np.zeros(2))), P(arr([1.5]), arr([0.0]))
    AdamW([w, b, gain], lr=0.1, weight_decay=0.5).step()
    np.testing.assert_array_equal(host(w.data), np.array(W0) * (1 - 0.1 * 0.5))
    np.testing.assert_array_equal(host(b.data), np.array(B0))
    np.testing.assert_array_equal(host(gain.data), [1.5])


def test_adamw_float32_in_place_no_allocations():
    rng = np.random.default_rng(0)
    ps = [P(arr(rng.standard_normal((256, 200)), np.float32)), P(arr(rng.standard_normal(200), np.float32))]
    for p in ps:
        p.grad = arr(rng.standard_normal(p.data.shape), np.float32)
    before = [host(p.data).astype(np.float64) for p in ps]
    grads = [host(p.grad).copy() for p in ps]
    ids = [id(p.data) for p in ps]
    opt = AdamW(ps, lr=1e-2, weight_decay=0.1)
    opt.step()
    for p, p0, g in zip(ps, before, grads):
        assert p.data.dtype == np.float32 and opt.state[opt.names[ps.index(p)]]["m"].dtype == np.float32
        np.testing.assert_array_equal(host(p.grad), g)  # gradients are not modified
        ref, _, _ = _reference_step(p0, g.astype(np.float64), 0.0, 0.0, 1, 1e-2, (0.9, 0.999), 1e-8,
                                    0.1, p.data.ndim >= 2)
        np.testing.assert_allclose(host(p.data), ref, rtol=1e-5, atol=1e-6)
    assert [id(p.data) for p in ps] == ids
    if not backend.is_gpu():  # tracemalloc sees host memory only
        tracemalloc.start()
        opt.step()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 16_000, f"a step allocated {peak} bytes (a parameter is {256 * 200 * 4})"


def test_none_grads_are_skipped():
    w, b = P(arr(W0), arr(GW[0])), P(arr(B0), None)
    opt = AdamW({"w": w, "b": b}, lr=0.1, weight_decay=0.1)
    opt.step()
    np.testing.assert_array_equal(host(b.data), B0)
    assert not host(opt.state["b"]["m"]).any() and not host(opt.state["b"]["v"]).any()
    assert not np.allclose(host(w.data), W0)
    opt.zero_grad()
    assert w.grad is None and b.grad is None
    w_before = host(w.data).copy()
    opt.step()  # nothing has a gradient: nothing moves
    np.testing.assert_array_equal(host(w.data), w_before)


def test_step_lr_overrides_and_is_remembered():
    w = P(arr([[1.0]]), arr([[1.0]]))
    opt = AdamW([w], lr=1.0)
    opt.step(lr=0.25)
    assert opt.lr == 0.25 and opt.state_dict()["lr"] == 0.25
    np.testing.assert_allclose(host(w.data), [[1.0 - 0.25]], rtol=1e-7)


@pytest.mark.cpu_only
def test_adamw_matches_torch():
    torch = pytest.importorskip("torch")
    tw = torch.tensor(W0, dtype=torch.float64, requires_grad=True)
    tb = torch.tensor(B0, dtype=torch.float64, requires_grad=True)
    topt = torch.optim.AdamW([{"params": [tw], "weight_decay": 0.1}, {"params": [tb], "weight_decay": 0.0}],
                             lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    w, b = P(arr(W0)), P(arr(B0))
    opt = AdamW([w, b], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for t in range(3):
        tw.grad, tb.grad = torch.tensor(GW[t], dtype=torch.float64), torch.tensor(GB[t], dtype=torch.float64)
        w.grad, b.grad = arr(GW[t]), arr(GB[t])
        topt.step()
        opt.step()
    np.testing.assert_allclose(host(w.data), tw.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(host(b.data), tb.detach().numpy(), rtol=1e-12)


# ---- SGD --------------------------------------------------------------------------------

def _run_sgd(grads, **kw):
    v, m = P(arr([1.0])), P(arr([[1.0]]))  # a vector (never decayed) and a 1x1 matrix
    opt = SGD([v, m], **kw)
    for g in grads:
        v.grad, m.grad = arr([g]), arr([[g]])
        opt.step()
    return host(v.data)[0], host(m.data)[0, 0]


def test_sgd_hand_values():
    # plain: 1 - 0.1*1 - 0.1*2
    assert _run_sgd([1.0, 2.0], lr=0.1) == pytest.approx((0.7, 0.7), abs=1e-15)
    # momentum 0.9: b=1, p=0.9; b=0.9*1+2=2.9, p=0.9-0.29=0.61
    assert _run_sgd([1.0, 2.0], lr=0.1, momentum=0.9)[0] == pytest.approx(0.61, abs=1e-15)
    # nesterov: b=1, g=1+0.9*1=1.9, p=0.81; b=2.9, g=2+0.9*2.9=4.61, p=0.81-0.461=0.349
    assert _run_sgd([1.0, 2.0], lr=0.1, momentum=0.9, nesterov=True)[0] == pytest.approx(0.349, abs=1e-15)
    # weight decay 0.5 (matrix only) with momentum: g=1.5, b=1.5, p=0.85;
    # g=2+0.5*0.85=2.425, b=0.9*1.5+2.425=3.775, p=0.85-0.3775=0.4725
    vec, mat = _run_sgd([1.0, 2.0], lr=0.1, momentum=0.9, weight_decay=0.5)
    assert (vec, mat) == pytest.approx((0.61, 0.4725), abs=1e-15)
    # nesterov + decay: g=1.5, b=1.5, g'=1.5+1.35=2.85, p=0.715;
    # g=2+0.3575=2.3575, b=1.35+2.3575=3.7075, g'=2.3575+3.33675=5.69425, p=0.715-0.569425=0.145575
    assert _run_sgd([1.0, 2.0], lr=0.1, momentum=0.9, weight_decay=0.5, nesterov=True)[1] == \
        pytest.approx(0.145575, abs=1e-15)


def test_sgd_errors():
    with pytest.raises(ConfigError, match="momentum"):
        SGD([P(arr([1.0]))], lr=0.1, nesterov=True)
    with pytest.raises(ConfigError, match="lr"):
        SGD([P(arr([1.0]))], lr=-1.0)


# ---- state dicts ------------------------------------------------------------------------

def _make_params(dtype):
    rng = np.random.default_rng(1)
    return [("h.0.w", P(arr(rng.standard_normal((4, 3)), dtype))),
            ("h.0.b", P(arr(rng.standard_normal(4), dtype))),
            ("ln.g", P(arr(np.ones(3), dtype)))]


def _grads(step, dtype):
    rng = np.random.default_rng(100 + step)
    return [arr(rng.standard_normal(s), dtype) for s in ((4, 3), (4,), (3,))]


@pytest.mark.parametrize("make_opt", [
    lambda ps: AdamW(ps, lr=0.01, betas=(0.9, 0.95), weight_decay=0.1),
    lambda ps: SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=True),
], ids=["adamw", "sgd"])
def test_state_dict_round_trip_is_bit_exact(make_opt):
    dtype = np.float32
    full = _make_params(dtype)
    opt_full = make_opt(full)
    for step in range(6):
        for (_, p), g in zip(full, _grads(step, dtype)):
            p.grad = g
        opt_full.step(lr=opt_full.lr * 0.9)

    first = _make_params(dtype)
    opt1 = make_opt(first)
    for step in range(3):
        for (_, p), g in zip(first, _grads(step, dtype)):
            p.grad = g
        opt1.step(lr=opt1.lr * 0.9)
    sd = opt1.state_dict()
    params_at_save = [(n, host(p.data).copy()) for n, p in first]
    # As if written to and read from HDF5: host NumPy arrays, NumPy scalars.
    saved = {k: (np.asarray(v) if k in ("betas",) else v) for k, v in sd.items() if k != "state"}
    saved["step"] = np.int64(sd["step"])
    saved["state"] = {n: {k: host(a).copy() for k, a in st.items()} for n, st in sd["state"].items()}
    snapshot = {n: {k: host(a).copy() for k, a in st.items()} for n, st in sd["state"].items()}
    opt1.step()  # a state dict is a snapshot: stepping on does not change it
    for n, st in sd["state"].items():
        for k, a in st.items():
            np.testing.assert_array_equal(host(a), snapshot[n][k])

    # A fresh process: parameters as they were saved (copies), a new optimizer, the loaded state.
    replay = [(n, P(arr(snap, dtype))) for n, snap in params_at_save]
    opt2 = make_opt(replay)
    opt2.load_state_dict(saved)
    assert opt2.step_count == 3 and opt2.lr == pytest.approx(sd["lr"])
    for step in range(3, 6):
        for (_, p), g in zip(replay, _grads(step, dtype)):
            p.grad = g
        opt2.step(lr=opt2.lr * 0.9)
    for (_, a), (_, b) in zip(full, replay):
        np.testing.assert_array_equal(host(a.data), host(b.data))
    for n in opt_full.state:
        for k in opt_full.state[n]:
            np.testing.assert_array_equal(host(opt_full.state[n][k]), host(opt2.state[n][k]))


def test_state_dict_names_and_mismatch_errors():
    opt = AdamW(_make_params(np.float64), lr=0.1)
    sd = opt.state_dict()
    assert set(sd) == {"step", "lr", "betas", "eps", "weight_decay", "state"}
    assert list(sd["state"]) == ["h.0.w", "h.0.b", "ln.g"] and set(sd["state"]["h.0.w"]) == {"m", "v"}
    assert list(AdamW([P(arr([1.0])), P(arr([2.0]))]).state_dict()["state"]) == ["0", "1"]

    bad = opt.state_dict()
    del bad["state"]["ln.g"]
    bad["state"]["extra"] = {"m": np.zeros(2), "v": np.zeros(2)}
    bad["state"]["h.0.w"]["m"] = np.zeros((3, 4))
    with pytest.raises(UserError) as e:
        opt.load_state_dict(bad)
    msg = str(e.value)
    assert "\n" not in msg and "ln.g" in msg and "extra" in msg and "(3, 4)" in msg and "h.0.w" in msg
    assert opt.step_count == 0  # nothing changed

    sgd_sd = SGD(_make_params(np.float64), lr=0.1, momentum=0.9).state_dict()
    with pytest.raises(UserError, match="lacks .'betas', 'eps'"):
        opt.load_state_dict(sgd_sd)
    with pytest.raises(UserError, match="momentum_buffer"):
        opt.load_state_dict({**sgd_sd, "betas": (0.9, 0.99), "eps": 1e-8})
    with pytest.raises(UserError, match="lacks"):
        opt.load_state_dict({"state": {}})


def test_construction_errors():
    w = P(arr([[1.0]]))
    with pytest.raises(UserError, match="empty"):
        AdamW([], lr=0.1)
    with pytest.raises(UserError, match="same object"):
        AdamW([("a", w), ("b", w)])
    with pytest.raises(UserError, match="mix"):
        AdamW([("a", w), P(arr([1.0]))])
    with pytest.raises(UserError, match="not a parameter"):
        AdamW([1.0, 2.0])
    with pytest.raises(ConfigError, match="betas"):
        AdamW([w], betas=(0.9, 1.0))


# ---- schedules --------------------------------------------------------------------------

@dataclass
class Sched:
    schedule: str = "cosine"
    lr: float = 1.0
    min_lr: float = 0.1
    warmup_steps: int = 10
    max_steps: int = 110
    decay_frac: float = 0.2


@pytest.mark.parametrize("schedule,step,expected", [
    # warm-up, shared by all: lr * (step + 1) / warmup
    *[(s, 0, 0.1) for s in ("constant", "cosine", "wsd")],
    *[(s, 9, 1.0) for s in ("constant", "cosine", "wsd")],
    *[(s, 10, 1.0) for s in ("constant", "cosine", "wsd")],
    ("constant", 60, 1.0), ("constant", 110, 1.0), ("constant", 500, 1.0),
    # cosine: progress (step - 10) / 100; middle = (lr + min_lr) / 2
    ("cosine", 35, 0.1 + 0.45 * (1 + math.sqrt(0.5))), ("cosine", 60, 0.55),
    ("cosine", 85, 0.1 + 0.45 * (1 - math.sqrt(0.5))), ("cosine", 110, 0.1), ("cosine", 111, 0.1),
    ("cosine", 10**6, 0.1),
    # wsd: decay over the last 0.2 * 110 = 22 steps, from step 88
    ("wsd", 60, 1.0), ("wsd", 88, 1.0), ("wsd", 99, 0.55), ("wsd", 105, 1.0 - 0.9 * 17 / 22),
    ("wsd", 110, 0.1), ("wsd", 500, 0.1),
])
def test_schedules_at_key_steps(schedule, step, expected):
    assert get_lr(step, Sched(schedule=schedule)) == pytest.approx(expected, abs=1e-12)


def test_inv_sqrt_and_functions():
    cfg = Sched(schedule="inv_sqrt", warmup_steps=16)
    assert [get_lr(s, cfg) for s in (0, 15, 16, 64, 1600)] == pytest.approx([1 / 16, 1.0, 1.0, 0.5, 0.1])
    assert inv_sqrt_lr(0, 1.0, 0) == 1.0 and inv_sqrt_lr(4, 1.0, 0) == 0.5
    assert constant_lr(0, 3e-4) == 3e-4
    assert cosine_lr(60, 1.0, 0.1, 10, 110) == pytest.approx(0.55)
    assert wsd_lr(99, 1.0, 0.1, 10, 110, 0.2) == pytest.approx(0.55)
    assert wsd_lr(109, 1.0, 0.0, 0, 110, 0.0) == 1.0 and wsd_lr(110, 1.0, 0.0, 0, 110, 0.0) == 0.0
    assert isinstance(get_lr(3, Sched(lr=1, min_lr=0)), float)


def test_schedule_errors():
    with pytest.raises(ConfigError) as e:
        get_lr(0, Sched(schedule="linear"))
    assert "\n" not in str(e.value) and all(s in str(e.value) for s in SCHEDULES)
    with pytest.raises(ConfigError, match="warmup_steps"):
        get_lr(0, Sched(warmup_steps=-1))
    with pytest.raises(ConfigError, match="decay_frac"):
        get_lr(0, Sched(schedule="wsd", decay_frac=1.5))


def test_short_run_of_a_long_recipe_stays_in_warmup():
    """warmup_steps > max_steps (e.g. --train.max_steps=20 on a recipe with 100 warm-up steps)
    is allowed: every step is a warm-up step, and nothing divides by zero."""
    for name in SCHEDULES:
        cfg = Sched(schedule=name, warmup_steps=200)
        lrs = [get_lr(s, cfg) for s in range(cfg.max_steps + 1)]
        assert lrs == pytest.approx([cfg.lr * (s + 1) / 200 for s in range(cfg.max_steps + 1)])
    # a wsd decay that would start inside warm-up starts when warm-up ends
    cfg = Sched(schedule="wsd", decay_frac=0.95)
    after = [get_lr(s, cfg) for s in range(cfg.warmup_steps, cfg.max_steps)]
    assert all(a > b for a, b in zip(after, after[1:])) and after[0] <= cfg.lr


# ---- clipping ---------------------------------------------------------------------------

def test_clip_scales_when_above_and_returns_norm_before():
    a, b, c = P(arr([0.0, 0.0]), arr([3.0, 4.0])), P(arr([[0.0]]), arr([[12.0]])), P(arr([1.0]))
    norm = clip_grad_norm([a, b, c], max_norm=6.5)
    assert norm == pytest.approx(13.0, abs=1e-12)
    scale = 6.5 / (13.0 + 1e-6)
    np.testing.assert_allclose(host(a.grad), [3 * scale, 4 * scale], rtol=1e-15)
    np.testing.assert_allclose(host(b.grad), [[12 * scale]], rtol=1e-15)
    assert global_grad_norm([a, b, c]) == pytest.approx(6.5, abs=1e-5)
    assert c.grad is None


def test_clip_below_threshold_or_disabled_leaves_grads():
    for max_norm in (20.0, 13.0, 0.0, -1.0):
        g = arr([3.0, 4.0, 12.0])
        p = P(arr([0.0, 0.0, 0.0]), g)
        assert clip_grad_norm([("p", p)], max_norm) == pytest.approx(13.0, abs=1e-12)
        assert p.grad is g
        np.testing.assert_array_equal(host(g), [3.0, 4.0, 12.0])


def test_clip_reduce_dedup_nonfinite_and_empty():
    p = P(arr([0.0, 0.0]), arr([3.0, 4.0]))
    assert global_grad_norm([p, p]) == pytest.approx(5.0)  # one object counted once
    assert global_grad_norm([p], reduce=lambda s: 4 * s) == pytest.approx(10.0)
    assert clip_grad_norm([P(arr([1.0]))], 1.0) == 0.0
    q = P(arr([0.0, 0.0]), arr([np.inf, 1.0]))
    assert math.isinf(clip_grad_norm([q], 1.0))
    np.testing.assert_array_equal(host(q.grad), [np.inf, 1.0])


def test_grad_norm_accuracy_float32_and_float16():
    if backend.is_gpu() and hasattr(backend.array_module(), "_fake"):
        pytest.skip("cuBLAS sums a dot product in a tree (accurate at any length), the fake CuPy's "
                    "NumPy dot does not: checked on the CPU and on a real GPU")
    rng = np.random.default_rng(0)
    # 2^22 + 1 values: one float32 dot product over all of them drifts by ~1e-5; chunks do not.
    g = rng.random(2**22 + 1, dtype=np.float32)
    exact = math.sqrt(float(np.dot(g.astype(np.float64), g.astype(np.float64))))
    assert global_grad_norm([P(arr(g, np.float32), arr(g, np.float32))]) == pytest.approx(exact, rel=1e-7)
    ones = arr(np.ones(70_000), np.float16)  # the sum of squares, 70000, overflows float16
    assert global_grad_norm([P(ones, ones)]) == pytest.approx(math.sqrt(70_000), rel=1e-7)
