"""Reference solutions, lesson 01."""


def tanh_backward(out, grad):
    return grad * (1 - out * out)
