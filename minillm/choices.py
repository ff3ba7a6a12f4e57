"""Every choice list of minillm, in one place.

Each choice is a ``typing.Literal``: a config field annotated with it accepts exactly those values
(``config_section.Section`` checks them once, when the config is built), and a function can say
what it takes (``def schedule(name: PipelineSchedule, ...)``). The tuples next to them are the same
values, for messages and loops. Adding an option means adding it here and handling it where it is
used; there is no second list to keep in sync.
"""
from typing import Literal, get_args

from minillm.errors import ConfigError

Tokenizer = Literal["char", "bpe", "gpt2"]
NamedSource = Literal["pydocs", "shakespeare"]     # any other data.source is a path to a text file
Optimizer = Literal["adamw", "sgd"]
LRSchedule = Literal["constant", "cosine", "wsd", "inv_sqrt"]
DType = Literal["float32", "float16", "bfloat16"]
Device = Literal["cpu", "gpu"]
DeviceSetting = Literal["auto", "cpu", "gpu"]  # train.device: "auto" = not set (MINILLM_DEVICE, else cpu)
PipelineSchedule = Literal["1f1b", "gpipe", "zb-h1"]
AllReduce = Literal["mpi", "ring"]               # MPI's own, or minillm's hand-written ring
ZeroStage = Literal[0, 1, 2, 3]
Norm = Literal["layernorm", "rmsnorm"]
MLPKind = Literal["gelu", "swiglu"]
Position = Literal["learned", "rope"]
Recompute = Literal["none", "full", "selective"]  # activation recomputation (model/recompute.py)
# the data pipeline (minillm/data/pipeline.py): how documents are split, undecodable bytes,
# which duplicates are removed, and the quality rules in the order they are tried (filters.py)
DocSep = Literal["eot", "blank"]
BadUTF8 = Literal["error", "skip"]
DedupMode = Literal["both", "exact", "near"]
FilterRule = Literal["min_words", "max_words", "mean_word_length", "symbol_ratio", "bullet_lines",
                     "ellipsis_lines", "alpha_words", "stop_words", "dup_lines", "dup_line_chars",
                     "top_2gram", "lorem_ipsum"]

TOKENIZERS = get_args(Tokenizer)
NAMED_SOURCES = get_args(NamedSource)
OPTIMIZERS = get_args(Optimizer)
LR_SCHEDULES = get_args(LRSchedule)
DTYPES = get_args(DType)
HALF_DTYPES = ("float16", "bfloat16")
DEVICES = get_args(Device)
DEVICE_SETTINGS = get_args(DeviceSetting)
PIPELINE_SCHEDULES = get_args(PipelineSchedule)
ALLREDUCES = get_args(AllReduce)
ZERO_STAGES = get_args(ZeroStage)
NORMS = get_args(Norm)
MLP_KINDS = get_args(MLPKind)
POSITIONS = get_args(Position)
RECOMPUTES = get_args(Recompute)
DOC_SEPS = get_args(DocSep)
BAD_UTF8 = get_args(BadUTF8)
DEDUP_MODES = get_args(DedupMode)
FILTER_RULES = get_args(FilterRule)


def one_of(what: str, value, options):
    """``value`` when it is in ``options``; else a one-line error naming them (for functions users
    call directly with a name, e.g. ``get_tokenizer("bpe")``; configs are checked on construction)."""
    if value not in options:
        raise ConfigError(f"{what}={value!r} is not one of {', '.join(map(repr, options))}")
    return value
