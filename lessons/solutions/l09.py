"""Reference solutions, lesson 09."""


def one_f_one_b(p, s, m):
    warm = min(p - s - 1, m)
    steps = [("F", i) for i in range(warm)]
    for j in range(m - warm):
        steps += [("F", warm + j), ("B", j)]
    return steps + [("B", i) for i in range(m - warm, m)]


def split_linear_backward(x, w, g):
    dx = g @ w                      # needed now: the previous stage waits for it
    return dx, (lambda: g.T @ x)    # dW: nobody waits, run it in the bubble
