"""HDF5 checkpoints on real files: round trips, checksums, corruption, discovery, pruning, a real
kill -9 during a save, and the inspect report."""
import datetime
import hashlib
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import ml_dtypes
import numpy as np
import pytest

from minillm.checkpoint import (CHECKPOINT_VERSION, check_config, checkpoint_header,
                                checkpoint_path, checkpoint_step, compare_config,
                                find_latest_checkpoint, inspect_checkpoint, iter_tensors,
                                list_checkpoints, load_checkpoint, prune_checkpoints, read_tensor,
                                save_checkpoint, verify_checkpoint)
from minillm.checkpoint.chunks import ArrayWriter, chunk_shape, fletcher32
from minillm.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]


def small_state(step=3, seed=0):
    rng = np.random.default_rng(seed)
    model = {"transformer.wte.weight": rng.standard_normal((17, 8)).astype(np.float32),
             "transformer.h.0.attn.c_attn.weight": rng.standard_normal((24, 8)).astype(np.float32),
             "lm_head.weight": rng.standard_normal((17, 8)).astype(np.float32)}
    return {"meta": {"step": step, "tokens_seen": 768 * step, "best_val_loss": 1.93,
                     "layout": {"dp": 2, "pp": 1}},
            "config": {"model": {"n_layer": 1, "n_embd": 8, "bias": False},
                       "train": {"lr": 1e-3, "out_dir": "runs/x"}},
            "model": model,
            "optimizer": {"step": step, "lr": 1e-3, "betas": [0.9, 0.99],
                          "state": {k: {"m": v * 0.1, "v": v * v} for k, v in model.items()}},
            "scaler": {"scale": 65536.0, "growth_tracker": 3},
            "rng": {"dropout": np.random.default_rng(seed + 1).bit_generator.state}}


def assert_same(a, b, where="state"):
    """Exact equality, dtype and bits included, through dicts and lists."""
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys/order differ"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert a.tobytes() == b.tobytes(), f"{where}: values differ"
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"
        if isinstance(a, float):
            assert math.copysign(1, a) == math.copysign(1, b), where


def flip_bytes(path, dataset, at=100, n=4):
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_chunk_info(0).byte_offset  # chunked: get_offset() is None
    with open(path, "r+b") as fh:
        fh.seek(offset + at)
        data = fh.read(n)
        fh.seek(offset + at)
        fh.write(bytes(x ^ 0xFF for x in data))


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------- round trips

def test_round_trip_every_leaf_type(tmp_path):
    gen = np.random.default_rng(7)
    gen.standard_normal(3)  # move the state away from its seed
    data = np.random.default_rng(8)
    state = {
        "ints": {"small": -3, "i64": 2**63 - 1, "i128": 2**127 + 12345, "neg_big": -(2**100)},
        "floats": {"pi": math.pi, "tiny": 5e-324, "inf": float("inf"), "ninf": float("-inf"),
                   "nan": float("nan"), "negzero": -0.0, "third": 1 / 3},
        "other": {"s": "héllo ✓", "empty": "", "t": True, "f": False, "none": None,
                  "list": [1, 2.5, "x", None, [True, {"k": 2**70}]], "empty_list": [],
                  "tuple": (1, 2), "empty_dict": {}, "bytes": b"\x00\xffraw"},
        "pcg64": gen.bit_generator.state,
        "arrays": {"f32": data.standard_normal((5, 3)).astype(np.float32),
                   "f16": data.standard_normal(7).astype(np.float16),
                   "f64_nan": np.array([np.nan, np.inf, -np.inf, -0.0, 1.0]),
                   "i64": np.array([-(2**62), 0, 2**62], dtype=np.int64),
                   "u16": np.arange(65530, 65536, dtype=np.uint16),
                   "u8_odd": np.arange(7, dtype=np.uint8),  # odd byte count for the checksum
                   "bool": np.array([True, False, True]),
                   "bf16": data.standard_normal(9).astype(ml_dtypes.bfloat16),
                   "zero_d": np.array(2.5, dtype=np.float32),
                   "empty": np.zeros((0, 3), dtype=np.float32),
                   "empty_1d": np.zeros(0, dtype=np.int64),
                   "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T},
        "np_scalars": {"f32": np.float32(0.1), "i64": np.int64(-5), "u16": np.uint16(7)},
        "list_of_arrays": [np.ones(2, np.float32), 3, {"m": np.zeros(1)}],
        "transformer.h.0.attn.c_attn.weight": np.ones((6, 2), np.float32),
        # too long for an attribute: stored as checksummed JSON datasets instead
        "long_list": list(range(3000)),
        "many_keys": {f"layer.{i}.scale": float(i) for i in range(300)},
    }
    path = save_checkpoint(tmp_path / "ckpt_0000001.h5", state)
    back = load_checkpoint(path)
    expected = dict(state)
    expected["other"] = {**state["other"], "tuple": [1, 2]}  # tuples come back as lists
    expected["arrays"] = {**state["arrays"],
                          "transposed": np.ascontiguousarray(state["arrays"]["transposed"])}
    assert_same(expected, back)
    assert back["arrays"]["zero_d"].shape == ()
    # the restored 128-bit PCG64 state continues the same stream
    restored = np.random.default_rng()
    restored.bit_generator.state = back["pcg64"]
    assert np.array_equal(restored.standard_normal(4), gen.standard_normal(4))
    assert os.listdir(tmp_path) == ["ckpt_0000001.h5"]  # no temp file left behind


def test_file_layout_is_self_describing(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt_0000003.h5", small_state())
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == CHECKPOINT_VERSION
        ds = f["model"]["transformer.h.0.attn.c_attn.weight"]  # dotted names kept as-is
        assert ds.fletcher32 and ds.chunks is not None and ds.shape == (24, 8)
        assert f["optimizer/state/lm_head.weight/m"].fletcher32
        assert f["meta"].attrs["step"] == b"3"  # plain leaves are JSON attributes
    header = checkpoint_header(path)
    assert header["format_version"] == CHECKPOINT_VERSION and header["minillm_version"]
    assert datetime.datetime.fromisoformat(header["created"]).tzinfo is not None


def test_multi_chunk_arrays_with_padded_edge_chunks(tmp_path):
    # tiny chunks force many chunks per dataset, partial edge chunks and a row larger than a chunk
    writer = ArrayWriter(chunk_bytes=256)
    a = np.random.default_rng(1).standard_normal((37, 11)).astype(np.float32)
    wide = np.arange(3 * 200, dtype=np.int64).reshape(3, 200)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        writer.write(f, "a", a)
        writer.write(f, "wide", wide)
        assert f["a"].chunks == (5, 11) and f["wide"].chunks == (1, 32)
    with h5py.File(tmp_path / "x.h5", "r") as f:  # HDF5's own filter verifies our checksums
        assert np.array_equal(f["a"][()], a) and np.array_equal(f["wide"][()], wide)
    assert chunk_shape((10, 3), 4, limit=1 << 20) == (10, 3)


def reference_fletcher32(data: bytes) -> int:
    """H5_checksum_fletcher32 transcribed from HDF5's H5checksum.c."""
    s1 = s2 = 0
    words, i = len(data) // 2, 0
    while words:
        t = min(words, 360)
        words -= t
        for _ in range(t):
            s1 += (data[i] << 8) | data[i + 1]
            i += 2
            s2 += s1
        s1, s2 = (s1 & 0xFFFF) + (s1 >> 16), (s2 & 0xFFFF) + (s2 >> 16)
    if len(data) % 2:
        s1 += data[i] << 8
        s2 += s1
        s1, s2 = (s1 & 0xFFFF) + (s1 >> 16), (s2 & 0xFFFF) + (s2 >> 16)
    s1, s2 = (s1 & 0xFFFF) + (s1 >> 16), (s2 & 0xFFFF) + (s2 >> 16)
    return (s2 << 16) | s1


@pytest.mark.parametrize("n", [0, 1, 2, 3, 101, 65535 * 2, 65535 * 2 + 1, 140001])
@pytest.mark.parametrize("fill", ["random", 0xFF, 0x00])
def test_fletcher32_matches_hdf5_reference(n, fill):
    rng = np.random.default_rng(n)
    data = (rng.integers(0, 256, n, dtype=np.uint8) if fill == "random"
            else np.full(n, fill, np.uint8))
    assert fletcher32(data) == reference_fletcher32(data.tobytes())


def test_fletcher32_matches_what_hdf5_filter_stores(tmp_path):
    a = np.random.default_rng(3).standard_normal((300, 7)).astype(np.float32)
    with h5py.File(tmp_path / "ref.h5", "w") as f:
        f.create_dataset("a", data=a, chunks=(300, 7), fletcher32=True)  # HDF5's own filter
    with h5py.File(tmp_path / "ref.h5", "r") as f:
        _, raw = f["a"].id.read_direct_chunk((0, 0))
    assert raw[:-4] == a.tobytes()
    assert int.from_bytes(raw[-4:], "little") == fletcher32(a)


class FakeDeviceArray:
    """Stands in for a CuPy array: shape, dtype and .get() to copy to the host."""

    def __init__(self, a):
        self._a, self.shape, self.dtype, self.gets = a, a.shape, a.dtype, 0

    def get(self):
        self.gets += 1
        return self._a.copy()


def test_device_arrays_are_copied_to_host_one_at_a_time(tmp_path):
    arrays = {f"w{i}": np.full((4, 3), i, np.float32) for i in range(5)}
    fakes = {k: FakeDeviceArray(v) for k, v in arrays.items()}
    path = save_checkpoint(tmp_path / "ckpt_0000001.h5", {"model": fakes})
    assert all(f.gets == 1 for f in fakes.values())
    assert_same({"model": arrays}, load_checkpoint(path))


def test_overwrite_replaces_and_failed_save_leaves_old_file(tmp_path):
    path = tmp_path / "ckpt_0000003.h5"
    save_checkpoint(path, small_state(seed=0))
    save_checkpoint(path, small_state(seed=1))
    assert_same(small_state(seed=1)["model"], load_checkpoint(path)["model"])
    before = sha(path)
    with pytest.raises(TypeError, match="meta/bad"):
        save_checkpoint(path, {**small_state(seed=2), "meta": {"bad": object()}})
    assert sha(path) == before and os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("bad", [{"a/b": 1}, {"": 1}, {"x": {"__order__": 1}}, {1: 2},
                                 {"format_version": 3}])
def test_unstorable_keys_are_refused(tmp_path, bad):
    with pytest.raises((TypeError, ValueError)):
        save_checkpoint(tmp_path / "c.h5", bad)


def test_partial_reads(tmp_path):
    state = small_state()
    path = save_checkpoint(tmp_path / "ckpt_0000003.h5", state)
    names = [n for n, _ in iter_tensors(path)]
    assert names == list(state["model"])
    moments = dict(iter_tensors(path, "optimizer/state"))
    assert_same(state["optimizer"]["state"]["lm_head.weight"]["v"], moments["lm_head.weight/v"])
    assert_same(state["model"]["lm_head.weight"], read_tensor(path, "lm_head.weight"))
    light = load_checkpoint(path, exclude=("model", "optimizer/state"))
    assert "model" not in light and "state" not in light["optimizer"]
    assert light["optimizer"]["lr"] == 1e-3
    with pytest.raises(UserError, match="no tensor 'model/nope'"):
        read_tensor(path, "nope")


# ---------------------------------------------------------------------------- bad files

def test_checksum_mismatch_is_a_user_error(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt_0000003.h5", small_state())
    flip_bytes(path, "model/transformer.wte.weight")
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert str(e.value) == (f"checkpoint {path} is corrupt: checksum mismatch in dataset "
                            f"model/transformer.wte.weight; use an earlier checkpoint")
    with pytest.raises(UserError, match="checksum mismatch"):
        verify_checkpoint(path)
    with pytest.raises(UserError, match="checksum mismatch"):
        list(iter_tensors(path))


def test_truncated_missing_and_foreign_files(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt_0000003.h5", small_state())
    data = path.read_bytes()
    short = tmp_path / "short.h5"
    short.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"short.h5 is truncated \(it has \d+ bytes of the \d+"):
        load_checkpoint(short)
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5 at all\n" * 100)
    with pytest.raises(UserError, match="notes.h5 is not an HDF5 file"):
        load_checkpoint(text)
    with pytest.raises(UserError, match="missing.h5 does not exist"):
        load_checkpoint(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.ones(3)
    with pytest.raises(UserError, match="not a minillm checkpoint"):
        load_checkpoint(tmp_path / "other.h5")
    for p in (short, text):
        assert "\n" not in str(pytest.raises(UserError, load_checkpoint, p).value)


def test_random_bit_flips_never_pass_silently(tmp_path):
    # every byte that matters is checksummed: fletcher32 on data, HDF5's checksums on metadata
    # (small JSON leaves live in object headers, not in the unchecksummed global heap)
    state = small_state()
    state["meta"].update({f"k{i}": i * 1.5 for i in range(12)})  # dense attribute storage too
    path = save_checkpoint(tmp_path / "ckpt_0000001.h5", state)
    expected, data = load_checkpoint(path), path.read_bytes()
    rng = np.random.default_rng(0)
    caught = 0
    for pos, bit in zip(rng.integers(0, len(data), 60), rng.integers(0, 8, 60)):
        bad = bytearray(data)
        bad[pos] ^= 1 << int(bit)
        path.write_bytes(bytes(bad))
        try:
            verify_checkpoint(path)
        except UserError:
            caught += 1
            continue
        assert_same(expected, load_checkpoint(path), f"flip at byte {pos}")  # unused byte
    assert caught > 40


def test_newer_format_version_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt_0000003.h5", small_state())
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = CHECKPOINT_VERSION + 1
    with pytest.raises(UserError, match=f"has format version {CHECKPOINT_VERSION + 1} but this "
                                        rf"minillm \(.*\) reads version {CHECKPOINT_VERSION}"):
        load_checkpoint(path)


# -------------------------------------------------------------------- discovery and pruning

def write_run(run_dir, steps):
    return [save_checkpoint(checkpoint_path(run_dir, s), small_state(step=s)) for s in steps]


def test_naming_and_listing(tmp_path):
    assert checkpoint_path(tmp_path, 120).name == "ckpt_0000120.h5"
    assert checkpoint_step(tmp_path / "ckpt_0000120.h5") == 120
    assert checkpoint_step(tmp_path / "ckpt_12.h5") is None
    write_run(tmp_path, [2, 10, 1])
    (tmp_path / ".ckpt_0000011.h5.tmp-999999").write_bytes(b"partial")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt_0000010.h5", "ckpt_0000002.h5", "ckpt_0000001.h5"]
    assert list_checkpoints(tmp_path / "nope") == []
    assert find_latest_checkpoint(tmp_path / "nope") is None


def test_find_latest_skips_corrupt_newer_checkpoints(tmp_path, capsys):
    paths = write_run(tmp_path, [1, 2, 3])
    flip_bytes(paths[2], "optimizer/state/lm_head.weight/v", at=8)  # deep inside the newest
    paths[1].write_bytes(paths[1].read_bytes()[:3000])  # a truncated one before it
    assert find_latest_checkpoint(tmp_path) == paths[0]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert err[0].startswith("warning: skipping unusable checkpoint ckpt_0000003.h5")
    assert "checksum mismatch in dataset optimizer/state/lm_head.weight/v" in err[0]
    assert "ckpt_0000002.h5" in err[1] and "truncated" in err[1]
    paths[0].write_text("garbage")
    assert find_latest_checkpoint(tmp_path) is None


def test_prune_keeps_newest_and_removes_stale_temps(tmp_path):
    write_run(tmp_path, [1, 2, 3, 4, 5])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".ckpt_0000006.h5.tmp-{dead.pid}"
    mine = tmp_path / f".ckpt_0000007.h5.tmp-{os.getpid()}"  # a save in progress here
    other = tmp_path / f".ckpt_0000008.h5.tmp-{os.getppid()}"  # a live process's save
    for p in (stale, mine, other):
        p.write_bytes(b"x")
    assert prune_checkpoints(tmp_path, 0) == [stale]  # 0 keeps every checkpoint
    removed = prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in removed) == [f"ckpt_000000{i}.h5" for i in (1, 2, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        mine.name, other.name, "ckpt_0000004.h5", "ckpt_0000005.h5"])


CRASH_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from minillm.checkpoint import checkpoint_path, save_checkpoint

    class SlowDeviceArray:  # a GPU array whose copy to the host takes a while
        def __init__(self, a):
            self._a, self.shape, self.dtype = a, a.shape, a.dtype
        def get(self):
            time.sleep(0.05)
            return self._a

    model = {f"h.{i}.mlp.c_fc.weight": SlowDeviceArray(np.full((512, 512), i, np.float32))
             for i in range(60)}  # 1 MiB each: the save takes about 3 s
    save_checkpoint(checkpoint_path(sys.argv[1], 4), {"meta": {"step": 4}, "model": model})
""")


def test_kill_9_during_save_leaves_previous_checkpoints_intact(tmp_path):
    old = write_run(tmp_path, [1, 2, 3])
    digests = [sha(p) for p in old]
    proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(tmp_path)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    tmp = tmp_path / f".ckpt_0000004.h5.tmp-{proc.pid}"
    deadline = time.monotonic() + 60
    try:
        while not (tmp.exists() and tmp.stat().st_size > 5 << 20):  # mid-write: several MiB in
            assert proc.poll() is None, "the saving process ended before it could be killed"
            assert time.monotonic() < deadline, "the temp file never grew"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert tmp.exists() and not checkpoint_path(tmp_path, 4).exists()
    assert [sha(p) for p in old] == digests
    for p in old:
        verify_checkpoint(p)
    assert find_latest_checkpoint(tmp_path) == old[2]
    assert load_checkpoint(old[2])["meta"]["step"] == 3
    assert prune_checkpoints(tmp_path, 0) == [tmp]  # the dead writer's temp is cleaned up
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in old]


# --------------------------------------------------------------------- reports and configs

def test_inspect_report(tmp_path):
    state = small_state(step=120)
    path = save_checkpoint(tmp_path / "ckpt_0000120.h5", state)
    report = inspect_checkpoint(path)
    for needle in ("ckpt_0000120.h5", f"version {CHECKPOINT_VERSION}", "step           120",
                   "tokens seen    92,160", "best val loss  1.93", "dp=2 pp=1",
                   "[model] n_layer=1 n_embd=8 bias=False", "transformer.h.0.attn.c_attn.weight",
                   "(24, 8)", "float32", "total parameters  464",
                   "optimizer state   6 tensors, 3.6 KB, step 120, lr 0.001",
                   "other sections    scaler, rng"):
        assert needle in report, needle
    norm = float(np.linalg.norm(state["model"]["lm_head.weight"].astype(np.float64)))
    line = next(x for x in report.splitlines() if "lm_head.weight" in x)
    assert line.split()[1:3] == ["(17,", "8)"] and f"{norm:.6g}" in line


def test_compare_and_check_config():
    saved = {"model": {"n_layer": 4, "n_embd": 64, "act": "gelu"}, "train": {"lr": 1e-3}}
    current = {"model": {"n_layer": 6, "n_embd": 64, "act": "gelu", "new": True},
               "train": {"lr": 3e-4}}
    assert compare_config(saved, current) == [
        "model.n_layer: checkpoint 4, config 6", "model.new: checkpoint (absent), config True"]
    assert compare_config(saved, current, sections=("train",)) == [
        "train.lr: checkpoint 0.001, config 0.0003"]
    assert compare_config(saved, saved, sections=("model", "train", "missing")) == []
    check_config("c.h5", saved, saved)
    with pytest.raises(ConfigError) as e:
        check_config("runs/x/ckpt_0000004.h5", saved, {"model": {**saved["model"], "n_layer": 6}})
    assert str(e.value) == ("checkpoint runs/x/ckpt_0000004.h5 was written with model.n_layer=4 "
                            "but the config has 6; resume with --model.n_layer=4 or start a new "
                            "out_dir")
