"""Neural-network building blocks: Module, Parameter and the layers a GPT needs."""
from minillm.nn.module import Module, ModuleList, Parameter  # noqa: F401
from minillm.nn.layers import CrossEntropyLoss, Dropout, Embedding, LayerNorm, Linear, RMSNorm  # noqa: F401
