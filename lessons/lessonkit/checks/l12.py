"""Checks of lesson 12 (memory: the ledger, recomputation, ZeRO, will it fit)."""
import math

from lessonkit.exercise import exercise
from minillm.config import Config, ParallelConfig, TrainConfig
from minillm.model import GPTConfig
from minillm.perf.memory import gpt_parameters, memory_ledger
from minillm.perf.memory_sim import Dims, block_bytes

GPT2_SMALL = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
RECOMPUTE = ("none", "selective", "full")


@exercise("12.block_activation_bytes",
          broken=lambda b, T, C, n_head: 4 * (26 * b * T * C + 2 * b * T))  # forgets the (T, T) scores
def check_block_activation_bytes(block_activation_bytes):
    """The learner's formula against the ledger's own count of what a block keeps."""
    for b, T, C, nh in ((1, 8, 16, 2), (4, 64, 64, 4), (8, 256, 384, 6), (2, 1024, 768, 12)):
        want = sum(block_bytes(Dims(b=b, T=T, C=C, H=4 * C, nh=nh, V=1, a=4)).values())
        got = block_activation_bytes(b, T, C, nh)
        assert got == want, (f"b={b}, T={T}, C={C}, n_head={nh}: you say {got:,} bytes, a block keeps "
                             f"{want:,} ({(got - want) / want:+.1%}). Hint: count every (B, T, C) array, "
                             f"the (B, T, 4C) ones of the MLP, rstd (B, T) twice, and the probabilities")


def _ledger_state(n_layer, dp, zero):
    """Bytes of weights, gradients and AdamW moments one rank holds with ``zero``, and the
    parameter count, from the ledger (plain data parallelism keeps its gradients in the
    all-reduce buckets, which the ledger files under buffers)."""
    mc = GPTConfig(vocab_size=64, block_size=32, n_layer=n_layer, n_head=2, n_embd=64)
    cfg = Config(model=mc, train=TrainConfig(batch_size=dp), parallel=ParallelConfig(dp=dp, zero=zero))
    r = memory_ledger(cfg)[0]
    n = sum(math.prod(s) for _, s in gpt_parameters(mc))
    return r.state + (r.parts["buffers"] if zero == 0 else 0), n


@exercise("12.zero_state_bytes", broken=lambda n, dp, zero: 16 * n // (dp if zero else 1))
def check_zero_state_bytes(zero_state_bytes):
    for n_layer, dp in ((2, 2), (4, 4), (1, 8)):
        for zero in (0, 1, 2, 3):
            want, n = _ledger_state(n_layer, dp, zero)
            got = zero_state_bytes(n, dp, zero)
            # shards are cut where the parameters are, so they differ from n/dp by a few numbers
            assert abs(got - want) <= 16 * dp, (
                f"{n:,} parameters, dp={dp}, zero={zero}: you say {got:,} bytes per rank, the ledger "
                f"{want:,}. Hint: float32 weights, gradients, m and v are 4 bytes each per parameter; "
                f"stage 1 shards m and v, stage 2 also the gradients, stage 3 also the weights")


def _peak(model, batch_size, dp, zero, recompute):
    cfg = Config(model=model, train=TrainConfig(batch_size=batch_size, dtype="bfloat16", recompute=recompute),
                 parallel=ParallelConfig(dp=dp, zero=zero))
    return max(r.total for r in memory_ledger(cfg, gpu=True))


def _no_recompute(model, batch_size, gpu_bytes):  # only ever tries recompute="none"
    for dp in (1, 2, 4, 8, 16):
        for zero in (0, 1, 2, 3):
            if _peak(model, batch_size, dp, zero, "none") <= gpu_bytes:
                return dp, zero, "none"
    return None


@exercise("12.smallest_layout", broken=_no_recompute)
def check_smallest_layout(smallest_layout):
    """What "smallest" means, checked with the ledger: the answer fits, and nothing before it in
    the order (fewer GPUs; then a lower stage; then cheaper recomputation) does."""
    order = [(dp, z, r) for dp in (1, 2, 4, 8, 16) for z in (0, 1, 2, 3) for r in RECOMPUTE]
    for gib in (16, 4, 2):
        limit = gib * 2**30
        got = smallest_layout(GPT2_SMALL, 16, limit)
        assert got is not None and tuple(got) in order, f"a {gib} GiB GPU: {got} is not a (dp, zero, recompute)"
        got = tuple(got)
        peak = _peak(GPT2_SMALL, 16, *got)
        assert peak <= limit, f"a {gib} GiB GPU: {got} needs {peak / 2**30:.2f} GiB per GPU, it does not fit"
        for smaller in order[:order.index(got)]:
            peak = _peak(GPT2_SMALL, 16, *smaller)
            assert peak > limit, (f"a {gib} GiB GPU: {smaller} fits too ({peak / 2**30:.2f} GiB) and comes "
                                  f"before {got}: fewest GPUs first, then the lowest ZeRO stage, then the "
                                  f"cheapest recomputation")
