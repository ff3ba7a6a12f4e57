"""Performance tooling: `minillm bench` through the real CLI (table, --json, --threads in a child
process, bad input), the per-op `OpProfiler`, the FLOP count behind MFU, and the glibc allocator
tuning (checked by counting page faults in fresh processes, never by timing).
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from minillm import backend
from minillm.autograd.function import Function
from minillm.perf.bench import format_table
from minillm.model import GPT, GPTConfig
from minillm.perf.profiler import OpProfiler, all_functions
from minillm.perf.flops import flops_per_token, matmul_params

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.toml"
ROWS = ("forward ms", "backward ms", "optimizer ms", "step ms", "tokens/s", "MFU")
KEYS = ("forward_ms", "backward_ms", "optimizer_ms", "step_ms", "tokens_per_s", "mfu",
        "flops_per_token", "params")


def _bench(minillm_cli, tmp_path, char_data, *extra):
    return minillm_cli("bench", TINY_CONFIG, "--steps", "2", f"--data.dir={char_data}", *extra,
                       cwd=tmp_path)


def test_bench_prints_the_table(minillm_cli, tmp_path, char_data):
    r = _bench(minillm_cli, tmp_path, char_data)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "matmul peak" in lines[0] and "params" in lines[0]
    values = {}
    for label in ROWS:
        row = [line for line in lines if line.startswith(label)]
        assert len(row) == 1, (label, r.stdout)
        values[label] = row[0][len(label):].split()
    for label in ROWS[:5]:
        assert float(values[label][0].replace(",", "")) > 0, (label, values[label])
        assert values[label][1:] == ["-", "-"]           # no PyTorch column without --torch
    mfu = values["MFU"][0]
    assert mfu.endswith("%") and 0 < float(mfu[:-1]) < 100, mfu
    assert not list(tmp_path.iterdir()), "bench writes nothing in the working directory"


def test_bench_json_is_one_consistent_line(minillm_cli, tmp_path, char_data):
    r = _bench(minillm_cli, tmp_path, char_data, "--json")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout
    res = json.loads(lines[0])
    ours = res["minillm"]
    for key in KEYS:
        assert isinstance(ours[key], (int, float)) and ours[key] > 0, (key, ours)
    assert res["torch"] is None and res["batch"] == 4 and res["block"] == 16
    # tokens/s and MFU follow from the step time, the FLOP count and the measured peak
    tokens = res["batch"] * res["block"]
    assert ours["tokens_per_s"] == pytest.approx(tokens / (ours["step_ms"] / 1000))
    assert ours["mfu"] == pytest.approx(ours["flops_per_token"] * ours["tokens_per_s"]
                                        / (res["matmul_peak_gflops"] * 1e9))
    # the median of 2 steps is their mean, so with --steps 2 the parts add up to the step
    parts = ours["forward_ms"] + ours["backward_ms"] + ours["optimizer_ms"]
    assert parts == pytest.approx(ours["step_ms"], rel=1e-9)


def test_bench_threads_runs_a_pinned_child(minillm_cli, tmp_path, char_data, monkeypatch):
    # A sitecustomize on PYTHONPATH logs every interpreter that starts and the BLAS thread count
    # it sees, so the test can tell that --threads re-ran the benchmark in a child pinned to 1.
    hook = tmp_path / "hook"
    hook.mkdir()
    log = tmp_path / "starts.log"
    (hook / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import os
        with open({str(log)!r}, "a") as f:
            f.write(os.environ.get("OPENBLAS_NUM_THREADS", "unset") + "\\n")
    """))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), str(REPO), os.environ.get("PYTHONPATH")]))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = subprocess.run([sys.executable, "-m", "minillm", "bench", str(TINY_CONFIG), "--steps", "2",
                        f"--data.dir={char_data}", "--threads", "1", "--json"],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert int(res["threads"]) == 1 and res["minillm"]["step_ms"] > 0
    assert log.read_text().split() == ["2", "1"]        # the parent, then the pinned child


def test_bench_bad_steps_is_a_user_error(minillm_cli, tmp_path, char_data):
    r = _bench(minillm_cli, tmp_path, char_data, "--steps", "0")   # the last --steps wins
    assert r.returncode == 2, (r.returncode, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--steps" in err[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_format_table_ratios_with_a_reference():
    ours = {"forward_ms": 2.0, "backward_ms": 4.0, "optimizer_ms": 1.0, "step_ms": 7.0,
            "tokens_per_s": 1000.0, "mfu": 0.10, "params": 2_000_000, "peak_mb": 3.0}
    ref = {"forward_ms": 1.0, "backward_ms": 4.0, "optimizer_ms": 2.0, "step_ms": 7.0,
           "tokens_per_s": 2000.0, "mfu": 0.20}
    r = {"config": "c.toml", "overrides": [], "threads": 1, "device": "cpu", "batch": 2,
         "block": 8, "matmul_peak_gflops": 50.0, "minillm": ours, "torch": ref}
    rows = {line[:14].strip(): line[14:].split() for line in format_table(r).splitlines()[2:8]}
    assert rows["forward ms"] == ["2.0", "1.0", "2.00"]       # minillm time / PyTorch time
    assert rows["optimizer ms"] == ["1.0", "2.0", "0.50"]     # < 1: minillm faster
    assert rows["tokens/s"] == ["1,000.0", "2,000.0", "2.00"]  # same direction as the times
    assert rows["MFU"] == ["10.0%", "20.0%", "2.00"]
    assert "3.0 MB" in format_table(r)


# ------------------------------------------------------------------------------- profiler

def _tiny_step(n_layer=2):
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=n_layer, n_head=2, n_embd=32)
    model = GPT(cfg, seed=0)
    rng = np.random.default_rng(0)
    x, y = (backend.asarray(rng.integers(0, 50, (4, 16))) for _ in range(2))
    return model, x, y


def _methods():
    return {(cls, which): cls.__dict__[which] for cls in all_functions()
            for which in ("forward", "backward") if which in cls.__dict__}


def test_op_profiler_lists_the_ops_of_a_step_and_restores_them():
    model, x, y = _tiny_step(n_layer=2)
    before = _methods()
    with OpProfiler() as prof:
        inside = _methods()
        _, loss = model(x, y)
        loss.backward()
    after = _methods()
    assert {cls.__name__ for cls, _ in before} >= {"Linear", "CausalAttention", "LayerNorm", "GELU"}
    assert all(inside[k] is not before[k] for k in before), "inside, every op is timed"
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before), "every forward/backward is restored"
    # per block: 4 Linear (qkv, attn proj, fc, mlp proj), 2 LayerNorm, 1 attention; + head, ln_f
    calls = {name: (s[0], s[2]) for name, s in prof.stats.items()}
    assert calls["Linear"] == (2 * 4 + 1, 2 * 4 + 1)
    assert calls["LayerNorm"] == (2 * 2 + 1, 2 * 2 + 1)
    assert calls["CausalAttention"] == (2, 2)
    assert calls["CrossEntropy"] == (1, 1)
    assert all(s[1] >= 0 and s[3] >= 0 for s in prof.stats.values())
    table = prof.table()
    for name in ("Linear", "CausalAttention", "LayerNorm", "(everything else)"):
        assert re.search(rf"^{re.escape(name)}\s", table, re.M), table
    shares = [float(s) for s in re.findall(r"(-?[\d.]+)%$", table, re.M)]
    assert sum(shares) == pytest.approx(100, abs=0.5)
    # the step still trains the same after profiling: gradients match an unprofiled step
    grads = [p.grad.copy() for p in model.parameters()]
    model.zero_grad()
    _, loss2 = model(x, y)
    loss2.backward()
    assert float(loss2.data) == float(loss.data)
    for g, p in zip(grads, model.parameters()):
        np.testing.assert_array_equal(backend.to_numpy(g), backend.to_numpy(p.grad))


def test_op_profiler_restores_after_an_exception():
    before = _methods()
    with pytest.raises(ZeroDivisionError):
        with OpProfiler():
            1 / 0
    after = _methods()
    assert all(after[k] is before[k] for k in before)
    assert "timed" not in Function.forward.__qualname__  # the base class is never wrapped


# ------------------------------------------------------------------------------- FLOPs

def test_flops_per_token_matches_a_hand_count():
    V, T, L, C = 50, 16, 2, 32
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=2, n_embd=C), seed=0)
    # matmul weights by hand: token embedding (tied with the head), per block 2 LayerNorms (2C
    # each), qkv (3C x C + 3C), attention proj (C x C + C), fc (4C x C + 4C), proj (C x 4C + C);
    # final LayerNorm. The position table is a lookup, not a matmul.
    per_block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    n = V * C + L * per_block + 2 * C
    assert matmul_params(model) == n == model.num_parameters() - T * C
    # 6 FLOPs per matmul weight (2 forward, 4 backward) + attention's 12 L T C per token
    assert flops_per_token(model.config, n) == 6 * n + 12 * L * T * C


# ------------------------------------------------------------------------------- allocator

FAULTS = """
import resource, sys
from minillm.perf.allocator import tune_host_allocator
import numpy as np
print(int(tune_host_allocator()))
n = 5_000_000                                       # 40 MB: above glibc's default mmap ceiling
a = np.empty(n); a.fill(1.0); del a
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    a = np.empty(n); a.fill(1.0); del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(tmp_path, tuning):
    env = dict(os.environ, PYTHONPATH=str(REPO), OPENBLAS_NUM_THREADS="1")
    env.pop("MINILLM_MALLOC_TUNING", None)
    if tuning is not None:
        env["MINILLM_MALLOC_TUNING"] = tuning
    r = subprocess.run([sys.executable, "-c", FAULTS], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    applied, faults = map(int, r.stdout.split())
    return bool(applied), faults


def test_tune_host_allocator_returns_a_bool_and_can_be_disabled(monkeypatch):
    from minillm.perf.allocator import tune_host_allocator
    assert isinstance(tune_host_allocator(), bool)
    monkeypatch.setenv("MINILLM_MALLOC_TUNING", "0")
    assert tune_host_allocator() is False


def test_allocator_tuning_stops_page_faults_on_reused_memory(tmp_path):
    applied, tuned = _faults(tmp_path, None)
    off_applied, untuned = _faults(tmp_path, "0")
    assert off_applied is False
    if not applied:
        pytest.skip("mallopt is not available here (not glibc)")
    # freed 40 MB blocks are reused from the heap instead of being mmapped and faulted in again
    assert untuned >= 50 and tuned * 5 < untuned, (tuned, untuned)
