"""Reference solutions, lesson 01."""


def tanh_backward(out, grad):
    return grad * (1 - out * out)


def div_backward(a, b, grad):
    return grad / b, -grad * a / (b * b)


def unbroadcast(grad, shape):
    extra = grad.ndim - len(shape)
    if extra > 0:                                   # axes broadcasting added in front
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:                                   # size-1 axes it stretched
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad.reshape(shape)
