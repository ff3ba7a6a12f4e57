"""The autograd engine: Tensor, Function, primitive and fused ops, gradient checking."""
from minillm.autograd.function import Context, Function  # noqa: F401
from minillm.autograd.tensor import Tensor, enable_grad, is_grad_enabled, no_grad  # noqa: F401
from minillm.autograd import ops, fused  # noqa: F401
