"""The BPE trainer at scale: equal to the previous trainer, special tokens, parallel counting,
and ``encode_iterable`` equal to whole-text encoding on every tokenizer."""
import heapq
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from minillm.data import bpe_train
from minillm.data.bpe_train import count_chunks, count_words, train_bpe, train_from_counts
from minillm.data.pretokenize import safe_chunks, split_words
from minillm.data.tokenizers import ENDOFTEXT, BPETokenizer, CharTokenizer, GPT2Tokenizer

TIKTOKEN_CACHE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiktoken_cache"


def previous_trainer(word_counts, num_merges):
    """The trainer before this change (whole-word recounts), kept as the reference."""
    seqs = [list(w.encode()) for w in word_counts]
    freqs = list(word_counts.values())
    counts, where = {}, {}
    for wi, seq in enumerate(seqs):
        for p in zip(seq, seq[1:]):
            counts[p] = counts.get(p, 0) + freqs[wi]
            where.setdefault(p, set()).add(wi)
    heap = [(-c, a, b) for (a, b), c in counts.items()]
    heapq.heapify(heap)
    vocab = [bytes([i]) for i in range(256)]
    merges = []
    while len(merges) < num_merges:
        while True:
            neg, a, b = heapq.heappop(heap)
            if counts.get((a, b), 0) == -neg > 0:
                break
        new = len(vocab)
        vocab.append(vocab[a] + vocab[b])
        merges.append((a, b))
        changed = set()
        for wi in list(where.get((a, b), ())):
            old, seq, i = seqs[wi], [], 0
            while i < len(old):
                if i + 1 < len(old) and old[i] == a and old[i + 1] == b:
                    seq.append(new)
                    i += 2
                else:
                    seq.append(old[i])
                    i += 1
            for p in zip(old, old[1:]):
                counts[p] -= freqs[wi]
                changed.add(p)
            for p in zip(seq, seq[1:]):
                counts[p] = counts.get(p, 0) + freqs[wi]
                changed.add(p)
                where.setdefault(p, set()).add(wi)
            seqs[wi] = seq
        for p in changed:
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], *p))
            else:
                del counts[p]
    return merges


def test_trainer_equals_previous_trainer_on_real_text(shakespeare):
    words = count_words(shakespeare[:300_000])
    assert train_from_counts(words, 600).merges == previous_trainer(words, 600)


def test_trainer_equals_previous_trainer_on_runs_and_repeats():
    # Runs of one letter and alternations are where neighbouring occurrences overlap.
    rng = np.random.default_rng(0)
    for _ in range(60):
        alphabet = list(rng.choice(["a", "ab", "abc", "aab"]))
        words = Counter("".join(rng.choice(alphabet, size=rng.integers(1, 12)))
                        for _ in range(rng.integers(20, 60)))
        n = min(8, sum(max(0, len(w) - 1) for w in words) // 3)
        try:
            expected = previous_trainer(words, n)
        except IndexError:                              # the text ran out of pairs
            continue
        assert train_from_counts(words, n).merges == expected


def test_special_tokens_are_never_merged_and_encode_as_single_ids():
    specials = [ENDOFTEXT, "<|pad|>"]
    text = "".join(f"hello world {i % 7}{ENDOFTEXT}<|pad|>" for i in range(300))
    tok = BPETokenizer.train(text, 256 + 10 + len(specials), specials=specials)
    assert tok.special_tokens == {ENDOFTEXT: 266, "<|pad|>": 267} and tok.vocab_size == 268
    assert not any(b"|" in v or b"<" in v for v in tok.vocab[256:])   # no merge crosses into one
    ids = tok.encode(f"hello{ENDOFTEXT}<|pad|>world")
    assert ids.count(266) == 1 and ids.count(267) == 1
    assert tok.decode(ids) == f"hello{ENDOFTEXT}<|pad|>world"
    assert 266 not in tok.encode_ordinary(ENDOFTEXT)


def test_chunks_for_parallel_counting_add_up(shakespeare):
    text = shakespeare[:200_000] + ENDOFTEXT + "tail  words\n\n" + ENDOFTEXT
    for n in (1, 3, 8):
        chunks = count_chunks(text, [ENDOFTEXT], n)
        assert 1 <= len(chunks) <= n
        assert "".join(p for c in chunks for p in c) == text.replace(ENDOFTEXT, "")
        counted = Counter(w for c in chunks for p in c for w in split_words(p))
        assert counted == count_words(text, [ENDOFTEXT])


def test_parallel_counting_equals_serial(shakespeare, monkeypatch):
    monkeypatch.setattr(bpe_train, "PARALLEL_MIN_CHARS", 0)     # real worker processes, small text
    text = shakespeare[:100_000] + ENDOFTEXT + shakespeare[-50_000:]
    assert count_words(text, (ENDOFTEXT,), workers=2) == count_words(text, (ENDOFTEXT,))
    assert train_bpe(text, 200, specials=(ENDOFTEXT,), workers=2).merges == \
        train_bpe(text, 200, specials=(ENDOFTEXT,)).merges


# ---------------------------------------------------------------- encode_iterable

TRICKY = ("Hello, wörld!  double  spaces\n\n\n tabs\t\tand\r\nCRLF's we'll 12345 ++--\u00a0nbsp "
          "😀👍🏽 e\u0301 <|endoftext|>after\x1c\x1dcontrol   \n  trailing   ")


def _random_pieces(text, rng, max_len=40):
    out, i = [], 0
    while i < len(text):
        k = int(rng.integers(1, max_len))
        out.append(text[i:i + k])
        i += k
    return out


def _tokenizers(shakespeare):
    chars = sorted(set(shakespeare + TRICKY))
    toks = [CharTokenizer(chars, {ENDOFTEXT: len(chars)}),
            BPETokenizer.train(shakespeare[:200_000], 400)]
    if TIKTOKEN_CACHE.is_dir():
        import os
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
        toks.append(GPT2Tokenizer())
    return toks


def test_encode_iterable_equals_whole_text_encode(shakespeare):
    rng = np.random.default_rng(0)
    text = (TRICKY * 50 + shakespeare[:150_000] + TRICKY) * 2
    for tok in _tokenizers(shakespeare):
        whole = tok.encode(text)
        assert list(tok.encode_iterable(text.splitlines(keepends=True))) == whole, tok.name
        assert list(tok.encode_iterable(_random_pieces(text, rng))) == whole, tok.name
        assert list(tok.encode_iterable(iter([text]))) == whole
    # no white space for a long stretch: the chunker waits for a safe cut instead of cutting
    blob = "x" * 200_000 + " y"
    assert list(safe_chunks([blob[i:i + 1000] for i in range(0, len(blob), 1000)])) == [blob]


def test_encode_iterable_memory_is_bounded(shakespeare):
    """4 MB of text streamed through encode_iterable with a traced peak far below that."""
    tok = CharTokenizer.train(shakespeare)
    lines = shakespeare.splitlines(keepends=True)
    total = 0

    def stream():
        nonlocal total
        while total < 4_000_000:
            for line in lines:
                total += len(line)
                yield line

    tracemalloc.start()
    n = sum(1 for _ in tok.encode_iterable(stream()))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert total >= 4_000_000 and n == total
    assert peak < 2_000_000, peak                       # 64K-character chunks, not the stream
