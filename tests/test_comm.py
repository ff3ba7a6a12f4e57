"""Tests of distributed/comm.py and distributed/ring.py on real ``mpirun`` jobs.

This file is also the program the ranks run: ``python -m mpi4py tests/test_comm.py WORKER ...``
calls one of the worker functions below, which assert on every rank (a failed assert aborts the
job, and the test shows the output).
"""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mpi_util import output, run_mpi

from minillm.backend import asarray, to_numpy
from minillm.distributed import comm as comm_mod
from minillm.distributed.comm import SerialComm, get_world_comm, require_mpi
from minillm.distributed.launch import install_abort_handler
from minillm.distributed.ring import chunk_bounds, ring_allreduce_
from minillm.errors import UserError

HERE = Path(__file__).resolve()


# ---------------------------------------------------------------- workers (run on every rank) ---
def worker_collectives():
    comm = get_world_comm()
    install_abort_handler(comm)
    r, p = comm.rank, comm.size
    assert type(comm).__name__ == "Comm", comm

    a = np.full(5, r, dtype=np.float32)
    assert comm.bcast_(a, root=p - 1) is a and (a == p - 1).all(), a

    base = np.arange(6, dtype=np.float32).reshape(2, 3)
    a = base + r
    assert comm.allreduce_(a) is a
    np.testing.assert_array_equal(a, p * base + sum(range(p)))
    a = base + r
    np.testing.assert_array_equal(comm.allreduce_(a, op="max"), base + p - 1)
    a = base + r
    np.testing.assert_array_equal(comm.allreduce_(a, op="min"), base)
    with_gap = np.zeros((4, 4), dtype=np.float32)[:, ::2]
    try:
        comm.allreduce_(with_gap)
        raise AssertionError("a non-contiguous buffer was accepted")
    except ValueError:
        pass

    b = np.full(1000, r + 1, dtype=np.float64)
    req = comm.iallreduce_(b)
    req.wait()
    req.wait()  # a second wait does nothing
    assert req.done and (b == p * (p + 1) / 2).all()

    recv = np.empty(3, dtype=np.int64)
    comm.sendrecv(np.full(3, r, dtype=np.int64), (r + 1) % p, recv, (r - 1) % p, sendtag=5)
    assert (recv == (r - 1) % p).all(), recv

    # tags select messages: the receiver asks for tag 2 before tag 1
    if p > 1 and r == 0:
        reqs = [comm.isend(np.full(2, 10.0), 1, tag=1), comm.isend(np.full(2, 20.0), 1, tag=2)]
        for q in reqs:
            q.wait()
        comm.send(np.arange(4.0), 1, tag=3)
    elif p > 1 and r == 1:
        second, first = np.empty(2), np.empty(2)
        rq = comm.irecv(first, 0, tag=1)
        comm.recv(second, 0, tag=2)
        rq.wait()
        assert (first == 10.0).all() and (second == 20.0).all(), (first, second)
        got = comm.recv(np.empty(4), 0, tag=3)
        assert (got == np.arange(4.0)).all(), got

    assert comm.allreduce_scalar(r + 1) == p * (p + 1) / 2
    assert comm.allreduce_scalar(r + 1, op="max") == p
    assert comm.allreduce_scalar(r + 1, op="min") == 1
    assert comm.bcast_obj({"rank": r, "cfg": [1, 2]} if r == 0 else None) == {"rank": 0, "cfg": [1, 2]}
    assert comm.allgather_obj(r * r) == [k * k for k in range(p)]

    # split by parity, ordered by descending rank
    sub = comm.split(color=r % 2, key=-r)
    group = [k for k in range(p) if k % 2 == r % 2]
    assert sub.size == len(group) and sub.rank == sorted(group, reverse=True).index(r), (sub, group)
    assert sub.allreduce_scalar(r) == sum(group)
    comm.barrier()
    print(f"rank {r}/{p} collectives ok", flush=True)


def worker_ring():
    comm = get_world_comm()
    install_abort_handler(comm)
    r, p = comm.rank, comm.size
    sizes = [1, 2, 3, p - 1, p, p + 1, 7, 1000, 1001, 4099]
    for dtype, rtol in ((np.float32, 1e-6), (np.float64, 1e-13)):
        for n in sorted(set(s for s in sizes if s > 0)):
            # every rank can rebuild every rank's data, so the exact answer is known locally
            data = [np.random.default_rng(1000 * n + k).standard_normal(n).astype(dtype)
                    for k in range(p)]
            exact = np.sum(np.stack(data).astype(np.float64), axis=0)
            scale = np.sum(np.abs(np.stack(data).astype(np.float64)), axis=0)
            via_mpi = comm.allreduce_(data[r].copy())
            via_ring = ring_allreduce_(comm, asarray(data[r]))   # on the device, as a DP bucket is
            assert via_ring.dtype == dtype
            via_ring = to_numpy(via_ring)
            for got in (via_mpi, via_ring):
                assert np.all(np.abs(got - exact) <= rtol * scale + 1e-30), (n, dtype, got, exact)
            np.testing.assert_allclose(via_ring, via_mpi, rtol=0, atol=float(2 * rtol * scale.max()))
    # in place on a 2-D array, and max
    m = np.random.default_rng(r).standard_normal((3, 5)).astype(np.float32)
    want = comm.allreduce_(m.copy(), op="max")
    m = asarray(m)
    assert ring_allreduce_(comm, m, op="max") is m
    np.testing.assert_array_equal(to_numpy(m), want)
    print(f"rank {r}/{p} ring ok", flush=True)


def worker_fail(kind, bad_rank):
    comm = get_world_comm()
    install_abort_handler(comm)
    if comm.rank == int(bad_rank):
        if kind == "user":
            raise UserError("train.lr=-1 must be positive; set --train.lr to a value > 0")
        raise ValueError(f"deliberate failure on rank {comm.rank}")
    comm.barrier()  # the healthy ranks wait here forever unless the job is aborted
    raise AssertionError("barrier returned although a rank failed")


def worker_hang(pid_dir):
    comm = get_world_comm()
    Path(pid_dir, f"{comm.rank}.pid").write_text(str(os.getpid()))
    comm.recv(np.empty(1), (comm.rank + 1) % comm.size, tag=99)  # nobody sends: hangs


# ---------------------------------------------------------------- tests ------------------------
@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [1, 2])
def test_collectives(nprocs):
    res = run_mpi(nprocs, [HERE, "collectives"], timeout=120)
    assert res.returncode == 0, output(res)
    assert res.stdout.count("collectives ok") == nprocs, output(res)


@pytest.mark.mpi
def test_collectives_and_ring_four_ranks():
    res = run_mpi(4, [HERE, "collectives"], timeout=180)
    assert res.returncode == 0, output(res)
    res = run_mpi(4, [HERE, "ring"], timeout=180)
    assert res.returncode == 0, output(res)
    assert res.stdout.count("ring ok") == 4, output(res)


@pytest.mark.mpi
def test_ring_equals_mpi_two_ranks():
    res = run_mpi(2, [HERE, "ring"], timeout=120)
    assert res.returncode == 0, output(res)
    assert res.stdout.count("ring ok") == 2, output(res)


@pytest.mark.mpi
@pytest.mark.parametrize("mpi4py_runner", [False, True])
def test_exception_on_one_rank_aborts_job(mpi4py_runner):
    res = run_mpi(2, [HERE, "fail", "bug", "1"], timeout=60, mpi4py_runner=mpi4py_runner)
    assert res.returncode != 0, output(res)
    assert "ValueError: deliberate failure on rank 1" in res.stderr, output(res)
    assert "barrier returned" not in res.stderr, output(res)
    if not mpi4py_runner:  # our hook printed it: every traceback line names the rank
        assert "[rank 1] Traceback (most recent call last):" in res.stderr, output(res)
        assert "[rank 1] ValueError: deliberate failure on rank 1" in res.stderr, output(res)


@pytest.mark.mpi
@pytest.mark.parametrize("bad_rank", [0, 1])
def test_user_error_on_one_rank_exits_2(bad_rank):
    res = run_mpi(2, [HERE, "fail", "user", str(bad_rank)], timeout=60)
    assert res.returncode == 2, output(res)
    prefix = "" if bad_rank == 0 else "[rank 1] "
    line = f"{prefix}error: train.lr=-1 must be positive; set --train.lr to a value > 0"
    assert line in res.stderr.splitlines(), output(res)
    assert "Traceback" not in res.stderr, output(res)


@pytest.mark.mpi
def test_run_mpi_kills_hung_job(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="timed out"):
        run_mpi(2, [HERE, "hang", tmp_path], timeout=8)
    pids = [int(f.read_text()) for f in tmp_path.glob("*.pid")]
    assert len(pids) == 2, "the ranks did not start within the timeout"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids), pids


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent has not reaped it


@pytest.mark.mpi
def test_bench_allreduce_script(tmp_path):
    script = HERE.parents[1] / "scripts" / "bench_allreduce.py"
    res = run_mpi(2, [script, "--max-mb", "0.02", "--repeats", "2", "--out", tmp_path], timeout=120)
    assert res.returncode == 0, output(res)
    results = json.loads((tmp_path / "allreduce.json").read_text())
    assert results["nprocs"] == 2 and results["bytes"] == [1024, 4096, 16384]
    for key in ("mpi", "ring"):
        assert len(results["seconds"][key]) == 3 and all(t > 0 for t in results["seconds"][key])
        assert results["fit"][key]["alpha_s"] >= 0 and results["fit"][key]["beta_s_per_byte"] >= 0
    assert (tmp_path / "allreduce.png").stat().st_size > 1000


# ---------------------------------------------------------------- in-process -------------------
def test_serial_comm_is_a_world_of_one():
    c = SerialComm()
    assert (c.rank, c.size) == (0, 1)
    a = np.arange(5.0)
    assert c.allreduce_(a) is a and (a == np.arange(5.0)).all()
    assert c.bcast_(a) is a
    req = c.iallreduce_(a)
    req.wait()
    assert req.done
    assert c.allreduce_scalar(3, op="max") == 3.0 and c.bcast_obj({"x": 1}) == {"x": 1}
    assert c.allgather_obj(7) == [7]
    recv = np.empty(5)
    assert c.sendrecv(a, 0, recv, 0) is recv and (recv == a).all()
    c.send(np.ones(2), 0, tag=4)
    c.isend(np.full(2, 2.0), 0, tag=5).wait()
    r5 = np.empty(2)
    rq = c.irecv(r5, 0, tag=5)
    assert (c.recv(np.empty(2), 0, tag=4) == 1.0).all()
    rq.wait()
    assert (r5 == 2.0).all()
    with pytest.raises(RuntimeError):
        c.recv(np.empty(2), 0, tag=4)
    with pytest.raises(ValueError):
        c.send(a, 1)
    with pytest.raises(ValueError):
        c.allreduce_(a, op="mean")
    assert isinstance(c.split(0, 0), SerialComm)
    assert ring_allreduce_(c, a) is a and (a == np.arange(5.0)).all()


def test_alpha_beta_fit_recovers_the_model():
    path = HERE.parents[1] / "scripts" / "bench_allreduce.py"
    spec = importlib.util.spec_from_file_location("bench_allreduce", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    n = bench.sizes_bytes(1, 64)
    assert n[0] == 1024 and n[-1] == 64 * 2**20 and len(n) == 9
    true = {"alpha_s": 5e-6, "beta_s_per_byte": 1e-10}
    t = bench.model_time(true, n, 4) * (1 + 0.01 * np.cos(np.arange(len(n))))  # 1% noise
    fit = bench.fit_alpha_beta(n, t, 4)
    assert abs(fit["alpha_s"] / 5e-6 - 1) < 0.05 and abs(fit["beta_s_per_byte"] / 1e-10 - 1) < 0.05
    assert abs(fit["bandwidth_GB_per_s"] - 10.0) < 0.5


def test_chunk_bounds_cover_everything():
    for n in range(0, 12):
        for p in range(1, 6):
            b = chunk_bounds(n, p)
            sizes = np.diff(b)
            assert b[0] == 0 and b[-1] == n and sizes.min() >= 0 and sizes.max() - sizes.min() <= 1


def test_without_mpi4py(monkeypatch):
    monkeypatch.setattr(comm_mod, "_import_mpi", lambda: None)
    assert isinstance(get_world_comm(), SerialComm)
    with pytest.raises(UserError, match=r"dp=2 needs MPI: pip install 'minillm\[mpi\]'.*mpirun -np 2"):
        require_mpi("dp=2", nprocs=2)


def test_importing_minillm_does_not_import_mpi4py():
    code = ("import sys, minillm, minillm.distributed, minillm.distributed.comm, "
            "minillm.distributed.ring; assert 'mpi4py' not in sys.modules, 'mpi4py imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


if __name__ == "__main__":
    WORKERS = {"collectives": worker_collectives, "ring": worker_ring, "fail": worker_fail,
               "hang": worker_hang}
    WORKERS[sys.argv[1]](*sys.argv[2:])
