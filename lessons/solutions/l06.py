"""Reference solutions, lesson 06."""
import numpy as np


def rounds_to_zero(x):
    x = np.abs(np.asarray(x, dtype=np.float64))
    return (x > 0) & (x <= 2.0 ** -25)          # half of float16's smallest subnormal, 2^-24


def scaler_update(scale, good_steps, overflows_left, found_inf, growth_interval, hysteresis):
    if found_inf:
        good_steps, overflows_left = 0, overflows_left - 1
        if overflows_left > 0:                  # hysteresis: tolerate this overflow
            return scale, good_steps, overflows_left
        return scale * 0.5, good_steps, overflows_left
    good_steps += 1
    if good_steps >= growth_interval:
        return scale * 2.0, 0, hysteresis
    return scale, good_steps, overflows_left
