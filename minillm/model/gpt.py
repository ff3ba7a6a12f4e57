"""GPT: the model (GPT-2 style, with Llama-style options); its config is in model/config.py."""
import functools
import math

import numpy  # host-side: initial values and sampling use explicit numpy Generators

import minillm.functional as F
from minillm import backend
from minillm.autograd.tensor import Tensor, no_grad
from minillm.backend import xp
from minillm.errors import ConfigError
from minillm.model.config import GPTConfig
from minillm.model.kv_cache import KVCache  # noqa: F401  (part of this module's API)
from minillm.model.sampling import check_sampling, sample_next
from minillm.model.vocab import mask_padded_logits
from minillm.nn import (CrossEntropyLoss, Dropout, Embedding, LayerNorm, Linear, Module, ModuleList,
                        RMSNorm)
from minillm.nn.layers import SampleDropoutRNG


def _norm(config):
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd)
    return LayerNorm(config.n_embd, bias=config.bias)


def rope_tables(head_size, positions, base=10000.0, dtype="float32"):
    """cos and sin tables (T, hs) for the given positions (T,) (halves layout); positions (B, T)
    give tables (B, T, hs), one row of positions per sequence."""
    inv_freq = 1.0 / (base ** (numpy.arange(0, head_size, 2) / head_size))   # (hs/2,)
    angles = numpy.asarray(positions)[..., None] * inv_freq                     # (..., T, hs/2)
    angles = numpy.concatenate([angles, angles], axis=-1)                       # (..., T, hs)
    return (backend.asarray(numpy.cos(angles).astype(dtype)),
            backend.asarray(numpy.sin(angles).astype(dtype)))


@functools.lru_cache(maxsize=16)
def _rope_block(device_key, head_size, n, dtype, base=10000.0):
    """rope_tables for positions 0..n-1 (a whole block), made (and copied to device_key) once:
    every forward, and every decoded token, slices or gathers its positions from it."""
    return rope_tables(head_size, numpy.arange(n), base=base, dtype=dtype)


class AttentionCore(Module):
    """softmax(q k^T / sqrt(hs) + causal mask) v: the region whose (B, nh, T, T) probabilities
    dominate activation memory at long contexts. A module of its own (no parameters, so no
    names change) only so that wrappers can act on it: selective recomputation
    (``model/recompute.py``) re-runs just this region in backward."""

    def forward(self, q, k, v, attn_mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)    # (B, nh, T, hs)


class CausalSelfAttention(Module):
    def __init__(self, config, rng):
        super().__init__()
        C = config.n_embd
        resid_std = 0.02 / math.sqrt(2 * config.n_layer)
        self.c_attn = Linear(C, 3 * C, bias=config.bias, rng=rng, std=0.02)
        self.c_proj = Linear(C, C, bias=config.bias, rng=rng, std=resid_std)
        self.core = AttentionCore()
        # heads this module computes (a tensor-parallel wrapper gives each rank n_head / tp of them)
        self.n_head, self.head_size = config.n_head, config.head_size
        self.rope = config.pos == "rope"

    def forward(self, x, rope=None, cache=None, layer=0, attn_mask=None):
        nh, hs = self.n_head, self.head_size
        qkv = self.c_attn(x)                                                    # (B, T, 3C)
        B, T = qkv.shape[:2]
        qkv = qkv.reshape(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)               # (3, B, nh, T, hs)
        q, k, v = qkv[0], qkv[1], qkv[2]                                        # (B, nh, T, hs) each
        if rope is not None:
            q, k = F.rope(q, *rope), F.rope(k, *rope)
        if cache is not None:  # sampling: no graph, extend the cache
            k_all, v_all = cache.update(layer, k.data, v.data)
            k, v = Tensor(k_all, _check=False), Tensor(v_all, _check=False)
        y = self.core(q, k, v, attn_mask=attn_mask)                             # (B, nh, T, hs)
        y = y.permute(0, 2, 1, 3).reshape(B, T, nh * hs)                        # (B, T, C)
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

    def forward(self, x, rope=None, cache=None, layer=0, attn_mask=None):
        x = x + self.drop_1(self.attn(self.ln_1(x), rope, cache, layer, attn_mask))
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
        self.criterion = CrossEntropyLoss()  # a module, so a parallel wrapper can swap in its own

    # The forward pass in three pieces, so pipeline stages can run any contiguous part of it.
    def embed(self, idx, start_pos=0, positions=None):
        """Token (+ learned position) embeddings: idx (B, T) -> x (B, T, C). Positions are
        start_pos.. for every row, or ``positions`` (B, T): each row its own (left-padded batches)."""
        T = idx.shape[1]
        last = start_pos + T if positions is None else int(numpy.max(positions)) + 1
        if last > self.config.block_size:
            raise ValueError(f"sequence of length {last} is longer than block_size "
                             f"{self.config.block_size}")
        x = self.transformer.wte(idx)                                           # (B, T, C)
        if self.config.pos == "learned":
            pos = xp.arange(start_pos, start_pos + T) if positions is None else backend.asarray(positions)
            x = x + self.transformer.wpe(pos)                                   # (T, C) or (B, T, C)
        return self.transformer.drop(x)

    def rope_for(self, T, start_pos=0, dtype="float32", positions=None):
        """RoPE cos/sin tables: (T, hs) for positions start_pos.., or (B, 1, T, hs) for per-row
        ``positions`` (B, T), broadcasting over the heads of q, k (B, nh, T, hs)."""
        if self.config.pos != "rope":
            return None
        c = self.config
        cos, sin = _rope_block(backend.device_key(), c.head_size, max(c.block_size, start_pos + T),
                               str(dtype), c.rope_theta)                        # (block_size, hs)
        if positions is None:  # the same positions for every row
            return cos[start_pos:start_pos + T], sin[start_pos:start_pos + T]   # (T, hs)
        at = backend.asarray(positions)                                         # (B, T)
        return cos[at][:, None], sin[at][:, None]                               # (B, 1, T, hs)

    def run_blocks(self, x, start=0, stop=None, rope=None, cache=None, attn_mask=None):
        """Blocks start..stop; ``attn_mask`` (boolean, broadcasting to (B, nh, T, T_all)) is
        applied on top of the causal mask in every block."""
        blocks = list(self.transformer.h)[start:stop]
        for i, block in enumerate(blocks):
            x = block(x, rope, cache, start + i, attn_mask)
        return x

    def head(self, x):
        """Final norm and output projection: x (B, T, C) -> logits (B, T, V)."""
        return self.lm_head(self.transformer.ln_f(x))

    def forward(self, idx, targets=None, cache=None, attn_mask=None, positions=None):
        """idx (B, T) -> (logits (B, T, V), loss or None). ``targets`` equal to -100 count for
        nothing in the loss; ``attn_mask`` (see run_blocks), e.g. ``document_mask(doc_ids)`` for
        packed sequences; ``positions`` (B, T) integers: each row's own positions (default: the
        cache's length onwards, the same for every row)."""
        idx = _ids(idx)
        start = 0
        if cache is not None:
            cache.default_capacity(self.config.block_size)
            start = cache.length
        positions = None if positions is None else numpy.asarray(backend.to_numpy(positions))
        x = self.embed(idx, start, positions)
        rope = self.rope_for(idx.shape[1], start, dtype=str(x.dtype), positions=positions)
        x = self.run_blocks(x, rope=rope, cache=cache, attn_mask=_mask(attn_mask))
        logits = self.head(x)
        loss = None if targets is None else self.criterion(logits, _ids(targets))
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
        check_sampling(temperature, top_k)
        rng = numpy.random.default_rng(seed)
        idx = numpy.array(backend.to_numpy(_ids(idx)), dtype=numpy.int64)
        was_training = self.training
        self.eval()
        bs = self.config.block_size
        cache = KVCache(self.config.n_layer, bs) if use_cache else None  # allocated once
        fed = 0  # how many tokens of idx the cache already holds
        try:
            with no_grad():
                for _ in range(max_new_tokens):
                    if cache is not None and fed and idx.shape[1] <= bs:
                        logits, _ = self(backend.asarray(idx[:, fed:]), cache=cache)
                    else:  # start (or restart after the window slid) from the cropped context
                        if cache is not None:
                            cache.set_length(0)
                        logits, _ = self(backend.asarray(idx[:, -bs:]), cache=cache)
                    fed = idx.shape[1]
                    last = mask_padded_logits(backend.to_numpy(logits.data[:, -1, :]), n_valid)  # (B, V)
                    nxt = sample_next(last, temperature, top_k, rng)
                    idx = numpy.concatenate([idx, nxt[:, None]], axis=1)
        finally:
            self.train(was_training)
        return idx


def _mask(mask):
    if mask is None or backend.is_array(mask):
        return mask
    return backend.asarray(numpy.asarray(mask, dtype=bool))


def document_mask(doc_ids):
    """Attention mask for packed sequences: doc_ids (B, T) integers (the document each token
    belongs to) -> boolean (B, 1, T, T), True where query i and key j are in the same document.
    Combined with the causal mask, each token attends only to earlier tokens of its own document,
    as if every document had its own row."""
    ids = _ids(doc_ids)
    if ids.ndim != 2:
        raise ValueError(f"document_mask: doc_ids must be (B, T), got shape {ids.shape}")
    return ids[:, None, :, None] == ids[:, None, None, :]                      # (B, 1, T, T)


def _ids(idx):
    if isinstance(idx, Tensor):
        return idx.data
    if backend.is_array(idx):
        return idx
    return backend.asarray(numpy.asarray(idx, dtype=numpy.int64))
