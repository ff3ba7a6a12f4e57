"""The ops of a GPT step as the memory simulation sees them (``memory_sim.py`` drives them).

Each function mirrors one op (or a few) of ``autograd/fused.py`` and ``ops.py``: what its forward
keeps for backward (``keep``: its output and saved arrays, by component), what its backward
allocates (input and parameter gradients) and frees (its output, saved arrays and the gradient it
consumed, when the engine drops them), and the temporaries alive inside (``temp``). ``s`` is a
``StepSim``, ``s.d`` the ``Dims`` of the micro-batch; sizes are bytes.

Under tensor parallelism (``distributed/tp_layers.py``) a column-parallel layer enters its region
through f (a view; with sequence parallelism an all-gather along T) and a row-parallel one leaves
it through g (an all-reduce into a new array; with sp a reduce-scatter), then adds its replicated
bias: ``column_fwd`` / ``row_fwd`` and their backwards add those arrays around ``linear_fwd``.
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


def column_fwd(s, comp, n_in, n_out):
    """A column-parallel linear (n_out: this rank's features): with sp its input is gathered
    along T first (``GatherLinear``: the rank-ordered parts, then their (B, T, C) copy), and the
    gathered input stays alive through the product."""
    d = s.d
    gathered = d.a * d.N * n_in if d.sp else 0
    s.temp(2 * gathered, "forward gather " + comp)
    linear_fwd(s, comp, n_in, n_out)
    s.temp(gathered, "forward " + comp)


def row_fwd(s, comp, n_in):
    """A row-parallel linear: partial sums (B, T, C), g (all-reduce into a float32 copy) or with
    sp a reduce-scatter (a float32 copy of all of it, this rank's T/tp back), then the bias."""
    d = s.d
    linear_fwd(s, comp, n_in, d.C)
    if d.tp == 1:
        return
    nc, out = d.N * d.C, d.Ns * d.C
    s.temp(F32 * nc + (F32 * out if d.sp else 0), "forward " + comp + " g")
    s.keep(comp, d.a * out)
    if d.bias:
        s.keep(comp, d.a * out)


def norm_fwd(s):
    """fused.LayerNorm / RMSNorm: keeps xhat and rstd (float32) and its output."""
    d = s.d
    N = d.Ns
    s.keep("norms", F32 * N * d.C + F32 * N + d.a * N * d.C)
    s.temp(F32 * N * d.C * (2 if d.cpu_half else (1 if d.rms else 0)), "forward norm")


def dropout_fwd(s, comp="dropout"):
    """ops.Dropout: a float32 uniform draw and a boolean mask on the way; keeps the scaled mask
    and its output."""
    d = s.d
    s.keep(comp, 2 * d.a * d.Ns * d.C)
    s.temp(F32 * d.Ns * d.C + d.Ns * d.C, "forward dropout")


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
        column_fwd(s, "mlp", d.C, H)
        s.keep("mlp", 2 * d.a * h)
        s.temp(2 * d.a * h, "forward silu")
        column_fwd(s, "mlp", d.C, H)
        s.keep("mlp", d.a * h)
    else:                     # c_fc, GELU (keeps its tanh and its output)
        column_fwd(s, "mlp", d.C, H)
        s.keep("mlp", 2 * d.a * h)
        s.temp(3 * F32 * h if d.cpu_half else 0, "forward gelu")
    row_fwd(s, "mlp", H)


def block_fwd(s, keep_core=True):
    """One block's forward with a graph."""
    d = s.d
    nc, ns = d.a * d.N * d.C, d.a * d.Ns * d.C
    norm_fwd(s)
    column_fwd(s, "attention", d.C, 3 * d.C // d.tp)           # qkv; q, k, v are views into it
    if d.rope:
        s.keep("attention", 2 * nc // d.tp)                     # rotated q and k
        s.temp(2 * nc // d.tp, "forward rope")
    core_fwd(s, keep_core)
    s.keep("attention", nc // d.tp)                             # heads back to (B, T, C): a copy
    row_fwd(s, "attention", d.C // d.tp)
    if d.dropout:
        dropout_fwd(s)
    s.keep("residual", ns)
    norm_fwd(s)
    mlp_fwd(s)
    if d.dropout:
        dropout_fwd(s)
    s.keep("residual", ns)


def block_fwd_no_grad(s):
    """A block run without a graph (full recomputation's first pass): each array lives an op or
    two; only the output stays. The moment with most alive: the MLP's hidden arrays."""
    d = s.d
    h = d.N * d.H // d.tp
    s.keep("residual", d.a * d.Ns * d.C)
    s.temp(d.a * d.N * d.C + (3 * d.a * h if d.swiglu else d.a * h + 2 * F32 * h + 3 * d.up(h)),
           "forward without a graph")


def embed_fwd(s):
    d = s.d
    s.keep("embeddings", d.a * d.N * d.C)                       # wte[idx]
    if d.tp > 1:  # this shard's rows (ids saved, a mask of them), then g: a float32 sum
        s.keep("embeddings", I64 * d.N + d.N)
        s.temp(I64 * d.N + d.a * d.N + F32 * d.N * d.C, "forward embeddings g")
        s.keep("embeddings", d.a * d.N * d.C)
    if d.learned:
        s.keep("embeddings", d.a * d.T * d.C + d.a * d.N * d.C)  # wpe[pos] and the sum
    if d.sp:
        s.keep("embeddings", d.a * d.Ns * d.C)                  # this rank's positions: a copy
    if d.dropout:
        dropout_fwd(s)


def head_fwd(s):
    """Final norm, the logits (B, T, V), the fused cross-entropy (keeps float32 probabilities)."""
    d = s.d
    nv = d.N * d.V
    norm_fwd(s)
    column_fwd(s, "head", d.C, d.V)                             # V: this rank's (padded) columns
    s.keep("loss", F32 * nv + I64 * d.N + d.N * (2 if d.tp > 1 else 1))  # probabilities, targets, masks
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
        if bias and d.bias:
            s.sink.add(s, f"{name}.bias", d.a * n_out)
    s.free(d.a * d.N * n_out)                                   # its output
    if not g_passed:
        s.free(d.a * d.N * n_out)                               # the gradient it consumed


def column_bwd(s, name, n_out, g_passed, bias=True, emit=True):
    """A column-parallel layer's backward: dx (B, T, C), then f's all-reduce (a float32 copy,
    the new dx) or with sp GatherLinear's reduce-scatter to (B, T/tp, C), and its weight
    gradient from the input gathered again."""
    d = s.d
    if d.tp == 1:
        return linear_bwd(s, name, d.C, n_out, g_passed, bias, emit)
    nc, ns = d.N * d.C, d.Ns * d.C
    if d.cpu_half:
        s.temp(d.up(d.N * n_out) + d.up_peak(d.C * n_out) + F32 * nc, f"backward {name}")
    if d.sp:
        s.temp(d.a * nc + F32 * nc + F32 * ns, f"backward {name} reduce-scatter")
        s.alloc(d.a * ns)
        s.temp(2 * d.a * nc + (d.up(d.N * n_out) + d.up_peak(nc) if d.cpu_half else 0) + F32 * d.C * n_out,
               f"backward {name} gather")
    else:
        s.alloc(d.a * nc)
        s.temp(F32 * nc, f"backward {name} f")
    if emit:
        s.sink.add(s, f"{name}.weight", d.a * d.C * n_out)
        if bias and d.bias:
            s.sink.add(s, f"{name}.bias", d.a * n_out)
    s.free(d.a * d.N * n_out)                                   # its output
    if not g_passed:
        s.free(d.a * d.N * n_out)                               # the gradient it consumed


def row_bwd(s, name, n_in, g_passed):
    """A row-parallel layer's backward: its bias's gradient, g's (identity) or with sp the
    all-gather of the gradient along T, then the product's."""
    d = s.d
    if d.tp == 1:
        return linear_bwd(s, name, n_in, d.C, g_passed)
    ns = d.a * d.Ns * d.C
    if d.bias:
        s.sink.add(s, f"{name}.bias", d.a * d.C)
        s.free(ns)                                              # the bias sum's output
    s.free(ns)                                                  # g's output
    if d.sp:  # the gradient gathered: rank-ordered parts, then the (B, T, C) copy
        s.temp(d.a * d.N * d.C, f"backward {name} gather")
        s.alloc(d.a * d.N * d.C)
        if not g_passed:
            s.free(ns)
        g_passed = False
    linear_bwd(s, name, n_in, d.C, g_passed, bias=False)


def norm_bwd(s, name, bias=True, residual=True):
    """Norm backward: float32 scratch and dx inside; dx is then summed with the gradient the
    residual stream already has (a new array; ``residual=False``: it is the first). Its output,
    xhat, rstd and the gradient it consumed go."""
    d = s.d
    nc = d.Ns * d.C
    s.temp(d.up(nc) + 2 * F32 * nc + (d.a * nc if d.a < 4 else 0), f"backward {name}")
    s.sink.add(s, f"{name}.weight", d.a * d.C)
    if bias and d.bias and not d.rms:
        s.sink.add(s, f"{name}.bias", d.a * d.C)
    if residual:
        s.temp(2 * d.a * nc, f"backward {name}")                # dx and the new sum, the old one still alive
    else:
        s.alloc(d.a * nc)                                       # dx is the residual gradient
    s.free(F32 * nc + F32 * d.Ns + d.a * nc)                    # xhat, rstd, output
    s.free(d.a * nc)                                            # the gradient it consumed


def mlp_bwd(s, p):
    d = s.d
    H, h, nc = d.H // d.tp, d.N * d.H // d.tp, d.a * d.Ns * d.C
    row_bwd(s, p + "mlp.c_proj", H, g_passed=not d.dropout)
    if d.swiglu:  # product: two gradients; SiLU: its formula's temporaries
        s.alloc(2 * d.a * h)
        s.free(2 * d.a * h)                                     # product output and g
        s.temp(3 * d.a * h, "backward silu")
        column_bwd(s, p + "mlp.c_fc", H, g_passed=False)
        s.free(2 * d.a * h)                                     # SiLU output and sigmoid
        column_bwd(s, p + "mlp.c_gate", H, g_passed=False)
        s.temp(nc, "backward mlp")                              # the two dx summed
        s.free(nc)
    else:         # GELU: d = x*x..., tmp = t*t; the float32 copies of x, t and g when 16-bit
        s.alloc(d.a * h)
        s.temp(F32 * h * 2 - (d.a * h if d.a == F32 else 0) + 2 * d.up(h) + d.up_peak(h), "backward gelu")
        s.free(3 * d.a * h)                                     # GELU output, tanh, g
        column_bwd(s, p + "mlp.c_fc", H, g_passed=False)


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
    row_bwd(s, p + "attn.c_proj", d.C // d.tp, g_passed=not d.dropout)
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
    column_bwd(s, p + "attn.c_attn", 3 * d.C // d.tp, g_passed=False)


def block_bwd(s, k, replay_core=False, output_held=False):
    """Backward of block k, from its output's gradient to its input's. ``output_held``: the
    output is the root of a recomputed block's backward, held until that backward returns."""
    d = s.d
    p = f"transformer.h.{k}."
    nc = d.a * d.Ns * d.C
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


def head_bwd(s, logits_held=False, own_copy=False):
    """From the loss to the last block's output. ``logits_held``: the caller still holds the
    logits (``LocalEngine``'s ``_, loss = model(x, y)``), so they outlive this backward.
    ``own_copy``: the last pipeline stage's copy of the tied embedding, whose gradient is whole
    here (the stages sum theirs after the step)."""
    d = s.d
    nv = d.N * d.V
    s.temp(F32 * nv + (d.a * nv if d.a < 4 else 0), "backward loss")  # d = probs - onehot
    s.alloc(d.a * nv)                                          # the logits' gradient
    s.free(F32 * nv + I64 * d.N + d.N)                          # probabilities, targets, mask
    if d.tied and not own_copy:  # the tied embedding's gradient is complete only after the embeddings' backward
        s.sink.hold(s, d.a * d.V * d.C)
    column_bwd(s, "transformer.wte" if d.tied else "lm_head", d.V, g_passed=False, bias=False,
               emit=own_copy or not d.tied)
    if logits_held:
        s.alloc(d.a * nv)                                      # (linear_bwd freed them)
    norm_bwd(s, "transformer.ln_f", residual=False)


def embed_bwd(s, own_copy=False):
    """``own_copy``: the first pipeline stage's copy of the tied embedding (no head part here)."""
    d = s.d
    nc = d.a * d.N * d.C
    if d.dropout:
        s.alloc(d.a * d.Ns * d.C)
        s.free(2 * d.a * d.Ns * d.C)
    if d.sp:  # the scatter's backward: the gradient gathered along T
        s.temp(nc, "backward embeddings gather")
        s.alloc(nc)
        s.free(2 * d.a * d.Ns * d.C)                            # the scattered copy and its gradient
    if d.learned:  # the (T, C) position gradient: a sum over the batch, a one-hot product
        s.temp(d.a * d.T * d.C + F32 * d.T * d.T + F32 * d.T * d.C, "backward embeddings")
        s.sink.add(s, "transformer.wpe.weight", d.a * d.T * d.C)
        s.free(d.a * d.T * d.C + nc)                            # wpe[pos] and the sum
    vc = d.V * d.C
    if d.tp > 1:
        s.temp(d.a * nc, "backward embeddings")                 # g where the ids are this shard's
    onehot = F32 * d.V * d.N if d.N * d.V <= 1 << 22 else 0     # small vocabularies: one matmul
    s.temp(onehot + F32 * vc + d.up(d.N * d.C), "backward embeddings")
    if d.tied and not own_copy:  # the head's part plus this one: a new array, then both parts go
        s.temp(F32 * vc + d.a * vc, "backward embeddings")
        s.sink.release(s, d.a * vc)
    s.sink.add(s, "transformer.wte.weight", d.a * vc)
    s.free(nc + nc)                                             # wte[idx] and g
    if d.tp > 1:
        s.free(nc + I64 * d.N + d.N)                            # g's sum, the ids and their mask
