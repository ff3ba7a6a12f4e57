"""Tensor and sequence parallelism: bytes per step, activation memory and step time, vs the formulas.

    python scripts/bench_tp.py [--tp 1 2 4] [--steps 5] [--out runs/bench_tp] [--section.key=value ...]

For every tp (and, for tp > 1, with and without ``parallel.sp``) this launches
``mpirun -np tp python -m mpi4py scripts/bench_tp.py --worker ...``: the real trainer on a GPT of
6 blocks, 384 wide, 8 heads, T = 256 (pydocs characters), float32, dropout 0.1, one BLAS thread
per rank, a global batch of 4 sequences. Each rank's world communicator is a ``CountingComm``, so

    bytes      what the tp group's collectives moved during one optimizer step, per operation
               (payload), against ``perf/tp_cost.comm_bytes`` (this implementation, exact) and
               ``megatron_comm_bytes`` (the papers' 4 all-reduces per layer), and the bytes one
               rank sends on a ring;
    memory     the bytes one micro-batch's graph saves for backward (``saved_bytes``) against
               ``activation_bytes`` and the paper's 16-bit ``megatron_activation_bytes``;
    time       the median step time after the first (warm-up) step, and the part of it spent
               inside tp collectives (which includes waiting for the slower rank), with the
               machine's 1-minute load average before and after each run.

With more ranks than cores (tp = 4 on a 2-core machine) the ranks share cores: the times say more
about the machine than about tensor parallelism; bytes and memory are exact anywhere.
Prints Markdown tables and writes ``OUT/bench_tp.json``.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a checkout without pip install

MODEL = ["--model.n_layer=6", "--model.n_head=8", "--model.n_embd=384", "--model.block_size=256",
         "--model.dropout=0.1"]
BATCH = 4


def overrides(tp, sp, data_dir, out_dir, steps, extra):
    return MODEL + [f"--train.batch_size={BATCH}", f"--train.max_steps={steps}", "--train.warmup_steps=0",
                    f"--parallel.tp={tp}", f"--parallel.sp={'true' if sp else 'false'}",
                    f"--data.dir={data_dir}", f"--train.out_dir={out_dir}", "--train.progress=false",
                    *extra]


# ---------------------------------------------------------------- one layout, on every rank
def worker(args):
    import time

    from minillm.autograd.tensor import saved_bytes
    from minillm.config import load_config
    from minillm.distributed.comm import get_world_comm
    from minillm.distributed.counting import CountingComm
    from minillm.distributed.launch import install_abort_handler
    from minillm.train.trainer import Trainer
    world = get_world_comm()
    install_abort_handler(world)
    cfg = load_config(None, args.overrides)
    tr = Trainer(cfg, comm=CountingComm(world), log=lambda msg: None)
    group = tr.engine.tensor_parallel.comm if cfg.parallel.tp > 1 else None
    times, comm_s, payload = [], [], {}
    for step in range(args.steps):
        if group is not None:
            group.reset()
        world.barrier()
        t0 = time.perf_counter()
        tr.train_step()
        tr.step += 1
        times.append(time.perf_counter() - t0)
        if group is not None:
            payload = {k: v for k, v in group.payload.items() if k != "allreduce_scalar"}
            comm_s.append(sum(group.seconds.values()))
    mb = tr.local_microbatches(tr.step)[0]
    with tr.model.dropout_rng.keyed(mb.step, mb.row0):
        _, loss = tr.model(mb.x, mb.y)
    act = saved_bytes(loss, {id(p.data) for _, p in tr.engine.named_parameters()})
    if world.rank == 0:
        print("RESULT " + json.dumps({
            "payload": payload, "activation_bytes": act, "rows": int(mb.x.shape[0]),
            "ms": 1000 * statistics.median(times[1:]),
            "comm_ms": 1000 * statistics.median(comm_s[1:]) if comm_s else 0.0}), flush=True)


# ---------------------------------------------------------------- the sweep
def run_one(tp, sp, data_dir, out_dir, steps, extra):
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    cmd = [mpirun, "-np", str(tp), sys.executable, "-m", "mpi4py", __file__, "--worker",
           "--steps", str(steps), "--", *overrides(tp, sp, data_dir, out_dir, steps, extra)]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if res.returncode != 0 or line is None:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stdout}\n{res.stderr}")
    return json.loads(line[len("RESULT "):])


def _mb(n):
    return f"{n / 1e6:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="runs/bench_tp")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, extra = ap.parse_known_args()
    if args.worker:
        args.overrides = [a for a in extra if a != "--"]
        return worker(args)

    from minillm.config import load_config
    from minillm.data import ensure_dataset, read_meta
    from minillm.perf.tp_cost import (activation_bytes, comm_bytes, megatron_activation_bytes,
                                      megatron_comm_bytes, wire_bytes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, comm_rows, mem_rows = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_tp_") as tmpdir:
        tmp = Path(tmpdir)
        ensure_dataset("pydocs", tmp / "data", "char")
        vocab = int(read_meta(tmp / "data")["vocab_size"])
        for tp in args.tp:
            for sp in ([False, True] if tp > 1 else [False]):
                load = os.getloadavg()[0]
                r = run_one(tp, sp, tmp / "data", tmp / f"run_{tp}_{sp}", args.steps, extra)
                r["load"] = [load, os.getloadavg()[0]]   # 1-minute load average before and after
                cfg = load_config(None, overrides(tp, sp, "", "x", args.steps, extra) + [f"--model.vocab_size={vocab}"])
                m = cfg.model
                ours = comm_bytes(m, r["rows"], tp, sp)
                paper = megatron_comm_bytes(m, r["rows"], tp, sp)
                act_formula = activation_bytes(m, r["rows"], tp, sp)
                act_paper = megatron_activation_bytes(m, r["rows"], tp, sp)
                results.append({"tp": tp, "sp": sp, **r, "formula": ours, "megatron": paper,
                                "activation_formula": act_formula, "activation_megatron_16bit": act_paper})
                name = f"{tp}{' + sp' if sp else ''}"
                if tp > 1:
                    ops = sorted(r["payload"])
                    comm_rows.append(
                        f"| {name} | " + ", ".join(f"{op} {_mb(r['payload'][op])}" for op in ops)
                        + f" | {_mb(sum(ours.values()))} {'(exact)' if r['payload'] == ours else '(DIFFERS)'} | "
                        f"{_mb(sum(paper.values()))} | "
                        f"{_mb(wire_bytes(r['payload'], tp))} | {_mb(wire_bytes(paper, tp))} | "
                        f"{r['ms']:.0f} | {r['comm_ms']:.0f} | {r['load'][0]:.1f}-{r['load'][1]:.1f} |")
                else:
                    comm_rows.append(f"| 1 | - | - | - | - | - | {r['ms']:.0f} | - | "
                                     f"{r['load'][0]:.1f}-{r['load'][1]:.1f} |")
                mem_rows.append(f"| {name} | {_mb(r['activation_bytes'])} | {_mb(act_formula)} | "
                                f"{_mb(act_paper)} |")
                print(comm_rows[-1], "\n", mem_rows[-1], flush=True)
    (out / "bench_tp.json").write_text(json.dumps(results, indent=1))
    print("\n| tp | measured payload per step (MB) | formula (MB) | Megatron layers (MB) | wire per rank (MB) "
          "| Megatron wire (MB) | step ms | in tp collectives ms | load |\n|---|---|---|---|---|---|---|---|---|\n"
          + "\n".join(comm_rows))
    print("\n| tp | activations measured (MB) | formula (MB) | Megatron 16-bit (MB) |\n|---|---|---|---|\n"
          + "\n".join(mem_rows))
    print(f"\nwrote {out / 'bench_tp.json'}")


if __name__ == "__main__":
    main()
