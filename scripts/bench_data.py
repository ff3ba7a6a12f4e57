"""Benchmark the data pipeline and the BPE trainer on a generated multi-GB corpus.

    flock /tmp/minillm-bench.lock .venv/bin/python scripts/bench_data.py --gb 2 --workers 1 2

1. Generates ``--gb`` GB of synthetic English-like documents (``minillm.data.synth``: 5% exact
   copies, 5% near copies, 5% junk) as ``<|endoftext|>``-separated .txt files in a temporary
   folder under /tmp (deleted at the end), two processes at a time.
2. For each worker count runs the real CLI, ``python -m minillm prepare DIR --clean --filter
   --dedup --tokenizer gpt2 --workers W``, in a subprocess, and records wall time, end-to-end
   MB/s, the CPU-seconds and MB/s per process of every stage (from its report.json), the wall
   time of every phase, and peak memory: the largest resident set of any one process, and the
   peak of the resident sets summed over the process tree (sampled from /proc every 0.2 s).
3. Trains BPE: 10,000 merges on the first 100 MB of the corpus with 2 workers, and the lesson's
   2,000 merges on the embedded pydocs text, each in a subprocess (time, peak memory); and times
   the one-time setup (compiling the pre-tokenisation regex).

Prints a Markdown table (for BENCHMARKS.md) and writes every figure to ``--json``. The GPT-2
tokenizer needs tiktoken's files: TIKTOKEN_CACHE_DIR, or ../shared/data/tiktoken_cache next to
the repository, else ``--tokenizer char`` is used.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO.parent / "shared" / "data" / "tiktoken_cache"
EOT = "<|endoftext|>"


def _write_file(job):
    """One corpus file of about ``size`` bytes from its own seed."""
    from minillm.data.synth import CorpusSpec, generate
    path, size, seed = job
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc, _ in generate(CorpusSpec(n_docs=10 ** 9, seed=seed, vocab_size=200_000)):
            f.write(doc + EOT)
            written += len(doc) + len(EOT)
            if written >= size:
                break
    return written


def generate_corpus(folder: Path, gb: float, file_mb: int = 100) -> int:
    file_mb = min(file_mb, gb * 1000)
    n = max(1, round(gb * 1000 / file_mb))
    jobs = [(folder / f"part_{i:04d}.txt", int(file_mb * 10 ** 6), 1000 + i) for i in range(n)]
    with Pool(2) as pool:
        return sum(pool.map(_write_file, jobs))


def _tree(root: int) -> dict:
    """{pid: (resident bytes, CPU seconds so far)} of ``root`` and its descendants (Linux /proc;
    pool workers are grandchildren, never reaped by us, so their CPU must be read here)."""
    parent, stat = {}, {}
    page, tick = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                f = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
                parent[int(d)] = int(f[1])
                stat[int(d)] = (int(f[21]) * page, (int(f[11]) + int(f[12])) / tick)
            except (OSError, IndexError, ValueError):
                continue
    out, stack = {}, [root]
    while stack:
        p = stack.pop()
        if p in stat:
            out[p] = stat[p]
        stack.extend(c for c, pp in parent.items() if pp == p)
    return out


def run_measured(cmd, env) -> dict:
    """Run ``cmd``: wall seconds, CPU seconds of its whole process tree, the peak of the tree's
    summed resident memory and the largest resident set of one process (sampled every 0.2 s)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    peak, one, cpu = [0], [0], {}
    done = threading.Event()

    def sample():
        while not done.is_set():
            tree = _tree(proc.pid)
            peak[0] = max(peak[0], sum(r for r, _ in tree.values()))
            one[0] = max([one[0]] + [r for r, _ in tree.values()])
            cpu.update({p: c for p, (_, c) in tree.items() if p != proc.pid})
            done.wait(0.2)
    threading.Thread(target=sample, daemon=True).start()
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{output}")
    # its own CPU and its reaped children's (wait4), plus what the samples saw of the others
    total = usage.ru_utime + usage.ru_stime + sum(cpu.values())
    return {"wall_s": round(wall, 2), "cpu_s": round(total, 1), "cores_used": round(total / wall, 2),
            "peak_rss_tree_mb": round(peak[0] / 2 ** 20, 1),
            "max_rss_one_process_mb": round(max(one[0], usage.ru_maxrss * 1024) / 2 ** 20, 1),
            "output": output}


def bench_prepare(corpus: Path, out: Path, workers: int, tokenizer: str, env, nbytes) -> dict:
    cmd = [sys.executable, "-m", "minillm", "prepare", str(corpus), "--clean", "--filter",
           "--dedup", "--tokenizer", tokenizer, "--workers", str(workers), "--out", str(out)]
    r = run_measured(cmd, env)
    report = json.loads((out / "report.json").read_text())
    stages = {s["stage"]: {k: s.get(k) for k in ("docs_in", "docs_out", "bytes_in", "bytes_out",
                                                   "cpu_s", "mb_per_s")} for s in report["stages"]}
    shutil.rmtree(out)
    r.pop("output")
    return dict(r, workers=workers, mb_per_s=round(nbytes / 1e6 / r["wall_s"], 2),
                stages=stages, phases_s=report["seconds"], tokens=report["tokens"])


def _bpe_child(path: str, mb: float, merges: int, workers: int):
    """(in a subprocess) train BPE on the first ``mb`` MB of ``path`` (or pydocs); print JSON."""
    from minillm.data.bpe_train import train_bpe
    from minillm.data.sources import pydocs_text
    if path == "pydocs":
        text = pydocs_text()
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read(int(mb * 1e6))
    t0 = time.perf_counter()
    result = train_bpe(text, merges, specials=(EOT,), workers=workers)
    print(json.dumps({"train_s": round(time.perf_counter() - t0, 2), "merges": len(result.merges),
                      "text_mb": round(len(text.encode()) / 1e6, 1)}))


def bench_bpe(path, mb, merges, workers, env) -> dict:
    cmd = [sys.executable, __file__, "--bpe-child", str(path), str(mb), str(merges), str(workers)]
    r = run_measured(cmd, env)
    return dict(json.loads(r.pop("output").strip().splitlines()[-1]), workers=workers, **r)


def setup_costs() -> dict:
    """Seconds of the first split (compiling the pre-tokenisation regex), imports excluded."""
    code = ("import time; from minillm.data.pretokenize import {f}; t = time.perf_counter(); "
            "{f}('warm up'); print(time.perf_counter() - t)")
    return {name: round(float(subprocess.run([sys.executable, "-c", code.format(f=f)],
                                             capture_output=True, text=True, check=True).stdout), 3)
            for name, f in (("trainer_regex_s", "fast_split_words"),
                            ("stdlib_regex_s", "split_words"))}


def table(res) -> str:
    lines = [f"corpus: {res['corpus_mb']:,.0f} MB generated in {res['generate_s']:.0f} s; "
             f"tokenizer {res['tokenizer']}; load average before: {res['load_before']}",
             "", "| workers | wall s | end-to-end MB/s | CPU s (cores used) | peak RSS, tree (MB) | "
             "max RSS, one process (MB) | scan s | dedup s | tokenize s | shards s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["prepare"]:
        p = r["phases_s"]
        lines.append(f"| {r['workers']} | {r['wall_s']:.0f} | {r['mb_per_s']:.2f} | "
                     f"{r['cpu_s']:.0f} ({r['cores_used']}) | "
                     f"{r['peak_rss_tree_mb']:.0f} | {r['max_rss_one_process_mb']:.0f} | "
                     f"{p.get('scan', 0):.0f} | {p.get('dedup', 0):.1f} | {p.get('tokenize', 0):.0f} | "
                     f"{p.get('shards', 0):.1f} |")
    r = res["prepare"][0]
    lines += ["", "| stage | docs in | docs out | MB in | MB out | CPU s | MB/s per process |",
              "|---|---|---|---|---|---|---|"]
    for name, s in r["stages"].items():
        lines.append(f"| {name} | {s['docs_in']:,} | {s['docs_out']:,} | {s['bytes_in'] / 1e6:,.0f} | "
                     f"{s['bytes_out'] / 1e6:,.0f} | {s['cpu_s'] or ''} | {s['mb_per_s'] or ''} |")
    lines += ["", "| BPE training | text MB | merges | workers | train s | wall s (process) | "
              "max RSS MB |", "|---|---|---|---|---|---|---|"]
    for b in res["bpe"]:
        lines.append(f"| {b['name']} | {b['text_mb']} | {b['merges']:,} | {b['workers']} | "
                     f"{b['train_s']} | {b['wall_s']} | {b['max_rss_one_process_mb']:.0f} |")
    lines.append(f"\nsetup: {res['setup']}; load average after: {res['load_after']}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--bpe-mb", type=float, default=100.0)
    ap.add_argument("--bpe-merges", type=int, default=10_000)
    ap.add_argument("--skip-prepare", action="store_true")
    ap.add_argument("--skip-bpe", action="store_true")
    ap.add_argument("--corpus", default=None, help="reuse this folder of .txt files (kept)")
    ap.add_argument("--json", default="bench_data.json")
    ap.add_argument("--bpe-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bpe_child:
        p, mb, merges, workers = args.bpe_child
        return _bpe_child(p, float(mb), int(merges), int(workers))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if "TIKTOKEN_CACHE_DIR" not in env and CACHE.is_dir():
        env["TIKTOKEN_CACHE_DIR"] = str(CACHE)
    tokenizer = "gpt2" if "TIKTOKEN_CACHE_DIR" in env else "char"
    tmp = Path(tempfile.mkdtemp(prefix="minillm_bench_data_", dir="/tmp"))
    res = {"machine": f"{platform.node()} {os.cpu_count()} cpus, {platform.platform()}",
           "date": time.strftime("%Y-%m-%d"), "load_before": os.getloadavg(), "tokenizer": tokenizer}
    try:
        if args.corpus:
            corpus = Path(args.corpus)
            nbytes = sum(p.stat().st_size for p in corpus.iterdir())
            res.update(generate_s=0.0, corpus_mb=nbytes / 1e6)
        else:
            corpus = tmp / "corpus"
            corpus.mkdir()
            t0 = time.perf_counter()
            nbytes = generate_corpus(corpus, args.gb)
            res.update(generate_s=round(time.perf_counter() - t0, 1), corpus_mb=nbytes / 1e6)
            print(f"generated {nbytes / 1e6:,.0f} MB in {res['generate_s']} s", flush=True)
        res["setup"] = setup_costs()
        res["bpe"] = []
        for name, path, mb, merges, workers in () if args.skip_bpe else (
                ("lesson case (pydocs)", "pydocs", 0, 2000, 1),
                (f"{args.bpe_mb:.0f} MB of the corpus", sorted(corpus.iterdir())[0], args.bpe_mb,
                 args.bpe_merges, 2)):
            res["bpe"].append(dict(bench_bpe(path, mb, merges, workers, env), name=name))
            print(res["bpe"][-1], flush=True)
        res["prepare"] = []
        for w in ([] if args.skip_prepare else args.workers):
            res["prepare"].append(bench_prepare(corpus, tmp / f"ds{w}", w, tokenizer, env, nbytes))
            print({k: v for k, v in res["prepare"][-1].items() if k != "stages"}, flush=True)
        res["load_after"] = os.getloadavg()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    if res["prepare"]:
        print(table(res))


if __name__ == "__main__":
    main()
