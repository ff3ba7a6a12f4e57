"""Checks of lesson 11 (tensor parallelism)."""
import numpy as np

from lessonkit.exercise import exercise
from minillm import Tensor
from minillm.distributed.tp_layers import QKV, ShardSpec
from minillm.nn import Linear


@exercise("11.split_qkv", broken=lambda w, rank, tp: np.split(w, tp, axis=0)[rank])
def check_split_qkv(split_qkv):
    """The learner's shard of c_attn's weight (3C, C) against the library's cut, then used: the
    attention heads it computes must be whole heads of the full layer."""
    C, tp = 8, 2
    w = np.arange(3 * C * C, dtype=np.float32).reshape(3 * C, C)
    for rank in range(tp):
        got = np.asarray(split_qkv(w.copy(), rank, tp))
        want = QKV.take(w, rank, tp)
        assert got.shape == want.shape, (f"rank {rank}: shape {got.shape}, expected {want.shape} "
                                         f"(3C/tp rows of C columns)")
        if not np.array_equal(got, want):
            rows = [int(r) for r in got[:, 0] // C]
            raise AssertionError(f"rank {rank} got rows {rows} of the full weight, expected "
                                 f"{[int(r) for r in want[:, 0] // C]}: cut q, k and v each into tp "
                                 f"parts and give rank r the r-th part of all three")


def _column_parallel_input_grads(tp, seed=0):
    """Each rank's local dL/dx of a column-parallel linear (x W_r^T), and the serial dL/dx."""
    rng = np.random.default_rng(seed)
    full = Linear(6, 8, rng=rng)
    x = Tensor(rng.standard_normal((3, 6)), requires_grad=True)          # float64
    gy = rng.standard_normal((3, 8))
    full.weight.data = full.weight.data.astype(np.float64)
    full.bias = None
    y = full(x)
    y.backward(gy)
    cut = ShardSpec(0)
    local = []
    for r in range(tp):
        w_r = cut.take(full.weight.data, r, tp)                         # (8/tp, 6)
        g_r = ShardSpec(1).take(gy, r, tp)                              # (3, 8/tp): dL/dy_r
        local.append(g_r @ w_r)                                         # this rank's part of dL/dx
    return local, x.grad


@exercise("11.f_backward", broken=lambda grads: [g.copy() for g in grads])
def check_f_backward(f_backward):
    for tp in (2, 4):
        local, want = _column_parallel_input_grads(tp)
        got = f_backward([g.copy() for g in local])
        assert isinstance(got, (list, tuple)) and len(got) == tp, \
            f"return one gradient per rank ({tp} of them), got {type(got).__name__}"
        for r, g in enumerate(got):
            if not np.allclose(g, want, rtol=1e-10, atol=1e-12):
                raise AssertionError(f"tp={tp}, rank {r}: dL/dx differs from the serial layer's by "
                                     f"{np.abs(np.asarray(g) - want).max():.3g}. Every rank used the "
                                     f"same x, so its gradient gets a contribution from every rank")


def _logsumexp(x):
    m = x.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


@exercise("11.vocab_parallel_logsumexp",
          broken=lambda shards: np.log(sum(np.exp(s).sum(axis=1) for s in shards)))
def check_vocab_parallel_logsumexp(vocab_parallel_logsumexp):
    rng = np.random.default_rng(0)
    for tp, scale in ((2, 1.0), (4, 1.0), (2, 1000.0)):
        logits = scale * rng.standard_normal((5, 12))
        shards = np.split(logits, tp, axis=1)                          # rank r's columns
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            got = np.asarray(vocab_parallel_logsumexp([s.copy() for s in shards]), dtype=np.float64)
        want = _logsumexp(logits)
        assert got.shape == want.shape, f"one value per row: shape {want.shape}, got {got.shape}"
        if not np.allclose(got, want, rtol=1e-12, atol=1e-9):
            hint = (" (an overflow: shift by the global max first)" if not np.isfinite(got).all()
                    else "")
            raise AssertionError(f"tp={tp}, logits of scale {scale:g}: row 0 gives {got[0]:.6g}, "
                                 f"expected {want[0]:.6g}{hint}")
