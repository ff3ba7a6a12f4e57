"""Typed run configuration: four dataclass sections, TOML files and ``--section.key=value`` overrides.

A run is one ``Config`` = ``model`` (GPTConfig) + ``data`` + ``train`` + ``parallel``. Every value is
checked when its section is built, so a typo or an impossible value stops the run before any work,
with one line that says what to change. ``load_config`` reads a TOML preset and applies overrides;
``dump_toml`` writes the resolved config back (the run directory's ``config.toml``), and
``config_to_dict`` / ``config_from_dict`` carry it inside checkpoints.
"""
import dataclasses
import difflib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from minillm.choices import (NAMED_SOURCES, AllReduce, DeviceSetting, DType, LRSchedule, Optimizer,
                             PipelineSchedule, Recompute, Tokenizer, ZeroStage)
from minillm.config_section import (AT_LEAST_0, AT_LEAST_1, BELOW_1, OPEN_UNIT, POSITIVE, UNIT,
                                    Section, field_types, parse_override, parse_size, require, show,
                                    typed)
from minillm.distributed.topology import layout_problem
from minillm.errors import ConfigError
from minillm.model.config import GPTConfig


# ---------------------------------------------------------------- sections

@dataclass
class DataConfig(Section):
    source: str = "pydocs"        # "pydocs" | "shakespeare" | path to a UTF-8 text file
    tokenizer: Tokenizer = "char"
    vocab_size: int = 0           # bpe only; 0 = the tokenizer's default
    dir: str = ""                 # "" = data/<source>_<tokenizer>[_<vocab>] (see data_dir)
    val_fraction: float = 0.1
    _name = "data"
    _rules = ((AT_LEAST_0, "vocab_size"), (OPEN_UNIT, "val_fraction"))

    def _validate(self):
        require(self.source.strip() != "", "data.source is empty; use 'pydocs', 'shakespeare' or a text file path")
        require(self.vocab_size == 0 or self.tokenizer == "bpe",
                f"data.vocab_size={self.vocab_size} only applies to data.tokenizer='bpe' "
                f"({self.tokenizer!r} fixes its own vocabulary); set it to 0")
        require(self.vocab_size == 0 or self.vocab_size >= 256,
                f"data.vocab_size={self.vocab_size} must be >= 256 (the byte alphabet of byte-level BPE), "
                "or 0 for the default")


@dataclass
class TrainConfig(Section):
    batch_size: int = 12          # global sequences per optimizer step, over all ranks and micro-steps
    grad_accum: int = 1
    max_steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    schedule: LRSchedule = "cosine"
    decay_frac: float = 0.2       # wsd: the last fraction of steps that decays
    optimizer: Optimizer = "adamw"
    weight_decay: float = 0.1
    no_decay: str = "ndim<2"      # parameters spared from weight decay: "ndim<2" and/or name patterns (optim/groups.py)
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    momentum: float = 0.9         # sgd only
    grad_clip: float = 1.0        # 0 = no clipping
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    ckpt_interval: int = 250      # 0 = only at the end
    keep_last: int = 3            # 0 = keep every checkpoint
    seed: int = 1337
    dtype: DType = "float32"
    device: DeviceSetting = "auto"  # "auto": MINILLM_DEVICE, else cpu (backend.resolve_device)
    out_dir: str = "runs/default"
    sample_tokens: int = 300
    sample_prompt: str = ""
    loss_scale_init: float = 65536.0
    loss_scale_growth_interval: int = 2000
    progress: bool = True
    sample_interval: int = 0      # print a sample every N steps (0 = only at the end)
    threads: int = 0              # BLAS threads; 0 = chosen for the run (perf/threads.py)
    recompute: Recompute = "none"  # activation recomputation: "full" blocks, or the "selective" attention core
    memory_limit: str = ""        # e.g. "16GiB": refuse to start when the memory ledger predicts more per rank
    _name = "train"
    _rules = ((AT_LEAST_1, "batch_size", "grad_accum", "max_steps", "eval_interval", "eval_iters", "log_interval",
               "loss_scale_growth_interval"),
              (AT_LEAST_0, "warmup_steps", "ckpt_interval", "keep_last", "seed", "sample_tokens", "min_lr",
               "weight_decay", "grad_clip", "sample_interval", "threads"),
              (POSITIVE, "lr", "eps", "loss_scale_init"),
              (BELOW_1, "beta1", "beta2", "momentum"),
              (UNIT, "decay_frac"))

    def _validate(self):
        require(self.min_lr <= self.lr, f"train.min_lr={show(self.min_lr)} is above train.lr={show(self.lr)}; "
                                        "make min_lr <= lr")
        require(self.batch_size % self.grad_accum == 0,
                f"train.batch_size={self.batch_size} is not divisible by train.grad_accum={self.grad_accum}")
        require(self.out_dir.strip() != "", "train.out_dir is empty; give the run directory, e.g. runs/my_run")
        if self.memory_limit:
            parse_size("train.memory_limit", self.memory_limit)


@dataclass
class ParallelConfig(Section):
    dp: int = 1                   # data-parallel replicas
    pp: int = 1                   # pipeline stages
    microbatches: int = 1         # pipeline micro-batches per step
    schedule: PipelineSchedule = "1f1b"
    bucket_mb: float = 25.0       # gradient all-reduce bucket size
    allreduce: AllReduce = "mpi"   # "ring": our hand-written ring
    partition: str = ""           # blocks per stage (per chunk), e.g. "3,2,2,1"; "" = as even as possible
    zero: ZeroStage = 0           # 0 = plain dp; 1 AdamW state, 2 + gradients, 3 + parameters sharded over dp ranks
    virtual_stages: int = 1       # chunks of layers per pipeline rank (> 1: interleaved 1F1B)
    tp: int = 1                   # tensor-parallel ranks: every layer split across them (Megatron)
    sp: bool = False              # sequence parallelism: norms, dropout, residuals split along T over tp
    _name = "parallel"
    _rules = ((AT_LEAST_1, "dp", "pp", "microbatches", "virtual_stages", "tp"), (POSITIVE, "bucket_mb"))

    def _validate(self):
        require(not self.sp or self.tp > 1, "parallel.sp=true splits the sequence between tensor-parallel "
                "ranks; it needs parallel.tp >= 2 (or set parallel.sp=false)")
        require(self.zero == 0 or self.pp == 1, f"parallel.zero={self.zero} shards the optimizer over "
                f"data-parallel ranks only, not with parallel.pp={self.pp}; set parallel.pp=1 or parallel.zero=0")
        require(self.zero <= 1 or self.tp == 1, f"parallel.zero={self.zero} shards gradients and weights over "
                f"data-parallel ranks only, not with parallel.tp={self.tp}; set parallel.zero=1 or parallel.tp=1")
        v, pp, m = self.virtual_stages, self.pp, self.microbatches
        blocks = self.partition_blocks
        require(not blocks or len(blocks) == pp * v,
                f"parallel.partition={self.partition!r} lists {len(blocks)} stages but parallel.pp={pp}"
                + (f" x parallel.virtual_stages={v} = {pp * v}" if v > 1 else "")
                + "; give one block count per stage")
        if v > 1:
            require(pp > 1, f"parallel.virtual_stages={v} interleaves a pipeline; set parallel.pp >= 2 "
                    "or parallel.virtual_stages=1")
            require(v <= 16, f"parallel.virtual_stages={v} is more than 16 chunks per rank; lower it")
            require(self.schedule == "1f1b", f"parallel.virtual_stages={v} interleaves 1F1B; set "
                    f"parallel.schedule='1f1b' (not {self.schedule!r}) or parallel.virtual_stages=1")
            require(m % pp == 0, f"interleaved 1F1B needs parallel.microbatches={m} to be a multiple of "
                    f"parallel.pp={pp}; use {((m + pp - 1) // pp) * pp}")
        if self.schedule == "zb-h1" and pp > 1:
            require(m >= pp, f"parallel.schedule='zb-h1' needs parallel.microbatches={m} >= parallel.pp={pp}; "
                    f"use --parallel.microbatches={pp} or more")

    @property
    def partition_blocks(self) -> tuple:
        """The explicit blocks-per-stage list, or () for an even split."""
        if not self.partition.strip():
            return ()
        try:
            blocks = tuple(int(p) for p in self.partition.split(","))
        except ValueError:
            blocks = (-1,)
        require(all(b >= 0 for b in blocks), f"parallel.partition={self.partition!r} must be a comma list of "
                                             "block counts per stage, e.g. '2,2'")
        return blocks


SECTIONS = {"model": GPTConfig, "data": DataConfig, "train": TrainConfig, "parallel": ParallelConfig}


@dataclass
class Config:
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"Config.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        n_layer, par = self.model.n_layer, self.parallel
        require(par.zero == 0 or self.train.optimizer == "adamw",
                f"parallel.zero={par.zero} shards AdamW's moments; set train.optimizer='adamw' or parallel.zero=0")
        blocks = par.partition_blocks
        require(not blocks or sum(blocks) == n_layer,
                f"parallel.partition={par.partition!r} places {sum(blocks)} blocks but model.n_layer={n_layer}")
        require(blocks or par.pp <= n_layer,
                f"parallel.pp={par.pp} is more stages than model.n_layer={n_layer} blocks; lower parallel.pp")
        v = par.virtual_stages
        require(blocks or v == 1 or n_layer % (par.pp * v) == 0,
                f"parallel.virtual_stages={v} does not divide the {n_layer / par.pp:g} blocks per pipeline rank "
                f"(model.n_layer={n_layer}, parallel.pp={par.pp}); pick v dividing n_layer / pp")
        _check_tensor_parallel(self.model, par)


def _check_tensor_parallel(m: GPTConfig, par: "ParallelConfig") -> None:
    """Every split tensor-parallel layer must cut into equal whole shards (the vocabulary is padded)."""
    tp, why = par.tp, "each tensor-parallel rank holds whole heads and equal shards: pick a tp that divides it"
    for key in ("n_head", "n_embd"):
        n = getattr(m, key)
        require(n % tp == 0, f"model.{key}={n} is not divisible by parallel.tp={tp}; {why}")
    require(m.mlp_hidden % tp == 0, f"the MLP width {m.mlp_hidden} (model.mlp={m.mlp!r}) is not divisible "
                                    f"by parallel.tp={tp}; {why}")
    require(not par.sp or m.block_size % tp == 0,
            f"model.block_size={m.block_size} is not divisible by parallel.tp={tp}: parallel.sp=true "
            f"splits every sequence into tp equal parts")


def check_layout(cfg: Config, world_size: int) -> None:
    """Checks that need the number of MPI ranks: the rank grid and how the global batch splits."""
    par, tr = cfg.parallel, cfg.train
    problem = layout_problem(par.dp, par.pp, par.tp, world_size)
    require(problem is None, problem)
    per = par.dp * tr.grad_accum * par.microbatches
    require(tr.batch_size % per == 0,
            f"train.batch_size={tr.batch_size} is not divisible by parallel.dp={par.dp} x train.grad_accum="
            f"{tr.grad_accum} x parallel.microbatches={par.microbatches} = {per}; use a multiple of {per}")


def data_dir(cfg: Config) -> str:
    """The dataset directory: data.dir, or data/<source name>_<tokenizer>[_<vocab>] relative to cwd."""
    d = cfg.data
    if d.dir:
        return d.dir
    name = d.source if d.source in NAMED_SOURCES else Path(d.source).stem
    suffix = f"_{d.vocab_size}" if d.vocab_size else ""
    return os.path.join("data", f"{name}_{d.tokenizer}{suffix}")


# ---------------------------------------------------------------- unknown names

# Names other codebases (nanoGPT, Hugging Face) use, so a familiar spelling finds our key.
_ALIASES = {
    "learning_rate": "train.lr", "min_learning_rate": "train.min_lr", "max_iters": "train.max_steps",
    "lr_decay_iters": "train.max_steps", "warmup_iters": "train.warmup_steps",
    "gradient_accumulation_steps": "train.grad_accum", "max_grad_norm": "train.grad_clip",
    "decay_lr": "train.schedule", "lr_schedule": "train.schedule", "precision": "train.dtype",
    "n_ctx": "model.block_size", "context_length": "model.block_size", "seq_len": "model.block_size",
    "d_model": "model.n_embd", "hidden_size": "model.n_embd", "num_layers": "model.n_layer",
    "n_layers": "model.n_layer", "num_heads": "model.n_head", "n_heads": "model.n_head",
    "dataset": "data.source", "data_dir": "data.dir",
}


def _suggest(section: str, key: str) -> str:
    """'; did you mean X?' for a mistyped key, else the list of keys of the section."""
    keys = list(field_types(SECTIONS[section])) if section in SECTIONS else []
    own = {k: f"{section}.{k}" for k in keys}
    own.update({a: t for a, t in _ALIASES.items() if t.startswith(f"{section}.")})
    everywhere = {k: f"{s}.{k}" for s, cls in SECTIONS.items() for k in field_types(cls)}
    everywhere.update(_ALIASES)
    for names, cutoff in ((own, 0.6), (everywhere, 0.75)):
        hit = difflib.get_close_matches(key, list(names), n=1, cutoff=cutoff)
        if hit:
            return f"; did you mean '{names[hit[0]]}'?"
    return f"; known keys in [{section}]: {', '.join(keys)}" if keys else ""


def _unknown_key(section: str, key: str, where: str) -> ConfigError:
    return ConfigError(f"unknown key '{section}.{key}'{where}{_suggest(section, key)}")


def _unknown_section(section: str, where: str) -> ConfigError:
    hit = difflib.get_close_matches(section, list(SECTIONS), n=1, cutoff=0.6)
    hint = f"did you mean '{hit[0]}'?" if hit else f"the sections are {', '.join(SECTIONS)}"
    return ConfigError(f"unknown section '{section}'{where}; {hint}")


# ---------------------------------------------------------------- dicts, TOML, overrides

def _normalize(d, where: str = "") -> dict:
    """Check a nested {section: {key: value}} mapping: known names, right types. Returns a new dict."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(d).__name__}{where}")
    out = {}
    for section, values in d.items():
        if not isinstance(values, Mapping):
            if section in SECTIONS:
                raise ConfigError(f"'{section}'{where} must be a table [{section}] of keys, got {values!r}")
            hit = _suggest("", section)     # a bare key at the top level: name the section it belongs in
            raise ConfigError(f"key '{section}'{where} is outside any [section]{hit}")
        if section not in SECTIONS:
            raise _unknown_section(section, where)
        types = field_types(SECTIONS[section])
        for key, value in values.items():
            if key not in types:
                raise _unknown_key(section, key, where)
            out.setdefault(section, {})[key] = typed(f"{section}.{key}", value, types[key])
    return out


def _construct(d: dict) -> Config:
    return Config(**{name: cls(**d.get(name, {})) for name, cls in SECTIONS.items()})


def config_to_dict(cfg: Config) -> dict:
    """The config as a nested plain dict {section: {key: scalar}} (what checkpoints store)."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: Mapping) -> Config:
    """Rebuild a Config from config_to_dict output (missing keys take defaults), with full validation."""
    return _construct(_normalize(d))


def _split_override(item: str) -> tuple:
    text = item[2:] if item.startswith("--") else item
    dotted, eq, value = text.partition("=")
    dotted = dotted.strip().replace("-", "_")
    section, dot, key = dotted.partition(".")
    if not eq or not dot or not section or not key:
        hint = _suggest("", dotted) if not dot else ""
        raise ConfigError(f"override {item!r} must look like --section.key=value{hint}")
    return section, key, value


def _join_pairs(overrides) -> list:
    """Accept '--train.lr 1e-3' (two argv items) as well as '--train.lr=1e-3'."""
    items, out, i = list(overrides), [], 0
    while i < len(items):
        item = items[i]
        if "=" not in item and i + 1 < len(items) and not items[i + 1].startswith("--"):
            item, i = f"{item}={items[i + 1]}", i + 1
        out.append(item)
        i += 1
    return out


def override_text(overrides, key: str):
    """The text given for ``section.key`` in ``overrides`` (the last one wins), or None."""
    found = None
    for item in _join_pairs(overrides):
        section, name, text = _split_override(item)
        if f"{section}.{name}" == key:
            found = text
    return found


def _apply_overrides(d: dict, overrides) -> dict:
    for item in _join_pairs(overrides):
        section, key, text = _split_override(item)
        if section not in SECTIONS:
            raise _unknown_section(section, f" in override {item!r}")
        types = field_types(SECTIONS[section])
        if key not in types:
            raise _unknown_key(section, key, "")
        d.setdefault(section, {})[key] = parse_override(f"{section}.{key}", text, types[key])
    return d


def apply_overrides(cfg: Config, overrides) -> Config:
    """A new Config: cfg with ``--section.key=value`` overrides applied (cfg is not changed)."""
    return _construct(_apply_overrides(config_to_dict(cfg), overrides))


def _read_toml(path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' not found; pass an existing .toml file "
                          "(presets are in configs/)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config file as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror}") from None


def load_config(path: "str | os.PathLike | None" = None, overrides=()) -> Config:
    """Read a TOML config (or start from defaults when path is None), apply overrides, validate.
    Without a train.out_dir in either, the run directory is ``default_out_dir(path, overrides)``."""
    d = _normalize(_read_toml(path), f" in {path}") if path is not None else {}
    d = _apply_overrides(d, overrides)
    if "out_dir" not in d.get("train", {}):
        d.setdefault("train", {})["out_dir"] = default_out_dir(path, overrides)
    return _construct(d)


def default_out_dir(path=None, overrides=()) -> str:
    """``runs/<config name>[-<key>=<value>...]``: each override gets its own directory, so the same
    preset run with other options never writes into an earlier run (``runs/pydocs_char-dp=2``)."""
    parts = [Path(path).stem if path is not None else "default"]
    for item in _join_pairs(overrides):
        section, key, text = _split_override(item)
        if (section, key) != ("train", "out_dir"):
            parts.append(f"{key}={text}")
    name = "".join(c if c.isalnum() or c in "._=+,-" else "_" for c in "-".join(parts))
    if len(name) > 80:  # long paths as values: keep the name readable and still distinct
        import hashlib
        name = f"{name[:64]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return os.path.join("runs", name)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(int(v))
    if isinstance(v, float):
        return repr(float(v))         # the shortest text that reads back as exactly this float
    if isinstance(v, str):
        return '"' + "".join(_escape(c) for c in v) + '"'
    raise TypeError(f"cannot write {type(v).__name__} value {v!r} to TOML")


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _escape(c: str) -> str:
    # A TOML basic string may hold any character except these and the other control characters.
    if c in _ESCAPES:
        return _ESCAPES[c]
    return f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c


def dump_toml(cfg: Config) -> str:
    """The config as TOML text (one table per section); load_config reads it back to an equal Config."""
    lines = ["# minillm run configuration: minillm train <this file> reproduces the run"]
    for section, values in config_to_dict(cfg).items():
        lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def save_config(cfg: Config, path) -> None:
    """Write dump_toml(cfg) to path (parent directories created; written whole, then renamed)."""
    from minillm.fileio import write_atomic
    write_atomic(path, dump_toml(cfg), "config")
