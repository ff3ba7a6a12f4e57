"""Module and Parameter: containers that find their parameters by themselves.

Assigning a Parameter or a Module to an attribute registers it, so ``named_parameters()``
yields ``transformer.h.0.attn.c_attn.weight``-style names in a fixed (registration) order, and
``state_dict`` / ``load_state_dict`` map those names to arrays.
"""
import functools
from collections import OrderedDict

from minillm import backend
from minillm.autograd.tensor import Tensor
from minillm.backend import xp
from minillm.errors import UserError


class Parameter(Tensor):
    """A Tensor that a Module owns and an optimizer updates (requires_grad=True)."""

    def __init__(self, data, requires_grad=True):
        if not backend.is_array(data):
            data = backend.asarray(data, dtype=xp.float32)
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype})"


class Module:
    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                               f"before assigning {name!r}")
        # a replaced parameter or module keeps its place in the order (as in PyTorch), so a
        # wrapper that swaps layers (tensor parallelism) leaves the serial names' order alone
        if isinstance(value, Parameter):
            self._modules.pop(name, None)
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._parameters.pop(name, None)
            self._modules[name] = value
        else:
            self._parameters.pop(name, None)
            self._modules.pop(name, None)
        object.__setattr__(self, name, value)

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def wrap_forward(self, wrapper):
        """From now on, calling this module runs ``wrapper(forward, *args, **kwargs)``, where
        ``forward`` is what ran before. Features that act around a module without changing its
        code use this: activation recomputation (``model/recompute.py``), ZeRO-3's gathering of
        a block's parameters (``distributed/zero3.py``). The last wrapper added runs outermost."""
        object.__setattr__(self, "forward", functools.partial(wrapper, self.forward))

    # ----------------------------------------------------------------- traversal
    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        return [m for _, m in self.named_modules()]

    def _named_parameters_all(self):
        """Every (name, parameter) pair, shared (tied) parameters once per name."""
        for mod_name, mod in self.named_modules():
            for name, p in mod._parameters.items():
                yield (f"{mod_name}.{name}" if mod_name else name), p

    def named_parameters(self):
        """(name, parameter) pairs in registration order; a tied parameter appears once."""
        seen = set()
        for name, p in self._named_parameters_all():
            if id(p) not in seen:
                seen.add(id(p))
                yield name, p

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    # ----------------------------------------------------------------- modes and grads
    def train(self, mode=True):
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    # ----------------------------------------------------------------- state
    def state_dict(self):
        """name -> array for every parameter name (tied parameters under each of their names)."""
        return OrderedDict((name, p.data) for name, p in self._named_parameters_all())

    def load_state_dict(self, state, strict=True):
        """Copy arrays into the parameters in place (so optimizers keep their references).
        With strict, missing, unexpected or mis-shaped names are all listed in one error."""
        own = OrderedDict(self._named_parameters_all())
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        misshaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {own[k].shape}"
                     for k in own if k in state and tuple(state[k].shape) != own[k].shape]
        problems = []
        if missing and strict:
            problems.append("missing keys: " + ", ".join(missing))
        if unexpected and strict:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if misshaped:
            problems.append("shape mismatch: " + "; ".join(misshaped))
        if problems:
            raise ValueError("load_state_dict: " + " | ".join(problems))
        for name, p in own.items():
            if name in state:
                p.data[...] = backend.asarray(state[name], dtype=p.data.dtype)
        return self


class ModuleList(Module):
    """A list of modules registered as ``0``, ``1``, ... (``transformer.h.0`` in GPT names)."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module):
        setattr(self, str(len(self._modules)), module)

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self):
        return len(self._modules)


def check_state(shapes, state, source):
    """A UserError naming the tensor and the file unless ``state`` has every name of ``shapes``
    (name -> shape) with that shape."""
    missing = [n for n in shapes if n not in state]
    if missing:
        raise UserError(f"{source} has no tensor {missing[0]!r}" +
                        (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else "") +
                        "; it was written for a different model")
    for name, shape in shapes.items():
        if tuple(state[name].shape) != tuple(shape):
            raise UserError(f"{source}: tensor {name!r} has shape {tuple(state[name].shape)} but the "
                            f"model expects {tuple(shape)}; check the [model] config")


def load_params(named_params, state, source):
    """Copy ``state[name]`` into each parameter in place; a missing or mis-shaped tensor is a
    UserError naming it and the file."""
    check_state({n: p.shape for n, p in named_params}, state, source)
    for name, p in named_params:
        p.data[...] = backend.asarray(state[name]).astype(p.data.dtype, copy=False)
