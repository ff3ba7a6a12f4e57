"""Tokenizers: char / byte-level BPE / GPT-2 round trips, the BPE trainer, pre-tokenisation."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from minillm.data import (ENDOFTEXT, BPETokenizer, CharTokenizer, GPT2Tokenizer, get_tokenizer,
                          load_tokenizer, split_words, train_bpe)
from minillm.data.pretokenize import GPT2_PATTERN
from minillm.data.sources import pydocs_text
from minillm.errors import UserError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare.txt"
TIKTOKEN_CACHE = DATA / "tiktoken_cache"

UNICODE = ("Hello, wörld! naïve café — 你好，世界。 こんにちは 한국어 😀👍🏽 👨‍👩‍👧 "
           "e\u0301 a\u0308\u0323 مرحبا עברית ½ ²³ Ⅻ ٣٤٥ \u00a0nbsp\u2009thin \x1c\x1d\tTab\r\n"
           "  double  space's we'll I'M <|endoftext|> tail\n\n\n")


@pytest.fixture(scope="module")
def pydocs():
    return pydocs_text()


@pytest.fixture(scope="module")
def bpe_pydocs(pydocs):
    return BPETokenizer.train(pydocs, 512)


@pytest.fixture
def gpt2(monkeypatch):
    if not TIKTOKEN_CACHE.is_dir():
        pytest.skip(f"{TIKTOKEN_CACHE} not available")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
    return GPT2Tokenizer()


# ---------------------------------------------------------------- char

def test_char_round_trip_and_vocab():
    text = "hello wörld 😀\n"
    tok = get_tokenizer("char", text=text)
    assert tok.chars == sorted(set(text)) and tok.vocab_size == len(set(text))
    assert tok.name == "char" and tok.eot_id is None
    ids = tok.encode("löl 😀")
    assert tok.decode(ids) == "löl 😀"
    assert ids == [tok.chars.index(c) for c in "löl 😀"]


def test_char_unknown_characters_message():
    tok = CharTokenizer.train("abc ")
    with pytest.raises(UserError) as e:
        tok.encode("abé 😀 é")
    msg = str(e.value)
    assert "not in the vocabulary" in msg and "'é'" in msg and "'😀'" in msg
    assert "use characters from the training text" in msg and "\n" not in msg


def test_char_decode_out_of_range():
    with pytest.raises(UserError, match="outside the vocabulary"):
        CharTokenizer.train("ab").decode([0, 2])


def test_char_save_load(tmp_path):
    tok = CharTokenizer.train("the quick brown fox\n")
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert isinstance(back, CharTokenizer) and back.chars == tok.chars


# ---------------------------------------------------------------- pre-tokenisation

def test_stdlib_split_equals_regex_module(pydocs, shakespeare):
    """The spelled-out classes for `re` split exactly as the \\p{..} pattern does."""
    regex = pytest.importorskip("regex")  # the engine tiktoken's own reference code uses
    pat = regex.compile(GPT2_PATTERN)
    for text in (pydocs, shakespeare, UNICODE):
        words = split_words(text)
        assert "".join(words) == text
        assert words == pat.findall(text)


def test_split_examples():
    assert split_words("Hello world's 123 x++  y\n") == \
        ["Hello", " world", "'s", " 123", " x", "++", " ", " y", "\n"]


def test_whitespace_is_unicode_white_space_not_python_isspace():
    # Python's \s matches U+001C..U+001F; Unicode White_Space (and tiktoken) does not. With a
    # merge for "\x1c\x1c", tiktoken only merges it if both sit in one (punctuation) piece.
    tok = BPETokenizer([(0x1C, 0x1C)])
    text = "a\x1c\x1cb c\u00a0\u00a0d"
    assert tok.encode(text) == tok.encode_reference(text)
    assert 256 in tok.encode(text)


# ---------------------------------------------------------------- BPE trainer

def naive_bpe(text, num_merges):
    """Textbook BPE: recount every pair of every word occurrence after each merge."""
    words = [list(w.encode()) for w in split_words(text)]
    vocab = [bytes([i]) for i in range(256)]
    merges = []
    for _ in range(num_merges):
        counts = Counter(p for w in words for p in zip(w, w[1:]))
        best = min(counts, key=lambda p: (-counts[p], p))
        new = len(vocab)
        vocab.append(vocab[best[0]] + vocab[best[1]])
        merges.append(best)
        for k, w in enumerate(words):
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[k] = out
    return merges


def test_incremental_trainer_equals_naive(pydocs):
    text = pydocs[:20000] + " aaaaaaa aaa aaaa bbbbbb"
    assert train_bpe(text, 80).merges == naive_bpe(text, 80)


def test_tie_break_smallest_pair():
    # every pair occurs once: the smallest pair of ids, (ord(' '), ord('c')), goes first
    assert train_bpe("ab cd", 1).merges == [(32, 99)]
    assert train_bpe("ab cd", 3).merges == [(32, 99), (97, 98), (256, 100)]


def test_no_merge_repeats_existing_bytes():
    # Runs of one letter and odd contexts are where two merges could spell the same bytes.
    rng = np.random.default_rng(0)
    for _ in range(100):
        alphabet = rng.choice(["a", "ab", "abc", "aab"])
        words = ["".join(rng.choice(list(alphabet), size=rng.integers(1, 10)))
                 for _ in range(rng.integers(40, 80))]
        text = "".join(w + rng.choice([" ", "  ", ".", ""]) for w in words)
        result = train_bpe(text, 10)
        assert result.skipped == [] and len(set(result.vocab)) == len(result.vocab)


def test_bpe_deterministic(pydocs):
    a = BPETokenizer.train(pydocs[:100_000], 400)
    b = BPETokenizer.train(pydocs[:100_000], 400)
    assert a.merges == b.merges and len(a.merges) == 400 - 257
    assert a.vocab_size == 400 and a.eot_id == 399


def test_bpe_first_merges_are_common_pairs(bpe_pydocs):
    first = [bpe_pydocs.vocab[i] for i in range(256, 266)]
    assert b" t" in first or b"th" in first or b"in" in first
    assert len(set(bpe_pydocs.vocab)) == len(bpe_pydocs.vocab)  # tiktoken needs unique bytes


def test_bpe_reference_equals_tiktoken(pydocs, bpe_pydocs):
    ids = bpe_pydocs.encode(pydocs)
    assert ids == bpe_pydocs.encode_reference(pydocs)
    assert bpe_pydocs.decode(ids) == pydocs
    assert len(ids) < len(pydocs.encode()) / 1.8  # it compresses


def test_bpe_2000_merges_on_shakespeare(shakespeare):
    result = train_bpe(shakespeare, 2000, specials=(ENDOFTEXT,))  # ~1-2 s, incremental counts
    assert len(result.merges) == 2000 and result.skipped == []
    tok = BPETokenizer(result.merges)
    part = shakespeare[:150_000]
    ids = tok.encode(part)
    assert ids == tok.encode_reference(part)
    assert tok.decode(ids) == part
    assert len(ids) < len(part) / 2.5


def test_bpe_unicode_round_trip(bpe_pydocs):
    ids = bpe_pydocs.encode(UNICODE)
    assert ids == bpe_pydocs.encode_reference(UNICODE)
    assert bpe_pydocs.decode(ids) == UNICODE
    assert bpe_pydocs.decode_bytes(ids) == UNICODE.encode()
    assert bpe_pydocs.eot_id in ids                      # <|endoftext|> is the special token
    assert bpe_pydocs.eot_id not in bpe_pydocs.encode_ordinary(UNICODE)


def test_bpe_invalid_utf8_decodes_with_replacement(bpe_pydocs):
    raw = b"ok \xff\xfe \xc3 end"                          # not UTF-8
    ids = list(raw)                                      # byte tokens are the bytes themselves
    assert bpe_pydocs.decode_bytes(ids) == raw
    assert bpe_pydocs.decode(ids) == raw.decode("utf-8", errors="replace")
    emoji = bpe_pydocs.encode("😀")                       # 4 bytes, cut in the middle
    assert bpe_pydocs.decode(emoji[:-1]).startswith("\ufffd")
    assert bpe_pydocs.decode(emoji) == "😀"


def test_bpe_save_load(tmp_path, bpe_pydocs):
    path = bpe_pydocs.save(tmp_path)
    assert json.loads(path.read_text())["kind"] == "bpe"
    back = load_tokenizer(tmp_path)
    assert back.merges == bpe_pydocs.merges and back.vocab_size == bpe_pydocs.vocab_size
    assert back.encode(UNICODE) == bpe_pydocs.encode(UNICODE)


def test_bpe_user_errors(pydocs):
    with pytest.raises(UserError, match="too small"):
        BPETokenizer.train(pydocs, 256)
    with pytest.raises(UserError, match="only supports"):
        BPETokenizer.train("abab abab", 300)
    with pytest.raises(UserError, match="outside the vocabulary"):
        BPETokenizer([]).decode([257])


# ---------------------------------------------------------------- GPT-2

def test_gpt2_ids(gpt2):
    assert gpt2.encode("hello world") == [31373, 995]
    assert gpt2.vocab_size == 50257 and gpt2.eot_id == 50256 and gpt2.name == "gpt2"
    assert gpt2.decode(gpt2.encode(UNICODE)) == UNICODE
    assert gpt2.encode("<|endoftext|>") == [50256]


def test_gpt2_save_load(gpt2, tmp_path):
    gpt2.save(tmp_path)
    assert load_tokenizer(tmp_path).encode("hello world") == [31373, 995]


def test_gpt2_unavailable_is_a_user_error(tmp_path):
    # Fresh process: an empty cache dir and a dead proxy, so tiktoken can neither read nor fetch.
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path), HTTPS_PROXY="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    code = ("from minillm.data import GPT2Tokenizer\nfrom minillm.errors import UserError\n"
            "try:\n    GPT2Tokenizer()\nexcept UserError as e:\n    print('USERERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "USERERROR" in out.stdout, out.stderr
    assert "TIKTOKEN_CACHE_DIR" in out.stdout


# ---------------------------------------------------------------- factory

def test_get_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="unknown tokenizer"):
        get_tokenizer("wordpiece", text="abc")
    with pytest.raises(UserError, match="drop --vocab-size"):
        get_tokenizer("char", text="abc", vocab_size=100)
    with pytest.raises(UserError, match="empty text"):
        get_tokenizer("bpe", text="")
    with pytest.raises(UserError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer"):
        load_tokenizer(tmp_path)


def test_gpt2_wrong_vocab_size(gpt2):
    with pytest.raises(UserError, match="50257"):
        get_tokenizer("gpt2", vocab_size=512)
