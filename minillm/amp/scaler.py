"""Dynamic loss scaling: keep float16 gradients inside float16's range.

Gradients of a language model are small (most between 1e-8 and 1e-3); float16 rounds anything
below ~6e-8 to zero. Multiplying the loss by a scale S multiplies every gradient by S (backward
is linear), lifting them into range; dividing the fp32 master gradients by S afterwards undoes
it exactly. Too large an S overflows to inf instead, so the scale is tuned while training:

    overflow (inf/nan in any gradient)  -> skip this optimizer step, S *= backoff_factor
    growth_interval clean steps in a row -> S *= growth_factor (try a larger scale again)

With ``hysteresis = h > 1`` the scale backs off only at the h-th overflow since it last grew
(Megatron-LM's rule: isolated spikes do not halve it), then at every overflow until it grows.
A scale that would drop below ``min_scale`` means the gradients are inf/nan whatever the scale:
the loss diverged, and ``update`` raises ``LossDivergedError``.

``NoLossScaler`` is the same interface doing nothing (float32, bfloat16).
"""
import math

from minillm.errors import ConfigError, UserError


class LossDivergedError(UserError):
    """Gradients stayed inf/nan at the smallest loss scale: training cannot go on from here.

    The trainer catches exactly this type, saves the last good state, and re-raises (exit code 2).
    """


class DynamicLossScaler:
    """``DynamicLossScaler(init_scale=2**16, growth_factor=2.0, backoff_factor=0.5,
    growth_interval=2000, hysteresis=1, min_scale=1.0)``; ``loss_scale`` is the current scale."""

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, hysteresis=1, min_scale=1.0):
        checks = ((math.isfinite(init_scale) and init_scale > 0, f"init_scale={init_scale} must be > 0"),
                  (growth_factor > 1, f"growth_factor={growth_factor} must be > 1"),
                  (0 < backoff_factor < 1, f"backoff_factor={backoff_factor} must be in (0, 1)"),
                  (int(growth_interval) >= 1, f"growth_interval={growth_interval} must be >= 1"),
                  (int(hysteresis) >= 1, f"hysteresis={hysteresis} must be >= 1"),
                  (0 < min_scale <= init_scale, f"min_scale={min_scale} must be in (0, init_scale={init_scale}]"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"DynamicLossScaler: {message}")
        self.loss_scale = float(init_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.hysteresis = int(growth_interval), int(hysteresis)
        self.min_scale = float(min_scale)
        self.growth_tracker = 0                # clean steps since the last overflow or growth
        self.hysteresis_tracker = self.hysteresis  # overflows still tolerated before backing off
        self.overflows_in_a_row = 0            # for the divergence message only

    def scale_loss(self, loss):
        """``loss * scale`` (a Tensor, for backward)."""
        return loss * self.loss_scale

    @property
    def inv_scale(self) -> float:
        """What scaled gradients are multiplied by to get the true ones."""
        return 1.0 / self.loss_scale

    def update(self, found_inf: bool) -> None:
        """After each step: back off on overflow, grow after ``growth_interval`` clean steps."""
        if found_inf:
            self.growth_tracker = 0
            self.overflows_in_a_row += 1
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker > 0:
                return
            new_scale = self.loss_scale * self.backoff_factor
            if new_scale < self.min_scale:
                raise LossDivergedError(
                    f"the loss diverged: gradients are inf/nan even at loss scale {self.loss_scale:g} "
                    f"({self.overflows_in_a_row} overflowing steps in a row); lower train.lr or raise "
                    f"train.warmup_steps, or train in --train.dtype=bfloat16 or float32")
            self.loss_scale = new_scale
            return
        self.overflows_in_a_row = 0
        self.growth_tracker += 1
        if self.growth_tracker >= self.growth_interval:
            self.loss_scale *= self.growth_factor
            self.growth_tracker = 0
            self.hysteresis_tracker = self.hysteresis

    def state_dict(self) -> dict:
        return {"loss_scale": self.loss_scale, "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; a dict without a scale (a float32 or bfloat16 run's) keeps
        the initial one."""
        if "loss_scale" not in state:
            return
        scale = float(state["loss_scale"])
        if not (math.isfinite(scale) and scale > 0):
            raise UserError(f"checkpoint loss scale {scale} is not a positive number; the "
                            f"checkpoint is damaged, resume from an earlier one")
        self.loss_scale = scale
        self.growth_tracker = int(state.get("growth_tracker", 0))
        self.hysteresis_tracker = int(state.get("hysteresis_tracker", self.hysteresis))
        self.overflows_in_a_row = 0


class NoLossScaler:
    """No scaling (float32, bfloat16): the scale is 1 and never changes.

    bfloat16 has float32's range, so its gradients neither underflow nor overflow where float32
    would not; an inf/nan gradient there means the loss itself diverged, and ``update`` says so.
    """

    loss_scale = None  # nothing to log
    inv_scale = 1.0

    def scale_loss(self, loss):
        return loss

    def update(self, found_inf: bool) -> None:
        if found_inf:
            raise LossDivergedError("the loss diverged: gradients are inf/nan (no loss scaling is "
                                    "involved); lower train.lr or raise train.warmup_steps")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
