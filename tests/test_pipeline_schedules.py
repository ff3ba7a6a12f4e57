"""Schedules past 1F1B, in one process: interleaved 1F1B and ZB-H1 step lists checked step by step
and against the bubble formulas in the simulator, and the split backward (B now, W later) of the
autograd engine that ZB-H1 runs on. The real multi-rank runs are in test_pipeline.py."""
import numpy as np
import pytest

from minillm import Tensor, backend
from minillm.autograd.tensor import DeferredWeightGrads
from minillm.distributed.pipeline_schedule import (bubble_of, bubble_theory, idle_of,
                                                   interleaved_1f1b, peak_live_theory, schedule,
                                                   simulate, zb_h1)
from minillm.model import GPT, GPTConfig


def _check_steps(steps, m, v, split):
    """Every (micro, chunk) has one F, one B (and one W when split), each after what it needs on
    this stage; forwards of a chunk run in micro-batch order."""
    kinds = "FBW" if split else "FB"
    want = sorted((k, i, c) for k in kinds for i in range(m) for c in range(v))
    assert sorted(steps) == want
    pos = {s: n for n, s in enumerate(steps)}
    for i in range(m):
        for c in range(v):
            assert pos["F", i, c] < pos["B", i, c]
            if split:
                assert pos["B", i, c] < pos["W", i, c]
    for c in range(v):
        assert [i for k, i, cc in steps if k == "F" and cc == c] == list(range(m))


def _peak_unbackwarded(steps):
    live = peak = 0
    for k, _, _ in steps:
        live += {"F": 1, "B": -1, "W": 0}[k]
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("p, m, v", [(2, 2, 2), (2, 4, 2), (2, 6, 3), (4, 4, 2), (4, 8, 2), (3, 6, 4)])
def test_interleaved_steps_and_bubble(p, m, v):
    for s in range(p):
        steps = schedule("1f1b", p, s, m, v)
        assert steps == interleaved_1f1b(p, s, m, v)
        _check_steps(steps, m, v, split=False)
        assert _peak_unbackwarded(steps) / v == peak_live_theory("1f1b", p, s, m, v)
    for t_f, t_b in ((1.0, 2.0), (1.0, 1.0)):  # the formula holds whatever the costs
        assert bubble_of(simulate("1f1b", p, m, t_f, t_b, v=v)) == pytest.approx(bubble_theory(p, m, v))
    # v chunks shrink the bubble v times in time units
    assert idle_of(simulate("1f1b", p, m, v=v)) == pytest.approx(idle_of(simulate("1f1b", p, m)) / v)


@pytest.mark.parametrize("p, m", [(2, 2), (2, 5), (3, 3), (3, 7), (4, 4), (4, 8), (4, 9)])
def test_zb_h1_steps_bubble_and_memory(p, m):
    for s in range(p):
        steps = schedule("zb-h1", p, s, m)
        assert steps == zb_h1(p, s, m)
        _check_steps(steps, m, 1, split=True)
        # activations not yet back-propagated: never more than 1F1B's p - s (W work waits extra)
        assert _peak_unbackwarded(steps) == peak_live_theory("zb-h1", p, s, m) == min(p - s, m)
    zb = simulate("zb-h1", p, m, t_f=1.0, t_b=2.0, t_w=1.0)
    ff = simulate("1f1b", p, m, t_f=1.0, t_b=2.0)
    assert bubble_of(zb) == pytest.approx(bubble_theory(p, m, name="zb-h1"))
    # F = B = W = 1: 1F1B idles 3(p-1) units per stage, ZB-H1 p-1: a third
    assert idle_of(ff) == pytest.approx(3 * (p - 1)) and idle_of(zb) == pytest.approx(p - 1)


def test_schedules_that_need_enough_micro_batches():
    with pytest.raises(ValueError, match="at least as many micro-batches"):
        zb_h1(4, 0, 3)
    with pytest.raises(ValueError, match="multiple of the pipeline stages"):
        interleaved_1f1b(4, 0, 6, 2)
    with pytest.raises(ValueError, match="interleave"):
        schedule("gpipe", 2, 0, 4, v=2)


# ---------------------------------------------------------------- the split backward -----------
def _model_and_batch():
    cfg = GPTConfig(vocab_size=23, block_size=8, n_layer=2, n_head=2, n_embd=16)
    rng = np.random.default_rng(0)
    x, y = (backend.asarray(rng.integers(0, 23, (4, 8))) for _ in range(2))
    return GPT(cfg, seed=0), GPT(cfg, seed=0), x, y


def test_split_backward_gives_the_same_gradients_later():
    full, split, x, y = _model_and_batch()
    _, loss = full(x, y)
    loss.backward()
    _, loss = split(x, y)
    fired = []
    for n, p in split.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, n=n: fired.append(n))
    queue = DeferredWeightGrads()
    loss.backward(defer=queue)
    linear_weights = [n for n, _ in split.named_parameters()
                      if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))]
    assert len(queue) == 4 * 2 + 1  # four Linears a block, and the (tied) output head
    assert queue.nbytes > 0
    for n in linear_weights:  # B left them for W: no gradient yet, their hook has not fired
        assert dict(split.named_parameters())[n].grad is None and n not in fired
    assert "transformer.ln_f.weight" in fired  # non-splitting ops finish in B
    queue.run()
    assert len(queue) == 0 and sorted(fired) == sorted(n for n, _ in split.named_parameters())
    for (n, a), (_, b) in zip(full.named_parameters(), split.named_parameters()):
        np.testing.assert_array_equal(backend.to_numpy(a.grad), backend.to_numpy(b.grad), err_msg=n)


def test_a_weight_made_by_other_ops_is_not_deferred():
    """Only leaf weights wait: a weight computed from others must pass its gradient on at once."""
    import minillm.functional as F
    rng = np.random.default_rng(1)
    x = Tensor(backend.asarray(rng.standard_normal((3, 4))), requires_grad=True)
    w0 = Tensor(backend.asarray(rng.standard_normal((5, 4))), requires_grad=True)
    w = w0 * 2.0                                       # not a leaf
    queue = DeferredWeightGrads()
    F.linear(x, w).sum().backward(defer=queue)
    assert len(queue) == 0 and w0.grad is not None
    np.testing.assert_allclose(backend.to_numpy(w0.grad), 2.0 * np.ones((3, 5)).T @ backend.to_numpy(x.data))
