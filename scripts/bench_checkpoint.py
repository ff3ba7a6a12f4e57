"""Benchmark: save/load of a ~10M-parameter GPT checkpoint (weights + Adam m, v) vs numpy.save.

    python scripts/bench_checkpoint.py [--n-layer 5] [--n-embd 384] [--vocab 2048] [--repeat 3]

Both sides write the same fp32 arrays into one file in a temp directory next to ``--dir`` and are
timed with and without fsync (a checkpoint is only safe once fsynced; numpy.save alone only
reaches the page cache). The best of ``--repeat`` runs is reported.
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from minillm.checkpoint import load_checkpoint, save_checkpoint


def gpt_arrays(n_layer: int, n_embd: int, vocab: int, block: int) -> dict:
    rng = np.random.default_rng(0)
    C = n_embd
    shapes = {"transformer.wte.weight": (vocab, C), "transformer.wpe.weight": (block, C)}
    for i in range(n_layer):
        h = f"transformer.h.{i}."
        shapes.update({h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
                       h + "attn.c_attn.weight": (3 * C, C), h + "attn.c_attn.bias": (3 * C,),
                       h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
                       h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
                       h + "mlp.c_fc.weight": (4 * C, C), h + "mlp.c_fc.bias": (4 * C,),
                       h + "mlp.c_proj.weight": (C, 4 * C), h + "mlp.c_proj.bias": (C,)})
    shapes.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,),
                   "lm_head.weight": (vocab, C)})
    return {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}


def best(fn, repeat: int, target: Path = None) -> tuple[float, float]:
    """Fastest (wall, CPU) seconds of ``repeat`` runs; CPU time shows the work done even when
    other processes compete for the cores."""
    walls, cpus = [], []
    for _ in range(repeat):
        if target is not None:  # freeing the old file's blocks is not part of writing a new one
            target.unlink(missing_ok=True)
            os.sync()
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-layer", type=int, default=5)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: system temp dir)")
    args = ap.parse_args()

    model = gpt_arrays(args.n_layer, args.n_embd, args.vocab, args.block)
    state = {"meta": {"step": 1000}, "model": model,
             "optimizer": {"step": 1000, "lr": 3e-4,
                           "state": {k: {"m": v * 0.1, "v": v * v} for k, v in model.items()}}}
    arrays = list(model.values()) + [x for s in state["optimizer"]["state"].values()
                                     for x in s.values()]
    n_params = sum(a.size for a in model.values())
    nbytes = sum(a.nbytes for a in arrays)
    print(f"{n_params / 1e6:.2f}M parameters, {len(arrays)} arrays, {nbytes / 2**20:.0f} MiB")

    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        npy, h5 = Path(d) / "state.npy", Path(d) / "ckpt_0001000.h5"

        def np_save(sync: bool):
            with open(npy, "wb") as f:
                for a in arrays:
                    np.save(f, a)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())

        def np_load():
            with open(npy, "rb") as f:
                for _ in arrays:
                    np.load(f)

        rows = [("numpy.save", best(lambda: np_save(False), args.repeat, npy)),
                ("numpy.save + fsync", best(lambda: np_save(True), args.repeat, npy)),
                ("save_checkpoint", best(lambda: save_checkpoint(h5, state), args.repeat, h5)),
                ("numpy.load", best(np_load, args.repeat)),
                ("load_checkpoint", best(lambda: load_checkpoint(h5), args.repeat))]
        mb = nbytes / 2**20
        print(f"{'':20}  {'wall s':>7}  {'MiB/s':>6}  {'CPU s':>6}")
        for name, (wall, cpu) in rows:
            print(f"{name:20}  {wall:7.3f}  {mb / wall:6.0f}  {cpu:6.3f}")
        t = dict(rows)
        print(f"save_checkpoint (fletcher32 checksums, fsync, atomic rename) = "
              f"{t['save_checkpoint'][0] / t['numpy.save'][0]:.2f}x numpy.save, "
              f"{t['save_checkpoint'][0] / t['numpy.save + fsync'][0]:.2f}x numpy.save + fsync; "
              f"load_checkpoint (checksums verified) = "
              f"{t['load_checkpoint'][0] / t['numpy.load'][0]:.2f}x numpy.load")
        print(f"file sizes: npy {npy.stat().st_size / 2**20:.1f} MiB, "
              f"h5 {h5.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
