"""The GPU code path, run on the CPU through the strict fake CuPy (``tests/fake_cupy``).

What is checked here, in the normal (CPU) test pass: the fake itself refuses what CuPy refuses;
the device precedence and its one-line errors (no CuPy, no GPU, a CuPy 13 asked for bfloat16);
a run on the fake GPU equals the CPU run bit for bit; a training step reads nothing on the host
(0 syncs in float32, 1 with a loss scaler or bfloat16: the overflow decision); caches keyed by
device; ids moved to the device; the counter-based dropout masks (same bits on both devices,
slices drawn directly, statistics); MPI with device arrays, staged through reused pinned buffers
and CUDA-aware, on real ``mpirun`` jobs whose ranks pick their GPU from their node rank.

This file is also the program the ranks of those jobs run (``python -m mpi4py THIS WORKER``).
The CI's second pass runs the whole suite with ``MINILLM_DEVICE=gpu`` on the fake as well.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
FAKE = HERE.parent / "fake_cupy"
REPO = HERE.parents[1]
TINY = REPO / "configs" / "tiny.toml"

from minillm import backend  # noqa: E402
from minillm.nn.dropout_rng import SampleDropoutRNG, element_bits, key, mix32, threshold  # noqa: E402


# ``fake_gpu`` (conftest.py): the fake CuPy as this process's device for one test


def fake_env(**extra):
    """Environment for a child process whose ``import cupy`` gets the fake."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1", MINILLM_KERNELS="0")
    env["PYTHONPATH"] = os.pathsep.join([str(FAKE), str(REPO)])
    env.update({k: str(v) for k, v in extra.items()})
    return env


def on_host(a):
    return backend.to_numpy(a)


# ---------------------------------------------------------------- the fake is strict
def test_fake_cupy_refuses_what_cupy_refuses(fake_gpu):
    cp = fake_gpu
    a = cp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert not isinstance(a, np.ndarray)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(a)
    with pytest.raises(TypeError, match="Unsupported type"):
        a + np.ones(3, np.float32)
    with pytest.raises(TypeError, match="Unsupported type"):
        cp.where(a > 1, np.ones(3), a)
    with pytest.raises(TypeError, match="Unsupported type"):
        a[0] = np.zeros(3, np.float32)
    with pytest.raises(AttributeError):
        cp.errstate  # noqa: B018  (NumPy has it, CuPy does not)
    s = a.sum()
    assert type(s) is cp.ndarray and s.shape == () and cp._fake.total_syncs == 0
    assert float(s) == 15.0 and cp._fake.syncs["float"] == 1
    import ml_dtypes
    bf = cp.zeros(4, dtype=ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match="add.at only supports"):
        cp.add.at(bf, cp.asarray([0, 0]), 1.0)
    h = cp.asarray(np.full((2, 2), 3.0, np.float16))
    assert (h @ h).dtype == np.float16  # 16-bit in, 16-bit out (cuBLAS rounds once)


# ---------------------------------------------------------------- device precedence and errors
def test_device_precedence(monkeypatch):
    monkeypatch.delenv("MINILLM_DEVICE", raising=False)
    assert backend.resolve_device() == ("cpu", "default")
    monkeypatch.setenv("MINILLM_DEVICE", "gpu")
    assert backend.resolve_device(None, "auto") == ("gpu", "MINILLM_DEVICE")
    assert backend.resolve_device(None, "cpu") == ("cpu", "config")
    assert backend.resolve_device("cpu", "gpu") == ("cpu", "command line")


def _train(tmp_path, *args, env=None):
    cmd = [sys.executable, "-m", "minillm", "train", str(TINY), "--train.max_steps=2",
           f"--train.out_dir={tmp_path / 'run'}", "--train.sample_tokens=0", "--train.log_interval=1",
           "--train.eval_iters=1", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_gpu_errors_are_one_line_and_the_header_names_the_device(tmp_path):
    """No GPU, a CuPy 13 asked for bfloat16, and the device the header reports (from where)."""
    no_gpu = _train(tmp_path, env=fake_env(MINILLM_DEVICE="gpu", MINILLM_FAKE_CUPY_GPUS=0))
    assert no_gpu.returncode == 2, no_gpu.stderr
    assert no_gpu.stderr.strip().count("\n") == 0 and "no CUDA GPU" in no_gpu.stderr
    old = _train(tmp_path, "--train.dtype=bfloat16",
                 env=fake_env(MINILLM_DEVICE="gpu", MINILLM_FAKE_CUPY_VERSION="13.6.0"))
    assert old.returncode == 2 and "CuPy >= 14" in old.stderr and "13.6.0" in old.stderr, old.stderr
    ok = _train(tmp_path, "--train.device=gpu", env=fake_env(MINILLM_DEVICE="cpu"))
    assert ok.returncode == 0, ok.stderr
    assert "device gpu (config)" in ok.stdout and "rank 0: GPU 0 of 1" in ok.stdout, ok.stdout


# ---------------------------------------------------------------- one step on the fake GPU
def _tiny_trainer(tmp_path, char_data, device, *overrides):
    from minillm.config import load_config
    from minillm.train.trainer import Trainer
    cfg = load_config(TINY, [f"--data.dir={char_data}", f"--train.out_dir={tmp_path}", f"--train.device={device}",
                             "--train.sample_tokens=0", "--train.eval_iters=1", *overrides])
    return Trainer(cfg, log=lambda msg: None)


@pytest.mark.parametrize("dtype, syncs", [("float32", 0), ("float16", 1), ("bfloat16", 1)])
def test_a_step_reads_the_device_once_at_most(fake_gpu, tmp_path, char_data, dtype, syncs):
    """fp32: nothing read; with a loss scaler or bfloat16 the overflow flag (the skip decision);
    the logged values then come in one read, with the deferred id check."""
    trainer = _tiny_trainer(tmp_path, char_data, "gpu", f"--train.dtype={dtype}", "--train.grad_accum=2",
                            "--model.dropout=0.1")
    trainer.step_on_device()                      # warm-up: caches, optimizer state
    fake_gpu._fake.reset()
    loss, lr, norm, found_inf = trainer.step_on_device()
    assert fake_gpu._fake.total_syncs == syncs, dict(fake_gpu._fake.syncs)
    values = backend.fetch(loss, norm)
    assert fake_gpu._fake.total_syncs == syncs + 1 and all(np.isfinite(values))


def test_fake_gpu_run_equals_the_cpu_run(fake_gpu, tmp_path, char_data):
    """The same steps on both devices (dropout and bfloat16 included): the same bits."""
    args = ("--train.dtype=bfloat16", "--model.dropout=0.1", "--train.grad_accum=2")
    gpu = _tiny_trainer(tmp_path / "gpu", char_data, "gpu", *args)
    on_gpu = [gpu.train_step()[::2] for _ in range(3)]
    try:
        cpu = _tiny_trainer(tmp_path / "cpu", char_data, "cpu", *args)
        on_cpu = [cpu.train_step()[::2] for _ in range(3)]
    finally:
        backend.set_device("gpu")
    assert on_gpu == on_cpu


def test_ids_move_to_the_device_and_caches_are_per_device(fake_gpu):
    import minillm.functional as F
    from minillm import Tensor
    from minillm.autograd import fused
    w = Tensor(backend.asarray(np.arange(12, dtype=np.float32).reshape(4, 3)), requires_grad=True)
    out = F.embedding(np.array([[1, 3]]), w)          # NumPy ids: copied to the device
    assert backend.is_array(out.data) and on_host(out.data)[0, 1, 0] == 9.0
    loss = F.cross_entropy(w, [0, 1, 2, 0])           # list targets too
    assert backend.fetch(loss.data)[0] > 0
    F.cross_entropy(w, [0, 1, 7, 0])                  # an id out of range: raised at the next read
    with pytest.raises(ValueError, match=r"target ids must be in \[0, 3\)"):
        backend.fetch(loss.data)
    q = Tensor(backend.asarray(np.ones((1, 1, 4, 2), np.float32)))
    F.scaled_dot_product_attention(q, q, q)
    backend.set_device("cpu")
    try:
        qc = Tensor(np.ones((1, 1, 4, 2), np.float32))
        F.scaled_dot_product_attention(qc, qc, qc)    # the cached GPU mask is not reused here
    finally:
        backend.set_device("gpu")
    assert {k[0][0] for k in fused._MASKS} >= {"cpu", "gpu"}


def test_half_matmul_keeps_a_float32_accumulator_on_the_gpu(fake_gpu):
    """Scores of 16-bit inputs asked for in float32 are not rounded to 16 bits (nor overflow)."""
    from minillm.autograd.ops import mm
    a = backend.asarray(np.full((2, 64), 40.0, np.float16))
    s = mm(a, a.T, dtype=np.float32)
    assert s.dtype == np.float32 and float(s[0, 0]) == 64 * 1600.0   # > 65504, float16's max
    with np.errstate(over="ignore"):
        assert mm(a, a.T).dtype == np.float16                          # (rounded: inf)


def test_kernels_are_selected_on_the_gpu_only(fake_gpu, monkeypatch):
    from minillm import kernels
    from minillm.autograd import fused
    from minillm.kernels import cuda
    assert kernels.fused() is fused                   # kernels off (the fake cannot compile)
    monkeypatch.setattr(kernels, "_ENABLED", True)
    assert kernels.fused() is cuda and kernels.enabled()
    backend.set_device("cpu")
    try:
        assert kernels.fused() is fused and not kernels.enabled()
    finally:
        backend.set_device("gpu")


def test_bench_gpu_dry_run_writes_its_table(tmp_path):
    """scripts/bench_gpu.py (the GPU check's benchmark) end to end on the fake, tiny and one step."""
    import json
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_gpu.py"), "--dry-run",
                          "--dtypes", "float32,bfloat16", "--out", str(out)], cwd=tmp_path,
                         env=fake_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    assert [r["dtype"] for r in result["rows"]] == ["float32", "bfloat16"]
    assert all(r["minillm"]["tokens_per_s"] > 0 and np.isfinite(r["minillm"]["loss"]) for r in result["rows"])
    assert "minillm tok/s" in res.stdout and "bfloat16" in res.stdout.splitlines()[-1]


# ---------------------------------------------------------------- counter-based dropout masks
def test_dropout_bits_are_a_function_of_coordinates(fake_gpu):
    k = key(1337, 7, 3)
    full = on_host(element_bits(k, (4, 16, 8), row0=2))
    assert full.dtype == np.uint32
    np.testing.assert_array_equal(on_host(element_bits(k, (2, 5, 8), row0=3, t0=9)), full[1:3, 9:14])
    backend.set_device("cpu")
    try:  # the same bits on the host
        np.testing.assert_array_equal(element_bits(k, (4, 16, 8), row0=2), full)
    finally:
        backend.set_device("gpu")
    assert full[0, 0, 0] == mix32(mix32(mix32(k ^ ((2 * 0x85EBCA77) & 0xFFFFFFFF))) ^ 0)  # pinned
    rng = SampleDropoutRNG(1337)
    layer = rng.for_layer(3)
    with rng.keyed(7, row0=2):
        keep = on_host(layer.mask((4, 16, 8), 0.25))
        chunk = on_host(layer.mask((4, 4, 8), 0.25, t0=12))   # a sequence-parallel chunk
    np.testing.assert_array_equal(keep, full >= threshold(0.25))
    np.testing.assert_array_equal(chunk, keep[:, 12:16])


def test_dropout_masks_have_the_right_statistics():
    rng = SampleDropoutRNG(0)
    with rng.keyed(5, row0=0):
        a = rng.for_layer(1).mask((8, 64, 256), 0.1).astype(np.float64)
        b = rng.for_layer(2).mask((8, 64, 256), 0.1).astype(np.float64)
    with rng.keyed(6, row0=0):
        c = rng.for_layer(1).mask((8, 64, 256), 0.1).astype(np.float64)
    n = a.size
    for m in (a, b, c):
        assert abs(m.mean() - 0.9) < 4 * np.sqrt(0.09 / n)       # keep probability 1 - p
    for x, y in ((a, b), (a, c), (a[:, :, 1:], a[:, :, :-1]), (a[:, 1:], a[:, :-1]), (a[1:], a[:-1])):
        corr = np.corrcoef(x.ravel(), y.ravel())[0, 1]            # layers, steps, neighbours
        assert abs(corr) < 5 / np.sqrt(x.size), corr


# ---------------------------------------------------------------- MPI with device arrays
def worker_staged_collectives():
    """Every collective on device arrays (fake GPU), staged or CUDA-aware as the env says."""
    from minillm.distributed.comm import get_world_comm
    from minillm.distributed.launch import install_abort_handler
    backend.set_device("gpu")
    import cupy
    comm = get_world_comm()
    install_abort_handler(comm)
    r, p = comm.rank, comm.size
    print(f"rank {r}: {backend.use_gpu_for_rank(*comm.node_rank_and_size())}", flush=True)
    x = backend.asarray(np.arange(6, dtype=np.float32) + r)
    comm.allreduce_(x)
    np.testing.assert_array_equal(on_host(x), p * np.arange(6) + sum(range(p)))
    for step in range(3):  # buffers are reused: one pinned buffer per shape, not one per call
        y = backend.asarray(np.full(1000, r + step, np.float32))
        req = comm.iallreduce_(y)
        req.wait()
        assert (on_host(y) == sum(range(p)) + p * step).all()
    z = backend.asarray(np.full(4, r, np.int64))
    comm.bcast_(z, root=p - 1)
    assert (on_host(z) == p - 1).all()
    flat = backend.asarray(np.arange(8, dtype=np.float32) * (r + 1))
    part = comm.reduce_scatter_(flat, [4, 4])
    np.testing.assert_array_equal(on_host(part), np.arange(8)[4 * r:4 * r + 4] * sum(range(1, p + 1)))
    comm.allgather_(flat, [4, 4])
    buf = backend.asarray(np.zeros(3, np.float32))
    comm.sendrecv(backend.asarray(np.full(3, r, np.float32)), (r + 1) % p, buf, (r - 1) % p)
    assert (on_host(buf) == (r - 1) % p).all()
    staged = comm._device
    print(f"rank {r}: cuda_aware={staged.cuda_aware} pinned={staged.allocated} "
          f"gpu={cupy.cuda.runtime.getDevice()}", flush=True)


def _mpi(nprocs, args, **env):
    from mpi_util import run_mpi
    return run_mpi(nprocs, args, env=fake_env(**env), timeout=120)


@pytest.mark.mpi
@pytest.mark.parametrize("cuda_aware, gpus", [("0", 1), ("1", 2)])
def test_collectives_on_device_arrays(cuda_aware, gpus):
    """Staged through pinned memory (the default), or handed to a CUDA-aware MPI as device
    pointers; each rank on the GPU its node rank picks."""
    res = _mpi(2, [HERE, "staged"], MINILLM_DEVICE="gpu", MINILLM_CUDA_AWARE_MPI=cuda_aware,
               MINILLM_FAKE_CUPY_GPUS=gpus)
    assert res.returncode == 0, res.stdout + res.stderr
    for r in (0, 1):
        gpu = r % gpus
        assert f"rank {r}: GPU {gpu} of {gpus} (local rank {r} of 2 on this node)" in res.stdout
        assert f"rank {r}: cuda_aware={cuda_aware == '1'}" in res.stdout and f"gpu={gpu}" in res.stdout
    assert ("2 processes share 1 GPU(s)" in res.stdout) == (gpus == 1)
    if cuda_aware == "0":  # staging: one pinned buffer per shape in use (the send and receive
        # sides of reduce-scatter and sendrecv are two each: 7), reused by the repeated calls
        assert all(f"rank {r}: cuda_aware=False pinned=7" in res.stdout for r in (0, 1)), res.stdout


@pytest.mark.mpi
def test_dp2_on_one_shared_fake_gpu_equals_the_serial_gpu_run(tmp_path, char_data):
    """Two ranks on a node with one GPU share it (with a warning), stage their buckets through
    pinned memory, and train as the serial run does."""
    from minillm.train.metrics import read_metrics
    common = [f"--data.dir={char_data}", "--train.max_steps=4", "--train.log_interval=1",
              "--train.sample_tokens=0", "--train.eval_iters=1", "--parallel.bucket_mb=0.01"]
    dp = _mpi(2, ["-m", "minillm", "train", TINY, f"--train.out_dir={tmp_path / 'dp'}",
                  "--parallel.dp=2", *common], MINILLM_DEVICE="gpu", MINILLM_FAKE_CUPY_GPUS=1)
    assert dp.returncode == 0, dp.stdout + dp.stderr
    assert dp.stdout.count("GPU 0 of 1") == 2 and "2 processes share 1 GPU(s)" in dp.stdout
    serial = subprocess.run([sys.executable, "-m", "minillm", "train", str(TINY),
                             f"--train.out_dir={tmp_path / 'serial'}", *common], cwd=tmp_path,
                            env=fake_env(MINILLM_DEVICE="gpu"), capture_output=True, text=True, timeout=120)
    assert serial.returncode == 0, serial.stderr
    got, want = read_metrics(tmp_path / "dp"), read_metrics(tmp_path / "serial")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    for g, w in zip(got, want):
        assert abs(g["loss"] - w["loss"]) <= 1e-6 * abs(w["loss"]), (g, w)
        assert abs(g["grad_norm"] - w["grad_norm"]) <= 1e-5 * w["grad_norm"], (g, w)


if __name__ == "__main__":  # a worker of one of the mpirun jobs above
    {"staged": worker_staged_collectives}[sys.argv[1]](*sys.argv[2:])
    sys.exit(0)
