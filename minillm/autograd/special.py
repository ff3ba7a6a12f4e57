"""Special functions NumPy lacks, written with ``xp`` so one code path runs on CPU and GPU.

``erf`` (the exact GELU needs it) is summed from its Taylor series and its continued fraction in
float64, accurate to float64 rounding; a fused GPU kernel may replace it later.
"""
import math

from minillm.backend import xp


def erf(x):
    """Error function, elementwise, accurate to float64 rounding (NumPy has none built in).

    |x| < 3: erf(x) = 2/sqrt(pi) exp(-x^2) sum_n 2^n x^(2n+1) / (1*3*...*(2n+1))  (all terms
    positive, so no cancellation); |x| >= 3: erfc from its continued fraction.
    """
    x = xp.asarray(x)
    ax = xp.abs(x).astype(xp.float64)
    small = xp.minimum(ax, 3.0)
    x2 = small * small
    term = small.copy()
    total = small.copy()
    for n in range(1, 80):
        term *= 2.0 * x2 / (2 * n + 1)
        total += term
    res_small = (2.0 / math.sqrt(math.pi)) * xp.exp(-x2) * total
    big = xp.maximum(ax, 3.0)
    frac = xp.zeros_like(big)
    for k in range(60, 0, -1):  # erfc(x) = exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...))))
        frac = (k / 2.0) / (big + frac)
    res_big = 1.0 - xp.exp(-big * big) / math.sqrt(math.pi) / (big + frac)
    res = xp.where(ax < 3.0, res_small, res_big)
    return (xp.sign(x) * res).astype(x.dtype if x.dtype.kind == "f" else xp.float64)
