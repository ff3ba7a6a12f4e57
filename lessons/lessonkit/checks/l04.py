"""Checks of lesson 04 (the Transformer): against minillm's fused attention and GPT."""
import numpy as np

from lessonkit.exercise import exercise
from lessonkit.verify import assert_close
from minillm import Tensor, no_grad
from minillm.functional import scaled_dot_product_attention
from minillm.model import GPT, GPTConfig


@exercise("04.causal_mask", broken=lambda T: np.triu(np.ones((T, T), dtype=bool)))
def check_causal_mask(causal_mask):
    for T in (1, 2, 5):
        got = np.asarray(causal_mask(T))
        assert_close(got.astype(bool), np.tril(np.ones((T, T), dtype=bool)), f"causal_mask({T})",
                     hint="row i is query position i, column j key position j; it may see j <= i")


def _unscaled(q, k, v):  # a plausible slip: forgets the 1/sqrt(hs)
    T = q.shape[0]
    s = np.where(np.tril(np.ones((T, T), dtype=bool)), q @ k.T, -np.inf)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True) @ v


@exercise("04.attention_head", broken=_unscaled)
def check_attention_head(attention_head):
    rng = np.random.default_rng(0)
    for T, hs in ((1, 4), (6, 8)):
        q, k, v = (rng.standard_normal((T, hs)) for _ in range(3))
        with no_grad():
            want = scaled_dot_product_attention(*(Tensor(a[None, None]) for a in (q, k, v)))
        assert_close(attention_head(q, k, v), want.numpy()[0, 0],
                     f"attention_head for T={T}, hs={hs} (against minillm's fused attention)",
                     hint="scores q k^T / sqrt(hs); -inf above the diagonal; softmax over each row "
                          "(subtract the row max first); then times v")


def _untied(cfg):  # a plausible slip: counts lm_head as a separate V x C matrix
    V, T, C, L = cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_layer
    return 2 * V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C


@exercise("04.param_count", broken=_untied)
def check_param_count(param_count):
    for V, T, L, nh, C in ((65, 16, 1, 2, 8), (103, 64, 4, 4, 128), (1000, 128, 3, 6, 96)):
        cfg = GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=nh, n_embd=C)
        want = GPT(cfg, seed=0).num_parameters()
        got = param_count(cfg)
        assert got == want, (f"param_count for V={V}, T={T}, L={L}, C={C}: {got:,}, but the model "
                             f"has {want:,} ({got - want:+,}). Hint: per layer two norms (weight and "
                             "bias), c_attn, c_proj, the MLP's two Linears, all with biases; plus "
                             "wte, wpe and ln_f; lm_head shares wte's matrix")

