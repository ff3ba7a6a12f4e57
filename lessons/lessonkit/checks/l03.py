"""Checks of lesson 03 (tokenization): against minillm's CharTokenizer and BPE trainer."""
from collections import Counter

from lessonkit.exercise import exercise
from minillm.data import CharTokenizer, load_source, train_bpe
from minillm.data.bpe_train import count_words

_SAMPLES = ["def f(x):\n    return x * 2  # double\n", "The interpreter evaluates the expression list."]


def _first_seen_order(text):  # a plausible slip: ids in order of first appearance, not sorted
    chars = list(dict.fromkeys(text))
    return (lambda s: [chars.index(c) for c in s]), (lambda ids: "".join(chars[i] for i in ids))


@exercise("03.char_codec", broken=_first_seen_order)
def check_char_codec(char_codec):
    text = load_source("pydocs")[:50_000]
    encode, decode = char_codec(text)
    library = CharTokenizer.train(text)
    for s in _SAMPLES:
        got, want = list(encode(s)), library.encode(s)
        if got != want:
            i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise AssertionError(f"encode({s[:20]!r}...) differs from minillm's CharTokenizer at "
                                 f"character {i} ({s[i]!r}): {got[i:i + 1]} instead of {want[i:i + 1]}. "
                                 "Hint: the vocabulary is the sorted set of the text's characters, "
                                 "and a character's id is its position there")
        back = decode(want)
        if back != s:
            raise AssertionError(f"decode(encode(s)) gives {back[:30]!r}, not {s[:30]!r}")


def word_ids(text):
    """{word as a tuple of byte ids: frequency}: the input of a BPE training step."""
    return {tuple(w.encode("utf-8")): n for w, n in count_words(text).items()}


def _max_without_ties(words):  # a plausible slip: the first pair with the top count, no tie rule
    counts = Counter()
    for w, n in words.items():
        for p in zip(w, w[1:]):
            counts[p] += n
    return max(counts, key=counts.get)


@exercise("03.most_frequent_pair", broken=_max_without_ties)
def check_most_frequent_pair(most_frequent_pair):
    for text in ["ba ab", "aaa bbb aaa", load_source("pydocs")[:20_000]]:
        got = most_frequent_pair(word_ids(text))
        want = train_bpe(text, 1).merges[0]
        assert tuple(got) == want, (
            f"for the words of {text[:20]!r}: {tuple(got)}, but minillm's trainer merges {want} "
            "first. Hint: count every adjacent pair inside each word, weighted by the word's "
            "frequency; on a tie take the smallest pair (compare (a, b) tuples)")


def _merge_overlapping(ids, pair, new_id):  # a plausible slip: merges overlapping occurrences
    out = []
    for i in range(len(ids)):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == tuple(pair):
            out.append(new_id)
        elif not (i > 0 and (ids[i - 1], ids[i]) == tuple(pair)):
            out.append(ids[i])
    return out


@exercise("03.merge", broken=_merge_overlapping)
def check_merge(merge):
    cases = [([1, 2, 3, 1, 2], (1, 2), 9, [9, 3, 9]), ([1, 1, 1], (1, 1), 9, [9, 1]),
             ([1, 1, 1, 1], (1, 1), 9, [9, 9]), ([2, 1], (1, 2), 9, [2, 1]), ([], (1, 2), 9, [])]
    for ids, pair, new_id, want in cases:
        got = list(merge(list(ids), pair, new_id))
        assert got == want, (f"merge({ids}, {pair}, {new_id}) = {got}, expected {want}. Hint: scan "
                             "left to right; after replacing a pair, continue after its second "
                             "element, so occurrences never overlap")
    # the real thing: 30 steps of BPE on pydocs with your merge give minillm's 30 merges
    text = load_source("pydocs")[:20_000]
    words, merges = word_ids(text), []
    for k in range(30):
        counts = Counter()
        for w, n in words.items():
            for p in zip(w, w[1:]):
                counts[p] += n
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        merged = Counter()
        for w, n in words.items():
            merged[tuple(merge(list(w), pair, 256 + k))] += n
        words = merged
    want = train_bpe(text, 30).merges
    bad = next((k for k in range(30) if merges[k] != want[k]), None)
    assert bad is None, (f"training with your merge, merge {bad} is {merges[bad]} but minillm's "
                         f"trainer makes {want[bad]}")
