"""Mixed precision (minillm.amp): the loss scaler's rules, float32 master weights, 16-bit ops,
the trainer skipping overflowing steps and stopping on divergence, and float16 / bfloat16 runs of
the shakespeare CPU recipe against float32.

Runs on the active backend: under MINILLM_DEVICE=gpu the same tests run with CuPy (configs pass
--train.device accordingly); tests that only make sense with CuPy are marked ``needs_gpu``.
"""
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from minillm import backend
from minillm.amp import (DynamicLossScaler, LossDivergedError, MixedPrecision, NoLossScaler,
                         compute_dtype, format_info, make_precision)
from minillm.amp import dtypes as amp_dtypes
from minillm.autograd import fused
from minillm.autograd.ops import mm
from minillm.autograd.tensor import saved_bytes
from minillm.backend import xp
from minillm.checkpoint import load_checkpoint
from minillm.config import load_config
from minillm.data import BatchSampler, TokenDataset, prepare_dataset, read_meta
from minillm.errors import ConfigError, UserError
from minillm.model import GPT, GPTConfig
from minillm.train.metrics import read_metrics
from minillm.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"
RECIPE = REPO / "configs" / "shakespeare_char_cpu.toml"
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
DEVICE = f"--train.device={backend.device()}"
needs_gpu = pytest.mark.skipif(not backend.is_gpu(), reason="needs CuPy (run with MINILLM_DEVICE=gpu)")


def _bfloat16_available():
    try:
        compute_dtype("bfloat16")
        return True
    except UserError:  # a CuPy without bfloat16 (tested by test_gpu_bfloat16_works_or_is_a_clear_error)
        return False


HALF = ["float16"] + (["bfloat16"] if _bfloat16_available() else [])
needs_bf16 = pytest.mark.skipif("bfloat16" not in HALF, reason="this backend has no bfloat16")


def host(a):
    return backend.to_numpy(a)


def quiet(msg):
    pass


def tiny(data_dir, out_dir, *overrides):
    return load_config(TINY, [f"--data.dir={data_dir}", f"--train.out_dir={out_dir}", DEVICE,
                              "--train.log_interval=1", "--train.sample_tokens=0", *overrides])


def recipe_model(vocab_size, seed=0):
    """The shakespeare CPU recipe's GPT: 4 layers, 4 heads, 128 wide, block 64."""
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=128), seed=seed)


def real_batch(data_dir, batch=12, block=64):
    x, y = BatchSampler(TokenDataset(data_dir, "train").tokens, block, batch, 1337).get_batch(0, 0, batch)
    return backend.asarray(x), backend.asarray(y)


# ---------------------------------------------------------------- the loss scaler alone

def test_overflow_halves_the_scale_and_clean_steps_double_it():
    s = DynamicLossScaler(init_scale=2.0 ** 10, growth_interval=3)
    s.update(True)
    assert s.loss_scale == 2.0 ** 9
    s.update(False), s.update(False)
    assert s.loss_scale == 2.0 ** 9          # two clean steps: not yet
    s.update(False)
    assert s.loss_scale == 2.0 ** 10         # the third doubles it
    s.update(False), s.update(True), s.update(False), s.update(False)
    assert s.loss_scale == 2.0 ** 9          # an overflow restarts the count of clean steps


def test_hysteresis_waits_for_that_many_overflows():
    s = DynamicLossScaler(init_scale=1024.0, growth_interval=2, hysteresis=3)
    s.update(True), s.update(True)
    assert s.loss_scale == 1024.0            # two overflows tolerated
    s.update(True)
    assert s.loss_scale == 512.0             # the third backs off
    s.update(True)
    assert s.loss_scale == 256.0             # then every overflow does, until the scale grows
    s.update(False), s.update(False)
    assert s.loss_scale == 512.0
    s.update(True), s.update(True)
    assert s.loss_scale == 512.0             # growth restored the tolerance


def test_scale_below_min_scale_is_a_divergence_error():
    s = DynamicLossScaler(init_scale=4.0, min_scale=1.0)
    s.update(True), s.update(True)
    assert s.loss_scale == 1.0
    with pytest.raises(LossDivergedError) as e:
        s.update(True)
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "diverged" in msg and "train.lr" in msg and "\n" not in msg
    assert s.loss_scale == 1.0


def test_scaler_state_dict_round_trip():
    a = DynamicLossScaler(init_scale=2.0 ** 12, growth_interval=5, hysteresis=2)
    for found in (False, True, True, False, False):
        a.update(found)
    state = a.state_dict()
    assert state == {"loss_scale": 2.0 ** 11, "growth_tracker": 2, "hysteresis_tracker": 0}
    b = DynamicLossScaler(growth_interval=5, hysteresis=2)
    b.load_state_dict(state)
    for found in (False, False, False, True, False, False, False, False, False):
        a.update(found), b.update(found)
        assert b.state_dict() == a.state_dict()
    fresh = DynamicLossScaler(init_scale=8.0)
    fresh.load_state_dict({"dtype": "float32"})     # a float32 checkpoint: keep the initial scale
    assert fresh.loss_scale == 8.0


@pytest.mark.parametrize("kwargs, word", [({"init_scale": 0}, "init_scale"), ({"growth_factor": 1.0}, "growth_factor"),
                                          ({"backoff_factor": 1.5}, "backoff_factor"),
                                          ({"growth_interval": 0}, "growth_interval"),
                                          ({"hysteresis": 0}, "hysteresis"), ({"min_scale": 0}, "min_scale")])
def test_scaler_rejects_bad_settings(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        DynamicLossScaler(**kwargs)


def test_no_loss_scaler_does_nothing_but_reports_divergence():
    s = NoLossScaler()
    loss = object()
    assert s.scale_loss(loss) is loss and s.loss_scale is None and s.state_dict() == {}
    s.update(False)
    with pytest.raises(LossDivergedError, match="diverged"):
        s.update(True)


# ---------------------------------------------------------------- dtype policy

def test_formats_and_dtype_names():
    f16, bf16, f32 = format_info("float16"), format_info("bfloat16"), format_info("float32")
    assert f16.max == 65504.0 and f16.smallest_subnormal == 2.0 ** -24 and f16.eps == 2.0 ** -10
    assert bf16.exponent_bits == f32.exponent_bits == 8 and bf16.mantissa_bits == 7 and bf16.eps == 2.0 ** -7
    assert bf16.max > 3e38 and f32.smallest_normal == bf16.smallest_normal
    assert list(f16.spacing([1.0, 1000.0, 1e-7])) == [2.0 ** -10, 0.5, 2.0 ** -24]
    assert compute_dtype("float16") == np.float16 and compute_dtype("float32") == np.float32
    with pytest.raises(UserError, match="'float32', 'float16', 'bfloat16'"):
        compute_dtype("float8")
    with pytest.raises(UserError, match="unknown dtype 'int8'"):
        make_precision(types.SimpleNamespace(dtype="int8"), [])


def test_bfloat16_without_backend_support_names_the_alternatives(monkeypatch):
    monkeypatch.setattr(amp_dtypes.backend, "is_gpu", lambda: True)
    monkeypatch.setattr(amp_dtypes.backend, "cupy_version", lambda: "13.6.0")  # CuPy 13: no bfloat16
    with pytest.raises(UserError) as e:
        compute_dtype("bfloat16")
    msg = str(e.value)
    assert "CuPy >= 14" in msg and "13.6.0" in msg and "float16" in msg and "float32" in msg and "\n" not in msg


# ---------------------------------------------------------------- master weights and 16-bit ops

def test_mixed_precision_keeps_fp32_masters_of_the_same_parameters():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16), seed=3)
    start = {n: host(p.data).copy() for n, p in model.named_parameters()}
    prec = MixedPrecision(model.named_parameters(), "float16", DynamicLossScaler())
    assert [n for n, _ in prec.master_params] == list(start)
    for (name, p), (_, m) in zip(model.named_parameters(), prec.master_params):
        assert p.dtype == np.float16 and m.dtype == np.float32
        assert np.array_equal(host(m.data), start[name])
    assert model.lm_head.weight is model.transformer.wte.weight      # still tied, now float16
    prec.master_params[0][1].data += 1.0
    prec.master_to_model()
    assert np.array_equal(host(model.transformer.wte.weight.data), (start["transformer.wte.weight"] + 1).astype(np.float16))


@pytest.mark.parametrize("dtype, tol", [("float16", 3e-3), pytest.param("bfloat16", 3e-2, marks=needs_bf16)])
def test_gpt_computes_in_16_bits_and_master_grads_match_float32(char_data, dtype, tol):
    vocab = int(read_meta(char_data)["vocab_size"])
    x, y = real_batch(char_data, batch=4, block=32)
    ref = recipe_model(vocab)
    _, loss = ref(x, y)
    loss.backward()
    model = recipe_model(vocab)
    prec = make_precision(types.SimpleNamespace(dtype=dtype, loss_scale_init=2.0 ** 16,
                                                loss_scale_growth_interval=2000), model.named_parameters())
    logits, loss16 = model(x, y)
    assert logits.dtype == compute_dtype(dtype) and loss16.dtype == np.float32
    assert abs(float(loss16.data) - float(loss.data)) < 10 * tol
    prec.scale_loss(loss16).backward()
    assert {str(p.grad.dtype) for p in model.parameters()} == {dtype}
    assert not prec.grads_to_master()
    for (name, p32), (_, m) in zip(ref.named_parameters(), prec.master_params):
        g, g16 = host(p32.grad), host(m.grad)
        assert m.grad.dtype == np.float32
        assert np.linalg.norm(g16 - g) <= tol * np.linalg.norm(g) + 1e-7, name


def test_activation_memory_is_about_half_in_16_bits(char_data):
    vocab = int(read_meta(char_data)["vocab_size"])
    x, y = real_batch(char_data)
    held = {}
    for dtype in ["float32", *HALF]:
        model = recipe_model(vocab)
        if dtype != "float32":
            MixedPrecision(model.named_parameters(), dtype)
        _, loss = model(x, y)
        held[dtype] = saved_bytes(loss)
    for dtype in HALF:
        assert 0.45 <= held[dtype] / held["float32"] <= 0.65, held


def test_float16_gradients_underflow_without_loss_scaling(char_data, monkeypatch):
    """Measured on the recipe model and a real batch: the gradients flowing into every Linear
    layer (activation gradients) and the parameter gradients, in float16 without and with loss
    scaling, against the same gradients in float32."""
    seen = []
    original = fused.Linear.backward

    def recording_backward(ctx, g):
        seen.append(host(g).astype(np.float32))
        return original(ctx, g)

    monkeypatch.setattr(fused.Linear, "backward", staticmethod(recording_backward))
    vocab = int(read_meta(char_data)["vocab_size"])
    x, y = real_batch(char_data)
    act, par = {}, {}
    for scale in (None, 1.0, 2.0 ** 16):             # None: float32
        seen.clear()
        model = recipe_model(vocab)
        prec = MixedPrecision(model.named_parameters(), "float16", DynamicLossScaler(init_scale=scale)) \
            if scale else None
        _, loss = model(x, y)
        (prec.scale_loss(loss) if prec else loss).backward()
        act[scale] = np.concatenate([g.ravel() for g in seen])
        par[scale] = np.concatenate([host(p.grad).astype(np.float32).ravel() for p in model.parameters()])
    tiny_normal = format_info("float16").smallest_normal

    def fractions(grads, scale):
        live = grads[None] != 0                       # exact zeros (unused rows) are not underflow
        g = grads[scale][live]
        return float(np.mean(g == 0)), float(np.mean(np.abs(g) < tiny_normal))  # flushed; zero or subnormal

    (a_flush, a_lost), (p_flush, p_lost) = fractions(act, 1.0), fractions(par, 1.0)
    (sa_flush, sa_lost), (sp_flush, sp_lost) = fractions(act, 2.0 ** 16), fractions(par, 2.0 ** 16)
    report = dict(a_flush=a_flush, a_lost=a_lost, p_flush=p_flush, p_lost=p_lost, sa_flush=sa_flush,
                  sa_lost=sa_lost, sp_flush=sp_flush, sp_lost=sp_lost)
    # measured: ~2% of activation gradients flush to zero and ~78% are subnormal (a few
    # significant bits left); ~17% of parameter gradients are subnormal or zero
    assert a_flush > 2e-3 and a_lost > 0.5 and p_lost > 0.08, report
    assert sa_flush < 1e-4 and sp_flush < 1e-4 and sa_lost < 0.01 and sp_lost < 0.01, report


# ---------------------------------------------------------------- the trainer: skipped steps, divergence, resume

def _snapshot(trainer):
    return ({n: host(p.data).copy() for n, p in trainer.precision.master_params},
            {n: host(p.data).copy() for n, p in trainer.model.named_parameters()},
            trainer.optimizer.state_dict())


def _inject_inf(trainer, steps):
    """Make the given steps end with an inf in one model gradient (as an fp16 overflow would)."""
    original = trainer.engine.forward_backward

    def forward_backward(microbatches):
        loss = original(microbatches)
        if trainer.step in steps:
            trainer.model.transformer.h[0].mlp.c_fc.weight.grad[0, 0] = xp.inf
        return loss

    trainer.engine.forward_backward = forward_backward


def test_injected_inf_skips_the_step_and_halves_the_scale(char_data, tmp_path):
    cfg = tiny(char_data, tmp_path / "run", "--train.dtype=float16", "--train.loss_scale_init=1024",
               "--train.loss_scale_growth_interval=3")
    trainer = Trainer(cfg, log=quiet)
    trainer.train_step()
    trainer.step += 1                                # one clean step: the optimizer has state
    masters, model, opt = _snapshot(trainer)
    _inject_inf(trainer, steps={1})
    loss, lr, grad_norm, found_inf = trainer.train_step()
    assert found_inf and np.isfinite(loss) and trainer.precision.loss_scale == 512.0
    masters2, model2, opt2 = _snapshot(trainer)
    for name in masters:
        assert masters2[name].tobytes() == masters[name].tobytes(), name
        assert model2[name].tobytes() == model[name].tobytes(), name
    assert opt2["step"] == opt["step"] == 1
    for name, st in opt["state"].items():
        for k, a in st.items():
            assert host(opt2["state"][name][k]).tobytes() == host(a).tobytes(), (name, k)
    for step in (2, 3, 4):                           # three clean steps
        trainer.step = step
        assert not trainer.train_step()[3]
    assert trainer.precision.loss_scale == 1024.0 and trainer.optimizer.step_count == 4
    assert any(not np.array_equal(host(p.data), masters[n]) for n, p in trainer.precision.master_params)


def test_divergence_saves_the_last_good_state_then_raises(char_data, tmp_path):
    out = tmp_path / "run"
    cfg = tiny(char_data, out, "--train.dtype=float16", "--train.loss_scale_init=4", "--train.max_steps=10")
    trainer = Trainer(cfg, log=quiet)
    _inject_inf(trainer, steps=range(3, 10))         # scale 4 -> 2 -> 1 -> below min_scale=1
    with pytest.raises(LossDivergedError, match="diverged"):
        trainer.run()
    assert trainer.step == 5 and trainer.optimizer.step_count == 3
    state = load_checkpoint(out / "ckpt_0000005.h5")
    assert state["scaler"]["loss_scale"] == 1.0 and state["meta"]["step"] == 5
    for name, m in trainer.precision.master_params:
        assert state["model"][name].dtype == np.float32
        assert np.array_equal(state["model"][name], host(m.data)), name
    assert [r["skipped_steps"] for r in read_metrics(out)] == [0, 0, 0, 1, 2]


def test_cli_exits_2_with_one_line_when_the_loss_diverges(char_data, tmp_path, minillm_cli):
    out = tmp_path / "run"
    r = minillm_cli("train", TINY, f"--data.dir={char_data}", f"--train.out_dir={out}", DEVICE,
                    "--train.dtype=float16", "--train.lr=1e4", "--train.warmup_steps=0", "--train.grad_clip=0",
                    "--train.loss_scale_init=1", "--train.sample_tokens=0", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: the loss diverged") and "Traceback" not in r.stderr
    assert list(out.glob("ckpt_*.h5")), "the last good state was not saved"


def test_float16_resume_restores_the_scale_and_continues_exactly(char_data, tmp_path):
    common = ("--train.dtype=float16", "--train.max_steps=6", "--train.loss_scale_init=256",
              "--train.loss_scale_growth_interval=2", "--train.ckpt_interval=2", "--train.keep_last=0")
    Trainer(tiny(char_data, tmp_path / "a", *common), log=quiet).run()
    ckpt4 = load_checkpoint(tmp_path / "a" / "ckpt_0000004.h5")
    assert ckpt4["scaler"] == {"dtype": "float16", "loss_scale": 1024.0, "growth_tracker": 0,
                               "hysteresis_tracker": 1}
    resumed = Trainer(tiny(char_data, tmp_path / "b", *common), resume=str(tmp_path / "a" / "ckpt_0000004.h5"),
                      log=quiet)
    assert resumed.precision.loss_scale == 1024.0
    resumed.run()
    a, b = load_checkpoint(tmp_path / "a" / "ckpt_0000006.h5"), load_checkpoint(tmp_path / "b" / "ckpt_0000006.h5")
    assert b["scaler"]["loss_scale"] == a["scaler"]["loss_scale"] == 2048.0
    for name, arr in a["model"].items():
        assert np.array_equal(b["model"][name], arr), name
    assert [r["loss"] for r in read_metrics(tmp_path / "b")][-2:] == [r["loss"] for r in read_metrics(tmp_path / "a")][-2:]


@needs_bf16
def test_bfloat16_training_logs_no_loss_scale(char_data, tmp_path):
    Trainer(tiny(char_data, tmp_path / "bf", "--train.dtype=bfloat16", "--train.max_steps=4"), log=quiet).run()
    recs = read_metrics(tmp_path / "bf")
    assert len(recs) == 4 and all(np.isfinite(r["loss"]) and "loss_scale" not in r for r in recs)
    assert load_checkpoint(tmp_path / "bf" / "ckpt_0000004.h5")["model"]["transformer.wte.weight"].dtype == np.float32


# ---------------------------------------------------------------- the shakespeare CPU recipe, 300 steps

@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory):
    """float32, float16 and bfloat16 runs of configs/shakespeare_char_cpu.toml for 300 steps, in
    three processes at once (NumPy's elementwise work is single-threaded: two cores do two runs).
    On the CPU float16 costs about as much as the other two together (its casts are emulated), so
    they run at a lower priority: on two cores, one runs float16, the other float32 + bfloat16."""
    root = tmp_path_factory.mktemp("amp_recipe")
    source = str(SHAKESPEARE) if SHAKESPEARE.is_file() else "pydocs"
    prepare_dataset(source, root / "data", "char")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    procs = {}
    for dtype in ["float32", *HALF]:
        argv = [sys.executable, "-m", "minillm", "train", str(RECIPE), f"--data.source={source}",
                f"--data.dir={root / 'data'}", f"--train.out_dir={root / dtype}", f"--train.dtype={dtype}",
                DEVICE, "--train.max_steps=300", "--train.eval_interval=300", "--train.eval_iters=8",
                "--train.log_interval=1", "--train.sample_tokens=0", "--train.progress=false"]
        log = open(root / f"{dtype}.log", "w")  # a file, not a pipe: nobody has to drain it
        nice = None if dtype == "float16" else (lambda: os.nice(10))
        procs[dtype] = (subprocess.Popen(argv, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=nice), log)
    for dtype, (proc, log) in procs.items():
        proc.wait(timeout=900)
        log.close()
        assert proc.returncode == 0, f"{dtype}: {(root / f'{dtype}.log').read_text()[-3000:]}"
    return {dtype: read_metrics(root / dtype) for dtype in procs}


def _smoothed(records):
    return float(np.mean([r["loss"] for r in records[-20:]]))


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_recipe_ends_within_2_percent_of_float32(recipe_runs, dtype):
    ref, run = recipe_runs["float32"], recipe_runs[dtype]
    assert len(run) == len(ref) == 300
    assert _smoothed(ref) < ref[0]["loss"] - 1.0                 # it learned (4.2 -> ~2.4)
    assert abs(_smoothed(run) - _smoothed(ref)) <= 0.02 * _smoothed(ref), (_smoothed(run), _smoothed(ref))
    v, v_ref = run[-1]["val_loss"], ref[-1]["val_loss"]
    assert abs(v - v_ref) <= 0.02 * v_ref, (v, v_ref)
    if dtype == "float16":
        assert run[-1]["loss_scale"] >= 1.0 and run[-1]["skipped_steps"] <= 10
    else:
        assert "loss_scale" not in run[-1]


# ---------------------------------------------------------------- CuPy only

@needs_gpu
def test_gpu_float16_matmul_accumulates_in_float32():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 1.5, (8, 4096)).astype(np.float16)
    b = rng.uniform(0.5, 1.5, (4096, 8)).astype(np.float16)
    exact = a.astype(np.float64) @ b.astype(np.float64)              # ~4096: float16 spacing 2-4
    got = host(mm(backend.asarray(a), backend.asarray(b))).astype(np.float64)
    assert np.max(np.abs(got - exact) / exact) < 2 ** -10  # one rounding, not 4096


@needs_gpu
def test_gpu_bfloat16_works_or_is_a_clear_error(char_data):
    try:
        dt = compute_dtype("bfloat16")
    except UserError as e:
        assert "float16" in str(e) and "\n" not in str(e)
        return
    x, y = real_batch(char_data, batch=2, block=16)
    model = recipe_model(int(read_meta(char_data)["vocab_size"]))
    prec = MixedPrecision(model.named_parameters(), "bfloat16")
    logits, loss = model(x, y)
    assert logits.dtype == dt
    prec.scale_loss(loss).backward()
    assert not prec.grads_to_master()
