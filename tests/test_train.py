"""The training loop in-process (``train(cfg)``): it learns, gradient accumulation changes nothing,
SGD works, checkpoints are pruned, and a resumed run's metrics.jsonl reads as one run.
"""
from pathlib import Path

import numpy as np
import pytest

from minillm.checkpoint import load_checkpoint
from minillm.config import load_config
from minillm.train.metrics import read_metrics
from minillm.train.trainer import Trainer, train

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"


def tiny(data_dir, out_dir, *overrides):
    """configs/tiny.toml on the session's dataset, quiet, every step logged."""
    return load_config(TINY_CONFIG, [f"--data.dir={data_dir}", f"--train.out_dir={out_dir}",
                                     "--train.log_interval=1", "--train.sample_tokens=0",
                                     *overrides])


def quiet(msg):
    pass


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir)]


def test_loss_decreases(char_data, tmp_path):
    cfg = tiny(char_data, tmp_path / "run", "--train.max_steps=60", "--train.lr=3e-3",
               "--train.eval_interval=30")
    summary = train(cfg, log=quiet)
    assert summary["step"] == 60 and not summary["stopped"]
    loss = losses(tmp_path / "run")
    assert len(loss) == 60
    assert np.mean(loss[-10:]) < np.mean(loss[:5]) - 0.5, loss
    val = [r["val_loss"] for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0]
    assert summary["val_loss"] == val[1]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_accumulation_matches_one_big_batch(char_data, tmp_path, dropout):
    """The same global batch cut into 2 micro-batches gives the same step (to float rounding),
    with dropout too: masks are keyed by (seed, step, layer, sample), not by micro-batch."""
    runs = {}
    for accum in (1, 2, 4):
        out = tmp_path / f"accum{accum}"
        train(tiny(char_data, out, "--train.max_steps=8", f"--train.grad_accum={accum}",
                   f"--model.dropout={dropout}"), log=quiet)
        runs[accum] = read_metrics(out)
    for accum in (2, 4):
        for a, b in zip(runs[1], runs[accum], strict=True):
            assert b["loss"] == pytest.approx(a["loss"], abs=2e-6), (accum, a["step"])
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-6)
            assert b["lr"] == a["lr"]
    assert runs[1][-1]["val_loss"] == pytest.approx(runs[2][-1]["val_loss"], abs=2e-6)


def test_sgd_optimizer_path(char_data, tmp_path):
    out = tmp_path / "sgd"
    cfg = tiny(char_data, out, "--train.optimizer=sgd", "--train.lr=0.5", "--train.min_lr=0.05",
               "--train.max_steps=30", "--train.weight_decay=0")
    train(cfg, log=quiet)
    loss = losses(out)
    assert all(np.isfinite(loss)) and np.mean(loss[-5:]) < loss[0] - 0.2, loss
    state = load_checkpoint(out / "ckpt_0000030.h5")
    opt = state["optimizer"]
    assert opt["step"] == 30 and opt["momentum"] == pytest.approx(0.9)
    buf = opt["state"]["transformer.wte.weight"]["momentum_buffer"]
    assert buf.shape == state["model"]["transformer.wte.weight"].shape and np.abs(buf).sum() > 0
    assert "m" not in opt["state"]["transformer.wte.weight"]


def test_keep_last_prunes_old_checkpoints(char_data, tmp_path):
    out = tmp_path / "run"
    train(tiny(char_data, out, "--train.max_steps=10", "--train.ckpt_interval=2",
               "--train.keep_last=2"), log=quiet)
    assert sorted(p.name for p in out.glob("ckpt_*.h5")) == ["ckpt_0000008.h5", "ckpt_0000010.h5"]
    out = tmp_path / "keep_all"
    train(tiny(char_data, out, "--train.max_steps=6", "--train.ckpt_interval=2",
               "--train.keep_last=0"), log=quiet)
    assert sorted(p.name for p in out.glob("ckpt_*.h5")) == \
        ["ckpt_0000002.h5", "ckpt_0000004.h5", "ckpt_0000006.h5"]


def test_checkpoint_holds_what_an_exact_resume_needs(char_data, tmp_path):
    out = tmp_path / "run"
    train(tiny(char_data, out, "--train.max_steps=4"), log=quiet)
    state = load_checkpoint(out / "ckpt_0000004.h5")
    assert state["meta"]["step"] == 4 and state["meta"]["tokens_seen"] == 4 * 4 * 16
    assert state["config"]["model"]["n_layer"] == 2 and state["config"]["train"]["max_steps"] == 4
    assert state["optimizer"]["step"] == 4
    moments = state["optimizer"]["state"]["transformer.h.0.attn.c_attn.weight"]
    assert moments["m"].shape == moments["v"].shape == (96, 32)
    assert (moments["v"] > 0).any()


def test_resume_rewrites_metrics_after_the_checkpoint_only(char_data, tmp_path):
    """Resuming from step 5 of a 10-step run keeps records 1..5 and re-logs 6..10: one run's file."""
    out = tmp_path / "run"
    cfg = tiny(char_data, out, "--train.max_steps=10", "--train.ckpt_interval=5",
               "--model.dropout=0.1")
    train(cfg, log=quiet)
    first = read_metrics(out)
    train(cfg, resume=str(out / "ckpt_0000005.h5"), log=quiet)
    again = read_metrics(out)
    assert [r["step"] for r in again] == list(range(1, 11))
    assert [r["loss"] for r in again] == [r["loss"] for r in first]  # bit-identical, dropout on


def test_resume_auto_without_checkpoint_starts_from_scratch(char_data, tmp_path):
    messages = []
    t = Trainer(tiny(char_data, tmp_path / "fresh", "--train.max_steps=2"), resume="auto",
                log=messages.append)
    assert t.step == 0
    assert any("starting from scratch" in m for m in messages)
    assert t.run()["step"] == 2
