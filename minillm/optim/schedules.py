"""Learning-rate schedules: pure functions of the step number, no state to save or restore.

``step`` is the 0-based index of the optimizer step about to be taken. Every schedule starts
with the same linear warm-up, from ``lr / warmup_steps`` at step 0 to ``lr`` at step
``warmup_steps - 1`` (no warm-up when ``warmup_steps == 0``), then:

- ``constant``: ``lr``.
- ``cosine``:   half a cosine from ``lr`` at ``warmup_steps`` down to ``min_lr`` at ``max_steps``,
                ``min_lr`` after.
- ``wsd``:      warm-up, stable at ``lr``, then a straight line down to ``min_lr`` over the last
                ``decay_frac * max_steps`` steps, ``min_lr`` after ("warmup-stable-decay").
- ``inv_sqrt``: ``lr * sqrt(warmup_steps / step)`` (``min_lr`` and ``max_steps`` unused).

``get_lr(step, cfg)`` reads ``lr, min_lr, warmup_steps, max_steps, schedule, decay_frac`` from
a config object (the ``[train]`` section) and dispatches by name.
"""
import functools
import math

from minillm.choices import LR_SCHEDULES as SCHEDULES
from minillm.errors import ConfigError


def warmup_lr(step: int, lr: float, warmup_steps: int) -> float:
    """Linear warm-up: ``lr * (step + 1) / warmup_steps``, for ``step < warmup_steps``."""
    return lr * (step + 1) / warmup_steps


def constant_lr(step: int, lr: float, warmup_steps: int = 0) -> float:
    if step < warmup_steps:
        return warmup_lr(step, lr, warmup_steps)
    return float(lr)


def cosine_lr(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    if step < warmup_steps:
        return warmup_lr(step, lr, warmup_steps)
    if step >= max_steps:
        return float(min_lr)
    progress = (step - warmup_steps) / (max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def wsd_lr(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int,
           decay_frac: float) -> float:
    if step < warmup_steps:
        return warmup_lr(step, lr, warmup_steps)
    if step >= max_steps:
        return float(min_lr)
    decay_start = max_steps - decay_frac * max_steps
    if step < decay_start:
        return float(lr)
    progress = (step - decay_start) / (max_steps - decay_start)  # 0 -> 1
    return lr + progress * (min_lr - lr)


def inv_sqrt_lr(step: int, lr: float, warmup_steps: int) -> float:
    if step < warmup_steps:
        return warmup_lr(step, lr, warmup_steps)
    # Without warm-up, treat it as 1 step so the decay lr / sqrt(step) is defined from step 0.
    w = max(warmup_steps, 1)
    return lr * math.sqrt(w / max(step, w))


def check_schedule(cfg) -> None:
    """Raise ConfigError (one line, saying what to change) if ``cfg`` cannot define a schedule."""
    _checked(cfg.schedule, cfg.warmup_steps, getattr(cfg, "decay_frac", 0.0))


# Each schedule by name, called with (step, cfg): the one dispatch table.
_BY_NAME = {
    "constant": lambda step, c: constant_lr(step, c.lr, c.warmup_steps),
    "cosine": lambda step, c: cosine_lr(step, c.lr, c.min_lr, c.warmup_steps, c.max_steps),
    "wsd": lambda step, c: wsd_lr(step, c.lr, c.min_lr, c.warmup_steps, c.max_steps, c.decay_frac),
    "inv_sqrt": lambda step, c: inv_sqrt_lr(step, c.lr, c.warmup_steps),
}
assert tuple(_BY_NAME) == SCHEDULES, "minillm.choices.LRSchedule and _BY_NAME must list the same names"


@functools.lru_cache(maxsize=64)
def _checked(name, warmup_steps, decay_frac):
    """The schedule function for these settings, checked once: later steps of the same schedule
    hit this cache and are not validated again."""
    if name not in SCHEDULES:
        raise ConfigError(f"unknown train.schedule={name!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps={warmup_steps} must be >= 0")
    if name == "wsd" and not 0.0 <= decay_frac <= 1.0:
        raise ConfigError(f"train.decay_frac={decay_frac} must be in [0, 1] (e.g. 0.2)")
    # warmup_steps > max_steps (a short trial run of a long recipe) is allowed: the run simply
    # ends during warm-up, and a decay that starts inside warm-up begins when warm-up ends.
    return _BY_NAME[name]


def get_lr(step: int, cfg) -> float:
    """The learning rate for optimizer step ``step`` (0-based) under ``cfg.schedule``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return _checked(cfg.schedule, cfg.warmup_steps, getattr(cfg, "decay_frac", 0.0))(step, cfg)
