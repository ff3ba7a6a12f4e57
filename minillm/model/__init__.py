"""The GPT model."""
from minillm.model.gpt import GPTConfig  # noqa: F401
