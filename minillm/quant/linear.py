"""A quantized model is the same GPT with its Linear layers swapped for QuantLinear.

QuantLinear keeps its weight as integer codes plus scales (formats.py) and multiplies through
``weight.matmul_t`` (dequantize on the fly, then one GEMM), so the model code, the KV cache and
batched generation run unchanged. The float bias stays a Parameter under the same name.

What is quantized: every Linear whose weight is its own (attention, MLP, an untied lm_head).
Embeddings stay float: a lookup reads one row per token, so they cost no bandwidth per decoding
step; a tied lm_head shares the token embedding's matrix and stays float with it.
"""
from minillm.autograd.function import Function
from minillm.autograd.ops import acc_dtype
from minillm.nn import Embedding, Linear, Module
from minillm.quant.formats import check_group_size, quantize_weight


class QuantLinearFunction(Function):
    """y = x @ W^T + b with W quantized and frozen: gradients flow to x and b, never to W."""

    @staticmethod
    def forward(ctx, x, b=None, weight=None):
        x2 = x.reshape(-1, x.shape[-1])                                  # (N, in)
        y = weight.matmul_t(x2.astype(acc_dtype(x.dtype), copy=False))   # (N, out)
        if b is not None:
            y += b
        ctx.weight, ctx.x_shape = weight, x.shape
        return y.astype(x.dtype, copy=False).reshape(x.shape[:-1] + (weight.shape[0],))

    @staticmethod
    def backward(ctx, g):
        need_x, need_b = (ctx.needs_input_grad + (False,))[:2]
        g2 = g.reshape(-1, g.shape[-1])                                  # (N, out)
        gx = (g2 @ ctx.weight.dequantize(g.dtype)).reshape(ctx.x_shape) if need_x else None
        gb = g2.sum(axis=0) if need_b else None
        return gx, gb


class QuantLinear(Module):
    """A Linear whose weight is an Int8Weight / Int4Weight (not a Parameter: it never trains)."""

    def __init__(self, weight, bias=None):
        super().__init__()
        self.qweight = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    def forward(self, x):
        return QuantLinearFunction.apply(x, self.bias, weight=self.qweight)


def quantizable_layers(model):
    """(parent, attribute, dotted name) of every Linear with a weight of its own."""
    embedded = {id(m.weight) for _, m in model.named_modules() if isinstance(m, Embedding)}
    found = []
    for name, mod in model.named_modules():
        for attr, child in mod._modules.items():
            if isinstance(child, Linear) and id(child.weight) not in embedded:
                found.append((mod, attr, f"{name}.{attr}" if name else attr))
    return found


def quantize_model(model, bits, group_size=None, weights=None):
    """Swap the model's Linear layers for QuantLinear in place; returns {dotted name: layer}.

    ``weights`` (name -> Int8Weight/Int4Weight) installs already quantized weights (loading a
    file) instead of quantizing the float ones."""
    layers = quantizable_layers(model)
    if bits == 4 and weights is None:  # check every layer before touching any
        for parent, attr, name in layers:
            check_group_size(group_size, getattr(parent, attr).in_features, f"layer {name}")
    done = {}
    for parent, attr, name in layers:
        lin = getattr(parent, attr)
        w = weights[name] if weights is not None else quantize_weight(lin.weight.data, bits, group_size)
        if tuple(w.shape) != lin.weight.shape:
            raise ValueError(f"{name}: quantized weight {w.shape} does not fit {lin.weight.shape}")
        q = QuantLinear(w, lin.bias)
        q.train(lin.training)
        setattr(parent, attr, q)
        done[name] = q
    return done
