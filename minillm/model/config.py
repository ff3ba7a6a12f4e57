"""GPTConfig: the shape of a GPT (the ``[model]`` section of a run config)."""
from dataclasses import dataclass

from minillm.choices import MLPKind, Norm, Position
from minillm.config_section import AT_LEAST_0, POSITIVE_INT, Section, require


@dataclass
class GPTConfig(Section):
    vocab_size: int = 0          # 0: take it from the dataset (the trainer fills it in)
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    norm: Norm = "layernorm"
    mlp: MLPKind = "gelu"
    pos: Position = "learned"
    tie_embeddings: bool = True
    _name = "model"
    _rules = (((AT_LEAST_0[0], "a positive integer (or 0: from the data)"), "vocab_size"),
              (POSITIVE_INT, "block_size", "n_layer", "n_head", "n_embd"))

    def _validate(self):
        require(self.n_embd % self.n_head == 0,
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                f"pick n_embd a multiple of n_head")
        require(self.pos != "rope" or self.head_size % 2 == 0,
                f"model.pos='rope' needs an even head size, got n_embd/n_head={self.head_size}")
        # repr, not the rule's short form: "model.dropout=1.0" says it is the fraction dropped
        require(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout!r} must be in [0, 1)")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return ((8 * self.n_embd // 3) + 7) // 8 * 8  # SwiGLU: ~2/3 of 4C, so parameters match
