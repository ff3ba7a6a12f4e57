"""Checks of lesson 10 (measuring): against minillm's FLOP count and the roofline's byte count."""
from lessonkit.exercise import exercise
from lessonkit.verify import assert_close
from minillm.model import GPTConfig
from minillm.perf.flops import flops_per_token


@exercise("10.attention_flops", broken=lambda n_layer, block_size, n_embd: 4 * n_layer * block_size * n_embd)
def check_attention_flops(attention_flops):
    for L, T, C in ((2, 16, 32), (12, 1024, 768), (96, 2048, 12288), (1, 1, 1)):
        cfg = GPTConfig(vocab_size=10, block_size=T, n_layer=L, n_head=1, n_embd=C)
        want = flops_per_token(cfg, 0)          # with no weights, only attention's products remain
        assert_close(float(attention_flops(L, T, C)), float(want),
                     f"attention_flops(n_layer={L}, block_size={T}, n_embd={C}), against "
                     "flops_per_token(config, 0)", rtol=1e-12,
                     hint="per layer and token, forward: q.k against T keys (2 T C) and the weighted "
                          "sum of T values (2 T C); backward costs twice the forward")


@exercise("10.matmul_intensity", broken=lambda m, k, n, itemsize: m * k * n / (itemsize * (m * k + k * n + m * n)))
def check_matmul_intensity(matmul_intensity):
    for m, k, n, size in ((1024, 1024, 1024, 4), (1024, 768, 3072, 4), (1, 4096, 4096, 2), (64, 64, 64, 8)):
        flops = 2 * m * k * n                   # a multiply and an add per term
        nbytes = size * (m * k + k * n + m * n)  # read both operands once, write the result once
        assert_close(float(matmul_intensity(m, k, n, size)), flops / nbytes,
                     f"matmul_intensity({m}, {k}, {n}, itemsize={size})", rtol=1e-12,
                     hint="FLOPs: 2 m k n; the fewest bytes: read A (m x k) and B (k x n) once and "
                          "write C (m x n) once, itemsize bytes each")
