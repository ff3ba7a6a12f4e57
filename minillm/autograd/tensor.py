"""Tensor: an xp array plus the graph that made it, and reverse-mode backward over that graph.

A Tensor made by an op remembers the op's Context in ``_ctx`` (which holds the op's inputs).
``loss.backward()`` sorts the graph topologically (iteratively: deep graphs never hit Python's
recursion limit), then walks it from the loss back to the leaves, calling each op's backward once
with the sum of the gradients that reached its output. Leaves (parameters, inputs) accumulate into
``.grad``; graph buffers are dropped afterwards unless ``retain_graph=True``.
"""
import contextlib

from minillm import backend
from minillm.backend import xp

_grad_enabled = [True]


def is_grad_enabled() -> bool:
    return _grad_enabled[0]


@contextlib.contextmanager
def no_grad():
    """Run ops without recording a graph (evaluation, sampling, optimizer updates)."""
    prev = _grad_enabled[0]
    _grad_enabled[0] = False
    try:
        yield
    finally:
        _grad_enabled[0] = prev


@contextlib.contextmanager
def enable_grad():
    prev = _grad_enabled[0]
    _grad_enabled[0] = True
    try:
        yield
    finally:
        _grad_enabled[0] = prev


def unbroadcast(grad, shape):
    """Sum ``grad`` over the axes that broadcasting added or stretched, so it has ``shape``."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad.reshape(shape)


class Tensor:
    """An array that can take part in automatic differentiation."""

    __array_priority__ = 1000  # so numpy_array + tensor calls Tensor.__radd__
    _graph_freed = False  # set once backward dropped the graph that made this tensor

    def __init__(self, data, requires_grad=False, dtype=None, _check=True):
        if _check:
            if isinstance(data, Tensor):
                data = data.data
            if not backend.is_array(data):
                kind = type(data).__module__.split(".")[0]
                if kind in ("numpy", "cupy"):
                    backend.check_array(data, "Tensor data")
                data = xp.asarray(data, dtype=dtype if dtype is not None else
                                  (xp.float32 if _is_float_like(data) else None))
            elif dtype is not None and data.dtype != dtype:
                data = data.astype(dtype)
            if requires_grad and data.dtype.kind != "f" and str(data.dtype) != "bfloat16":
                raise TypeError(f"only floating point tensors can require gradients, got {data.dtype}")
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._ctx = None
        self._hooks = None
        self.name = None

    # ----------------------------------------------------------------- properties
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    T = property(lambda self: self.transpose())

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        fn = f", grad_fn={self._ctx.fn.__name__}" if self._ctx is not None else ""
        return f"Tensor({self.data!r}{grad}{fn})"

    def numpy(self):
        return backend.to_numpy(self.data)

    def item(self):
        return self.data.item()

    def detach(self):
        """The same data, cut from the graph."""
        return Tensor(self.data, _check=False)

    def is_leaf(self):
        return self._ctx is None

    def register_post_accumulate_grad_hook(self, hook):
        """Call ``hook(self)`` during backward once this leaf's ``.grad`` holds every contribution
        of that backward call (data parallelism starts a bucket's all-reduce from here)."""
        if self._hooks is None:
            self._hooks = []
        self._hooks.append(hook)
        return _HookHandle(self._hooks, hook)

    # ----------------------------------------------------------------- backward
    def backward(self, grad=None, retain_graph=False, defer=None):
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad``.

        ``defer``: a ``DeferredWeightGrads`` queue. Ops that can split their backward (those with
        ``backward_input`` / ``backward_weight``, e.g. Linear) then compute only the gradient of
        their input now and leave their weights' gradients in the queue, computed when the queue
        is ``run()`` (zero-bubble pipeline schedules run them in the pipeline's idle time)."""
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad: no input of the "
                               "ops that made it has requires_grad=True (or it was made under no_grad)")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() on a non-scalar tensor of shape {self.shape} needs a "
                                   f"gradient: call .backward(grad) with an array of that shape, or "
                                   f"reduce it to a scalar first (e.g. .sum())")
            grad = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else backend.check_array(grad, "gradient")
            if grad.shape != self.shape:
                raise ValueError(f"backward(): gradient shape {grad.shape} does not match tensor "
                                 f"shape {self.shape}")
        if self._graph_freed:
            raise RuntimeError(_FREED_MSG)
        order, leaf_uses = _topological_order(self)
        if self._ctx is None:  # backward on a leaf itself
            _accumulate_leaf(self, grad)
            return
        grads = {id(self): grad}
        while order:  # outputs first; popping lets each node's array go once its backward ran
            node = order.pop()
            g = grads.pop(id(node), None)
            ctx = node._ctx
            if g is None:  # no gradient reached this node: its leaves get no contribution from it
                for parent, need in zip(ctx.parents, ctx.needs_input_grad):
                    if need and parent._ctx is None:
                        _leaf_use_done(parent, leaf_uses)
                continue
            later = defer is not None and defer.takes(ctx)
            if later:  # input gradient now, weight gradients queued (ctx stays alive in the queue)
                in_grads = ctx.fn.backward_input(ctx, g)
                defer.add(ctx, g, leaf_uses)
            else:
                in_grads = ctx.fn.backward(ctx, g)
            if not isinstance(in_grads, tuple):
                in_grads = (in_grads,)
            for k, (parent, pg, need) in enumerate(zip(ctx.parents, in_grads, ctx.needs_input_grad)):
                if not need or pg is None:
                    if need and parent._ctx is None and not (later and k in ctx.fn.weight_inputs):
                        _leaf_use_done(parent, leaf_uses)
                    continue
                pg = unbroadcast(pg, parent.data.shape)
                if parent._ctx is None:
                    _accumulate_leaf(parent, pg)
                    _leaf_use_done(parent, leaf_uses)
                else:
                    prev = grads.get(id(parent))
                    grads[id(parent)] = pg if prev is None else prev + pg  # never in place: pg may be shared
            in_grads = pg = None  # this op's gradients go now, not during the next op's backward
            if not retain_graph:
                node._ctx = None
                node._graph_freed = True
                if not later:
                    ctx.saved_tensors = ()
                    ctx.parents = ()

    # ----------------------------------------------------------------- operators
    def __add__(self, other): return _ops().Add.apply(self, _lift(other, self))
    def __radd__(self, other): return _ops().Add.apply(_lift(other, self), self)
    def __sub__(self, other): return _ops().Sub.apply(self, _lift(other, self))
    def __rsub__(self, other): return _ops().Sub.apply(_lift(other, self), self)
    def __mul__(self, other): return _ops().Mul.apply(self, _lift(other, self))
    def __rmul__(self, other): return _ops().Mul.apply(_lift(other, self), self)
    def __truediv__(self, other): return _ops().Div.apply(self, _lift(other, self))
    def __rtruediv__(self, other): return _ops().Div.apply(_lift(other, self), self)
    def __neg__(self): return _ops().Neg.apply(self)
    def __matmul__(self, other): return _ops().matmul(self, _lift(other, self))
    def __rmatmul__(self, other): return _ops().matmul(_lift(other, self), self)
    def __getitem__(self, index): return _ops().getitem(self, index)

    def __pow__(self, other):
        if isinstance(other, Tensor):
            return _ops().Pow.apply(self, other)
        return _ops().PowScalar.apply(self, exponent=other)

    def __rpow__(self, other): return _ops().Pow.apply(_lift(other, self), self)

    # comparisons give plain boolean arrays (no gradient flows through them)
    def __lt__(self, other): return self.data < _raw(other)
    def __le__(self, other): return self.data <= _raw(other)
    def __gt__(self, other): return self.data > _raw(other)
    def __ge__(self, other): return self.data >= _raw(other)

    __hash__ = object.__hash__

    # ----------------------------------------------------------------- methods
    def sum(self, axis=None, keepdims=False): return _ops().Sum.apply(self, axis=axis, keepdims=keepdims)
    def mean(self, axis=None, keepdims=False): return _ops().Mean.apply(self, axis=axis, keepdims=keepdims)
    def max(self, axis=None, keepdims=False): return _ops().Max.apply(self, axis=axis, keepdims=keepdims)
    def exp(self): return _ops().Exp.apply(self)
    def log(self): return _ops().Log.apply(self)
    def tanh(self): return _ops().Tanh.apply(self)
    def sqrt(self): return _ops().Sqrt.apply(self)
    def relu(self): return _ops().ReLU.apply(self)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return _ops().Reshape.apply(self, shape=shape)

    view = reshape

    def transpose(self, *axes):
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        if len(axes) == 2:  # transpose(dim0, dim1) swaps two axes (PyTorch's rule); permute() permutes
            perm = list(range(self.ndim))
            perm[axes[0]], perm[axes[1]] = perm[axes[1]], perm[axes[0]]
            axes = tuple(perm)
        return _ops().Transpose.apply(self, axes=axes or None)

    def permute(self, *axes):
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return _ops().Transpose.apply(self, axes=axes)

    def astype(self, dtype):
        return _ops().Cast.apply(self, dtype=dtype)


class _HookHandle:
    def __init__(self, hooks, hook):
        self._hooks, self._hook = hooks, hook

    def remove(self):
        if self._hook in self._hooks:
            self._hooks.remove(self._hook)


def _ops():
    from minillm.autograd import ops
    return ops


def _is_float_like(data):
    import numpy
    arr = numpy.asarray(data)
    return arr.dtype.kind in "f" or (arr.dtype.kind == "O")


def _raw(x):
    return x.data if isinstance(x, Tensor) else x


def _lift(x, like):
    """Turn a Python number or array into a constant Tensor of ``like``'s dtype (no float64 upcast)."""
    if isinstance(x, Tensor):
        return x
    if backend.is_array(x):
        return Tensor(x, _check=False)
    if isinstance(x, (int, float)):
        return Tensor(xp.asarray(x, dtype=like.data.dtype), _check=False)
    return Tensor(x)


_FREED_MSG = ("backward() through a graph that an earlier backward() already freed: pass "
              "retain_graph=True to the first backward() to run backward through it again")


def _topological_order(root):
    """Non-leaf nodes reachable from ``root`` in topological order (inputs before outputs), and
    for each leaf that needs a gradient, how many op inputs use it (for the grad-ready hooks)."""
    order, leaf_uses = [], {}
    visited = set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:  # every input of node is already in order
            order.append(node)
            continue
        if id(node) in visited or node._ctx is None:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for parent, need in zip(node._ctx.parents, node._ctx.needs_input_grad):
            if not need:
                continue
            if parent._graph_freed:  # else it would pass for a leaf and its inputs get nothing
                raise RuntimeError(_FREED_MSG)
            if parent._ctx is None:
                leaf_uses[id(parent)] = leaf_uses.get(id(parent), 0) + 1
            elif id(parent) not in visited:
                stack.append((parent, False))
    return order, leaf_uses


def _accumulate_leaf(leaf, grad):
    if grad.dtype != leaf.data.dtype:  # e.g. a float16 gradient reaching a float32 master weight
        grad = grad.astype(leaf.data.dtype)
    leaf.grad = grad if leaf.grad is None else leaf.grad + grad


def _leaf_use_done(leaf, leaf_uses):
    left = leaf_uses.get(id(leaf), 0) - 1
    leaf_uses[id(leaf)] = left
    if left == 0 and leaf._hooks:
        for hook in list(leaf._hooks):
            hook(leaf)


class DeferredWeightGrads:
    """Weight gradients left for later by a split backward (``Tensor.backward(defer=queue)``).

    A zero-bubble pipeline schedule cuts each micro-batch's backward in two: B, the gradient of
    the stage's input (the next stage upstream waits for it), and W, the gradients of the
    weights (nobody waits for them). B runs ``backward(defer=queue)``: every op whose Function
    defines ``backward_input``/``backward_weight`` and whose ``weight_inputs`` are leaves returns
    the input gradient now and leaves a closure here; ``run()`` is W. Until then each queued op
    keeps what it saved (the activation memory that deferring W costs, ``nbytes``). Gradient
    hooks of a weight fire in W, when its last use is done.
    """

    def __init__(self):
        self.items = []

    def takes(self, ctx) -> bool:
        """Whether this op's weight gradients can wait: it splits, and those inputs are leaves
        that need a gradient (a weight computed by other ops must pass its gradient on now)."""
        wanted = [k for k in ctx.fn.weight_inputs if k < len(ctx.parents) and ctx.needs_input_grad[k]]
        return bool(wanted) and all(ctx.parents[k]._ctx is None for k in wanted)

    def add(self, ctx, g, leaf_uses):
        self.items.append((ctx, g, leaf_uses))

    @property
    def nbytes(self) -> int:
        """Bytes of arrays the queued closures hold (saved inputs and output gradients)."""
        seen, total = set(), 0
        for ctx, g, _ in self.items:
            for a in (*ctx.saved_tensors, g):
                if backend.is_array(a) and id(a) not in seen:
                    seen.add(id(a))
                    total += a.nbytes
        return total

    def __len__(self):
        return len(self.items)

    def run(self):
        """Compute and accumulate every queued weight gradient (W), oldest first."""
        items, self.items = self.items, []
        for ctx, g, leaf_uses in items:
            grads = ctx.fn.backward_weight(ctx, g)
            for k, pg in zip(ctx.fn.weight_inputs, grads):
                if k >= len(ctx.parents) or not ctx.needs_input_grad[k]:
                    continue
                leaf = ctx.parents[k]
                if pg is not None:
                    _accumulate_leaf(leaf, unbroadcast(pg, leaf.data.shape))
                _leaf_use_done(leaf, leaf_uses)
            ctx.saved_tensors, ctx.parents = (), ()


def saved_bytes(root, exclude_ids=()):
    """Bytes of arrays the graph behind ``root`` holds for backward (the activation memory);
    arrays whose id is in ``exclude_ids`` (e.g. the parameters' own data) are not counted."""
    seen, total = set(exclude_ids), 0
    for node in _topological_order(root)[0]:
        for a in node._ctx.saved_tensors:
            if backend.is_array(a) and id(a) not in seen:
                seen.add(id(a))
                total += a.nbytes
    return total


def topological_order(root):
    """The tensors made by ops that ``root`` depends on, inputs before outputs: the order in
    which backward visits them, reversed (what lesson 01 prints)."""
    return _topological_order(root)[0]
