"""Weight-only quantization: int4 packing is exact, scales are what the formats say, a quantized
GPT computes exactly what a float GPT holding the dequantized weights computes, int8 logits stay
close to float32 (tolerance below), files round-trip through `minillm quantize` / sample / eval,
and bad input is one line, exit 2."""
import numpy as np
import pytest
from test_cli import assert_user_error

from minillm import backend, no_grad
from minillm.autograd.gradcheck import gradcheck
from minillm.autograd.tensor import Tensor
from minillm.model import GPT, GPTConfig
from minillm.quant import (Int4Weight, Int8Weight, QuantLinear, load_quantized, pack_int4,
                           quantize_model, unpack_int4)
from minillm.quant.linear import QuantLinearFunction


def host(a):
    return backend.to_numpy(a)


def test_int4_pack_unpack_is_exact(rng):
    codes = rng.integers(-8, 8, size=(7, 64)).astype(np.int8)
    codes[0, :16] = np.arange(-8, 8)                       # every nibble value
    packed = pack_int4(backend.asarray(codes))
    assert packed.dtype == np.uint8 and packed.shape == (7, 32)   # two codes per byte
    assert np.array_equal(host(unpack_int4(packed)), codes)
    # layout: the even input in the low nibble, stored as code + 8
    assert host(packed)[0, 0] == ((-8 + 8) | ((-7 + 8) << 4))
    with pytest.raises(ValueError, match="odd"):
        pack_int4(backend.asarray(codes[:, :3]))


def test_int8_per_channel_scale_and_error_bound(rng):
    w = (rng.standard_normal((16, 48)) * rng.uniform(0.01, 2, (16, 1))).astype(np.float32)
    w[3] = 0.0                                             # an all-zero row stays exact
    q = Int8Weight.quantize(backend.asarray(w))
    scale, codes = host(q.scale), host(q.codes)
    assert codes.dtype == np.int8 and np.abs(codes).max() == 127
    np.testing.assert_allclose(scale[np.arange(16) != 3], np.abs(w).max(axis=1)[np.arange(16) != 3] / 127,
                               rtol=1e-6)
    err = np.abs(host(q.dequantize()) - w)
    assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()  # round to nearest: half a step at most
    assert (host(q.dequantize())[3] == 0).all()


@pytest.mark.parametrize("group_size", [8, 32])
def test_int4_group_scales_and_error_bound(rng, group_size):
    w = rng.standard_normal((6, 64)).astype(np.float32)
    w[2, :group_size] *= 50                                # one loud group
    q = Int4Weight.quantize(backend.asarray(w), group_size)
    assert q.packed.shape == (6, 32) and q.scale.shape == (6, 64 // group_size)
    assert q.scale.dtype == np.float16
    s = host(q.scale).astype(np.float32)
    np.testing.assert_allclose(s, np.abs(w.reshape(6, -1, group_size)).max(axis=2) / 7, rtol=1e-3)
    err = np.abs(host(q.dequantize()) - w).reshape(6, -1, group_size)
    # half a step, plus the float16 rounding of the scale times the largest code (7)
    assert (err <= s[..., None] * (0.5 + 7 * 2 ** -11) + 1e-6).all()
    # the loud group does not spoil its row's other groups
    assert err[2, 1:].max() < 0.1 * err[2, 0].max()


def tiny_model(seed=0, **kw):
    cfg = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=64, **kw)
    return GPT(cfg, seed=seed).eval()


@pytest.mark.parametrize("bits, group_size", [(8, None), (4, 16)])  # SwiGLU hidden: 176
@pytest.mark.parametrize("opts", [{}, {"tie_embeddings": False, "mlp": "swiglu", "bias": False}],
                         ids=["gpt2", "untied-swiglu"])
def test_quantized_model_computes_with_the_dequantized_weights(bits, group_size, opts, rng):
    """The QuantLinear path (codes x scales inside the matmul) equals a float GPT whose Linear
    weights are the dequantized ones: quantization error is all there is."""
    x = rng.integers(0, 61, size=(2, 16))
    quant = tiny_model(**opts)
    layers = quantize_model(quant, bits, group_size)
    assert len(layers) == 8 + (not opts.get("tie_embeddings", True)) + 2 * (opts.get("mlp") == "swiglu")
    ref = tiny_model(**opts)
    params = dict(ref.named_parameters())
    for name, layer in layers.items():
        params[f"{name}.weight"].data[...] = layer.qweight.dequantize()
    with no_grad():
        np.testing.assert_allclose(host(quant(x)[0].data), host(ref(x)[0].data), rtol=1e-5, atol=1e-5)
    # a tied head is the token embedding: it stays float (an untied one is quantized)
    assert isinstance(quant.lm_head, QuantLinear) != opts.get("tie_embeddings", True)


def test_int8_logits_close_to_float32(rng):
    """Tolerance: the RMS of the int8 model's logit error is at most 1 % of the RMS of the
    float32 logits (centred per position), the largest error at most 1 % of the largest logit,
    and the most likely next token is the same at >= 95 % of positions. (Measured: 0.5 % and
    0.5 %; per-weight int8 error is about 0.5 % RMS, and it does not grow through the layers.)"""
    x = rng.integers(0, 61, size=(4, 16))
    f32, q8 = tiny_model(seed=3), tiny_model(seed=3)
    quantize_model(q8, 8)
    with no_grad():
        a, b = host(f32(x)[0].data), host(q8(x)[0].data)
    centred = a - a.mean(axis=-1, keepdims=True)
    assert np.sqrt(np.mean((b - a) ** 2)) <= 0.01 * np.sqrt(np.mean(centred ** 2))
    assert np.abs(b - a).max() <= 0.01 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.95


def test_quant_linear_backward_reaches_the_input_and_bias(rng):
    w = Int4Weight.quantize(backend.asarray(rng.standard_normal((6, 16))), 8)
    x = Tensor(backend.asarray(rng.standard_normal((3, 16))), requires_grad=True)  # float64 gradcheck
    b = Tensor(backend.asarray(rng.standard_normal(6)), requires_grad=True)
    assert gradcheck(lambda x, b: QuantLinearFunction.apply(x, b, weight=w), [x, b],
                     raise_exception=False).ok


# ------------------------------------------------------------------ files and the command line

def test_quantize_command_writes_a_file_that_sample_and_eval_use(tiny_run, minillm_cli):
    cwd = tiny_run.parent
    r = minillm_cli("quantize", tiny_run, "--bits", "4", "--group-size", "16", "--eval", cwd=cwd)
    assert r.returncode == 0, r.stderr
    out = tiny_run / "ckpt_0000020.int4-g16.h5"
    assert f"wrote {out}" in r.stdout and "val loss" in r.stdout
    model, cfg = load_quantized(out)
    from minillm.checkpoint import load_checkpoint
    meta = load_checkpoint(out, exclude=("model", "quantized", "config"))["meta"]
    assert meta["source"] == str((tiny_run / "ckpt_0000020.h5").resolve()) and meta["bits"] == 4
    # the file's model equals quantizing the checkpoint in memory
    from minillm.train.inference import load_model
    ref, _, _ = load_model(tiny_run)
    quantize_model(ref, 4, 16)
    x = np.arange(16)[None] % cfg.model.vocab_size
    with no_grad():
        assert np.array_equal(host(model(x)[0].data), host(ref(x)[0].data))
    s = minillm_cli("sample", out, "--prompt", "def ", "--max-new-tokens", "12", cwd=cwd)
    e = minillm_cli("eval", out, cwd=cwd)
    assert s.returncode == 0 and s.stdout.startswith("def ") and len(s.stdout) == 4 + 12 + 1, s.stderr
    assert e.returncode == 0 and "val loss" in e.stdout, e.stderr


@pytest.mark.parametrize("args, needles", [
    (("--bits", "3"), ("--bits=3", "8", "4")),
    (("--bits", "4", "--group-size", "24"), ("--group-size=24", "does not divide", "32")),
    (("--bits", "4", "--group-size", "7"), ("--group-size=7", "even")),
    (("--bits", "8", "--group-size", "32"), ("--bits 4 only",)),
], ids=["bits", "group-divides", "group-odd", "group-with-int8"])
def test_bad_quantize_arguments(tiny_run, capsys, args, needles):
    assert_user_error(run_main(capsys, "quantize", tiny_run, *args), *needles)


def test_quantize_needs_a_model_checkpoint(tiny_run, capsys, tmp_path):
    assert_user_error(run_main(capsys, "quantize", tiny_run / "metrics.jsonl"), "not an HDF5 file")
    from minillm.checkpoint import save_checkpoint
    save_checkpoint(tmp_path / "other.h5", {"meta": {"step": 1}, "lora": {"a": np.zeros(3)}})
    assert_user_error(run_main(capsys, "quantize", tmp_path / "other.h5"), "not a model checkpoint")
    r = run_main(capsys, "quantize", tiny_run, "--bits", "8", "--out", tmp_path / "q8.h5")
    assert r.returncode == 0, r.stderr
    assert_user_error(run_main(capsys, "quantize", tmp_path / "q8.h5"), "already quantized")


def run_main(capsys, *args):
    """The `minillm` entry point in this process (the same code path as the command, without a
    second of interpreter start-up per call): exit code and captured output."""
    import types

    from minillm.cli import main
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
