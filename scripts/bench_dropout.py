"""Dropout masks on the CPU: the counter-based hash (nn/dropout_rng.py) against one NumPy generator
per sample (what minillm did before: ``default_rng([seed, step, layer, sample]).random(...)``).

    python scripts/bench_dropout.py [--repeats 5]

Times one keep-mask of each activation shape (batch, positions, channels), median of the repeats.
"""
import argparse
import statistics
import time

import numpy

from minillm.nn.dropout_rng import SampleDropoutRNG

SHAPES = {"pydocs_char (16, 64, 128)": (16, 64, 128),
          "shakespeare_char (64, 256, 384)": (64, 256, 384),
          "GPT-2 small (8, 1024, 768)": (8, 1024, 768)}


def per_sample_generators(shape, p, seed=1337, step=7, layer=3):
    out = numpy.empty(shape, dtype=numpy.float32)
    for r in range(shape[0]):
        out[r] = numpy.random.default_rng([seed, step, layer, r]).random(shape[1:], dtype=numpy.float32)
    return out >= p


def hashed(shape, p, seed=1337, step=7, layer=3):
    rng = SampleDropoutRNG(seed)
    with rng.keyed(step, 0):
        return rng.for_layer(layer).mask(shape, p)


def median_ms(fn, shape, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(shape, 0.1)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"{'mask shape':34}{'per-sample generators':>23}{'hash':>10}{'ratio':>8}")
    for name, shape in SHAPES.items():
        old, new = median_ms(per_sample_generators, shape, args.repeats), median_ms(hashed, shape, args.repeats)
        print(f"{name:34}{old:>20.1f} ms{new:>7.1f} ms{new / old:>8.2f}")


if __name__ == "__main__":
    main()
