"""Checks of lesson 10b (optimizing): against minillm's GELU and fused cross-entropy, with the
memory the learner's function allocates traced (the point of both is to move fewer bytes)."""
import tracemalloc

import numpy as np

import minillm.functional as F
from lessonkit.exercise import exercise
from lessonkit.verify import assert_close
from minillm import Tensor


def _peak_bytes(fn, *args):
    """(result, peak bytes NumPy allocated while fn ran)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = fn(*args)
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _gelu_as_written(x):   # correct, but one temporary array per operator
    k = float(np.sqrt(2 / np.pi))
    return 0.5 * x * (1 + np.tanh(k * (x + 0.044715 * x ** 3)))


@exercise("10b.gelu_inplace", broken=_gelu_as_written)
def check_gelu_inplace(gelu_inplace):
    x = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)   # 1 MiB
    x_before = x.copy()
    y, peak = _peak_bytes(gelu_inplace, x)
    assert isinstance(y, np.ndarray), f"return the output array, got {type(y).__name__}"
    assert np.array_equal(x, x_before), "gelu_inplace changed its input x: write into a new output array"
    want = F.gelu(Tensor(x)).data
    assert y.dtype == np.float32, f"the output is {y.dtype}, keep float32 (NumPy scalars are float64: use np.float32 constants or in-place ops)"
    assert_close(y, want, "gelu_inplace(x), against minillm's F.gelu (tanh approximation)",
                 rtol=1e-5, atol=1e-6, hint="0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))")
    assert peak <= 1.5 * x.nbytes, (
        f"gelu_inplace allocated {peak / x.nbytes:.1f}x the input's size at its peak; the output alone "
        "is enough (1x): allocate it once (e.g. t = x * x) and apply every further step in place "
        "(t *= ..., t += ..., np.tanh(t, out=t))")


def _one_hot(logits, targets):   # correct, but a second (N, V) array for the one-hot targets
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(targets)), targets] = 1
    return (p - onehot) / len(targets)


@exercise("10b.xent_backward", broken=_one_hot)
def check_xent_backward(xent_backward):
    rng = np.random.default_rng(1)
    N, V = 512, 2048                                           # 4 MiB of float32 logits
    logits = (3 * rng.standard_normal((N, V))).astype(np.float32)
    logits[0, 0] = 80.0                                        # exp would overflow without the max
    targets = rng.integers(0, V, N)
    before = logits.copy()
    z = Tensor(logits.copy(), requires_grad=True)
    F.cross_entropy(z, targets).backward()
    grad, peak = _peak_bytes(xent_backward, logits, targets)
    assert np.array_equal(logits, before), "xent_backward changed the logits: leave its inputs alone"
    assert_close(grad, z.grad, "dL/dlogits of the mean cross-entropy, against F.cross_entropy's backward",
                 rtol=1e-4, atol=1e-8, hint="softmax(logits) with 1 subtracted at each row's target, "
                 "all divided by N (the loss is a mean); subtract the row max before exp")
    assert peak <= 1.5 * logits.nbytes, (
        f"xent_backward allocated {peak / logits.nbytes:.1f}x the logits' size at its peak; the result "
        "alone is enough (1x): compute the softmax in place in one array and subtract 1 at "
        "[rows, targets] instead of building a one-hot matrix")
