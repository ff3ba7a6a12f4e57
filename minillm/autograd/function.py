"""Function (one differentiable op) and Context (what forward saves for backward).

An op is a subclass of Function with two static methods side by side:

    class Mul(Function):
        @staticmethod
        def forward(ctx, a, b):          # plain xp arrays in, one xp array out
            ctx.save_for_backward(a, b)
            return a * b
        @staticmethod
        def backward(ctx, grad):         # dL/d(out) in, dL/d(input) for every input out
            a, b = ctx.saved_tensors
            return grad * b, grad * a

``Mul.apply(x, y)`` unwraps the Tensors, runs forward, and, when a gradient is needed, records
the Context as the new Tensor's ``_ctx`` so that backward can walk the graph. Backward may return
a gradient with a broadcast shape; the engine sums it back to each input's shape.

``saved_tensors_hooks(pack, unpack)`` changes how arrays are saved while it is active: each saved
array is stored as ``pack(array)`` and handed back as ``unpack(stored)`` when backward reads it.
ZeRO-3 uses it to save a block's weights by reference (they are freed after the block's forward
and gathered again before its backward), as PyTorch's hooks of the same name allow.
"""
import contextlib

from minillm.autograd import tensor as _tensor

_saved_hooks = []  # the active (pack, unpack) pairs, innermost last


@contextlib.contextmanager
def saved_tensors_hooks(pack, unpack):
    """Inside, arrays saved for backward are stored as ``pack(a)``, read back as ``unpack(x)``."""
    _saved_hooks.append((pack, unpack))
    try:
        yield
    finally:
        _saved_hooks.pop()


class Context:
    """Per-call scratch space of a Function: saved arrays plus any attributes forward sets."""

    def __init__(self, fn, parents):
        self.fn = fn                      # the Function class
        self.parents = parents            # the inputs (Tensors or constants), in order
        self._saved, self._unpack = (), None
        self.needs_input_grad = tuple(isinstance(p, _tensor.Tensor) and p.requires_grad
                                      for p in parents)

    def save_for_backward(self, *arrays):
        if _saved_hooks:
            pack, self._unpack = _saved_hooks[-1]
            arrays = tuple(pack(a) for a in arrays)
        self._saved = arrays

    @property
    def saved_tensors(self):
        if self._unpack is None:
            return self._saved
        return tuple(self._unpack(a) for a in self._saved)

    @saved_tensors.setter
    def saved_tensors(self, arrays):  # backward empties it to free the memory
        self._saved, self._unpack = tuple(arrays), None


class Function:
    """Base class of every differentiable op (see the module docstring).

    An op whose backward can be cut in two (zero-bubble pipelines, ``tensor.DeferredWeightGrads``)
    lists in ``weight_inputs`` the inputs whose gradients can wait and defines
    ``backward_input(ctx, grad)`` (the gradients of the other inputs, None for these) and
    ``backward_weight(ctx, grad)`` (the gradients of ``weight_inputs``, in that order).
    """

    weight_inputs = ()

    @staticmethod
    def forward(ctx, *args, **kwargs):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs, **kwargs):
        Tensor = _tensor.Tensor
        arrays = [x.data if isinstance(x, Tensor) else x for x in inputs]
        ctx = Context(cls, inputs)
        out = cls.forward(ctx, *arrays, **kwargs)
        requires_grad = _tensor.is_grad_enabled() and any(ctx.needs_input_grad)
        result = Tensor(out, requires_grad=requires_grad, _check=False)
        if requires_grad:
            result._ctx = ctx
        return result

    @classmethod
    def name(cls):
        return cls.__name__
