"""Sources, prepared datasets on disk, memory-mapped splits and the batch sampler."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from minillm.data import (BatchSampler, TokenDataset, default_dataset_dir, ensure_dataset,
                          find_dataset, load_source, load_tokenizer, prepare_dataset, token_dtype)
from minillm.data import sources
from minillm.errors import UserError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare.txt"
TIKTOKEN_CACHE = DATA / "tiktoken_cache"


@pytest.fixture
def small_text(tmp_path, shakespeare):
    path = tmp_path / "small.txt"
    path.write_text(shakespeare[:20_000], encoding="utf-8")
    return path


# ---------------------------------------------------------------- sources

def test_pydocs_source():
    text = load_source("pydocs")
    from pydoc_data.topics import topics
    assert len(text) > 300_000 and text == load_source("pydocs")
    first = sorted(topics)[0]
    assert text.startswith(topics[first].strip()[:200])


def test_path_source_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_source(str(tmp_path / "nope.txt"))
    with pytest.raises(UserError, match="not a file"):
        load_source(str(tmp_path))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        load_source(str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_source(str(tmp_path / "latin1.txt"))


def test_shakespeare_uses_cache(tmp_path, shakespeare, monkeypatch):
    monkeypatch.setattr(sources, "SHAKESPEARE_URL", "file:///nonexistent/never/fetched.txt")
    shutil.copy(SHAKESPEARE, tmp_path / sources.SHAKESPEARE_FILE)
    assert load_source("shakespeare", cache_dir=tmp_path) == shakespeare


def test_shakespeare_download(tmp_path, shakespeare, monkeypatch):
    # A real urllib fetch of a local file:// URL; the network itself is not needed.
    monkeypatch.setattr(sources, "SHAKESPEARE_URL", SHAKESPEARE.as_uri())
    assert load_source("shakespeare", cache_dir=tmp_path / "cache") == shakespeare
    assert (tmp_path / "cache" / sources.SHAKESPEARE_FILE).is_file()


def test_shakespeare_download_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SHAKESPEARE_URL", (tmp_path / "missing.txt").as_uri())
    with pytest.raises(UserError, match="pass the local file path"):
        load_source("shakespeare", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []                # nothing half-written left behind


# ---------------------------------------------------------------- prepare

def test_prepare_char(tmp_path, small_text):
    out = tmp_path / "ds"
    meta = prepare_dataset(str(small_text), out, tokenizer="char")
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == "char"
    assert meta["n_train"] == 18_000 and meta["n_val"] == 2_000
    assert meta["created_with"].startswith("minillm ")
    assert json.loads((out / "meta.json").read_text()) == meta
    train = np.fromfile(out / "train.bin", dtype="<u2")
    val = np.fromfile(out / "val.bin", dtype="<u2")
    tok = load_tokenizer(out)
    assert tok.vocab_size == meta["vocab_size"]
    assert tok.decode(np.concatenate([train, val]).tolist()) == small_text.read_text()
    assert not list(out.glob("*.tmp*"))


def test_prepare_is_reused(tmp_path, small_text, monkeypatch):
    out = tmp_path / "ds"
    meta = prepare_dataset(str(small_text), out, tokenizer="bpe", vocab_size=300)
    stamp = (out / "train.bin").stat().st_mtime_ns

    def no_work(*a, **k):
        raise AssertionError("a matching dataset must be reused, not rebuilt")
    monkeypatch.setattr("minillm.data.dataset.load_source", no_work)
    assert ensure_dataset(str(small_text), out, tokenizer="bpe", vocab_size=300) == meta
    assert prepare_dataset(str(small_text), out, tokenizer="bpe", vocab_size=300) == meta
    assert (out / "train.bin").stat().st_mtime_ns == stamp
    assert find_dataset(out, str(small_text), "bpe", 300) == meta
    assert find_dataset(out, str(small_text), "bpe", 320) is None     # another request
    assert find_dataset(out, str(small_text), "char") is None


def test_prepare_redoes_changed_or_incomplete(tmp_path, small_text):
    out = tmp_path / "ds"
    prepare_dataset(str(small_text), out, tokenizer="bpe", vocab_size=300)
    meta = prepare_dataset(str(small_text), out, tokenizer="char")      # different request
    assert meta["tokenizer"] == "char" and load_tokenizer(out).name == "char"
    with open(out / "val.bin", "r+b") as f:                            # a torn file
        f.truncate(10)
    assert find_dataset(out, str(small_text), "char") is None
    ensure_dataset(str(small_text), out, tokenizer="char")
    assert (out / "val.bin").stat().st_size == meta["n_val"] * 2


def test_prepare_bpe_pydocs_default_vocab(tmp_path):
    meta = prepare_dataset("pydocs", tmp_path / "ds", tokenizer="bpe")
    assert meta["vocab_size"] == 512 and meta["eot_id"] == 511 and meta["source"] == "pydocs"
    ds = TokenDataset(tmp_path / "ds", "train")
    assert int(np.max(ds.tokens)) < 511


def test_prepare_gpt2(tmp_path, small_text, monkeypatch):
    if not TIKTOKEN_CACHE.is_dir():
        pytest.skip("tiktoken gpt2 files not available")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
    meta = prepare_dataset(str(small_text), tmp_path / "ds", tokenizer="gpt2")
    assert meta["vocab_size"] == 50257 and meta["dtype"] == "uint16" and meta["eot_id"] == 50256
    ds = TokenDataset(tmp_path / "ds", "val")
    assert ds.tokenizer().decode(ds.tokens[:5].tolist()) != ""


def test_token_dtype():
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"
    with pytest.raises(UserError, match="does not fit"):
        token_dtype(2 ** 32 + 1)


def test_prepare_user_errors(tmp_path, small_text):
    src = str(small_text)
    with pytest.raises(UserError, match="val_fraction"):
        prepare_dataset(src, tmp_path / "a", val_fraction=1.0)
    with pytest.raises(UserError, match="unknown tokenizer"):
        prepare_dataset(src, tmp_path / "a", tokenizer="words")
    with pytest.raises(UserError, match="too small"):
        prepare_dataset(src, tmp_path / "a", tokenizer="bpe", vocab_size=200)
    with pytest.raises(UserError, match="does not fit"):
        prepare_dataset(src, tmp_path / "a", tokenizer="bpe", vocab_size=2 ** 33)
    with pytest.raises(UserError, match="drop --vocab-size"):
        prepare_dataset(src, tmp_path / "a", tokenizer="char", vocab_size=64)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abc")
    with pytest.raises(UserError, match="too short"):
        prepare_dataset(str(tiny), tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        prepare_dataset(src, tmp_path / "file")
    assert not (tmp_path / "a" / "meta.json").exists()


def test_default_dataset_dir():
    assert default_dataset_dir("pydocs", "char") == Path("data/pydocs_char")
    assert default_dataset_dir("shakespeare", "bpe") == Path("data/shakespeare_bpe512")
    assert default_dataset_dir("/x/my.txt", "gpt2", root="d") == Path("d/my_gpt2")


# ---------------------------------------------------------------- TokenDataset

def test_token_dataset_memmap(tmp_path, small_text):
    meta = prepare_dataset(str(small_text), tmp_path, tokenizer="char")
    ds = TokenDataset(tmp_path, "train")
    assert isinstance(ds.tokens, np.memmap) and len(ds) == meta["n_train"]
    assert ds.meta == meta and ds.vocab_size == meta["vocab_size"]
    with pytest.raises(ValueError):
        ds.tokens[0] = 1                                   # read-only
    assert ds.tokenizer().decode(ds.tokens[:14].tolist()) == "First Citizen:"


def test_token_dataset_uint32(tmp_path):
    ids = np.array([0, 70000, 5, 65536], dtype="<u4")
    ids[:3].tofile(tmp_path / "train.bin")
    ids[3:].tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps(
        {"dtype": "uint32", "n_train": 3, "n_val": 1, "vocab_size": 70001}))
    assert TokenDataset(tmp_path, "train").tokens.tolist() == [0, 70000, 5]
    assert TokenDataset(tmp_path, "val").tokens.tolist() == [65536]


def test_token_dataset_errors(tmp_path, small_text):
    with pytest.raises(UserError, match="minillm prepare"):
        TokenDataset(tmp_path / "none", "train")
    prepare_dataset(str(small_text), tmp_path / "ds")
    with pytest.raises(UserError, match="unknown split"):
        TokenDataset(tmp_path / "ds", "test")
    (tmp_path / "ds" / "val.bin").write_bytes(b"\0\0")
    with pytest.raises(UserError, match="wrong size"):
        TokenDataset(tmp_path / "ds", "val")


# ---------------------------------------------------------------- sampler

@pytest.fixture
def tokens():
    return np.arange(1000, dtype=np.uint16)  # token i == its position: offsets are visible


def test_sampler_shapes_and_targets(tokens):
    x, y = BatchSampler(tokens, block_size=16, batch_size=8, seed=3).get_batch(0)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])
    assert np.array_equal(x - x[:, :1], np.broadcast_to(np.arange(16), (8, 16)))  # windows
    assert np.array_equal(y, x + 1)


def test_sampler_is_a_function_of_seed_and_step(tokens):
    a = BatchSampler(tokens, 16, 8, seed=1)
    b = BatchSampler(tokens, 16, 8, seed=1)
    later = [b.get_batch(s)[0] for s in (7, 2, 5)]          # any call order
    assert all(np.array_equal(a.get_batch(s)[0], x) for s, x in zip((7, 2, 5), later))
    assert not np.array_equal(a.get_batch(0)[0], a.get_batch(1)[0])
    assert not np.array_equal(a.get_batch(0)[0], BatchSampler(tokens, 16, 8, seed=2).get_batch(0)[0])
    first = np.random.default_rng([1, 5]).integers(0, len(tokens) - 16, size=8)
    assert np.array_equal(a.get_batch(5)[0][:, 0], first)


def test_sampler_slices_compose(tokens):
    s = BatchSampler(tokens, 16, 8, seed=0)
    for step in range(3):
        x, y = s.get_batch(step)
        x0, y0 = s.get_batch(step, start=0, count=4)
        x1, y1 = s.get_batch(step, start=4, count=4)
        assert np.array_equal(np.concatenate([x0, x1]), x)
        assert np.array_equal(np.concatenate([y0, y1]), y)
        parts = [s.get_batch(step, start=i, count=1)[0] for i in range(8)]   # 8 ranks
        assert np.array_equal(np.concatenate(parts), x)
    with pytest.raises(ValueError):
        s.get_batch(0, start=6, count=4)


def test_sampler_offsets_cover_the_whole_range():
    toks = np.arange(6, dtype=np.uint16)                     # block 4: offsets 0 and 1 only
    s = BatchSampler(toks, block_size=4, batch_size=16, seed=0)
    starts = np.concatenate([s.get_batch(i)[0][:, 0] for i in range(4)])
    assert set(starts.tolist()) == {0, 1}
    assert s.get_batch(0)[1].max() == 5                     # the last token is a target


def test_sampler_too_short():
    with pytest.raises(UserError, match=r"has 10 tokens but block_size=10 needs at least 11"):
        BatchSampler(np.arange(10), block_size=10, batch_size=2)
    with pytest.raises(UserError, match="seed"):
        BatchSampler(np.arange(100), block_size=10, batch_size=2, seed=-1)


def test_eval_batches_fixed_and_separate(tokens):
    s = BatchSampler(tokens, 16, 4, seed=0)
    ev = s.eval_batches(3)
    again = BatchSampler(tokens, 16, 4, seed=0).eval_batches(3)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(ev, again))
    assert not np.array_equal(ev[0][0], s.get_batch(0)[0])
    assert np.array_equal(s.eval_batch(1, start=2, count=2)[0], ev[1][0][2:])


def test_sampler_on_memmap(tmp_path, small_text):
    prepare_dataset(str(small_text), tmp_path)
    ds = TokenDataset(tmp_path, "train")
    x, y = BatchSampler(ds.tokens, 32, 4, seed=0).get_batch(10)
    assert x.shape == (4, 32) and x.dtype == np.int64 and int(x.max()) < ds.vocab_size
