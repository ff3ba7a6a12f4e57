"""Byte-level BPE training with incremental pair counts.

The textbook loop (count every adjacent pair in the corpus, merge the most frequent, repeat)
rescans the whole corpus once per merge. Two observations make it fast:

1. Text repeats. Pre-tokenise into words and keep each *unique* word once with its frequency;
   a pair's count is the sum of the frequencies of the words it occurs in.
2. A merge only changes the words that contain the merged pair. Keep an index
   pair -> words containing it; after a merge, re-count just those words and push the
   changed counts onto a heap. The heap may hold stale entries; an entry is trusted only
   if it still equals the live count ("lazy deletion").

Order is deterministic: the most frequent pair wins, ties go to the smallest pair of ids
(the heap orders by (-count, a, b)).

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

from minillm.data.pretokenize import split_specials, split_words
from minillm.errors import UserError


@dataclass
class BPETrainResult:
    merges: list[tuple[int, int]]          # merges[k] made token 256 + k
    vocab: list[bytes]                     # vocab[i] = bytes of token i
    skipped: list[tuple[int, int]] = field(default_factory=list)  # merges folded into old ids


def count_words(text: str, specials=()) -> Counter:
    """Frequency of each pre-tokenised word (special-token strings removed first)."""
    words: Counter = Counter()
    for chunk, is_special in split_specials(text, specials):
        if not is_special:
            words.update(split_words(chunk))
    return words


def _pairs(seq):
    return zip(seq, seq[1:])


def _merge_seq(seq: list[int], a: int, b: int, new: int) -> list[int]:
    """Replace each non-overlapping (a, b), left to right, by ``new``."""
    out, i, n = [], 0, len(seq)
    while i < n:
        if i + 1 < n and seq[i] == a and seq[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def train_bpe(text: str, num_merges: int, specials=(), verbose: bool = False) -> BPETrainResult:
    """Learn ``num_merges`` new tokens from ``text``. Raises UserError if the text runs out."""
    word_counts = count_words(text, specials)
    seqs = [list(w.encode("utf-8")) for w in word_counts]       # the words, as token ids
    freqs = list(word_counts.values())

    counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}                 # pair -> words holding it
    for wi, seq in enumerate(seqs):
        for p in _pairs(seq):
            counts[p] = counts.get(p, 0) + freqs[wi]
            where.setdefault(p, set()).add(wi)
    heap = [(-c, a, b) for (a, b), c in counts.items()]
    heapq.heapify(heap)

    vocab = [bytes([i]) for i in range(256)]
    ids_by_bytes = {v: i for i, v in enumerate(vocab)}
    merges: list[tuple[int, int]] = []
    skipped: list[tuple[int, int]] = []

    while len(merges) < num_merges:
        best = None
        while heap:
            neg, a, b = heapq.heappop(heap)
            if counts.get((a, b), 0) == -neg > 0:               # a live entry, not a stale one
                best = (a, b)
                break
        if best is None:
            raise UserError(f"the training text only supports {len(merges)} BPE merges, "
                            f"{num_merges} were asked for; lower --vocab-size or use more text")
        a, b = best
        merged = vocab[a] + vocab[b]
        new = ids_by_bytes.get(merged)
        if new is None:
            new = len(vocab)
            vocab.append(merged)
            ids_by_bytes[merged] = new
            merges.append(best)
            if verbose:
                print(f"merge {len(merges):5d}: {vocab[a]!r} + {vocab[b]!r} -> {merged!r} "
                      f"(count {counts[best]})")
        else:
            skipped.append(best)

        changed = set()
        for wi in list(where.get(best, ())):
            old = seqs[wi]
            seq = _merge_seq(old, a, b, new)
            f = freqs[wi]
            for p in _pairs(old):                               # take the old word out ...
                counts[p] -= f
                changed.add(p)
            for p in _pairs(seq):                               # ... and put the new one in
                counts[p] = counts.get(p, 0) + f
                changed.add(p)
            for p in set(_pairs(old)) - set(_pairs(seq)):
                where[p].discard(wi)
            for p in _pairs(seq):
                where.setdefault(p, set()).add(wi)
            seqs[wi] = seq
        for p in changed:
            c = counts[p]
            if c > 0:
                heapq.heappush(heap, (-c, p[0], p[1]))
            else:
                del counts[p]
                where.pop(p, None)
    return BPETrainResult(merges=merges, vocab=vocab, skipped=skipped)
