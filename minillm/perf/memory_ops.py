"""The ops of a GPT step as the memory simulation sees them (``memory_sim.py`` drives them).

Each function mirrors one op (or a few) of ``autograd/fused.py`` and ``ops.py``: what its forward
keeps for backward (``keep``: its output and saved arrays, by component), what its backward
allocates (input and parameter gradients) and frees (its output, saved arrays and the gradient it
consumed, when the engine drops them), and the temporaries alive inside (``temp``). ``s`` is a
``StepSim``, ``s.d`` the ``Dims`` of the micro-batch; sizes are bytes.
"""
from __future__ import annotations

F32 = 4  # statistics, scores and gradients summed over ranks are float32
I64 = 8


# ---------------------------------------------------------------- forward ------------------------
# Each function keeps what the real op keeps (``keep``: the output, and what it saves for
# backward), then looks at the moment its temporaries are alive too (``temp``).

def linear_fwd(s, comp, n_in, n_out):
    """fused.Linear: keeps its output (its input is kept by whoever made it). On the CPU a 16-bit
    product is taken in float32: copies of both operands, a float32 result, then the rounding."""
    d = s.d
    s.keep(comp, d.a * d.N * n_out)
    if d.cpu_half:
        s.temp(F32 * (d.N * n_in + n_in * n_out + d.N * n_out), "forward " + comp)


def norm_fwd(s):
    """fused.LayerNorm / RMSNorm: keeps xhat and rstd (float32) and its output."""
    d = s.d
    s.keep("norms", F32 * d.N * d.C + F32 * d.N + d.a * d.N * d.C)
    s.temp(F32 * d.N * d.C * (2 if d.cpu_half else (1 if d.rms else 0)), "forward norm")


def dropout_fwd(s, comp="dropout"):
    """ops.Dropout: a float32 uniform draw and a boolean mask on the way; keeps the scaled mask
    and its output."""
    d = s.d
    s.keep(comp, 2 * d.a * d.N * d.C)
    s.temp(F32 * d.N * d.C + d.N * d.C, "forward dropout")


def core_fwd(s, keep=True):
    """fused.CausalAttention: float32 scores (B, nh, T, T); keeps q*scale, the probabilities and
    its output (the last only, run without a graph)."""
    d = s.d
    nc = d.N * d.C // d.tp
    s.keep("attention", d.a * nc * (2 if keep else 1) + (d.att(d.a) if keep else 0))
    s.temp(d.att(F32) * (1 if d.a < 4 else (0 if keep else 1)) + 2 * d.up(nc), "forward attention")


def mlp_fwd(s):
    d = s.d
    H, h = d.H // d.tp, d.N * d.H // d.tp
    if d.swiglu:              # c_gate, SiLU (keeps its sigmoid), c_fc, their product
        linear_fwd(s, "mlp", d.C, H)
        s.keep("mlp", 2 * d.a * h)
        s.temp(2 * d.a * h, "forward silu")
        linear_fwd(s, "mlp", d.C, H)
        s.keep("mlp", d.a * h)
    else:                     # c_fc, GELU (keeps its tanh and its output)
        linear_fwd(s, "mlp", d.C, H)
        s.keep("mlp", 2 * d.a * h)
        s.temp(3 * F32 * h if d.cpu_half else 0, "forward gelu")
    linear_fwd(s, "mlp", H, d.C)


def block_fwd(s, keep_core=True):
    """One block's forward with a graph."""
    d = s.d
    nc = d.a * d.N * d.C
    norm_fwd(s)
    linear_fwd(s, "attention", d.C, 3 * d.C // d.tp)           # qkv; q, k, v are views into it
    if d.rope:
        s.keep("attention", 2 * nc // d.tp)                     # rotated q and k
        s.temp(2 * nc // d.tp, "forward rope")
    core_fwd(s, keep_core)
    s.keep("attention", nc // d.tp)                             # heads back to (B, T, C): a copy
    linear_fwd(s, "attention", d.C // d.tp, d.C)
    if d.dropout:
        dropout_fwd(s)
    s.keep("residual", nc)
    norm_fwd(s)
    mlp_fwd(s)
    if d.dropout:
        dropout_fwd(s)
    s.keep("residual", nc)


def block_fwd_no_grad(s):
    """A block run without a graph (full recomputation's first pass): each array lives an op or
    two; only the output stays. The moment with most alive: the MLP's hidden arrays."""
    d = s.d
    h = d.N * d.H // d.tp
    s.keep("residual", d.a * d.N * d.C)
    s.temp(d.a * d.N * d.C + (3 * d.a * h if d.swiglu else d.a * h + 2 * F32 * h + 3 * d.up(h)),
           "forward without a graph")


def embed_fwd(s):
    d = s.d
    s.keep("embeddings", d.a * d.N * d.C)                       # wte[idx]
    if d.learned:
        s.keep("embeddings", d.a * d.T * d.C + d.a * d.N * d.C)  # wpe[pos] and the sum
    if d.dropout:
        dropout_fwd(s)


def head_fwd(s):
    """Final norm, the logits (B, T, V), the fused cross-entropy (keeps float32 probabilities)."""
    d = s.d
    nv = d.N * d.V
    norm_fwd(s)
    linear_fwd(s, "head", d.C, d.V)
    s.keep("loss", F32 * nv + I64 * d.N + d.N)                  # probabilities, targets, mask
    s.temp(F32 * nv if d.a < 4 else 0, "forward loss")          # logits cast up first


# ---------------------------------------------------------------- backward -----------------------
# ``g`` is the gradient an op receives; the engine drops it (and the op's output and saved
# arrays) once the op's backward has run, unless it was passed on as it is (Add, views).

def linear_bwd(s, name, n_in, n_out, g_passed, bias=True, emit=True):
    """dx = g W, dW = g^T x (and db): dx becomes the next op's gradient, dW the parameter's."""
    d = s.d
    gx, gw = d.a * d.N * n_in, d.a * n_in * n_out
    if d.cpu_half:  # a float32 copy of g and of W, the float32 product, then the rounding
        s.temp(d.up(d.N * n_out) + d.up_peak(n_in * n_out) + F32 * d.N * n_in, f"backward {name}")
    s.alloc(gx)
    if d.cpu_half:  # dW = g^T x: a float32 copy of the input x too
        s.temp(d.up(d.N * n_out) + d.up_peak(d.N * n_in) + F32 * n_in * n_out, f"backward {name}")
    if emit:
        s.sink.add(s, f"{name}.weight", gw)
        if bias:
            s.sink.add(s, f"{name}.bias", d.a * n_out)
    s.free(d.a * d.N * n_out)                                   # its output
    if not g_passed:
        s.free(d.a * d.N * n_out)                               # the gradient it consumed


def norm_bwd(s, name, bias=True, residual=True):
    """Norm backward: float32 scratch and dx inside; dx is then summed with the gradient the
    residual stream already has (a new array; ``residual=False``: it is the first). Its output,
    xhat, rstd and the gradient it consumed go."""
    d = s.d
    nc = d.N * d.C
    s.temp(d.up(nc) + 2 * F32 * nc + (d.a * nc if d.a < 4 else 0), f"backward {name}")
    s.sink.add(s, f"{name}.weight", d.a * d.C)
    if bias and not d.rms:
        s.sink.add(s, f"{name}.bias", d.a * d.C)
    if residual:
        s.temp(2 * d.a * nc, f"backward {name}")                # dx and the new sum, the old one still alive
    else:
        s.alloc(d.a * nc)                                       # dx is the residual gradient
    s.free(F32 * nc + F32 * d.N + d.a * nc)                     # xhat, rstd, output
    s.free(d.a * nc)                                            # the gradient it consumed


def mlp_bwd(s, p):
    d = s.d
    H, h, nc = d.H // d.tp, d.N * d.H // d.tp, d.a * d.N * d.C
    linear_bwd(s, p + "mlp.c_proj", H, d.C, g_passed=not d.dropout)
    if d.swiglu:  # product: two gradients; SiLU: its formula's temporaries
        s.alloc(2 * d.a * h)
        s.free(2 * d.a * h)                                     # product output and g
        s.temp(3 * d.a * h, "backward silu")
        linear_bwd(s, p + "mlp.c_fc", d.C, H, g_passed=False)
        s.free(2 * d.a * h)                                     # SiLU output and sigmoid
        linear_bwd(s, p + "mlp.c_gate", d.C, H, g_passed=False)
        s.temp(d.a * d.N * d.C, "backward mlp")                 # the two dx summed
        s.free(nc)
    else:         # GELU: d = x*x..., tmp = t*t; the float32 copies of x, t and g when 16-bit
        s.alloc(d.a * h)
        s.temp(F32 * h * 2 - (d.a * h if d.a == F32 else 0) + 2 * d.up(h) + d.up_peak(h), "backward gelu")
        s.free(3 * d.a * h)                                     # GELU output, tanh, g
        linear_bwd(s, p + "mlp.c_fc", d.C, H, g_passed=False)


def core_bwd(s, replay=False):
    """Attention backward: dv, the float32 score gradient (B, nh, T, T), dq, dk. ``replay``:
    selective recomputation runs the core's forward again first (q*scale, probabilities)."""
    d = s.d
    nc = d.a * d.N * d.C // d.tp
    if replay:  # q*scale, the probabilities and the output again (the last held until it returns)
        s.alloc(2 * nc + d.att(d.a))
        s.temp(d.att(F32) * (1 if d.a < 4 else 0) + 2 * d.up(nc), "backward attention (recomputed)")
    s.alloc(3 * nc)                                             # dq, dk, dv
    s.temp(d.att(F32) + (d.att(d.a) if d.a < 4 else 0) + 2 * d.up(d.N * d.C // d.tp), "backward attention")
    s.free(2 * nc + d.att(d.a) + nc + (nc if replay else 0))    # output, q*scale, probabilities, g


def attention_bwd(s, p, replay_core=False):
    """From the attention output projection back to qkv and ln_1."""
    d = s.d
    nc = d.a * d.N * d.C
    linear_bwd(s, p + "attn.c_proj", d.C // d.tp, d.C, g_passed=not d.dropout)
    s.free(nc // d.tp)                                          # the (B, T, C) copy (its g goes on as a view)
    core_bwd(s, replay_core)
    if d.rope:  # g cos - rotate_half(g sin), for q and k
        s.temp(3 * nc // d.tp, "backward rope")
        s.free(2 * nc // d.tp)
    # q, k, v are views of qkv: each gradient is scattered into zeros of qkv's shape and the three
    # summed, while the engine still holds the previous op's results (units of one (B, T, C))
    u = nc // d.tp
    for step in (3, -1, 3, 3, -1, 3, -6, 3, -1, -6, 3, -3):  # pg_v, dv, pg_k, sum, dk, pg_q, ...
        s.alloc(step * u) if step > 0 else s.free(-step * u)
    linear_bwd(s, p + "attn.c_attn", d.C, 3 * d.C // d.tp, g_passed=False)


def block_bwd(s, k, replay_core=False, output_held=False):
    """Backward of block k, from its output's gradient to its input's. ``output_held``: the
    output is the root of a recomputed block's backward, held until that backward returns."""
    d = s.d
    p = f"transformer.h.{k}."
    nc = d.a * d.N * d.C
    if not output_held:
        s.free(nc)                                              # its output (the residual sum)
    if d.dropout:
        s.alloc(nc)                                             # g * mask
        s.free(2 * nc)                                          # dropout output and mask
    mlp_bwd(s, p)
    norm_bwd(s, p + "ln_2")
    s.free(nc)                                                  # the attention residual sum
    if d.dropout:
        s.alloc(nc)
        s.free(2 * nc)
    attention_bwd(s, p, replay_core)
    norm_bwd(s, p + "ln_1")


def head_bwd(s, logits_held=False):
    """From the loss to the last block's output. ``logits_held``: the caller still holds the
    logits (``LocalEngine``'s ``_, loss = model(x, y)``), so they outlive this backward."""
    d = s.d
    nv = d.N * d.V
    s.temp(F32 * nv + (d.a * nv if d.a < 4 else 0), "backward loss")  # d = probs - onehot
    s.alloc(d.a * nv)                                          # the logits' gradient
    s.free(F32 * nv + I64 * d.N + d.N)                          # probabilities, targets, mask
    if d.tied:  # the tied embedding's gradient is complete only after the embeddings' backward
        s.sink.hold(s, d.a * d.V * d.C)
    linear_bwd(s, "lm_head", d.C, d.V, g_passed=False, bias=False, emit=not d.tied)
    if logits_held:
        s.alloc(d.a * nv)                                      # (linear_bwd freed them)
    norm_bwd(s, "transformer.ln_f", residual=False)


def embed_bwd(s):
    d = s.d
    nc = d.a * d.N * d.C
    if d.dropout:
        s.alloc(nc)
        s.free(2 * nc)
    if d.learned:  # the (T, C) position gradient: a sum over the batch, a one-hot product
        s.temp(d.a * d.T * d.C + F32 * d.T * d.T + F32 * d.T * d.C, "backward embeddings")
        s.sink.add(s, "transformer.wpe.weight", d.a * d.T * d.C)
        s.free(d.a * d.T * d.C + nc)                            # wpe[pos] and the sum
    vc = d.V * d.C
    onehot = F32 * d.V * d.N if d.N * d.V <= 1 << 22 else 0     # small vocabularies: one matmul
    s.temp(onehot + F32 * vc + d.up(d.N * d.C), "backward embeddings")
    if d.tied:  # the head's part plus this one: a new array, then both parts go
        s.temp(F32 * vc + d.a * vc, "backward embeddings")
        s.sink.release(s, d.a * vc)
    s.sink.add(s, "transformer.wte.weight", d.a * vc)
    s.free(nc + nc)                                             # wte[idx] and g
