"""Attention with a boolean mask: float64 gradchecks against a NumPy reference for random masks,
fully masked rows (zero output, zero gradient, no NaN), the fused causal path untouched, and
document masking of packed sequences in the model (a packed row equals its documents run alone)."""
import math
import zlib

import numpy as np
import pytest

import minillm.functional as F
from minillm import backend
from minillm.autograd import fused
from minillm.autograd.gradcheck import gradcheck
from minillm.autograd.tensor import Tensor, no_grad
from minillm.model import GPT, GPTConfig, document_mask


def np_masked_attention(q, k, v, mask, causal):
    """softmax over the allowed keys only, in float64; a row with no allowed key gives zeros."""
    tq, tk = q.shape[-2], k.shape[-2]
    allowed = np.broadcast_to(mask, q.shape[:-1] + (tk,)) if mask is not None \
        else np.ones(q.shape[:-1] + (tk,), bool)
    if causal:
        allowed = allowed & ~(np.arange(tk)[None, :] > np.arange(tq)[:, None] + (tk - tq))
    att = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
    att = np.where(allowed, att, -np.inf)
    top = att.max(axis=-1, keepdims=True)
    w = np.exp(att - np.where(np.isfinite(top), top, 0.0))
    w = w / np.maximum(w.sum(axis=-1, keepdims=True), 1e-300)
    return w @ v


CASES = [  # q, k shapes, mask shape, causal
    ((2, 2, 4, 3), (2, 2, 4, 3), (2, 1, 4, 4), True),    # per-row mask broadcast over heads
    ((2, 2, 4, 3), (2, 2, 4, 3), (2, 2, 4, 4), False),   # a full mask, no causal part
    ((1, 2, 2, 3), (1, 2, 5, 3), (5,), True),            # Tq < Tk (KV cache) and a key-only mask
    ((2, 1, 3, 2), (2, 1, 3, 2), None, False),           # plain bidirectional attention
]


@pytest.mark.parametrize("qs,ks,ms,causal", CASES)
def test_masked_attention_matches_float64_reference(qs, ks, ms, causal):
    rng = np.random.default_rng(zlib.crc32(repr((qs, ks, ms, causal)).encode()))
    q, k, v = rng.standard_normal(qs), rng.standard_normal(ks), rng.standard_normal(ks)
    mask = None if ms is None else rng.random(ms) < 0.6
    fn = lambda a, b, c: F.scaled_dot_product_attention(  # noqa: E731
        a, b, c, is_causal=causal, attn_mask=None if mask is None else backend.asarray(mask))
    inputs = [Tensor(backend.asarray(x.copy()), requires_grad=True) for x in (q, k, v)]
    result = gradcheck(fn, inputs)
    assert result.ok, result
    got = fn(*(Tensor(backend.asarray(x)) for x in (q, k, v))).numpy()
    np.testing.assert_allclose(got, np_masked_attention(q, k, v, mask, causal), rtol=1e-10, atol=1e-12)


def test_fully_masked_rows_give_zero_output_and_zero_gradient():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 2, 4, 3)) for _ in range(3))
    mask = rng.random((2, 1, 4, 4)) < 0.7
    mask[0, :, 1, :] = False           # query 1 of row 0 may see nothing
    mask[1, :, :, :] = False           # row 1 sees nothing at all (a padding-only row)
    mask[1, :, 3, 0] = True            # ... except one query, one key
    fn = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=backend.asarray(mask))  # noqa: E731
    inputs = [Tensor(backend.asarray(x.copy()), requires_grad=True) for x in (q, k, v)]
    out = fn(*inputs)
    out.backward(backend.asarray(rng.standard_normal(out.shape)))
    y = out.numpy()
    assert np.isfinite(y).all() and all(np.isfinite(backend.to_numpy(t.grad)).all() for t in inputs)
    assert (y[0, :, 1] == 0).all() and (y[1, :, :3] == 0).all()
    np.testing.assert_allclose(y[1, :, 3], np.broadcast_to(v[1, :, 0], y[1, :, 3].shape))  # one key: its value
    gq = backend.to_numpy(inputs[0].grad)
    assert (gq[0, :, 1] == 0).all() and (gq[1, :, :3] == 0).all()   # dead queries get no gradient
    gv = backend.to_numpy(inputs[2].grad)
    assert (gv[1, :, 1:] == 0).all()   # keys nobody attends to get no gradient either
    assert gradcheck(fn, [Tensor(backend.asarray(x.copy()), requires_grad=True) for x in (q, k, v)]).ok


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_all_true_mask_equals_the_fused_causal_path_bit_for_bit(dtype):
    rng = np.random.default_rng(1)
    q, k, v = (backend.asarray(rng.standard_normal((2, 3, 5, 4)).astype(dtype)) for _ in range(3))
    ones = backend.asarray(np.ones((2, 1, 5, 5), bool))
    a = fused.CausalAttention.apply(q, k, v)
    b = F.scaled_dot_product_attention(q, k, v, attn_mask=ones)
    assert a.dtype == b.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    qt, kt, vt = (Tensor(x, requires_grad=True) for x in (q, k, v))
    assert F.scaled_dot_product_attention(qt, kt, vt)._ctx.fn is fused.CausalAttention


@pytest.mark.parametrize("mask,msg", [(np.ones((4, 4), np.int64), "boolean"),
                                      (np.ones((3, 4), bool), "does not broadcast")])
def test_bad_masks_are_named(mask, msg):
    q = Tensor(backend.asarray(np.zeros((1, 1, 4, 2))))
    with pytest.raises(ValueError, match=msg):
        F.scaled_dot_product_attention(q, q, q, attn_mask=backend.asarray(mask))


def test_document_mask_of_packed_sequences():
    ids = np.array([[0, 0, 1, 1, 1, 2]])
    m = backend.to_numpy(document_mask(ids))
    assert m.shape == (1, 1, 6, 6)
    np.testing.assert_array_equal(m[0, 0], ids[0][:, None] == ids[0][None, :])


def test_packed_row_with_document_mask_equals_documents_run_alone():
    # With rotary positions attention depends only on relative positions, so a document packed
    # after another, masked from it, must give the logits it gets on its own.
    cfg = GPTConfig(vocab_size=11, block_size=12, n_layer=2, n_head=2, n_embd=16, pos="rope")
    model = GPT(cfg, seed=3).eval()
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 11, 5), rng.integers(0, 11, 7)
    doc = np.array([[0] * 5 + [1] * 7])
    with no_grad():
        packed = model(np.concatenate([a, b])[None], attn_mask=document_mask(doc))[0].numpy()
        alone_a = model(a[None])[0].numpy()
        alone_b = model(b[None])[0].numpy()
        unmasked = model(np.concatenate([a, b])[None])[0].numpy()
    np.testing.assert_allclose(packed[0, :5], alone_a[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[0, 5:], alone_b[0], rtol=1e-4, atol=1e-5)
    assert np.abs(unmasked[0, 5:] - alone_b[0]).max() > 1e-3   # without the mask b sees a
