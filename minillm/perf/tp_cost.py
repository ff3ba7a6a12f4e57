"""What tensor (and sequence) parallelism costs one rank: bytes communicated and activation memory.

Two kinds of formula. The *Megatron* ones are the papers' (Shoeybi et al. 2019; Korthikanti et
al. 2022, section 4): per layer and micro-batch of b sequences of s tokens, width h,

    tensor parallel       4 all-reduces of b*s*h values (2 forward, 2 backward)
    + sequence parallel   4 all-gathers + 4 reduce-scatters of b*s*h (the same bytes on a ring)
    activations, 16 bit   s*b*h * (10 + 24/t + 5*a*s/(h*t))    (tp)
                          s*b*h * (34/t + 5*a*s/(h*t))          (tp + sp)

The *minillm* ones count what this implementation does (float32, the default GPT-2 layout), term
by term, so a test can check a real step against them byte for byte (``distributed/counting``
counts the traffic, ``autograd.tensor.saved_bytes`` the memory). They differ from Megatron's in
known places: the embedding's all-reduce and the head's f / all-gather, the vocabulary-parallel
loss's three small all-reduces, with sp an extra all-gather per column-parallel layer in backward
(its input is stored as this rank's shard and gathered again, as Megatron-LM does too), and the
activations of our fused ops (float32, no attention dropout, two layer norms saving x-hat).
"""
from __future__ import annotations

from minillm.distributed.counting import wire_bytes  # noqa: F401  (bytes on the wire, for bench_tp.py)
from minillm.distributed.tp_layers import padded_length

F32, I64 = 4, 8


def _entries(cfg) -> int:
    """Column-parallel layers per block: c_attn and c_fc (and SwiGLU's c_gate)."""
    return 3 if cfg.mlp == "swiglu" else 2


def partial_grad_numel(cfg) -> int:
    """Parameters whose gradients sequence parallelism all-reduces over tp once per step: the
    norms' weights (and biases) and the row-parallel layers' biases."""
    C, L = cfg.n_embd, cfg.n_layer
    per_norm = C * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    return (2 * L + 1) * per_norm + (2 * L * C if cfg.bias else 0)


def comm_bytes(cfg, rows: int, tp: int, sp: bool, micro: int = 1) -> dict:
    """Payload bytes per optimizer step on the tp group, per operation, for ``micro`` micro-batches
    of ``rows`` sequences of ``cfg.block_size`` tokens (float32; scalars such as the gradient
    norm's not included)."""
    if tp == 1:
        return {}
    L, e = cfg.n_layer, _entries(cfg)
    n_tok = rows * cfg.block_size
    bsh, ce = F32 * n_tok * cfg.n_embd, F32 * 3 * n_tok        # activations; max, sum-exp, target
    if not sp:  # embedding g, c_proj g x2 forward; f backward of every column entry and the head
        return {"allreduce": micro * (bsh * (1 + 2 * L + e * L + 1) + ce)}
    return {"allreduce": micro * (bsh + ce) + F32 * partial_grad_numel(cfg),
            # forward gathers, c_proj backward, backward re-gathers, head forward + re-gather, scatter
            "allgather": micro * bsh * (e * L + 2 * L + e * L + 3),
            # c_proj forward, column layers' backward, head backward
            "reduce_scatter": micro * bsh * (2 * L + e * L + 1)}


def megatron_comm_bytes(cfg, rows: int, tp: int, sp: bool, micro: int = 1) -> dict:
    """The papers' count for the transformer layers only (float32 values)."""
    if tp == 1:
        return {}
    bsh = F32 * rows * cfg.block_size * cfg.n_embd
    n = micro * 4 * cfg.n_layer * bsh
    return {"allgather": n, "reduce_scatter": n} if sp else {"allreduce": n}


def activation_bytes(cfg, rows: int, tp: int = 1, sp: bool = False) -> int:
    """Bytes one micro-batch's graph saves for backward on one rank (float32, GPT-2 layout:
    layernorm, GELU, learned positions, tied head; no parameters counted)."""
    B, T, C, L = rows, cfg.block_size, cfg.n_embd, cfg.n_layer
    BT, BTC, s = B * T, B * T * C, (tp if sp else 1)    # s: how far the replicated regions are split
    drop = 1 if cfg.dropout > 0 else 0
    # per block: layer norms' x-hat (2), dropout masks (2), inputs of c_attn and c_fc (2: whole,
    # or with sp this rank's shard); split by tp: q, k, v (3), c_proj's input (1), GELU's x and
    # tanh (8), the MLP c_proj's input (4); attention probabilities; the norms' 1/std (2 x B T)
    block = (F32 * BTC * (2 + 2 * drop + 2) // s + F32 * BTC * 16 // tp
             + F32 * B * cfg.n_head * T * T // tp + 2 * F32 * BT // s)
    embed = I64 * BT + (BT if tp > 1 else 0) + I64 * T + drop * F32 * BTC // s
    V = padded_length(cfg.vocab_size, tp)
    head = (2 * F32 * BTC // s + F32 * BT // s                 # ln_f x-hat and 1/std, lm_head input
            + F32 * BT * V // tp + I64 * BT + BT + (BT if tp > 1 else 0))  # softmax, targets, masks
    return L * block + embed + head


def megatron_activation_bytes(cfg, rows: int, tp: int = 1, sp: bool = False) -> float:
    """The paper's activation memory of the transformer layers (16-bit activations)."""
    s, b, h, a, t = cfg.block_size, rows, cfg.n_embd, cfg.n_head, tp
    attn = 5 * a * s / (h * t)
    return cfg.n_layer * s * b * h * ((34 / t if sp else 10 + 24 / t) + attn)
