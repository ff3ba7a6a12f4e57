"""Synthetic text corpora for tests, lessons and benchmarks: English-like documents with planted
exact duplicates, near duplicates and junk, each labelled, so a pipeline's decisions can be scored.

Words follow Zipf's law over a vocabulary whose most frequent entries are real English function
words (so stop-word rules see English) and the rest pseudo-words built from syllables (so BPE has
a realistic long tail of rare words). Everything is a function of the seed.

Labels: ``"unique"``, ``"exact:I"`` (a byte copy of document I), ``"near:I"`` (document I with
about ``near_edit`` of its words replaced and a new first line), ``"junk:RULE"`` (made to fail
the quality rule RULE of ``minillm.data.filters``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STOP = ("the of and to a in is that it was for on are as with be by at this have from or "
        "had not but what all were when we there can an your which their said if do will each "
        "about how up out them then she many some so these would other into has more her two "
        "like him see time could no make than first been its who now people my made over did "
        "down only way find use may water long little very after words called just where most "
        "know").split()
_ONSET = "b c d f g h j k l m n p r s t v w z br cr dr fr gr pl pr st tr ch sh th".split()
_VOWEL = "a e i o u ai ea ee oo ou ie".split()
_CODA = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "rt"]


def make_vocabulary(size: int, seed: int = 0) -> list[str]:
    """``size`` distinct words: English function words first, then syllable pseudo-words of
    one to three syllables, shorter ones first (so they are the more frequent ones)."""
    rng = np.random.default_rng([seed, 1])
    words, seen = list(STOP), set(STOP)
    while len(words) < size:
        m = 4 * (size - len(words)) + 64
        n_syl = rng.choice([1, 2, 2, 3, 3, 3], size=m)
        parts = [np.array(a, dtype=object)[rng.integers(0, len(a), size=(m, 3))]
                 for a in (_ONSET, _VOWEL, _CODA)]
        fresh = []
        for i in range(m):
            w = "".join(parts[0][i, k] + parts[1][i, k] + parts[2][i, k] for k in range(n_syl[i]))
            if w not in seen:
                seen.add(w)
                fresh.append(w)
        words.extend(sorted(fresh, key=len))
    return words[:size]


class WordSampler:
    """Draws Zipf-distributed words (rank r has probability proportional to 1 / r**s)."""

    def __init__(self, vocab_size: int = 50_000, s: float = 1.1, seed: int = 0):
        self.words = np.array(make_vocabulary(vocab_size, seed), dtype=object)
        p = 1.0 / np.arange(1, vocab_size + 1) ** s
        self.cdf = np.cumsum(p / p.sum())

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.words[np.minimum(np.searchsorted(self.cdf, rng.random(n)), len(self.cdf) - 1)]

    def paragraph(self, rng: np.random.Generator, n_words: int) -> str:
        """Sentences of 4-24 words, capitalised, ending in . ? or !, commas and numbers sprinkled."""
        words = self.draw(rng, n_words).tolist()
        lengths = rng.integers(4, 25, size=n_words // 4 + 1)
        u = rng.random((len(lengths), 3))
        out, i = [], 0
        for k, (comma, number, end) in zip(lengths, u):
            if i >= len(words):
                break
            sent = words[i:i + k]
            i += k
            sent[0] = sent[0].capitalize()
            if len(sent) > 6 and comma < 0.5:
                sent[len(sent) // 2] += ","
            if number < 0.1:
                sent.insert(1, str(int(number * 30000)))
            out.append(" ".join(sent) + ("?" if end < 0.1 else "!" if end < 0.15 else "."))
        return " ".join(out)

    def document(self, rng: np.random.Generator, mean_words: int = 300) -> str:
        """A title line and paragraphs of 20-200 words separated by blank lines."""
        n = max(60, int(rng.exponential(mean_words)))
        title = " ".join(self.draw(rng, int(rng.integers(2, 7))).tolist()).title()
        sizes = []
        while n > 0:
            k = min(n, int(rng.integers(20, 200)))
            sizes.append(k)
            n -= k
        return title + "\n\n" + "\n\n".join(self.paragraph(rng, k) for k in sizes)


def near_copy(doc: str, rng: np.random.Generator, sampler: WordSampler, edit: float) -> str:
    """``doc`` with a new first line and about ``edit`` of its words replaced by random words."""
    lines = doc.split("\n")
    lines[0] = " ".join(sampler.draw(rng, 4).tolist()).title()
    words = "\n".join(lines).split(" ")
    for i in np.flatnonzero(rng.random(len(words)) < edit):
        words[i] = str(sampler.draw(rng, 1)[0])
    return " ".join(words)


def junk_document(kind: str, rng: np.random.Generator, sampler: WordSampler) -> str:
    """A document made to fail one quality rule (see ``minillm.data.filters.RULES``)."""
    if kind == "min_words":
        return " ".join(sampler.draw(rng, int(rng.integers(3, 30))).tolist()) + "."
    if kind == "symbol_ratio":
        return " ".join(f"#{w} ..." for w in sampler.draw(rng, 120).tolist())
    if kind == "dup_lines":
        line = sampler.paragraph(rng, 12)
        return "\n".join([line] * 20 + [sampler.paragraph(rng, 12) for _ in range(3)])
    if kind == "bullet_lines":
        return "\n".join("- " + sampler.paragraph(rng, 8) for _ in range(15))
    if kind == "mean_word_length":
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        return " ".join("".join(rng.choice(letters, 16)) for _ in range(120))
    if kind == "alpha_words":
        return " ".join(str(int(x)) for x in rng.integers(0, 10 ** 6, 150))
    if kind == "lorem_ipsum":
        return "Lorem ipsum dolor sit amet. " + sampler.paragraph(rng, 120)
    raise ValueError(f"unknown junk kind {kind!r}")


JUNK_KINDS = ("min_words", "symbol_ratio", "dup_lines", "bullet_lines", "mean_word_length",
              "alpha_words", "lorem_ipsum")


@dataclass
class CorpusSpec:
    n_docs: int = 1000
    mean_words: int = 300
    exact_rate: float = 0.05      # fraction of documents that are byte copies of earlier ones
    near_rate: float = 0.05       # ... that are near copies (see ``near_edit``)
    near_edit: float = 0.01       # fraction of words a near copy replaces (J ~ 0.9 on 5-grams)
    junk_rate: float = 0.05       # ... that fail one quality rule, kinds in turn
    vocab_size: int = 50_000
    seed: int = 0


def generate(spec: CorpusSpec):
    """Yield ``(document, label)`` pairs; duplicates copy a random earlier unique document."""
    rng = np.random.default_rng([spec.seed, 2])
    sampler = WordSampler(spec.vocab_size, seed=spec.seed)
    originals: list[tuple[int, str]] = []     # a bounded pool of unique documents to copy from
    n_junk = 0
    for i in range(spec.n_docs):
        u = rng.random()
        if originals and u < spec.exact_rate:
            j, src = originals[int(rng.integers(len(originals)))]
            yield src, f"exact:{j}"
        elif originals and u < spec.exact_rate + spec.near_rate:
            j, src = originals[int(rng.integers(len(originals)))]
            yield near_copy(src, rng, sampler, spec.near_edit), f"near:{j}"
        elif spec.exact_rate + spec.near_rate <= u < spec.exact_rate + spec.near_rate + spec.junk_rate:
            kind = JUNK_KINDS[n_junk % len(JUNK_KINDS)]
            n_junk += 1
            yield junk_document(kind, rng, sampler), f"junk:{kind}"
        else:
            doc = sampler.document(rng, spec.mean_words)
            if len(originals) < 2000:
                originals.append((i, doc))
            else:
                originals[int(rng.integers(len(originals)))] = (i, doc)
            yield doc, "unique"
