"""Checks of lesson 15 (scale and cost): against minillm's FLOP count and a brute-force optimum."""
import numpy as np

from lessonkit.exercise import exercise
from lessonkit.verify import assert_close
from minillm.model import GPT, GPTConfig
from minillm.perf.flops import flops_per_token, matmul_params


@exercise("15.training_flops", broken=lambda n_params, n_tokens: 2 * n_params * n_tokens)
def check_training_flops(training_flops):
    cfg = GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=4, n_embd=64)
    n = matmul_params(GPT(cfg, seed=0))
    tokens = 1_000_000
    attention = 12 * cfg.n_layer * cfg.block_size * cfg.n_embd   # the part 6ND leaves out
    want = (flops_per_token(cfg, n) - attention) * tokens
    assert_close(float(training_flops(n, tokens)), float(want),
                 f"training_flops({n:,} weights, {tokens:,} tokens), against minillm's "
                 "flops_per_token without its attention term", rtol=1e-9,
                 hint="each weight: 2 FLOPs (one multiply-add) per token forward, 4 backward")


@exercise("15.gpu_days", broken=lambda flops, peak_flops, mfu, n_gpus: flops / (peak_flops * n_gpus) / 86400)
def check_gpu_days(gpu_days):
    for flops, peak, mfu, n in ((3.15e23, 312e12, 0.4, 1024), (7.4e18, 989e12, 0.35, 8), (1e20, 1e14, 1.0, 1)):
        want = flops / (peak * mfu * n) / 86400
        assert_close(float(gpu_days(flops, peak, mfu, n)), want,
                     f"gpu_days({flops:.3g} FLOPs, peak {peak:.3g} FLOP/s, MFU {mfu}, {n} GPUs)",
                     rtol=1e-9, hint="each GPU delivers peak * mfu FLOP/s; a day is 86,400 s")


def _twenty_tokens_per_param(C, law):  # a plausible slip: Chinchilla's rule of thumb, not the law
    n = np.sqrt(C / 120)
    return n, 20 * n


@exercise("15.compute_optimal", broken=_twenty_tokens_per_param)
def check_compute_optimal(compute_optimal):
    law = {"E": 1.1, "A": 60.0, "alpha": 0.45, "B": 900.0, "beta": 0.35}
    n_grid = np.logspace(2, 14, 200_001)
    for C in (1e12, 1e16, 1e20):
        d_grid = C / (6 * n_grid)
        loss = law["E"] + law["A"] / n_grid ** law["alpha"] + law["B"] / d_grid ** law["beta"]
        n_best = n_grid[np.argmin(loss)]
        n, d = compute_optimal(C, law)
        assert_close(float(6 * n * d), C, f"6 N D of your optimum at C = {C:.0e}", rtol=1e-6,
                     hint="spend the whole budget: D = C / (6 N)")
        assert_close(float(n), n_best, f"N at C = {C:.0e} (a fine grid search of L(N, C/6N) "
                     f"finds {n_best:.4g})", rtol=2e-3,
                     hint="set dL/dN = 0 with D = C/(6N): alpha A N^-alpha = beta B D^-beta")
