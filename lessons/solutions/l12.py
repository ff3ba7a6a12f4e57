"""Reference solutions, lesson 12."""
from minillm.config import Config, ParallelConfig, TrainConfig
from minillm.perf.memory import memory_ledger


def block_activation_bytes(b, T, C, n_head):
    N = b * T
    return 4 * (26 * N * C + 2 * N + b * n_head * T * T)


def zero_state_bytes(n_params, dp, zero):
    weights, grads, moments = 4 * n_params, 4 * n_params, 8 * n_params
    if zero >= 1:
        moments //= dp
    if zero >= 2:
        grads //= dp
    if zero >= 3:
        weights //= dp
    return weights + grads + moments


def smallest_layout(model, batch_size, gpu_bytes):
    for dp in (1, 2, 4, 8, 16):
        for zero in (0, 1, 2, 3):
            for recompute in ("none", "selective", "full"):
                cfg = Config(model=model, train=TrainConfig(batch_size=batch_size, dtype="bfloat16",
                                                            recompute=recompute),
                             parallel=ParallelConfig(dp=dp, zero=zero))
                if max(r.total for r in memory_ledger(cfg, gpu=True)) <= gpu_bytes:
                    return dp, zero, recompute
    return None
