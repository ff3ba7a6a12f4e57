"""Reference solutions, lesson 04."""
import math

import numpy as np


def causal_mask(T):
    return np.tril(np.ones((T, T), dtype=bool))          # query i may see keys j <= i


def attention_head(q, k, v):
    T, hs = q.shape
    scores = q @ k.T / math.sqrt(hs)                      # (T, T)
    scores = np.where(causal_mask(T), scores, -np.inf)
    p = np.exp(scores - scores.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return p @ v                                          # (T, hs)


def param_count(cfg):
    V, T, C, L = cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_layer
    per_layer = 4 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    return V * C + T * C + L * per_layer + 2 * C         # lm_head is tied to wte: no extra
