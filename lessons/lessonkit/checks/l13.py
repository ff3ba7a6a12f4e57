"""Checks of lesson 13 (evaluation and fine-tuning)."""
import numpy as np

from lessonkit.exercise import exercise
from minillm import Tensor
from minillm.autograd.tensor import no_grad
from minillm.finetune.data import Example
from minillm.finetune.lora import LoRALinear
from minillm.nn import Linear


@exercise("13.sft_targets", broken=lambda ids, train: np.where(train[:-1], ids[1:], -100))
def check_sft_targets(sft_targets):
    """Against the library's Example.targets (what minillm finetune trains on)."""
    rng = np.random.default_rng(0)
    for n in (5, 12):
        ids, train = rng.integers(0, 50, n), rng.random(n) < 0.5
        want = Example(ids, train).targets
        got = np.asarray(sft_targets(ids, train))
        assert got.shape == want.shape, (f"targets have shape {got.shape}, expected {want.shape}: one per "
                                         "input position, i.e. len(ids) - 1")
        bad = np.flatnonzero(got != want)
        assert not bad.size, (f"position {bad[0]}: got {got[bad[0]]}, expected {want[bad[0]]}. The target of "
                              f"position t is token t+1, kept where train[t+1] (the flag of the token predicted)")


@exercise("13.lora_forward", broken=lambda x, W, b, A, B, alpha: x @ W.T + b + x @ A.T @ B.T)
def check_lora_forward(lora_forward):
    """Against LoRALinear.forward, the layer minillm finetune --lora-rank uses."""
    rng = np.random.default_rng(1)
    base = Linear(6, 5, rng=rng)
    layer = LoRALinear(base, rank=2, alpha=3.0, rng=rng)
    layer.lora_B.data[...] = rng.standard_normal((5, 2)).astype(np.float32)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    with no_grad():
        want = layer(Tensor(x)).numpy()
    got = np.asarray(lora_forward(x, base.weight.data, base.bias.data, layer.lora_A.data, layer.lora_B.data, 3.0))
    assert got.shape == want.shape, f"output of shape {got.shape}, expected {want.shape}"
    err = np.abs(got - want).max()
    assert err < 1e-4, (f"differs from LoRALinear by up to {err:.3g}; y = x W^T + b + (alpha / r) (x A^T) B^T "
                        "with r = A.shape[0]")


@exercise("13.pick_choice", broken=lambda logprobs, byte_lengths: int(np.argmax(logprobs)))
def check_pick_choice(pick_choice):
    """A long likely choice against a short unlikely one: only normalising picks the long one."""
    cases = [([-2.77, -2.30], [4, 1], 0), ([-1.0, -6.0, -3.0], [1, 2, 2], 0), ([-9.0, -4.0], [10, 2], 0)]
    for logprobs, lengths, want in cases:
        got = pick_choice(list(logprobs), list(lengths))
        assert int(got) == want, (f"log-likelihoods {logprobs} over {lengths} bytes: picked {got}, expected {want} "
                                  f"(per byte: {[round(l / n, 3) for l, n in zip(logprobs, lengths)]})")
