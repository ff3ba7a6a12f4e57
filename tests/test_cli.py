"""The `minillm` command end to end, in real subprocesses: train -> sample / eval / plot / inspect
on one tiny run, and every kind of bad input ending in exit code 2 with one `error:` line.
"""
import json
import math
import re
from pathlib import Path

import pytest

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"


# A short run that still evaluates twice and saves a mid-run checkpoint.
STEPS = 20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, char_data, minillm_cli):
    """One finished tiny run (its directory), shared by the tests of this file."""
    cwd = tmp_path_factory.mktemp("cli")
    r = minillm_cli("train", TINY_CONFIG, f"--data.dir={char_data}", "--train.out_dir=run",
                    f"--train.max_steps={STEPS}", "--train.ckpt_interval=10", "--train.log_interval=2",
                    "--train.sample_tokens=20", cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return cwd / "run"


def test_train_writes_config_metrics_and_checkpoints(run_dir):
    from minillm.config import load_config
    cfg = load_config(run_dir / "config.toml")          # the resolved config reads back
    assert cfg.train.max_steps == STEPS and cfg.model.vocab_size > 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    for r in records:
        for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (key, r)
        assert ("val_loss" in r) == (r["step"] % 10 == 0), r
    assert sorted(p.name for p in run_dir.glob("ckpt_*.h5")) == ["ckpt_0000010.h5", "ckpt_0000020.h5"]
    assert not list(run_dir.glob(".*tmp*")), "a finished run leaves no temp files"


def test_sample_is_deterministic_for_a_seed(run_dir, minillm_cli):
    args = ("sample", run_dir, "--prompt", "def ", "--max-new-tokens", "40")
    two = minillm_cli(*args, "--seed", "7", "--num-samples", "2", cwd=run_dir.parent)
    one = minillm_cli(*args, "--seed", "8", cwd=run_dir.parent)
    assert two.returncode == one.returncode == 0, two.stderr + one.stderr
    first, second = two.stdout.split("\n" + "-" * 40 + "\n")    # samples of seeds 7 and 8
    assert first.startswith("def ") and len(first) >= len("def ") + 20
    assert second == one.stdout                                   # seed 8 again, another process
    assert first != second


def test_sample_from_a_checkpoint_file(run_dir, minillm_cli):
    r = minillm_cli("sample", run_dir / "ckpt_0000010.h5", "--max-new-tokens", "10",
                    "--temperature", "0", cwd=run_dir.parent)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == 1 + 10 + 1  # the "\n" start token, 10 characters, print's newline


def test_eval_prints_loss_and_perplexity(run_dir, minillm_cli, tmp_path):
    r = minillm_cli("eval", run_dir, cwd=tmp_path)  # from another folder: the run names its data by absolute path
    assert r.returncode == 0, r.stderr
    m = re.search(r"val loss ([\d.]+) \| perplexity ([\d.]+)", r.stdout)
    assert m, r.stdout
    loss, ppl = float(m.group(1)), float(m.group(2))
    assert ppl == pytest.approx(math.exp(loss), rel=1e-3)
    # the same fixed validation batches the trainer scored at its last step
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert loss == pytest.approx(last["val_loss"], abs=1e-4)
    assert "ckpt_0000020.h5" in r.stdout  # the newest checkpoint of the run


def test_plot_writes_a_png(run_dir, minillm_cli, tmp_path):
    out = tmp_path / "curves.png"
    r = minillm_cli("plot", run_dir, "--out", out, cwd=run_dir.parent)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in r.stdout


def test_inspect_prints_layout_step_config_and_tensors(run_dir, minillm_cli):
    r = minillm_cli("inspect", run_dir / "ckpt_0000010.h5", cwd=run_dir.parent)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert re.search(r"^step\s+10$", out, re.M), out
    assert re.search(r"^layout\s+dp=1 pp=1", out, re.M), out
    assert "[model]" in out and "n_layer=2" in out and "[train]" in out
    from minillm.config import load_config
    vocab = load_config(run_dir / "config.toml").model.vocab_size
    for name, shape in (("transformer.wte.weight", f"({vocab}, 32)"), ("transformer.wpe.weight", "(16, 32)"),
                        ("transformer.h.0.ln_1.weight", "(32,)"),
                        ("transformer.h.0.attn.c_attn.weight", "(96, 32)"),
                        ("transformer.h.1.mlp.c_fc.weight", "(128, 32)"),
                        ("transformer.h.1.mlp.c_proj.weight", "(32, 128)"),
                        ("transformer.ln_f.weight", "(32,)")):
        row = re.search(rf"^\s+{re.escape(name)}\s+(\(.*?\))\s+float32\s+[\d.e+-]+$", out, re.M)
        assert row, f"no tensor row for {name}:\n{out}"
        assert row.group(1) == shape, (name, row.group(0))


# ---------------------------------------------------------------- user errors: exit 2, one line

def assert_user_error(r, *needles):
    """Exit code 2, exactly one stderr line that starts with 'error:' and mentions each needle."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def train_args(data_dir, *extra):
    return ("train", TINY_CONFIG, f"--data.dir={data_dir}", "--train.out_dir=run", *extra)


@pytest.mark.parametrize("extra, needles", [
    (("--train.lrr=1e-3",), ("train.lrr", "did you mean 'train.lr'")),
    (("--model.n_embd=30", "--model.n_head=4"), ("n_embd=30", "n_head=4")),
    (("--model.dropout=1.0",), ("model.dropout", "[0, 1)")),
    (("--model.dropout=-0.1",), ("model.dropout",)),
    (("--train.lr=0",), ("train.lr", "> 0")),
    (("--train.lr=-0.001",), ("train.lr",)),
    (("--model.vocab_size=10",), ("model.vocab_size=10",)),
], ids=["unknown-key", "heads", "dropout-1", "dropout-neg", "lr-zero", "lr-negative", "vocab-small"])
def test_bad_config_values(extra, needles, char_data, minillm_cli, tmp_path):
    r = minillm_cli(*train_args(char_data, *extra), cwd=tmp_path)
    assert_user_error(r, *needles)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unknown_key_in_config_file(tmp_path, minillm_cli):
    (tmp_path / "bad.toml").write_text("[train]\nmax_step = 5\n")
    assert_user_error(minillm_cli("train", "bad.toml", cwd=tmp_path), "train.max_step",
                      "did you mean 'train.max_steps'")


def test_missing_config_file(tmp_path, minillm_cli):
    assert_user_error(minillm_cli("train", "nope.toml", cwd=tmp_path), "nope.toml")


@pytest.mark.parametrize("text, needles", [
    (None, ("missing.txt", "does not exist")),
    ("", ("empty.txt", "empty")),
    ("abc def ghi\n", ("block_size",)),
], ids=["missing", "empty", "too-short"])
def test_bad_data_source(text, needles, tmp_path, minillm_cli):
    name = {None: "missing.txt", "": "empty.txt"}.get(text, "short.txt")
    if text is not None:
        (tmp_path / name).write_text(text)
    r = minillm_cli("train", TINY_CONFIG, f"--data.source={name}", "--data.dir=data",
                    "--train.out_dir=run", cwd=tmp_path)
    assert_user_error(r, *needles)


def test_vocab_too_big_for_token_files(tmp_path, minillm_cli):
    r = minillm_cli("prepare", "pydocs", "--tokenizer", "bpe", "--vocab-size", str(2 ** 33),
                    "--out", "data", cwd=tmp_path)
    assert_user_error(r, "uint32")


def test_prompt_outside_the_char_vocabulary(run_dir, minillm_cli):
    r = minillm_cli("sample", run_dir, "--prompt", "def \u65e5\u672c", cwd=run_dir.parent)
    assert_user_error(r, "\u65e5", "vocabulary")


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sample_and_eval_need_a_checkpoint(command, tmp_path, minillm_cli):
    (tmp_path / "empty_run").mkdir()
    assert_user_error(minillm_cli(command, "empty_run", cwd=tmp_path), "no checkpoint", "empty_run")
    assert_user_error(minillm_cli(command, "no_such_dir", cwd=tmp_path), "no_such_dir")


def test_unknown_command_line_option(tmp_path, minillm_cli):
    assert_user_error(minillm_cli("sample", "run", "--temprature", "1", cwd=tmp_path), "--temprature")


def test_parallel_run_without_mpi_says_how_to_get_it(char_data, tmp_path):
    """No mpi4py (a stand-in package that fails to import shadows it): asking for dp=2 is a
    one-line error naming the extra to install, not a confusing world-size message."""
    import subprocess
    import sys

    from conftest import REPO, minillm_env
    fake = tmp_path / "fake" / "mpi4py"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no MPI here')\n")
    env = minillm_env()
    env["PYTHONPATH"] = f"{tmp_path / 'fake'}:{REPO}"
    r = subprocess.run([sys.executable, "-m", "minillm", "train", str(REPO / "configs" / "tiny.toml"),
                        f"--data.dir={char_data}", f"--train.out_dir={tmp_path / 'run'}",
                        "--parallel.dp=2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "pip install 'minillm[mpi]'" in lines[0], r.stderr
    assert not (tmp_path / "run").exists()
