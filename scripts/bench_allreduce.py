"""Time MPI's all-reduce and the hand-written ring, and fit the alpha-beta cost model.

    mpirun -np 4 python -m mpi4py scripts/bench_allreduce.py --max-mb 64 --out runs/bench_allreduce

For message sizes 1 KB, 4 KB, 16 KB, ... up to ``--max-mb`` every rank times ``--repeats`` calls
of each algorithm (after one warm-up call; a barrier before each call so all ranks start
together). A call's time is the slowest rank's; the median over repeats is reported.

The ring sends 2(p-1) messages of n/p bytes from every rank, so its time for n bytes is

    T(n) = 2(p-1) alpha + 2(p-1)/p n beta

with alpha the latency of one message and beta the seconds per byte (1/bandwidth). Both are
fitted by least squares on relative error, for the ring and (as an effective model) for MPI.
Writes ``OUT/allreduce.json`` and ``OUT/allreduce.png`` and prints a table.
"""
import argparse
import json
import time
from pathlib import Path

import numpy

from minillm import backend
from minillm.backend import xp
from minillm.distributed.comm import get_world_comm
from minillm.distributed.launch import install_abort_handler
from minillm.distributed.ring import ring_allreduce_
from minillm.errors import UserError


def sizes_bytes(min_kb: float, max_mb: float) -> list[int]:
    sizes, n = [], int(min_kb * 1024)
    while n <= max_mb * 1024 * 1024:
        sizes.append(n)
        n *= 4
    return sizes


def time_calls(comm, fn, buf, repeats: int) -> float:
    """Median over repeats of the slowest rank's time for fn(buf)."""
    fn(buf)  # warm-up: first-touch of memory, MPI connection setup
    times = []
    for _ in range(repeats):
        comm.barrier()
        t0 = time.perf_counter()
        fn(buf)
        backend.synchronize()
        times.append(comm.allreduce_scalar(time.perf_counter() - t0, op="max"))
    return float(numpy.median(times))


def fit_alpha_beta(n_bytes, seconds, p: int) -> dict:
    """alpha, beta >= 0 minimising the relative error of 2(p-1)a + 2(p-1)/p n b."""
    n, t = numpy.asarray(n_bytes, float), numpy.asarray(seconds, float)
    cols = numpy.stack([numpy.full_like(n, 2.0 * (p - 1)), 2.0 * (p - 1) / p * n], axis=1)
    w = cols / t[:, None]  # dividing each row by t: least squares on relative error
    coef = numpy.linalg.lstsq(w, numpy.ones_like(t), rcond=None)[0]
    if coef.min() < 0:  # a negative latency or bandwidth means that term is lost in the noise
        keep = int(numpy.argmax(coef))
        coef = numpy.zeros(2)
        coef[keep] = numpy.linalg.lstsq(w[:, keep:keep + 1], numpy.ones_like(t), rcond=None)[0][0]
    alpha, beta = float(coef[0]), float(coef[1])
    return {"alpha_s": alpha, "beta_s_per_byte": beta,
            "bandwidth_GB_per_s": (1e-9 / beta) if beta > 0 else None}


def model_time(fit: dict, n_bytes, p: int):
    n = numpy.asarray(n_bytes, float)
    return 2 * (p - 1) * fit["alpha_s"] + 2 * (p - 1) / p * n * fit["beta_s_per_byte"]


def plot(results: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, n = results["nprocs"], numpy.asarray(results["bytes"], float)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key, color in (("mpi", "tab:blue"), ("ring", "tab:orange")):
        fit = results["fit"][key]
        ax.loglog(n, results["seconds"][key], "o", color=color, label=f"{key} measured")
        dense = numpy.geomspace(n.min(), n.max(), 100)
        ax.loglog(dense, model_time(fit, dense, p), "-", color=color, alpha=0.7,
                  label=f"{key} model: α={fit['alpha_s'] * 1e6:.1f} µs, "
                        f"1/β={(fit['bandwidth_GB_per_s'] or 0):.2f} GB/s")
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("time per all-reduce (s)")
    ax.set_title(f"all-reduce on {p} ranks ({results['device']}, {results['dtype']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-mb", type=float, default=64.0, help="largest message in MB (default 64)")
    ap.add_argument("--min-kb", type=float, default=1.0, help="smallest message in KB (default 1)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per size (default 5)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--out", default="runs/bench_allreduce", help="directory for the JSON and PNG")
    args = ap.parse_args(argv)

    comm = get_world_comm()
    install_abort_handler(comm)
    p = comm.size
    if p < 2:
        raise UserError("an all-reduce needs 2 or more ranks: mpirun -np 4 python -m mpi4py "
                        "scripts/bench_allreduce.py")
    if args.repeats < 1 or args.max_mb * 1024 < args.min_kb:
        raise UserError("--repeats must be >= 1 and --max-mb must be at least --min-kb")

    dtype = xp.dtype(args.dtype)
    sizes = sizes_bytes(args.min_kb, args.max_mb)
    seconds = {"mpi": [], "ring": []}
    if comm.rank == 0:
        print(f"{p} ranks, {backend.device()}, {args.dtype}")
        print(f"{'bytes':>12} {'mpi (s)':>11} {'ring (s)':>11} {'mpi GB/s':>9} {'ring GB/s':>9}")
    for nbytes in sizes:
        count = max(1, nbytes // dtype.itemsize)
        data = numpy.random.default_rng(comm.rank).standard_normal(count).astype(args.dtype)
        check_mpi = comm.allreduce_(backend.asarray(data))
        check_ring = ring_allreduce_(comm, backend.asarray(data))
        tol = 1e-4 if args.dtype == "float32" else 1e-10
        if not bool(xp.allclose(check_ring, check_mpi, rtol=tol, atol=tol * p)):
            raise RuntimeError(f"ring and MPI all-reduce disagree at {nbytes} bytes")
        buf = xp.zeros(count, dtype=dtype)  # zeros: repeated sums can never overflow
        t_mpi = time_calls(comm, comm.allreduce_, buf, args.repeats)
        t_ring = time_calls(comm, lambda b: ring_allreduce_(comm, b), buf, args.repeats)
        seconds["mpi"].append(t_mpi)
        seconds["ring"].append(t_ring)
        if comm.rank == 0:
            # "bus bandwidth": the bytes each rank must move, 2(p-1)/p n, per second
            moved = 2 * (p - 1) / p * nbytes / 1e9
            print(f"{nbytes:>12} {t_mpi:>11.3e} {t_ring:>11.3e} "
                  f"{moved / t_mpi:>9.2f} {moved / t_ring:>9.2f}", flush=True)

    if comm.rank == 0:
        results = {"nprocs": p, "device": backend.device(), "dtype": args.dtype,
                   "repeats": args.repeats, "bytes": sizes, "seconds": seconds,
                   "fit": {k: fit_alpha_beta(sizes, v, p) for k, v in seconds.items()}}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "allreduce.json").write_text(json.dumps(results, indent=2))
        plot(results, out / "allreduce.png")
        for key, fit in results["fit"].items():
            bw = fit["bandwidth_GB_per_s"]
            bw_text = f"{bw:.2f} GB/s" if bw else "not resolved (increase --max-mb)"
            print(f"{key:>5}: alpha = {fit['alpha_s'] * 1e6:8.2f} µs   bandwidth 1/beta = {bw_text}")
        print(f"wrote {out / 'allreduce.json'} and {out / 'allreduce.png'}")
    comm.barrier()


if __name__ == "__main__":
    main()
