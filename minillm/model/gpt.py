"""GPT: the model (GPT-2 style, with Llama-style options); its config is in model/config.py."""
import math

import numpy  # host-side: initial values and sampling use explicit numpy Generators

import minillm.functional as F
from minillm import backend
from minillm.autograd.tensor import Tensor, no_grad
from minillm.backend import xp
from minillm.errors import ConfigError
from minillm.model.config import GPTConfig
from minillm.model.vocab import mask_padded_logits
from minillm.nn import Dropout, Embedding, LayerNorm, Linear, Module, ModuleList, RMSNorm
from minillm.nn.layers import SampleDropoutRNG


def _norm(config):
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd)
    return LayerNorm(config.n_embd, bias=config.bias)


def rope_tables(head_size, positions, base=10000.0, dtype="float32"):
    """cos and sin tables (T, hs) for the given positions (halves layout)."""
    inv_freq = 1.0 / (base ** (numpy.arange(0, head_size, 2) / head_size))   # (hs/2,)
    angles = numpy.outer(positions, inv_freq)                                   # (T, hs/2)
    angles = numpy.concatenate([angles, angles], axis=1)                        # (T, hs)
    return (backend.asarray(numpy.cos(angles).astype(dtype)),
            backend.asarray(numpy.sin(angles).astype(dtype)))


class KVCache:
    """Keys and values of the tokens seen so far, per layer, so sampling never recomputes them."""

    def __init__(self, n_layer):
        self.k = [None] * n_layer
        self.v = [None] * n_layer

    @property
    def length(self):
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, layer, k, v):
        """Append this step's k, v (B, nh, T, hs) and return all of them."""
        if self.k[layer] is not None:
            k = xp.concatenate([self.k[layer], k], axis=2)                      # (B, nh, T_all, hs)
            v = xp.concatenate([self.v[layer], v], axis=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


class CausalSelfAttention(Module):
    def __init__(self, config, rng):
        super().__init__()
        C = config.n_embd
        resid_std = 0.02 / math.sqrt(2 * config.n_layer)
        self.c_attn = Linear(C, 3 * C, bias=config.bias, rng=rng, std=0.02)
        self.c_proj = Linear(C, C, bias=config.bias, rng=rng, std=resid_std)
        self.n_head, self.rope = config.n_head, config.pos == "rope"

    def forward(self, x, rope=None, cache=None, layer=0):
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        qkv = self.c_attn(x)                                                    # (B, T, 3C)
        qkv = qkv.reshape(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)               # (3, B, nh, T, hs)
        q, k, v = qkv[0], qkv[1], qkv[2]                                        # (B, nh, T, hs) each
        if rope is not None:
            q, k = F.rope(q, *rope), F.rope(k, *rope)
        if cache is not None:  # sampling: no graph, extend the cache
            k_all, v_all = cache.update(layer, k.data, v.data)
            k, v = Tensor(k_all, _check=False), Tensor(v_all, _check=False)
        y = F.scaled_dot_product_attention(q, k, v)                             # (B, nh, T, hs)
        y = y.permute(0, 2, 1, 3).reshape(B, T, C)                              # (B, T, C)
        return self.c_proj(y)


class MLP(Module):
    def __init__(self, config, rng):
        super().__init__()
        C, H = config.n_embd, config.mlp_hidden
        resid_std = 0.02 / math.sqrt(2 * config.n_layer)
        self.swiglu = config.mlp == "swiglu"
        self.c_fc = Linear(C, H, bias=config.bias, rng=rng, std=0.02)
        if self.swiglu:
            self.c_gate = Linear(C, H, bias=config.bias, rng=rng, std=0.02)
        self.c_proj = Linear(H, C, bias=config.bias, rng=rng, std=resid_std)

    def forward(self, x):
        if self.swiglu:
            return self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x))          # (B, T, C)
        return self.c_proj(F.gelu(self.c_fc(x)))                                # (B, T, C)


class Block(Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config, rng, dropout_rngs):
        super().__init__()
        self.ln_1 = _norm(config)
        self.attn = CausalSelfAttention(config, rng)
        self.ln_2 = _norm(config)
        self.mlp = MLP(config, rng)
        self.drop_1 = Dropout(config.dropout, dropout_rngs[0])  # one module per call site: each
        self.drop_2 = Dropout(config.dropout, dropout_rngs[1])  # draws its own (layer-keyed) masks

    def forward(self, x, rope=None, cache=None, layer=0):
        x = x + self.drop_1(self.attn(self.ln_1(x), rope, cache, layer))
        return x + self.drop_2(self.mlp(self.ln_2(x)))


class _Transformer(Module):
    """The ``transformer.*`` namespace of the GPT-2 parameter names."""


class GPT(Module):
    """A GPT-2 style language model: ``logits, loss = model(idx, targets)``.

    ``seed`` seeds the initial weights; dropout masks come from ``self.dropout_rng``, keyed by
    (seed, step, layer, sample) so that any split of the batch draws the same masks.
    """

    def __init__(self, config: GPTConfig, seed: int = 0):
        super().__init__()
        if config.vocab_size < 1:
            raise ConfigError("model.vocab_size is 0: set it, or let the trainer take it from the dataset")
        self.config = config
        rng = numpy.random.default_rng(seed)
        self.dropout_rng = SampleDropoutRNG(seed)
        C = config.n_embd
        t = _Transformer()
        t.wte = Embedding(config.vocab_size, C, rng=rng, std=0.02)
        if config.pos == "learned":
            t.wpe = Embedding(config.block_size, C, rng=rng, std=0.02)
        t.drop = Dropout(config.dropout, self.dropout_rng.for_layer(0))
        t.h = ModuleList(Block(config, rng, (self.dropout_rng.for_layer(2 * i + 1),
                                             self.dropout_rng.for_layer(2 * i + 2)))
                         for i in range(config.n_layer))
        t.ln_f = _norm(config)
        self.transformer = t
        self.lm_head = Linear(C, config.vocab_size, bias=False, rng=rng, std=0.02)
        if config.tie_embeddings:
            self.lm_head.weight = t.wte.weight

    # The forward pass in three pieces, so pipeline stages can run any contiguous part of it.
    def embed(self, idx, start_pos=0):
        """Token (+ learned position) embeddings: idx (B, T) -> x (B, T, C)."""
        T = idx.shape[1]
        if start_pos + T > self.config.block_size:
            raise ValueError(f"sequence of length {start_pos + T} is longer than block_size "
                             f"{self.config.block_size}")
        x = self.transformer.wte(idx)                                           # (B, T, C)
        if self.config.pos == "learned":
            pos = xp.arange(start_pos, start_pos + T)
            x = x + self.transformer.wpe(pos)                                   # (T, C) broadcast
        return self.transformer.drop(x)

    def rope_for(self, T, start_pos=0, dtype="float32"):
        if self.config.pos != "rope":
            return None
        return rope_tables(self.config.head_size, numpy.arange(start_pos, start_pos + T), dtype=dtype)

    def run_blocks(self, x, start=0, stop=None, rope=None, cache=None):
        blocks = list(self.transformer.h)[start:stop]
        for i, block in enumerate(blocks):
            x = block(x, rope, cache, start + i)
        return x

    def head(self, x):
        """Final norm and output projection: x (B, T, C) -> logits (B, T, V)."""
        return self.lm_head(self.transformer.ln_f(x))

    def forward(self, idx, targets=None, cache=None):
        idx = _ids(idx)
        start = cache.length if cache is not None else 0
        x = self.embed(idx, start)
        rope = self.rope_for(idx.shape[1], start, dtype=str(x.dtype))
        x = self.run_blocks(x, rope=rope, cache=cache)
        logits = self.head(x)
        loss = None if targets is None else F.cross_entropy(logits, _ids(targets))
        return logits, loss

    # ------------------------------------------------------------------ sampling
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, seed=None, use_cache=True,
                 n_valid=None):
        """Append ``max_new_tokens`` sampled tokens to idx (B, T); returns a numpy int64 array.

        temperature 0 picks the most likely token; ids >= ``n_valid`` (a vocabulary padded past
        the tokenizer's, model/vocab.py) are never picked. With ``use_cache`` each new token costs one
        position's forward (keys and values of the prefix are kept); past block_size the context
        window slides, positions change, and the window is recomputed, exactly as without a cache.
        """
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1")
        rng = numpy.random.default_rng(seed)
        idx = numpy.array(backend.to_numpy(_ids(idx)), dtype=numpy.int64)
        was_training = self.training
        self.eval()
        bs = self.config.block_size
        cache, fed = None, 0  # fed: how many tokens of idx the cache already holds
        try:
            with no_grad():
                for _ in range(max_new_tokens):
                    if use_cache and cache is not None and idx.shape[1] <= bs:
                        logits, _ = self(backend.asarray(idx[:, fed:]), cache=cache)
                    else:  # start (or restart after the window slid) from the cropped context
                        cache = KVCache(self.config.n_layer) if use_cache else None
                        logits, _ = self(backend.asarray(idx[:, -bs:]), cache=cache)
                    fed = idx.shape[1]
                    last = mask_padded_logits(backend.to_numpy(logits.data[:, -1, :]), n_valid)  # (B, V)
                    nxt = _sample(last, temperature, top_k, rng)
                    idx = numpy.concatenate([idx, nxt[:, None]], axis=1)
        finally:
            self.train(was_training)
        return idx


def _sample(logits, temperature, top_k, rng):
    """One token per row from logits (B, V), in float64 on the host so it is deterministic."""
    logits = logits.astype(numpy.float64)
    if temperature == 0:
        return logits.argmax(axis=1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[1]:
        kth = numpy.sort(logits, axis=1)[:, -top_k][:, None]
        logits = numpy.where(logits < kth, -numpy.inf, logits)
    probs = numpy.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    u = rng.random(logits.shape[0])[:, None]
    return numpy.minimum((numpy.cumsum(probs, axis=1) < u).sum(axis=1), logits.shape[1] - 1)


def _ids(idx):
    if isinstance(idx, Tensor):
        return idx.data
    if backend.is_array(idx):
        return idx
    return backend.asarray(numpy.asarray(idx, dtype=numpy.int64))
