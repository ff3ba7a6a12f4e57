"""The GPT model."""
from minillm.model.gpt import GPT, GPTConfig, KVCache, document_mask  # noqa: F401
