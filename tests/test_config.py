"""Tests for minillm.config: validation, override coercion, unknown-key suggestions, TOML round trip, presets."""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from minillm.config import (Config, DataConfig, ParallelConfig, TrainConfig, apply_overrides, check_layout,
                            config_from_dict, config_to_dict, data_dir, dump_toml, load_config, save_config)
from minillm.errors import ConfigError, UserError
from minillm.model.gpt import GPTConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(CONFIGS.glob("*.toml"))


def config_error(*overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def write(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- defaults and validation

def test_defaults_validate_and_match_the_documented_values():
    cfg = Config()
    assert cfg == load_config()
    assert isinstance(cfg.model, GPTConfig) and cfg.model.vocab_size == 0
    assert (cfg.data.source, cfg.data.tokenizer, cfg.data.vocab_size, cfg.data.val_fraction) == ("pydocs", "char", 0, 0.1)
    t = cfg.train
    assert (t.batch_size, t.max_steps, t.lr, t.min_lr, t.warmup_steps, t.schedule) == (12, 2000, 1e-3, 1e-4, 100, "cosine")
    assert (t.beta2, t.dtype, t.device, t.out_dir, t.progress) == (0.99, "float32", "auto", "runs/default", True)
    p = cfg.parallel
    assert (p.dp, p.pp, p.microbatches, p.schedule, p.allreduce, p.partition, p.zero) == (1, 1, 1, "1f1b", "mpi", "", 0)
    check_layout(cfg, 1)


def test_config_errors_are_user_errors():
    assert issubclass(ConfigError, UserError)


INVALID = [
    ("train.lr", 0, "train.lr=0 must be > 0"),
    ("train.lr", -1e-3, "train.lr"),
    ("train.min_lr", 0.1, "train.min_lr=0.1 is above train.lr=0.001"),
    ("train.min_lr", -1.0, "train.min_lr"),
    ("train.batch_size", 0, "train.batch_size"),
    ("train.grad_accum", 0, "train.grad_accum"),
    ("train.max_steps", 0, "train.max_steps"),
    ("train.warmup_steps", -1, "train.warmup_steps"),
    ("train.eval_iters", 0, "train.eval_iters"),
    ("train.eval_interval", 0, "train.eval_interval"),
    ("train.log_interval", 0, "train.log_interval"),
    ("train.ckpt_interval", -1, "train.ckpt_interval"),
    ("train.keep_last", -1, "train.keep_last"),
    ("train.seed", -5, "train.seed"),
    ("train.decay_frac", 1.5, "train.decay_frac"),
    ("train.decay_frac", -0.1, "train.decay_frac"),
    ("train.optimizer", "adam", "train.optimizer='adam' is not one of 'adamw', 'sgd'"),
    ("train.schedule", "linear", "train.schedule='linear' is not one of"),
    ("train.dtype", "fp8", "train.dtype='fp8' is not one of 'float32', 'float16', 'bfloat16'"),
    ("train.device", "tpu", "train.device='tpu'"),
    ("train.beta1", 1.0, "train.beta1"),
    ("train.beta2", -0.1, "train.beta2"),
    ("train.momentum", 1.2, "train.momentum"),
    ("train.eps", 0.0, "train.eps"),
    ("train.weight_decay", -0.1, "train.weight_decay"),
    ("train.grad_clip", -1.0, "train.grad_clip"),
    ("train.loss_scale_init", 0.0, "train.loss_scale_init"),
    ("train.loss_scale_growth_interval", 0, "train.loss_scale_growth_interval"),
    ("train.out_dir", "", "train.out_dir"),
    ("data.tokenizer", "wordpiece", "data.tokenizer='wordpiece' is not one of 'char', 'bpe', 'gpt2'"),
    ("data.source", "  ", "data.source"),
    ("data.val_fraction", 0.0, "data.val_fraction"),
    ("data.val_fraction", 1.0, "data.val_fraction"),
    ("data.vocab_size", 500, "data.vocab_size=500 only applies to data.tokenizer='bpe'"),
    ("parallel.dp", 0, "parallel.dp"),
    ("parallel.pp", 0, "parallel.pp"),
    ("parallel.microbatches", 0, "parallel.microbatches"),
    ("parallel.schedule", "zb", "parallel.schedule='zb' is not one of '1f1b', 'gpipe'"),
    ("parallel.allreduce", "nccl", "parallel.allreduce='nccl' is not one of 'mpi', 'ring'"),
    ("parallel.bucket_mb", 0.0, "parallel.bucket_mb"),
    ("parallel.zero", 4, "parallel.zero=4 is not one of 0, 1, 2, 3"),
    ("parallel.partition", "2,x", "parallel.partition"),
    ("parallel.partition", "3,-1", "parallel.partition"),
    ("model.n_head", 3, "model.n_embd=128 is not divisible by model.n_head=3"),
    ("model.dropout", 1.0, "model.dropout"),
]


@pytest.mark.parametrize("key,value,expected", INVALID, ids=[f"{k}={v}" for k, v, _ in INVALID])
def test_invalid_values_raise_one_line_config_errors_naming_the_key(key, value, expected):
    section, name = key.split(".")
    with pytest.raises(ConfigError) as info:
        config_from_dict({section: {name: value}})
    message = str(info.value)
    assert expected in message and "\n" not in message
    # the same mistake typed on the command line gives the same message
    assert expected in config_error(f"--{key}={value}")


def test_nonfinite_floats_rejected():
    assert "train.lr=nan must be a finite number" in config_error("--train.lr=nan")
    assert "train.grad_clip=inf" in config_error("--train.grad_clip=inf")


def test_batch_must_divide_by_grad_accum():
    assert "train.batch_size=10 is not divisible by train.grad_accum=3" in \
        config_error("--train.batch_size=10", "--train.grad_accum=3")
    assert load_config(None, ["--train.batch_size=12", "--train.grad_accum=3"]).train.grad_accum == 3


def test_bpe_vocab_size_bounds():
    assert load_config(None, ["--data.tokenizer=bpe", "--data.vocab_size=512"]).data.vocab_size == 512
    assert "data.vocab_size=100 must be >= 256" in config_error("--data.tokenizer=bpe", "--data.vocab_size=100")


def test_sections_check_types_when_built_directly():
    with pytest.raises(ConfigError, match="train.lr='abc' must be a number"):
        TrainConfig(lr="abc")
    with pytest.raises(ConfigError, match="train.max_steps=True must be an integer"):
        TrainConfig(max_steps=True)
    with pytest.raises(ConfigError, match="train.max_steps=2.5 must be an integer"):
        TrainConfig(max_steps=2.5)
    with pytest.raises(ConfigError, match="train.progress=1 must be true or false"):
        TrainConfig(progress=1)
    with pytest.raises(ConfigError, match="data.source=3 must be a string"):
        DataConfig(source=3)
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)
    with pytest.raises(TypeError):
        Config(train={"lr": 1.0})


def test_cross_section_partition_and_stage_count():
    cfg = load_config(None, ["--parallel.pp=2", "--parallel.partition=3,1"])
    assert cfg.parallel.partition_blocks == (3, 1)
    assert ParallelConfig().partition_blocks == ()
    assert "places 5 blocks but model.n_layer=4" in config_error("--parallel.pp=2", "--parallel.partition=3,2")
    assert "lists 3 stages but parallel.pp=2" in config_error("--parallel.pp=2", "--parallel.partition=2,1,1")
    assert "parallel.pp=5 is more stages than model.n_layer=4" in config_error("--parallel.pp=5")


def test_check_layout_needs_world_size_and_batch_split():
    cfg = load_config(None, ["--parallel.dp=2", "--parallel.pp=2", "--parallel.microbatches=3",
                             "--train.batch_size=12"])
    check_layout(cfg, 4)
    with pytest.raises(ConfigError, match=r"parallel.dp=2 x parallel.pp=2 = 4 ranks but the job has 2; "
                                          r"launch with mpirun -np 4"):
        check_layout(cfg, 2)
    cfg = apply_overrides(cfg, ["--train.grad_accum=2"])     # 2 x 2 x 3 = 12 still divides 12
    check_layout(cfg, 4)
    cfg = apply_overrides(cfg, ["--train.batch_size=15", "--train.grad_accum=1"])
    with pytest.raises(ConfigError, match=r"train.batch_size=15 is not divisible by parallel.dp=2 x "
                                          r"train.grad_accum=1 x parallel.microbatches=3 = 6"):
        check_layout(cfg, 4)


# ---------------------------------------------------------------- overrides

def test_override_coercion_for_every_type():
    cfg = load_config(None, ["--train.lr=1e-3", "train.min_lr=0", "--train.max_steps=10_000",
                             "--train.weight_decay=3", "--model.dropout=0.25", "--train.out_dir=runs/x y",
                             "--train.sample_prompt='def '", "--data.source=\"my file.txt\""])
    assert cfg.train.lr == 1e-3 and cfg.train.min_lr == 0.0 and cfg.train.max_steps == 10000
    assert cfg.train.weight_decay == 3.0 and isinstance(cfg.train.weight_decay, float)
    assert cfg.model.dropout == 0.25 and cfg.train.out_dir == "runs/x y"
    assert cfg.train.sample_prompt == "def " and cfg.data.source == "my file.txt"
    for text, value in [("true", True), ("False", False), ("1", True), ("0", False), ("yes", True),
                        ("NO", False), ("on", True), ("off", False)]:
        assert load_config(None, [f"--train.progress={text}"]).train.progress is value
        assert load_config(None, [f"--model.bias={text}"]).model.bias is value


def test_override_forms():
    cfg = load_config(None, ["--train.max-steps=7", "--train.lr", "2e-3"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 2e-3
    assert "train.seed=-1 must be >= 0" in config_error("--train.seed", "-1")
    assert load_config(None, ["--train.sample_prompt=a=b"]).train.sample_prompt == "a=b"
    assert load_config(None, ["--train.lr=1", "--train.lr=0.5"]).train.lr == 0.5     # the last one wins


def test_override_type_errors_name_key_and_type():
    assert config_error("--train.max_steps=abc") == "train.max_steps='abc' must be an integer"
    assert config_error("--train.max_steps=2.5") == "train.max_steps='2.5' must be an integer"
    assert config_error("--train.lr=fast") == "train.lr='fast' must be a number"
    assert config_error("--train.progress=maybe") == "train.progress='maybe' must be true or false"


def test_malformed_overrides():
    assert "must look like --section.key=value" in config_error("--train.lr")
    assert "must look like --section.key=value; did you mean 'train.lr'?" in config_error("--lr=1e-3")
    assert "must look like" in config_error("--train.=3")


def test_unknown_names_suggest_the_nearest_known_one():
    assert config_error("--train.lerning_rate=1e-3") == "unknown key 'train.lerning_rate'; did you mean 'train.lr'?"
    assert "did you mean 'train.max_steps'?" in config_error("--train.max_iters=5")
    assert "did you mean 'train.warmup_steps'?" in config_error("--train.warmup_step=5")
    assert "did you mean 'model.n_layer'?" in config_error("--model.n_layers=5")
    assert "unknown key 'model.lr'; did you mean 'train.lr'?" in config_error("--model.lr=1")
    assert "unknown section 'trian'" in config_error("--trian.lr=1") and "did you mean 'train'?" in \
        config_error("--trian.lr=1")
    message = config_error("--train.zzzzzz=1")
    assert "known keys in [train]: batch_size, grad_accum" in message and "learning_rate" not in message
    assert "the sections are model, data, train, parallel" in config_error("--qqq.lr=1")


def test_apply_overrides_does_not_change_its_input():
    cfg = Config()
    new = apply_overrides(cfg, ["--train.lr=0.01"])
    assert new.train.lr == 0.01 and cfg.train.lr == 1e-3


# ---------------------------------------------------------------- TOML files

def test_load_file_then_overrides(tmp_path):
    path = write(tmp_path, '[model]\nn_layer = 2\ndropout = 0\n[train]\nlr = 3e-4\nmin_lr = 1e-5\n')
    cfg = load_config(path, ["--train.max_steps=5"])
    assert cfg.model.n_layer == 2 and cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)
    assert cfg.train.lr == 3e-4 and cfg.train.max_steps == 5 and cfg.train.batch_size == 12
    # an override may repair what the file alone gets wrong; validation runs on the result
    bad = write(tmp_path, "[train]\nlr = 1e-5\n", "bad.toml")
    assert load_config(str(bad), ["--train.min_lr=0"]).train.min_lr == 0.0


def test_file_errors_name_the_file(tmp_path):
    path = write(tmp_path, "[train]\nlerning_rate = 1e-3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.lerning_rate' in .*c.toml; did you mean 'train.lr'\?"):
        load_config(path)
    path = write(tmp_path, "[trainer]\nlr = 1e-3\n")
    with pytest.raises(ConfigError, match=r"unknown section 'trainer' in .*c.toml; did you mean 'train'\?"):
        load_config(path)
    path = write(tmp_path, "lr = 1e-3\n")
    with pytest.raises(ConfigError, match=r"key 'lr' in .*c.toml is outside any \[section\]; did you mean 'train.lr'"):
        load_config(path)
    path = write(tmp_path, "train = 3\n")
    with pytest.raises(ConfigError, match=r"'train' in .*c.toml must be a table \[train\]"):
        load_config(path)
    path = write(tmp_path, '[train]\nlr = "1e-3"\n')
    with pytest.raises(ConfigError, match=r"train.lr='1e-3' must be a number"):
        load_config(path)
    path = write(tmp_path, "[train]\nmax_steps = 1.5\n")
    with pytest.raises(ConfigError, match=r"train.max_steps=1.5 must be an integer"):
        load_config(path)


def test_syntax_error_missing_file_and_bad_encoding(tmp_path):
    path = write(tmp_path, "[train]\nlr = = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "invalid TOML" in str(info.value) and "line 2" in str(info.value)
    with pytest.raises(ConfigError, match="config file '.*nope.toml' not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)
    (tmp_path / "latin.toml").write_bytes('[train]\nout_dir = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "latin.toml")


def tricky_config() -> Config:
    return apply_overrides(Config(), [
        "--train.lr=0.30000000000000004", "--train.min_lr=5e-324", "--train.eps=1e-300",
        "--train.loss_scale_init=1.7976931348623157e308", "--train.weight_decay=0.1", "--train.beta2=0.999999",
        "--train.out_dir=runs/ \"quoted\" \\back\\slash \u00e9\u4e2d\U0001F600",
        "--train.sample_prompt=line1\nline2\ttab\r\x01\x7f\x1b end", "--train.progress=false",
        "--model.vocab_size=65", "--model.bias=false", "--data.tokenizer=bpe", "--data.vocab_size=1024",
        "--parallel.pp=2", "--parallel.partition=3,1", "--parallel.bucket_mb=0.5"])


@pytest.mark.parametrize("make", [Config, tricky_config], ids=["defaults", "tricky"])
def test_toml_round_trip(tmp_path, make):
    cfg = make()
    text = dump_toml(cfg)
    assert text.startswith("#") and tomllib.loads(text) == config_to_dict(cfg)
    assert load_config(write(tmp_path, text)) == cfg
    save_config(cfg, tmp_path / "run" / "nested" / "config.toml")
    assert load_config(tmp_path / "run" / "nested" / "config.toml") == cfg
    assert [p.name for p in (tmp_path / "run" / "nested").iterdir()] == ["config.toml"]


def test_dict_round_trip_and_partial_dicts():
    cfg = tricky_config()
    d = config_to_dict(cfg)
    assert set(d) == {"model", "data", "train", "parallel"} and d["train"]["lr"] == cfg.train.lr
    assert config_from_dict(d) == cfg
    assert config_from_dict({}) == Config()
    assert config_from_dict({"train": {"lr": 2e-3}}).train == dataclasses.replace(TrainConfig(), lr=2e-3)
    # values read back from HDF5 arrive as numpy scalars
    np_dict = {"train": {"max_steps": np.int64(5), "lr": np.float32(0.5), "progress": np.bool_(False)}}
    cfg = config_from_dict(np_dict)
    assert cfg.train.max_steps == 5 and type(cfg.train.max_steps) is int and cfg.train.lr == 0.5
    assert cfg.train.progress is False
    with pytest.raises(ConfigError, match="unknown key 'train.lerning_rate'; did you mean 'train.lr'"):
        config_from_dict({"train": {"lerning_rate": 1}})
    with pytest.raises(ConfigError, match="must be a mapping"):
        config_from_dict([1, 2])


def test_data_dir_derivation():
    assert data_dir(Config()) == str(Path("data") / "pydocs_char")
    assert data_dir(load_config(None, ["--data.tokenizer=bpe", "--data.vocab_size=512"])) == \
        str(Path("data") / "pydocs_bpe_512")
    assert data_dir(load_config(None, ["--data.tokenizer=bpe"])) == str(Path("data") / "pydocs_bpe")
    assert data_dir(load_config(None, ["--data.source=shakespeare", "--data.tokenizer=gpt2"])) == \
        str(Path("data") / "shakespeare_gpt2")
    assert data_dir(load_config(None, ["--data.source=/some/where/my.corpus.txt"])) == \
        str(Path("data") / "my.corpus_char")
    assert data_dir(load_config(None, ["--data.dir=/tmp/ds"])) == "/tmp/ds"


# ---------------------------------------------------------------- presets

def test_all_expected_presets_exist():
    names = {p.stem for p in PRESETS}
    assert {"pydocs_char", "shakespeare_char_cpu", "shakespeare_char", "gpt10m", "tiny"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads_round_trips_and_fits_one_rank(path, tmp_path):
    assert path.read_text(encoding="utf-8").startswith("#"), "each preset opens with a comment header"
    cfg = load_config(path)
    check_layout(cfg, 1)
    assert load_config(write(tmp_path, dump_toml(cfg))) == cfg
    assert cfg.train.out_dir == f"runs/{path.stem}"
    schedules = pytest.importorskip("minillm.optim.schedules")
    schedules.check_schedule(cfg.train)     # the learning-rate schedule of every preset is well defined


def test_preset_values():
    main = load_config(CONFIGS / "pydocs_char.toml")
    m, t = main.model, main.train
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (4, 4, 128, 64, 0.0)
    assert (main.data.source, main.data.tokenizer, t.batch_size, t.lr, t.min_lr, t.device) == \
        ("pydocs", "char", 16, 2e-3, 2e-4, "auto")
    gpu = load_config(CONFIGS / "shakespeare_char.toml")
    assert (gpu.model.n_layer, gpu.model.n_embd, gpu.model.block_size, gpu.model.dropout) == (6, 384, 256, 0.2)
    assert (gpu.train.batch_size, gpu.train.max_steps, gpu.train.device, gpu.data.source) == \
        (64, 5000, "gpu", "shakespeare")
    bench = load_config(CONFIGS / "gpt10m.toml").model
    assert 9e6 < 12 * bench.n_layer * bench.n_embd ** 2 < 12e6      # the blocks hold ~10M parameters
    tiny = load_config(CONFIGS / "tiny.toml")
    assert (tiny.model.n_layer, tiny.model.n_embd, tiny.train.max_steps, tiny.train.progress) == (2, 32, 20, False)
