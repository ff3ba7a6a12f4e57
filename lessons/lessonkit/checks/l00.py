"""Checks of lesson 00 (overview): against minillm's BatchSampler and fused cross-entropy."""
import numpy as np

from lessonkit.exercise import exercise
from lessonkit.verify import assert_close
from minillm import Tensor
from minillm.data import BatchSampler
from minillm.functional import cross_entropy as library_cross_entropy


def _targets_are_inputs(ids, offsets, block_size):  # a plausible slip: forgets the shift by one
    x = np.stack([ids[o:o + block_size] for o in offsets]).astype(np.int64)
    return x, x.copy()


@exercise("00.next_token_batch", broken=_targets_are_inputs)
def check_next_token_batch(next_token_batch):
    ids = np.random.default_rng(0).integers(0, 50, 500).astype(np.uint16)
    for block_size, batch_size, step in ((8, 4, 0), (16, 3, 7)):
        sampler = BatchSampler(ids, block_size, batch_size, seed=0)
        offsets = sampler.offsets(np.random.default_rng([0, step]))   # the offsets of that step
        want_x, want_y = sampler.get_batch(step)
        got_x, got_y = next_token_batch(ids, offsets, block_size)
        hint = "x[b] = ids[o : o+T] and y[b] = ids[o+1 : o+T+1] for the b-th offset o"
        assert_close(got_x, want_x, f"x (block_size={block_size}, offsets {list(offsets)})", hint=hint)
        assert_close(got_y, want_y, f"y (block_size={block_size}, offsets {list(offsets)})", hint=hint)


def _unshifted(logits, targets):  # a plausible slip: the textbook formula without the max shift
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        p = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
        return float(-np.log(p[np.arange(len(targets)), targets]).mean())


@exercise("00.cross_entropy", broken=_unshifted)
def check_cross_entropy(cross_entropy):
    rng = np.random.default_rng(1)
    for scale in (1.0, 1000.0):                   # ordinary logits, then logits that overflow exp
        logits = rng.standard_normal((6, 10)) * scale
        targets = rng.integers(0, 10, 6)
        want = library_cross_entropy(Tensor(logits), targets).item()
        got = cross_entropy(logits.copy(), targets)
        assert_close(float(got), want, f"cross_entropy on logits of size ~{scale:g}", rtol=1e-6,
                     hint="mean over rows of log(sum(exp(z))) - z[target]; subtract each row's max "
                          "first so exp never overflows")
