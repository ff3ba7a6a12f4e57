"""The GPT model."""
from minillm.model.gpt import GPT, GPTConfig, KVCache  # noqa: F401
