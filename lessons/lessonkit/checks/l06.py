"""Checks of lesson 06 (mixed precision): against NumPy's float16 and minillm's DynamicLossScaler."""
import numpy as np

from lessonkit.exercise import exercise
from lessonkit.verify import assert_close
from minillm.amp import DynamicLossScaler, format_info


@exercise("06.rounds_to_zero",
          broken=lambda x: np.abs(np.asarray(x)) < format_info("float16").smallest_normal)
def check_rounds_to_zero(rounds_to_zero):
    tiny = format_info("float16").smallest_subnormal                  # 2^-24
    x = np.concatenate([[tiny / 2, tiny / 2 * (1 + 1e-6), tiny, 3e-8, 1e-8, 1e-5, 1.0, 0.0],
                        np.logspace(-10, -6, 41)])
    x = np.concatenate([x, -x])
    truth = (x.astype(np.float16) == 0) & (x != 0)                   # what float16 really does
    assert_close(np.asarray(rounds_to_zero(x), dtype=bool), truth,
                 "rounds_to_zero (compared with x.astype(float16) == 0, for x != 0)",
                 hint="float16 keeps subnormals down to smallest_subnormal = 2^-24; a nonzero value "
                      "becomes 0 only at or below half of that (round to nearest, ties to even)")


def _no_hysteresis(scale, good_steps, overflows_left, found_inf, growth_interval, hysteresis):
    if found_inf:                          # a plausible slip: backs off at every overflow
        return scale * 0.5, 0, overflows_left
    good_steps += 1
    if good_steps >= growth_interval:
        return scale * 2.0, 0, hysteresis
    return scale, good_steps, overflows_left


@exercise("06.scaler_update", broken=_no_hysteresis)
def check_scaler_update(scaler_update):
    rng = np.random.default_rng(0)
    for growth_interval, hysteresis in ((3, 1), (4, 2), (2, 3)):
        lib = DynamicLossScaler(init_scale=2.0 ** 20, growth_interval=growth_interval,
                                hysteresis=hysteresis, min_scale=2.0 ** -60)
        state = (lib.loss_scale, lib.growth_tracker, lib.hysteresis_tracker)
        history = []
        for found_inf in rng.random(40) < 0.35:
            found_inf = bool(found_inf)
            history.append("x" if found_inf else ".")
            lib.update(found_inf)
            got = tuple(scaler_update(*state, found_inf, growth_interval, hysteresis))
            want = (lib.loss_scale, lib.growth_tracker, lib.hysteresis_tracker)
            if got != want:
                raise AssertionError(
                    f"growth_interval={growth_interval}, hysteresis={hysteresis}, after the steps "
                    f"{''.join(history)} (x = overflow): (scale, good_steps, overflows_left) is "
                    f"{got}, DynamicLossScaler has {want}. Hint: an overflow resets good_steps and "
                    "uses up one of overflows_left; only when none is left does the scale halve. "
                    "Growing (after growth_interval clean steps) refills overflows_left")
            state = got
