"""Weight decay per parameter group: which parameters are decayed, by a rule you can override.

Weight decay pulls weights toward zero. That regularises matrices (Linear and Embedding weights),
but pulling biases or norm gains toward zero only fights the scales the network needs, so the
default (GPT-2 / nanoGPT practice) leaves every vector alone. The rule is ``train.no_decay``, a
comma list of entries; a parameter matching any entry is *not* decayed, every other one is:

    ndim<2     every parameter with fewer than 2 dimensions (biases, norm gains): the default
    PATTERN    an fnmatch pattern on the parameter name: transformer.wte.weight, *.bias, *.ln_*

e.g. ``--train.no_decay='ndim<2,transformer.wte.weight'`` also spares the embeddings; ``''``
decays everything. ``param_groups`` turns the rule into groups an optimizer accepts::

    AdamW(param_groups(model.named_parameters(), "ndim<2,transformer.wte.weight"), weight_decay=0.1)

A group is ``{"params": [(name, p), ...], "decay": bool}``: it switches decay on or off; the
strength is the optimizer's ``weight_decay``.
"""
from fnmatch import fnmatchcase

from minillm.errors import ConfigError

VECTORS = "ndim<2"
DEFAULT_NO_DECAY = VECTORS


def parse_no_decay(rule) -> tuple:
    """The entries of a rule: a comma string (config) or a sequence of entries."""
    items = rule.split(",") if isinstance(rule, str) else list(rule)
    return tuple(e.strip() for e in items if e.strip())


def excluded(name, ndim, entries) -> bool:
    """True when a parameter (its name and number of dimensions) matches an entry of the rule:
    it is not decayed."""
    return any(ndim < 2 if e == VECTORS else fnmatchcase(name, e) for e in entries)


def decay_by_name(names, shapes, no_decay=DEFAULT_NO_DECAY) -> dict:
    """{name: decayed?} by the rule for parameters known by name and shape: what sharded
    optimizers need, whose pieces are flat slices of the parameters they come from."""
    entries = parse_no_decay(no_decay)
    return {n: not excluded(n, len(s), entries) for n, s in zip(names, shapes)}


def check_no_decay(no_decay, names) -> None:
    """ConfigError naming a pattern of the rule that matches none of ``names`` (the whole model's)."""
    for e in parse_no_decay(no_decay):
        if e != VECTORS and not any(fnmatchcase(n, e) for n in names):
            raise ConfigError(f"train.no_decay: pattern {e!r} matches no parameter (names look like "
                              f"{', '.join(list(names)[:4])}, ...); fix the pattern or drop it")


def param_groups(named_params, no_decay=DEFAULT_NO_DECAY, strict=True) -> list:
    """Groups of (name, parameter) pairs, decayed or not by the rule ``no_decay`` (see the
    module docstring), in the order given. With ``strict`` a pattern that matches no parameter
    is a ConfigError naming it (a typo would otherwise silently decay what it meant to spare);
    pass ``strict=False`` where only part of the model is at hand (a pipeline stage)."""
    pairs = list(named_params)
    entries = parse_no_decay(no_decay)
    if strict:
        check_no_decay(no_decay, [n for n, _ in pairs])
    groups = []
    # runs of neighbours with the same flag: the model's order is kept, so the optimizer state
    # (and a checkpoint) is laid out exactly as without groups
    for pair in pairs:
        decay = not excluded(pair[0], pair[1].data.ndim, entries)
        if groups and groups[-1]["decay"] == decay:
            groups[-1]["params"].append(pair)
        else:
            groups.append({"params": [pair], "decay": decay})
    return groups
