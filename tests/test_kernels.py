"""The fused CUDA kernels (minillm/kernels) against the reference implementations.

Each kernel's forward and backward is compared with the NumPy-style reference Function of
``autograd/fused.py`` on the same device, in float64 (agreement to rounding: the same formula),
float32 and the 16-bit formats (agreement to the format's precision); the cuBLAS GEMM with a
float32 result against a float64 product of the same 16-bit values; the one-launch AdamW against
``AdamW.step`` with the kernels off; and a whole GPT step with the kernels on and off.

Where: on a real GPU (``scripts/gpu_check.sh`` runs this file first), else on the fake CuPy,
which compiles the CUDA C for the CPU with g++ and runs a thread per GPU thread
(``tests/fake_cupy/cupy/_emulator.py``) and does cuBLAS's GEMMs with NumPy: the kernels' code,
indexing, reductions and launch arguments are checked everywhere; their speed and the PTX float16
conversions only on a GPU. Skipped when neither is there, and in the fake CI pass (run once, here).
"""
import importlib.util
import os

import numpy as np
import pytest

from minillm import Tensor, backend, kernels


def _real_gpu() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    import cupy
    if hasattr(cupy, "_fake"):
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


REAL_GPU = _real_gpu()
pytestmark = [
    pytest.mark.skipif(not REAL_GPU and os.environ.get("MINILLM_FAKE_CUPY") == "1",
                       reason="emulated once, in the CPU pass"),
    pytest.mark.skipif(not REAL_GPU and not __import__("shutil").which("g++"),
                       reason="needs a CUDA GPU, or g++ for the emulator"),
]

TOL = {"float64": 1e-10, "float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}


@pytest.fixture(autouse=True)
def gpu(request):
    if REAL_GPU:
        prev = backend.device()
        backend.set_device("gpu")
    else:
        request.getfixturevalue("fake_gpu")
    on = kernels.set_enabled(True)
    yield backend.array_module()
    kernels.set_enabled(on)
    if REAL_GPU:
        backend.set_device(prev)


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def run(fn, arrays, grad_seed=0, **kw):
    """Forward and backward of Function ``fn`` on device copies of ``arrays`` (None stays None):
    (output, grads) as float64 host arrays."""
    ts = [None if a is None else Tensor(backend.asarray(a), requires_grad=a.dtype.kind == "f" or
                                        str(a.dtype) == "bfloat16") for a in arrays]
    out = fn.apply(*ts, **kw)
    g = np.random.default_rng(grad_seed).standard_normal(out.shape)
    out.backward(backend.asarray(g.astype(out.dtype)))
    host = backend.to_numpy
    return (host(out.data).astype(np.float64),
            [None if t is None or t.grad is None else host(t.grad).astype(np.float64) for t in ts])


def close(got, want, tol):
    scale = max(np.abs(want).max(), 1e-30)
    assert np.abs(got - want).max() <= tol * scale, (np.abs(got - want).max(), scale)


def compare(kernel_fn, reference_fn, arrays, dtype, **kw):
    out_k, grads_k = run(kernel_fn, arrays, **kw)
    out_r, grads_r = run(reference_fn, arrays, **kw)
    close(out_k, out_r, TOL[dtype])
    for gk, gr in zip(grads_k, grads_r):
        assert (gk is None) == (gr is None)
        if gk is not None:
            close(gk, gr, TOL[dtype])


DTYPES = ["float64", "float32", "float16", "bfloat16"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu(dtype, approximate):
    from minillm.autograd import fused
    from minillm.kernels import cuda
    x = (np.random.default_rng(1).standard_normal((5, 7, 33)) * 3).astype(_dtype(dtype))
    compare(cuda.GELU, fused.GELU, [x], dtype, approximate=approximate)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["layernorm", "layernorm_nobias", "rmsnorm"])
@pytest.mark.parametrize("C", [48, 769])
def test_norms(dtype, kind, C):
    from minillm.autograd import fused
    from minillm.kernels import cuda
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((3, 11, C)) * 2 + 0.5).astype(_dtype(dtype))
    w = (1 + 0.1 * rng.standard_normal(C)).astype(_dtype(dtype))
    b = (0.1 * rng.standard_normal(C)).astype(_dtype(dtype))
    if kind == "rmsnorm":
        compare(cuda.RMSNorm, fused.RMSNorm, [x, w], dtype)
    else:
        compare(cuda.LayerNorm, fused.LayerNorm, [x, w, b if kind == "layernorm" else None], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [17, 5000])
def test_cross_entropy(dtype, V):
    from minillm.autograd import fused
    from minillm.kernels import cuda
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((4, 9, V)) * 4).astype(_dtype(dtype))
    targets = rng.integers(0, V, (4, 9))
    targets[0, :3] = -100                                    # ignored rows
    compare(cuda.CrossEntropy, fused.CrossEntropy, [logits, targets], dtype)


def test_cross_entropy_bad_ids_are_reported_at_the_next_read():
    from minillm.kernels import cuda
    logits = Tensor(backend.asarray(np.zeros((2, 3), np.float32)))
    cuda.CrossEntropy.apply(logits, backend.asarray(np.array([0, 5])))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        backend.fetch()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", ["2d", "batched", "transposed", "weight"])
def test_gemm_float32_result(dtype, case):
    from minillm.kernels.gemm import matmul
    rng = np.random.default_rng(4)
    dt = _dtype(dtype)
    shapes = {"2d": ((37, 64), (64, 29)), "batched": ((2, 3, 17, 32), (2, 3, 32, 19)),
              "transposed": ((2, 3, 17, 32), (2, 3, 19, 32)), "weight": ((4, 17, 48), (48, 40))}
    sa, sb = shapes[case]
    a = (rng.standard_normal(sa) * 30).astype(dt)            # products beyond float16's 65504
    b = (rng.standard_normal(sb) * 30).astype(dt)
    da, db = backend.asarray(a), backend.asarray(b)
    if case == "transposed":
        db, b = db.swapaxes(-1, -2), b.swapaxes(-1, -2)      # a transposed view, as k^T in attention
    want = a.astype(np.float64) @ b.astype(np.float64)
    got = matmul(da, db, np.float32)
    assert got.dtype == np.float32 and got.shape == want.shape
    close(backend.to_numpy(got).astype(np.float64), want, 1e-5)
    rounded = backend.to_numpy(matmul(da, db, dt)).astype(np.float64)   # 16-bit out: rounded once
    finite = np.isfinite(rounded)
    close(rounded[finite], want[finite], TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_embedding_backward_is_a_deterministic_scatter_add(dtype):
    from minillm.kernels.cuda import embedding_backward
    rng = np.random.default_rng(8)
    V, N, C = 50, 200, 24
    ids = rng.integers(0, V, N)
    ids[:40] = 7                                             # a frequent token: a long segment
    rows = rng.standard_normal((N, C)).astype(dtype)
    want = np.zeros((V, C))
    np.add.at(want, ids, rows.astype(np.float64))
    got = embedding_backward(backend.asarray(ids), backend.asarray(rows), V)
    again = embedding_backward(backend.asarray(ids), backend.asarray(rows), V)
    assert got.dtype == np.dtype(dtype) and np.array_equal(backend.to_numpy(got), backend.to_numpy(again))
    close(backend.to_numpy(got).astype(np.float64), want, TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adamw_in_one_launch_equals_the_reference(dtype):
    from minillm.nn import Parameter
    from minillm.optim import AdamW
    shapes = [(33, 17), (17,), (5, 4, 3), (1,)]
    runs = []
    for on in (True, False):
        kernels.set_enabled(on)
        params = [Parameter(backend.asarray(np.random.default_rng(i).standard_normal(s).astype(dtype)))
                  for i, s in enumerate(shapes)]
        opt = AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = backend.asarray(np.random.default_rng(100 * step + i).standard_normal(p.shape).astype(dtype))
            opt.step()
        runs.append([backend.to_numpy(p.data) for p in params] +
                    [backend.to_numpy(opt.state[n][k]) for n in opt.names for k in ("m", "v")])
    for got, want in zip(*runs):
        close(got.astype(np.float64), want.astype(np.float64), 1e-6 if dtype == "float32" else 1e-13)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpt_step_with_and_without_kernels(dtype):
    """A whole model: the loss and the gradients agree; with kernels, two runs are bit-identical."""
    import types

    from minillm.amp import make_precision
    from minillm.model import GPT, GPTConfig
    V, T, B = (67, 32, 4) if REAL_GPU else (31, 8, 2)  # the emulator runs a fiber per GPU thread
    cfg = GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=64 if REAL_GPU else 32)
    x = backend.asarray(np.random.default_rng(6).integers(0, V, (B, T)))
    y = backend.asarray(np.random.default_rng(7).integers(0, V, (B, T)))
    results = []
    for on in (True, True, False):
        kernels.set_enabled(on)
        model = GPT(cfg, seed=0)
        prec = make_precision(types.SimpleNamespace(dtype=dtype), list(model.named_parameters()))
        _, loss = model(x, y)
        loss.backward()
        prec.grads_to_master()
        results.append((float(loss.data), np.concatenate([backend.to_numpy(m.grad).ravel()
                                                          for _, m in prec.master_params])))
    (l1, g1), (l2, g2), (l_ref, g_ref) = results
    assert l1 == l2 and np.array_equal(g1, g2)                       # deterministic
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert abs(l1 - l_ref) <= tol * abs(l_ref)
    close(g1.astype(np.float64), g_ref.astype(np.float64), 20 * tol)
