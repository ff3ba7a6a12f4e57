"""Byte-level BPE training with incremental pair counts.

The textbook loop (count every adjacent pair in the corpus, merge the most frequent, repeat)
rescans the whole corpus once per merge. Three observations make it fast:

1. Text repeats. Pre-tokenise into words and keep each *unique* word once with its frequency;
   a pair's count is the sum of the frequencies of the words it occurs in. Counting is the only
   pass over the text, and it runs in parallel: the text is cut into chunks at special-token
   strings (which are dropped: they are never merged, and become single ids of their own) and,
   inside long stretches, at places where the pre-tokeniser cuts anyway (``safe_cut``), so the
   chunks' counts add up to exactly the whole text's.
2. A merge only changes the words that contain the merged pair. Keep an index
   pair -> words containing it; after a merge, visit just those words and push the changed
   counts onto a heap. The heap may hold stale entries; an entry is trusted only if it still
   equals the live count ("lazy deletion"). The index is lazy too: a word that lost a pair stays
   listed under it and is skipped when visited.
3. Inside a word only the pairs next to a merged occurrence change: ``x a b y`` loses
   ``(x, a) (a, b) (b, y)`` and gains ``(x, ab) (ab, y)``. Each word is kept as a Python ``str``
   whose characters stand for token ids (``_ch``), so finding and replacing the pair is
   ``str.find`` / ``str.replace`` at C speed, and only the neighbours are touched in Python.

Tie rule (deterministic, independent of word order and of the number of workers): the most
frequent pair wins; among equally frequent pairs the smallest ``(a, b)`` of token ids (the heap
orders by ``(-count, a, b)``). Since byte ids are the byte values, the first ties go to the
lexicographically smallest byte pair.

Token ids: 0..255 are the raw bytes, each new merge gets the next id. tiktoken needs one id
per byte string, and in general two merges can spell the same bytes (("ab","c") after
("a","bc")). A merge whose bytes already are a token gets no new id: its occurrences are
rewritten to that token, which is what the byte-keyed encoder does too. With this trainer
it should never fire: a stretch of a word whose ends no merge has crossed evolves exactly as
it would as a word of its own, so every copy of the same bytes is cut the same way and the
pair that first formed them has merged them everywhere. The tests check that on real text.
"""
from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field

from minillm.data.pool import ordered_map
from minillm.data.pretokenize import fast_split_words, first_safe_cut, split_specials
from minillm.errors import UserError

PARALLEL_MIN_CHARS = 4_000_000   # below this, starting worker processes costs more than it saves


@dataclass
class BPETrainResult:
    merges: list[tuple[int, int]]          # merges[k] made token 256 + k
    vocab: list[bytes]                     # vocab[i] = bytes of token i
    skipped: list[tuple[int, int]] = field(default_factory=list)  # merges folded into old ids


def _ch(i: int) -> str:
    """The character that stands for token id ``i`` in a word string (surrogates skipped)."""
    return chr(i if i < 0xD800 else i + 0x800)


def _id(c: str) -> int:
    i = ord(c)
    return i if i < 0xD800 else i - 0x800


def _count_pieces(pieces: list[str]) -> Counter:
    words: Counter = Counter()
    for piece in pieces:
        words.update(fast_split_words(piece))
    return words


def count_chunks(text: str, specials=(), n_chunks: int = 1) -> list[list[str]]:
    """``text`` without its special-token strings, as up to ``n_chunks`` lists of pieces of about
    equal length, cut where pre-tokenisation cuts anyway (so counts over them add up exactly)."""
    target = max(1, len(text) // max(1, n_chunks))
    pieces = []
    for piece, is_special in split_specials(text, specials):
        while not is_special and len(piece) > target:
            cut = first_safe_cut(piece, target)
            if cut < 0:
                break
            pieces.append(piece[:cut])
            piece = piece[cut:]
        if not is_special:
            pieces.append(piece)
    chunks: list[list[str]] = [[]]
    size = 0
    for piece in pieces:
        if size >= target and len(chunks) < n_chunks:
            chunks.append([])
            size = 0
        chunks[-1].append(piece)
        size += len(piece)
    return chunks


def count_words(text: str, specials=(), workers: int = 1) -> Counter:
    """Frequency of each pre-tokenised word (special-token strings removed first).

    With ``workers > 1`` (and a text worth it) the counting is split over processes; the
    result is the same Counter either way.
    """
    workers = max(1, int(workers))
    if workers == 1 or len(text) < PARALLEL_MIN_CHARS:
        return _count_pieces([p for p, is_special in split_specials(text, specials)
                              if not is_special])
    words: Counter = Counter()
    for part in ordered_map(_count_pieces, count_chunks(text, specials, 4 * workers), workers):
        words.update(part)
    return words


def train_bpe(text: str, num_merges: int, specials=(), verbose: bool = False,
              workers: int = 1) -> BPETrainResult:
    """Learn ``num_merges`` new tokens from ``text``. Raises UserError if the text runs out."""
    return train_from_counts(count_words(text, specials, workers), num_merges, verbose)


def _initial_counts(words: list[str], freqs: list[int]):
    counts: dict[str, int] = {}
    where: dict[str, set[int]] = {}               # pair -> words that held it (lazily pruned)
    for wi, w in enumerate(words):
        f = freqs[wi]
        for k in range(len(w) - 1):
            p = w[k:k + 2]
            counts[p] = counts.get(p, 0) + f
            s = where.get(p)
            if s is None:
                where[p] = s = set()
            s.add(wi)
    return counts, where


def train_from_counts(word_counts, num_merges: int, verbose: bool = False) -> BPETrainResult:
    """Learn ``num_merges`` merges from a ``{word: frequency}`` mapping (see the module doc)."""
    # A pair is a 2-character string; word strings start as one character per UTF-8 byte.
    words = [w.encode("utf-8").decode("latin-1") for w in word_counts]
    freqs = list(word_counts.values())
    counts, where = _initial_counts(words, freqs)
    heap = [(-c, _id(p[0]), _id(p[1])) for p, c in counts.items()]
    heapq.heapify(heap)

    vocab = [bytes([i]) for i in range(256)]
    ids_by_bytes = {v: i for i, v in enumerate(vocab)}
    merges: list[tuple[int, int]] = []
    skipped: list[tuple[int, int]] = []

    while len(merges) < num_merges:
        ab = None
        while heap:
            neg, a, b = heapq.heappop(heap)
            ab = _ch(a) + _ch(b)
            if counts.get(ab, 0) == -neg > 0:                   # a live entry, not a stale one
                break
            ab = None
        if ab is None:
            raise UserError(f"the training text only supports {len(merges)} BPE merges, "
                            f"{num_merges} were asked for; lower --vocab-size or use more text")
        merged = vocab[a] + vocab[b]
        new = ids_by_bytes.get(merged)
        if new is None:
            new = len(vocab)
            vocab.append(merged)
            ids_by_bytes[merged] = new
            merges.append((a, b))
            if verbose:
                print(f"merge {len(merges):5d}: {vocab[a]!r} + {vocab[b]!r} -> {merged!r} "
                      f"(count {counts[ab]})")
        else:
            skipped.append((a, b))
        delta = _apply_merge(words, freqs, where, ab, _ch(new))
        for p, d in delta.items():
            if d == 0:
                continue
            c = counts.get(p, 0) + d
            if c > 0:
                counts[p] = c
                heapq.heappush(heap, (-c, _id(p[0]), _id(p[1])))
            else:
                counts.pop(p, None)
                where.pop(p, None)
    return BPETrainResult(merges=merges, vocab=vocab, skipped=skipped)


def _apply_merge(words: list[str], freqs: list[int], where: dict, ab: str, cn: str) -> dict:
    """Rewrite ``ab`` -> ``cn`` in every word listed under ``ab``; return the pair-count changes.

    Occurrences are merged left to right without overlap (``str.replace``). Around each one at
    ``i``: the left pair ``(w[i-1], a)`` becomes ``(w[i-1], ab)``, or, right after another
    occurrence, ``(ab, ab)`` (its old ``(b, a)`` was already taken out as that one's right pair);
    the right pair ``(b, w[i+2])`` goes, and ``(ab, w[i+2])`` comes unless another occurrence
    starts at ``i + 2``.
    """
    ca, cb = ab
    delta: dict[str, int] = {}
    get = delta.get
    gained = []
    for wi in where.pop(ab):
        w = words[wi]
        i = w.find(ab)
        if i < 0:
            continue                                            # a stale index entry
        f, n, after = freqs[wi], len(w), -1
        while i >= 0:
            if i > 0:
                if i != after:
                    p = w[i - 1] + ca
                    delta[p] = get(p, 0) - f
                    p = w[i - 1] + cn
                else:
                    p = cn + cn
                delta[p] = get(p, 0) + f
                gained.append((p, wi))
            delta[ab] = get(ab, 0) - f
            nxt = w.find(ab, i + 2)
            if i + 2 < n:
                p = cb + w[i + 2]
                delta[p] = get(p, 0) - f
                if nxt != i + 2:
                    p = cn + w[i + 2]
                    delta[p] = get(p, 0) + f
                    gained.append((p, wi))
            after, i = i + 2, nxt
        words[wi] = w.replace(ab, cn)
    for p, wi in gained:
        s = where.get(p)
        if s is None:
            where[p] = s = set()
        s.add(wi)
    return delta
