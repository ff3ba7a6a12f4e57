"""Reference solutions, lesson 15."""


def training_flops(n_params, n_tokens):
    return 6 * n_params * n_tokens


def gpu_days(flops, peak_flops, mfu, n_gpus):
    return flops / (peak_flops * mfu * n_gpus) / 86_400


def compute_optimal(C, law):
    # minimise E + A N^-a + B D^-b with D = C / (6N): a A N^-a = b B D^-b, which gives
    # N = G (C/6)^(b/(a+b)) with G = (a A / (b B))^(1/(a+b))
    a, b = law["alpha"], law["beta"]
    G = (a * law["A"] / (b * law["B"])) ** (1 / (a + b))
    n = G * (C / 6) ** (b / (a + b))
    return n, C / (6 * n)
