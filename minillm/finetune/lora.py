"""LoRA: low-rank adapters on chosen Linear layers of a frozen model (Hu et al., 2021).

A Linear y = x W^T + b learns, instead of a new W (out x in numbers), a low-rank update
dW = (alpha / r) B A with A (r, in) and B (out, r): r * (in + out) numbers. A starts random and
B at zero, so the adapted model starts as the base model exactly. Only A and B train: the base
weights get no gradient and no optimizer state.

    y = x W^T + b + (alpha / r) (x A^T) B^T        LoRALinear.forward
    W <- W + (alpha / r) B A                        merge(): one plain matmul again, for inference
    W <- W - (alpha / r) B A                        unmerge(): back to training the adapters

New tokens added by the fine-tune (chat roles) need embeddings that the frozen table cannot
learn: ``TokenRows`` keeps those last rows as a small Parameter of their own.
"""
import fnmatch

import numpy

import minillm.functional as F
from minillm import backend
from minillm.autograd.function import Function
from minillm.autograd.ops import acc_dtype, mm, mm_operand
from minillm.autograd.tensor import Tensor
from minillm.backend import xp
from minillm.errors import UserError
from minillm.nn import Linear, Module, Parameter

DEFAULT_TARGETS = ("attn.c_attn", "attn.c_proj")


class LoRALinear(Module):
    """A frozen Linear (same ``weight`` / ``bias`` Parameters, so names stay ``...c_attn.weight``)
    plus ``lora_A`` (r, in) and ``lora_B`` (out, r)."""

    def __init__(self, base: Linear, rank: int, alpha: float, rng):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.in_features, self.out_features = base.in_features, base.out_features
        bound = 1.0 / base.in_features ** 0.5  # PyTorch's Linear init for A; B = 0: no change at start
        a = rng.uniform(-bound, bound, (rank, base.in_features)).astype("float32")
        self.lora_A = Parameter(backend.asarray(a).astype(base.weight.dtype))
        self.lora_B = Parameter(xp.zeros((base.out_features, rank), dtype=base.weight.dtype))
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        self.merged = False

    def forward(self, x):
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return F.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale)  # (..., out)

    def delta(self):
        """The update (alpha / r) B A as an array of W's shape (out, in)."""
        return (self.lora_B.data.astype(xp.float32) @ self.lora_A.data.astype(xp.float32)) * self.scale

    def merge(self):
        if not self.merged:
            self.weight.data += self.delta().astype(self.weight.dtype)
            self.merged = True

    def unmerge(self):
        """Undo merge (exact up to float rounding of W + dW - dW)."""
        if self.merged:
            self.weight.data -= self.delta().astype(self.weight.dtype)
            self.merged = False


class NewRowsLinear(Function):
    """y = x @ [frozen; new].T, the output layer over a token table whose last n rows train.

    One GEMM over the whole table, as the base model's head (the same bits); backward gives x
    its gradient and the n new rows theirs, and never computes the (V, C) weight gradient of the
    frozen rows, which a Linear over the concatenated table would (the largest GEMM of a small GPT).
    """

    @staticmethod
    def forward(ctx, x, new, frozen=None):
        table = xp.concatenate([frozen, new], axis=0)         # (V + n, C)
        x2 = x.reshape(-1, x.shape[-1])                       # (N, C)
        y = mm(x2, table.T, dtype=acc_dtype(x.dtype))         # (N, V + n)
        ctx.save_for_backward(x2, table)
        ctx.x_shape, ctx.start = x.shape, frozen.shape[0]
        return y.astype(x.dtype, copy=False).reshape(x.shape[:-1] + (table.shape[0],))  # (..., V + n)

    @staticmethod
    def backward(ctx, g):
        x2, table = ctx.saved_tensors
        need_x, need_new = ctx.needs_input_grad[:2]
        g2 = mm_operand(g.reshape(-1, g.shape[-1]))           # (N, V + n)
        gx = mm(g2, table, dtype=g.dtype).reshape(ctx.x_shape) if need_x else None
        gnew = mm(g2[:, ctx.start:].T, x2, dtype=g.dtype) if need_new else None  # (n, C)
        return gx, gnew


class TokenRows(Module):
    """A frozen (V + n, C) token table whose last n rows (tokens added by the fine-tune) train as
    their own Parameter ``new_rows``. As the embedding it looks rows up; as an untied output
    layer (``head=True``) it projects onto them."""

    def __init__(self, weight, start: int, head=False):
        super().__init__()
        self.weight, self.start, self.head = weight, start, head
        self.new_rows = Parameter(weight.data[start:].copy())                   # (n, C)

    def table(self):
        old = Tensor(self.weight.data[:self.start], _check=False)               # (V, C), frozen
        return F.concatenate([old, self.new_rows], axis=0)                      # (V + n, C)

    def project(self, x):
        return NewRowsLinear.apply(x, self.new_rows, frozen=self.weight.data[:self.start])  # (B, T, V + n)

    def forward(self, x):
        if self.head:
            return self.project(x)                                              # (B, T, V + n)
        return F.embedding(x, self.table())                                     # (B, T, C)

    def merge(self):
        self.weight.data[self.start:] = self.new_rows.data


class _TiedHead(Module):
    """lm_head over the same TokenRows as the embedding (tied weights)."""

    def __init__(self, rows):
        super().__init__()
        self.rows = rows

    def forward(self, x):
        return self.rows.project(x)                                             # (B, T, V + n)


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, Linear) and n != "lm_head"]


def resolve_targets(model, targets):
    """Full module names of the Linear layers ``targets`` names: a full name, a suffix such as
    ``attn.c_attn`` (every block's), or an fnmatch pattern. A target matching nothing is an error."""
    names = linear_names(model)
    chosen = []
    for t in targets:
        hits = [n for n in names if n == t or n.endswith("." + t) or fnmatch.fnmatchcase(n, t)]
        if not hits:
            kinds = sorted({n.split(".", 3)[-1] for n in names})
            raise UserError(f"LoRA target {t!r} names no Linear layer of this model; choose from "
                            f"{', '.join(kinds)} (or full names like {names[0]})")
        chosen += [n for n in hits if n not in chosen]
    return [n for n in names if n in chosen]


def _set(model, name, module):
    parent, _, attr = name.rpartition(".")
    owner = model
    for part in parent.split(".") if parent else []:
        owner = getattr(owner, part)
    setattr(owner, attr, module)


def _get(model, name):
    for part in name.split("."):
        model = getattr(model, part)
    return model


def apply_lora(model, targets=DEFAULT_TARGETS, rank=8, alpha=None, seed=0, new_tokens_from=None):
    """Freeze ``model`` and put rank-``rank`` adapters on the Linear layers ``targets`` names;
    with ``new_tokens_from = V`` the embedding rows from V on train too (tokens the fine-tune
    added). ``alpha`` defaults to 2 * rank. Returns the adapted layers' full names."""
    if rank < 1:
        raise UserError(f"LoRA rank={rank} must be >= 1")
    alpha = 2.0 * rank if alpha is None else float(alpha)
    names = resolve_targets(model, targets)
    for p in model.parameters():
        p.requires_grad = False
    rng = numpy.random.default_rng(seed)
    for name in names:
        _set(model, name, LoRALinear(_get(model, name), rank, alpha, rng))
    if new_tokens_from is not None and new_tokens_from < model.config.vocab_size:
        tied = model.lm_head.weight is model.transformer.wte.weight
        rows = TokenRows(model.transformer.wte.weight, new_tokens_from)
        model.transformer.wte = rows
        model.lm_head = _TiedHead(rows) if tied else TokenRows(model.lm_head.weight, new_tokens_from, head=True)
    return names


def adapters(model):
    """The modules holding trainable adapter state, by name."""
    out, seen = {}, set()
    for n, m in model.named_modules():
        if isinstance(m, (LoRALinear, TokenRows)) and id(m) not in seen:  # a tied head shares its rows
            seen.add(id(m))
            out[n] = m
    return out


def trainable_parameters(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def parameter_report(model) -> dict:
    """How many parameters train, of how many in all (adapters included)."""
    total = sum(p.size for p in model.parameters())
    trainable = sum(p.size for _, p in trainable_parameters(model))
    return {"trainable": trainable, "total": total, "share": trainable / total}


def merge_lora(model):
    for m in adapters(model).values():
        m.merge()


def unmerge_lora(model):
    for m in adapters(model).values():
        if isinstance(m, LoRALinear):
            m.unmerge()


def adapter_state(model) -> dict:
    """Only what training changed: every lora_A, lora_B and new token rows, by parameter name."""
    return {n: p.data for n, p in trainable_parameters(model)}


def base_state(model) -> dict:
    """The model's weights under plain GPT names with every adapter folded in (the merged model),
    without changing the adapted model."""
    state = {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
    for name, m in adapters(model).items():
        if isinstance(m, LoRALinear) and not m.merged:
            state[f"{name}.weight"] += m.delta().astype(m.weight.dtype)
        elif isinstance(m, TokenRows):
            state[f"{name}.weight"][m.start:] = m.new_rows.data
    return state
