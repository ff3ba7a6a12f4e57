"""Reference solutions, lesson 10."""


def attention_flops(n_layer, block_size, n_embd):
    forward = 2 * block_size * n_embd + 2 * block_size * n_embd   # q.k over T keys, then mix T values
    return 3 * forward * n_layer                                  # backward: twice the forward


def matmul_intensity(m, k, n, itemsize):
    return 2 * m * k * n / (itemsize * (m * k + k * n + m * n))
