"""Activation recomputation: train.recompute = none | full | selective give bit-identical losses and
gradients (dropout on), serially, in float16 and bfloat16, with unkeyed masks, and on real
`mpirun` jobs under dp=2 and pp=2; the replay draws its dropout masks from the key it recorded
(without it the gradients differ: the test can fail); "full" keeps only the blocks' inputs.

This file is also the program the ranks run (``python -m mpi4py tests/test_recompute.py DATA OUT``).
"""
import sys
from pathlib import Path

import numpy as np
import pytest

from mpi_util import output, run_mpi
from test_zero23 import assert_same_run, train_run

from minillm.autograd.checkpoint import Checkpoint, checkpoint
from minillm.autograd.tensor import Tensor
from minillm.config import Config, TrainConfig
from minillm.distributed.comm import SerialComm
from minillm.engine import Microbatch
from minillm.model import GPT, GPTConfig
from minillm.model.recompute import apply_recompute
from minillm.train.build import build_engine

HERE = Path(__file__).resolve()
MODES = ("none", "full", "selective")
MODEL = GPTConfig(vocab_size=40, block_size=16, n_layer=3, n_head=2, n_embd=32, dropout=0.2)


def batches(step):
    rng = np.random.default_rng(step)
    x = rng.integers(0, MODEL.vocab_size, (4, MODEL.block_size))
    return [Microbatch(x[:2], np.roll(x, -1, 1)[:2], step, 0), Microbatch(x[2:], np.roll(x, -1, 1)[2:], step, 2)]


def run_engine(mode, dtype="float32", steps=2, keyed=True):
    """Losses and (model) gradients of ``steps`` forward-backward passes through the real engine."""
    cfg = Config(model=MODEL, train=TrainConfig(recompute=mode, dtype=dtype))
    model = GPT(MODEL, seed=3)
    engine = build_engine(cfg, model, SerialComm())
    losses = []
    for step in range(steps):
        mbs = batches(step) if keyed else [Microbatch(mb.x, mb.y) for mb in batches(step)]
        losses.append(engine.forward_backward(mbs))
    return losses, {n: np.array(p.grad) for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_recompute_modes_are_bit_identical(dtype):
    want_losses, want_grads = run_engine("none", dtype)
    for mode in ("full", "selective"):
        losses, grads = run_engine(mode, dtype)
        assert losses == want_losses, (mode, losses, want_losses)
        for name, g in want_grads.items():
            assert np.array_equal(grads[name], g), f"{mode} {dtype}: gradient of {name} differs"


def test_unkeyed_masks_replay_too():
    """Outside a keyed micro-batch, masks are counted per layer; the replay restores the count."""
    want_losses, want_grads = run_engine("none", keyed=False)
    losses, grads = run_engine("full", keyed=False)
    assert losses == want_losses
    assert all(np.array_equal(grads[n], g) for n, g in want_grads.items())


def test_replay_without_the_recorded_key_would_differ():
    """The negative control: a checkpoint that does not re-enter the key draws other masks in
    its replay, and the gradients come out wrong. (So the equality above is not a given.)"""
    model = GPT(MODEL, seed=3)
    block = model.transformer.h[0]
    x = Tensor(np.random.default_rng(0).standard_normal((2, 16, 32)).astype(np.float32), requires_grad=True)
    grads = {}
    for how in ("plain", "keyed replay", "unkeyed replay"):
        x.grad = None
        with model.dropout_rng.keyed(7, 0):
            if how == "plain":
                y = block(x)
            else:
                y = Checkpoint.apply(x, fn=block, rng=model.dropout_rng if how == "keyed replay" else None)
        y.sum().backward()  # outside the keyed context, as a pipeline stage runs backward
        grads[how] = x.grad.copy()
    assert np.array_equal(grads["keyed replay"], grads["plain"])
    assert not np.allclose(grads["unkeyed replay"], grads["plain"])


def test_checkpoint_with_no_input_needing_a_gradient_is_a_plain_call():
    """Only a parameter inside needs a gradient: the region keeps its graph, so it gets one."""
    from minillm.nn import Parameter
    w = Parameter(np.full((2, 3), 3.0, np.float32))
    out = checkpoint(lambda t: t * w, Tensor(np.ones((2, 3), np.float32)))
    assert out._ctx.fn.__name__ == "Mul"  # no Checkpoint node recorded
    out.sum().backward()
    assert np.array_equal(w.grad, np.ones((2, 3), np.float32))


def test_full_recompute_keeps_only_block_inputs():
    """The graph of a forward under "full" saves, for the blocks, exactly their inputs."""
    from minillm.autograd.tensor import topological_order
    model = GPT(MODEL, seed=3)
    apply_recompute(model, "full")
    mb = batches(0)[0]
    with model.dropout_rng.keyed(0, 0):
        _, loss = model(mb.x, mb.y)
    saved = [n._ctx.saved_tensors for n in topological_order(loss) if n._ctx.fn is Checkpoint]
    assert len(saved) == MODEL.n_layer
    assert all(len(s) == 1 and s[0].shape == (2, 16, 32) for s in saved)


def worker(data, out):
    from minillm.distributed.comm import get_world_comm
    from minillm.distributed.launch import install_abort_handler
    comm = get_world_comm()
    install_abort_handler(comm)
    layouts = {"dp=2": ["--parallel.dp=2"],
               "pp=2": ["--parallel.pp=2", "--parallel.microbatches=2"]}
    for layout, args in layouts.items():
        runs = {m: train_run(comm, data, Path(out) / f"{layout}_{m}", *args, "--model.dropout=0.1",
                             f"--train.recompute={m}") for m in MODES}
        for m in ("full", "selective"):
            assert_same_run(runs[m], runs["none"], f"{layout} recompute={m}", exact=True)
        print(f"{layout} recompute bit-identical ok", flush=True)


@pytest.mark.mpi
def test_recompute_under_dp2_and_pp2_is_bit_identical(char_data, tmp_path):
    res = run_mpi(2, [HERE, char_data, tmp_path], timeout=300)
    assert res.returncode == 0, output(res)
    for layout in ("dp=2", "pp=2"):
        assert res.stdout.count(f"{layout} recompute bit-identical ok") == 2, output(res)


if __name__ == "__main__":
    worker(*sys.argv[1:])
