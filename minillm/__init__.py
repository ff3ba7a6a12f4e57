"""minillm: train a GPT from scratch, with every piece of the pipeline written out to read.

    import minillm as mm
    from minillm import Tensor, no_grad
    import minillm.functional as F
"""
__version__ = "0.1.0"

from minillm.autograd.tensor import Tensor, no_grad, enable_grad  # noqa: E402,F401
from minillm import functional  # noqa: E402,F401
