"""The Optimizer base class: parameter lists, per-parameter state, scratch buffers, state dicts.

An optimizer owns, for every parameter, a few arrays of the same shape (AdamW: the moments
``m`` and ``v``; SGD: a momentum buffer) and a handful of hyperparameters. Subclasses say which
buffers they need and write ``step``; everything else (accepting ``model.named_parameters()``,
``zero_grad``, saving and restoring state with clear errors) lives here.

Updates are done in place with ``out=`` so a step allocates nothing: each parameter gets views
into one preallocated flat scratch array per dtype, sized for the largest parameter, so the
scratch costs one parameter's worth of memory, not a model's worth.
"""
from collections.abc import Mapping

from minillm import backend
from minillm.backend import xp
from minillm.errors import UserError

# How many differences load_state_dict spells out before summarising the rest.
_MAX_LISTED = 6


def named_parameters(params, owner: str):
    """Normalise ``params`` to ``(names, params)`` lists.

    Accepts an iterable of parameters (named "0", "1", ...), an iterable of ``(name, param)``
    pairs, or a mapping name -> param. A parameter is anything with ``.data`` (an xp array) and
    ``.grad`` (an xp array or None).
    """
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    if not items:
        raise UserError(f"{owner} got an empty parameter list; pass model.named_parameters() "
                        "or a list of parameters")
    is_pair = [isinstance(it, tuple) and len(it) == 2 and isinstance(it[0], str) for it in items]
    if all(is_pair):
        names, plist = [n for n, _ in items], [p for _, p in items]
    elif not any(is_pair):
        names, plist = [str(i) for i in range(len(items))], items
    else:
        raise UserError(f"{owner} got a mix of (name, parameter) pairs and bare parameters; "
                        "pass one kind only")
    seen_names, seen_ids = set(), {}
    for name, p in zip(names, plist):
        if not hasattr(p, "data") or not hasattr(p, "grad"):
            raise UserError(f"{owner}: {name!r} is a {type(p).__name__}, not a parameter "
                            "with .data and .grad")
        backend.check_array(p.data, what=f"parameter {name!r}")
        if name in seen_names:
            raise UserError(f"{owner}: parameter name {name!r} appears twice; names must be unique")
        if id(p) in seen_ids:
            # Tied weights (wte / lm_head) must be stepped once, or they move twice as far.
            raise UserError(f"{owner}: parameter {name!r} is the same object as "
                            f"{seen_ids[id(p)]!r} (tied weights?); pass each parameter once")
        seen_names.add(name)
        seen_ids[id(p)] = name
    return names, plist


def flatten_groups(params, owner: str):
    """``(names, params, decay)`` from what an optimizer was given: parameters or (name,
    parameter) pairs (``decay`` is then None: the default rule applies), or a list of groups
    ``{"params": ..., "decay": bool}`` (see groups.py) whose flags give one bool per parameter."""
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    if not items or not all(isinstance(g, Mapping) for g in items):
        if any(isinstance(g, Mapping) for g in items):
            raise UserError(f"{owner} got a mix of parameter groups (dicts) and parameters; pass one kind")
        return (*named_parameters(items, owner), None)
    flat, decay = [], []
    for i, g in enumerate(items):
        unknown = sorted(set(g) - {"params", "decay"})
        if "params" not in g or unknown:
            raise UserError(f"{owner}: parameter group {i} must have 'params' and may have 'decay' "
                            f"(on/off); it has {sorted(g)}")
        group = list(g["params"])
        flat += group
        decay += [None if "decay" not in g else bool(g["decay"])] * len(group)
    names, plist = named_parameters(flat, owner)
    return names, plist, [default_decay(p) if d is None else d for p, d in zip(plist, decay)]


def default_decay(p) -> bool:
    """The rule when nobody says otherwise: matrices (Linear, Embedding) decay, vectors (biases,
    norm gains) do not, as in GPT-2 / nanoGPT training recipes (groups.py overrides it)."""
    return p.data.ndim >= 2


def scratch_views(params, count: int = 1):
    """For each parameter, ``count`` scratch arrays of its shape and dtype.

    They are views into ``count`` flat buffers per dtype sized for the largest parameter, so
    parameters share the memory (they are updated one after another, never at once).
    """
    largest = {}
    for p in params:
        dt = p.data.dtype
        largest[dt] = max(largest.get(dt, 0), p.data.size)
    flats = {dt: [xp.empty(n, dtype=dt) for _ in range(count)] for dt, n in largest.items()}
    return [tuple(f[:p.data.size].reshape(p.data.shape) for f in flats[p.data.dtype])
            for p in params]


def _summarise(problems):
    shown = problems[:_MAX_LISTED]
    more = len(problems) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


class Optimizer:
    """Base class. Subclasses set ``buffers`` and ``hyperparameters``, and define
    ``_configure(**hyperparameters)`` (validate and store) and ``step(lr=None)``."""

    buffers: tuple = ()          # names of per-parameter state arrays, e.g. ("m", "v")
    hyperparameters: tuple = ()  # attributes saved in state_dict, e.g. ("lr", "betas", ...)
    scratch_count: int = 1       # scratch arrays per parameter that step() needs

    def __init__(self, params, **hyper):
        owner = type(self).__name__
        self.names, self.params, decay = flatten_groups(params, owner)
        self._configure(**hyper)
        self.step_count = 0  # optimizer steps taken; AdamW's bias correction uses it
        self.state = {name: {k: xp.zeros_like(p.data) for k in self._buffers_for(p)}
                      for name, p in zip(self.names, self.params)}
        self._scratch = scratch_views(self.params, self.scratch_count)
        self._decay = decay if decay is not None else [default_decay(p) for p in self.params]

    def _configure(self, **hyper):
        raise NotImplementedError

    def _buffers_for(self, p):
        return self.buffers

    def step(self, lr=None):
        raise NotImplementedError

    def zero_grad(self):
        """Drop every gradient (``grad = None``): the next backward starts fresh, and a
        parameter that gets no gradient is skipped by ``step``."""
        for p in self.params:
            p.grad = None

    def _grads(self):
        """Yield ``(param, grad, state, scratch, decay)`` for parameters that have a gradient."""
        for name, p, scratch, decay in zip(self.names, self.params, self._scratch, self._decay):
            g = p.grad
            if g is None:
                continue
            if g.shape != p.data.shape:
                raise ValueError(f"gradient of {name!r} has shape {g.shape}, "
                                 f"parameter has {p.data.shape}")
            yield p, g, self.state[name], scratch, decay

    # ---- saving and restoring -----------------------------------------------------------

    def state_dict(self) -> dict:
        """A snapshot: ``{"step", <hyperparameters>, "state": {name: {buffer: array}}}``.

        Arrays are copies (on the active device), so training on does not change a saved dict.
        """
        d = {"step": self.step_count}
        for k in self.hyperparameters:
            d[k] = getattr(self, k)
        d["state"] = {name: {k: a.copy() for k, a in st.items()} for name, st in self.state.items()}
        return d

    def load_state_dict(self, d: Mapping):
        """Restore a ``state_dict()`` (arrays may be NumPy, e.g. read from HDF5).

        Hyperparameters are restored too, as in PyTorch. Any mismatch of names, buffers or
        shapes raises one UserError listing what differs, before anything is changed.
        """
        owner = type(self).__name__
        missing_keys = [k for k in ("step", "state", *self.hyperparameters) if k not in d]
        if missing_keys:
            raise UserError(f"{owner} state dict lacks {missing_keys}; was it saved by "
                            f"{type(self).__name__}.state_dict()?")
        saved = d["state"]
        problems = []
        missing = [n for n in self.names if n not in saved]
        unexpected = [n for n in saved if n not in self.state]
        if missing:
            problems.append(f"missing parameters {missing[:_MAX_LISTED]}"
                            + (f" (+{len(missing) - _MAX_LISTED})" if len(missing) > _MAX_LISTED else ""))
        if unexpected:
            problems.append(f"unexpected parameters {unexpected[:_MAX_LISTED]}"
                            + (f" (+{len(unexpected) - _MAX_LISTED})" if len(unexpected) > _MAX_LISTED else ""))
        for name, st in self.state.items():
            if name not in saved:
                continue
            got = saved[name]
            if set(got) != set(st):
                problems.append(f"{name!r} has buffers {sorted(got)}, {owner} expects {sorted(st)}")
                continue
            for k, a in st.items():
                shape = tuple(got[k].shape)
                if shape != a.shape:
                    problems.append(f"{name!r}.{k} has shape {shape}, expected {a.shape}")
        if problems:
            raise UserError(f"cannot load {owner} state: {_summarise(problems)}")
        self._configure(**{k: d[k] for k in self.hyperparameters})
        self.step_count = int(d["step"])
        for name, st in self.state.items():
            for k, a in st.items():
                a[...] = backend.asarray(saved[name][k], dtype=a.dtype)

    def __repr__(self):
        hp = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.hyperparameters)
        return f"{type(self).__name__}({len(self.params)} parameters, step={self.step_count}, {hp})"
