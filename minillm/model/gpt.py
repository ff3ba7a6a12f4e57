"""GPT: configuration and model (GPT-2 style, with Llama-style options)."""
from dataclasses import dataclass

from minillm.errors import ConfigError


def _choice(name, value, options):
    if value not in options:
        raise ConfigError(f"model.{name}={value!r} is not one of {', '.join(map(repr, options))}")


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    norm: str = "layernorm"      # "layernorm" | "rmsnorm"
    mlp: str = "gelu"            # "gelu" | "swiglu"
    pos: str = "learned"         # "learned" | "rope"
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"model.{name}={v!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                              f"pick n_embd a multiple of n_head")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"model.pos='rope' needs an even head size, got n_embd/n_head="
                              f"{self.n_embd // self.n_head}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        _choice("norm", self.norm, ("layernorm", "rmsnorm"))
        _choice("mlp", self.mlp, ("gelu", "swiglu"))
        _choice("pos", self.pos, ("learned", "rope"))

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return ((8 * self.n_embd // 3) + 7) // 8 * 8  # SwiGLU: ~2/3 of 4C, so parameters match
