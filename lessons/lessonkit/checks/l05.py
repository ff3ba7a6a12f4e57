"""Checks of lesson 05 (training): against minillm's get_lr, AdamW and clip_grad_norm."""
import math

import numpy as np

from lessonkit.exercise import exercise
from lessonkit.verify import assert_close
from minillm.config import TrainConfig
from minillm.nn import Parameter
from minillm.optim import AdamW, clip_grad_norm, get_lr


def _warmup_from_zero(step, lr, min_lr, warmup_steps, max_steps):
    if step < warmup_steps:                     # a plausible slip: step 0 gets lr 0, a wasted step
        return lr * step / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


@exercise("05.cosine_lr", broken=_warmup_from_zero)
def check_cosine_lr(cosine_lr):
    for lr, min_lr, warmup, max_steps in ((1e-3, 1e-4, 10, 100), (3e-3, 0.0, 0, 50),
                                          (6e-4, 6e-5, 100, 1000), (1.0, 0.5, 7, 8)):
        cfg = TrainConfig(schedule="cosine", lr=lr, min_lr=min_lr, warmup_steps=warmup,
                          max_steps=max_steps)
        for step in sorted({0, 1, warmup - 1, warmup, warmup + 1, max_steps // 2, max_steps - 1,
                            max_steps, max_steps + 5} - {-1}):
            want = get_lr(step, cfg)
            assert_close(float(cosine_lr(step, lr, min_lr, warmup, max_steps)), want,
                         f"cosine_lr(step={step}, lr={lr}, min_lr={min_lr}, warmup_steps={warmup}, "
                         f"max_steps={max_steps}), against get_lr", rtol=1e-9, atol=1e-15,
                         hint="warm-up: lr * (step + 1) / warmup_steps, so step 0 already moves; then "
                              "min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2 with progress "
                              "going 0 -> 1 from warmup_steps to max_steps; min_lr after")


def _no_bias_correction(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay):
    p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    return p - lr * m / (np.sqrt(v) + eps), m, v


@exercise("05.adamw_step", broken=_no_bias_correction)
def check_adamw_step(adamw_step):
    rng = np.random.default_rng(0)
    for lr, beta1, beta2, eps, wd in ((1e-2, 0.9, 0.999, 1e-8, 0.1), (3e-3, 0.8, 0.99, 1e-6, 0.0)):
        w0 = rng.standard_normal((4, 3))
        param = Parameter(w0.copy())                 # float64: the library's AdamW, as trained
        opt = AdamW([("w", param)], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)
        p, m, v = w0.copy(), np.zeros_like(w0), np.zeros_like(w0)
        for t in range(1, 6):
            g = rng.standard_normal(w0.shape) * (0.1 if t % 2 else 3.0)
            param.grad = g.copy()
            opt.step()
            p, m, v = (np.asarray(a, dtype=np.float64) for a in
                       adamw_step(p.copy(), g.copy(), m.copy(), v.copy(), t, lr, beta1, beta2, eps, wd))
            what = f"lr={lr}, betas=({beta1}, {beta2}), weight_decay={wd}, step t={t}"
            assert_close(m, opt.state["w"]["m"], f"m after {what}", rtol=1e-9,
                         hint="m = beta1 * m + (1 - beta1) * g")
            assert_close(v, opt.state["w"]["v"], f"v after {what}", rtol=1e-9,
                         hint="v = beta2 * v + (1 - beta2) * g * g")
            assert_close(p, param.data, f"the weights after {what}, against minillm's AdamW",
                         rtol=1e-8, atol=1e-12,
                         hint="decay first (p * (1 - lr * weight_decay)), then divide m by "
                              "1 - beta1**t and v by 1 - beta2**t before p -= lr * m_hat / "
                              "(sqrt(v_hat) + eps)")


def _per_tensor(grads, max_norm):   # a plausible slip: clips each tensor to max_norm on its own
    out = []
    for g in grads:
        n = np.sqrt((np.asarray(g) ** 2).sum())
        out.append(g * (max_norm / n) if n > max_norm else g.copy())
    return out, float(np.sqrt(sum((np.asarray(g) ** 2).sum() for g in grads)))


@exercise("05.clip_by_global_norm", broken=_per_tensor)
def check_clip_by_global_norm(clip_by_global_norm):
    rng = np.random.default_rng(1)
    shapes = ((5, 3), (3,), (2, 2, 2))
    for scale, max_norm in ((1.0, 0.5), (0.05, 1.0), (10.0, 2.0), (1.0, 100.0)):
        grads = [scale * rng.standard_normal(s) for s in shapes]
        params = [Parameter(np.zeros(s)) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.copy()
        want_norm = clip_grad_norm(params, max_norm)
        got, norm = clip_by_global_norm([g.copy() for g in grads], max_norm)
        assert_close(float(norm), want_norm, f"the returned norm (max_norm={max_norm})", rtol=1e-9,
                     hint="return the norm measured BEFORE clipping: it is what the trainer logs")
        assert len(got) == len(grads), f"return one gradient per input, got {len(got)} for {len(grads)}"
        for i, (a, p) in enumerate(zip(got, params)):
            assert_close(a, p.grad, f"gradient {i} of shape {shapes[i]} (global norm "
                         f"{want_norm:.3g}, max_norm {max_norm})", rtol=1e-5,
                         hint="the norm is over ALL gradients as one vector; if it exceeds max_norm, "
                              "every gradient is multiplied by the same max_norm / norm")
