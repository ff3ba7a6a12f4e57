"""The same GPT in PyTorch, for side-by-side benchmarks and number-for-number comparison tests.

PyTorch is NOT a dependency of minillm: this module is imported only by ``minillm bench --torch``
and by tests that skip when torch is missing. Parameter names and shapes equal minillm's, so
``load_minillm_state(torch_model, minillm_model.state_dict())`` makes the two identical.
"""
import math

import numpy
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg.n_embd
        self.ln_1 = nn.LayerNorm(C, bias=cfg.bias)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(C, 3 * C, bias=cfg.bias)
        self.attn.c_proj = nn.Linear(C, C, bias=cfg.bias)
        self.ln_2 = nn.LayerNorm(C, bias=cfg.bias)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(C, cfg.mlp_hidden, bias=cfg.bias)
        self.mlp.c_proj = nn.Linear(cfg.mlp_hidden, C, bias=cfg.bias)
        self.n_head = cfg.n_head

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))


class TorchGPT(nn.Module):
    """GPT-2 layout (layernorm, GELU MLP, learned positions, optional tied embeddings)."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.norm != "layernorm" or cfg.mlp != "gelu" or cfg.pos != "learned":
            raise ValueError("the PyTorch reference implements the GPT-2 options only")
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.transformer.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.transformer.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.transformer.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        for name, p in self.named_parameters():  # GPT-2 init, as minillm
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T, device=idx.device))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


def load_minillm_state(model, state):
    """Copy a minillm state dict (name -> array) into the torch model."""
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(torch.from_numpy(numpy.ascontiguousarray(state[name])).to(p.dtype))
    return model
