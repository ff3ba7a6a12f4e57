"""Heuristic quality filters in the style of Gopher's rules (Rae et al. 2021, appendix A) and C4's.

Each rule looks at one document and says whether it fails; ``first_failure`` returns the name of
the first rule (in ``RULES`` order) that a document fails, or None to keep it. The pipeline counts
removals per rule (documents and bytes) for the report. Words are white-space separated tokens;
lines are separated by ``\\n``; blank lines are ignored in the line rules.

rule               removes a document when ...                             default (Gopher / C4)
min_words          it has fewer than ``min_words`` words                    50
max_words          it has more than ``max_words`` words                     100,000
mean_word_length   the mean word length is outside [min, max] characters    [3, 10]
symbol_ratio       ('#' + '...' + '…') per word is above the limit           0.1
bullet_lines       the share of lines starting with a bullet is above        0.9
ellipsis_lines     the share of lines ending in '...' or '…' is above        0.3
alpha_words        the share of words holding a letter is below              0.8
stop_words         it holds fewer than ``min_stop_words`` of                 2
                   the, be, to, of, and, that, have, with (distinct)
dup_lines          the share of lines that repeat an earlier line is above  0.3
dup_line_chars     the share of characters in such repeated lines is above  0.2
top_2gram          the most frequent word 2-gram covers more than this       0.2
                   share of the characters in words
lorem_ipsum        it contains "lorem ipsum" (any case)                      (C4)

These rules were written for English web text: code, verse or other languages can fail them
(``stop_words``, ``mean_word_length``), which is why the set is chosen per corpus (``rules``).
"""
from __future__ import annotations

import functools
import operator
import re
from collections import Counter
from itertools import compress
from dataclasses import dataclass, fields

from minillm.choices import FILTER_RULES
from minillm.errors import UserError

RULES = FILTER_RULES  # the one list, in the order rules are tried: minillm.choices
STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
BULLETS = ("•", "-", "*", "‣", "◦", "·", "–")
_HAS_LETTER = re.compile(r"[^\W\d_]")   # word characters that are not digits or "_"
_LOREM = re.compile("lorem ipsum", re.IGNORECASE)


@dataclass
class FilterConfig:
    rules: tuple = RULES                    # the rules applied, a subset of RULES
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_ratio: float = 0.1
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    min_alpha_words: float = 0.8
    min_stop_words: int = 2
    max_dup_lines: float = 0.3
    max_dup_line_chars: float = 0.2
    max_top_2gram: float = 0.2

    def __post_init__(self):
        self.rules = tuple(self.rules)
        unknown = [r for r in self.rules if r not in RULES]
        if unknown:
            raise UserError(f"unknown filter rule {unknown[0]!r}; choose from: {', '.join(RULES)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "rules" and not value >= 0:
                raise UserError(f"filter setting {f.name}={value} must be >= 0")


class _Doc:
    """What the rules look at, each computed once per document, when first needed."""

    def __init__(self, text: str):
        self.text = text

    @functools.cached_property
    def words(self) -> list:                # lower-cased: the rules never need the case
        return self.text.lower().split()

    @functools.cached_property
    def counts(self) -> Counter:
        return Counter(self.words)

    @functools.cached_property
    def lines(self) -> list:
        return [ln for ln in self.text.split("\n") if ln.strip()]

    @functools.cached_property
    def repeats(self) -> tuple[float, float]:
        return _repeats(self)


def _mean_word_length(d: _Doc, c: FilterConfig) -> bool:
    if not d.words:
        return True
    mean = sum(map(len, d.words)) / len(d.words)
    return not c.min_mean_word_length <= mean <= c.max_mean_word_length


def _symbol_ratio(d: _Doc, c: FilterConfig) -> bool:
    symbols = d.text.count("#") + d.text.count("...") + d.text.count("…")
    return symbols > c.max_symbol_ratio * max(1, len(d.words))


def _share(lines, test) -> float:
    return sum(1 for ln in lines if test(ln)) / len(lines) if lines else 0.0


def repeated_lines(text: str) -> tuple[float, float]:
    """(share of the non-blank lines that repeat an earlier line, share of their characters)."""
    return _Doc(text).repeats


def _repeats(d: _Doc) -> tuple[float, float]:
    seen, n_rep, c_rep = set(), 0, 0
    for ln in d.lines:
        if ln in seen:
            n_rep += 1
            c_rep += len(ln)
        else:
            seen.add(ln)
    total = sum(map(len, d.lines))
    return (n_rep / len(d.lines) if d.lines else 0.0), (c_rep / total if total else 0.0)


def _top_2gram(d: _Doc, c: FilterConfig) -> bool:
    words = d.words
    if len(words) < 2:
        return False
    total = sum(map(len, words))
    # A 2-gram (a, b) occurs at most count(a) and count(b) times, so its share is at most
    # 2 * max over words of count * length / total: usually far below the limit, and then the
    # 2-grams need no counting. (map/compress below iterate in C: these run on every document.)
    if 2 * max(map(operator.mul, d.counts.values(), map(len, d.counts))) <= c.max_top_2gram * total:
        return False
    (a, b), n = Counter(zip(words, words[1:])).most_common(1)[0]
    return n > 1 and n * (len(a) + len(b)) / total > c.max_top_2gram


_TESTS = {
    "min_words": lambda d, c: len(d.words) < c.min_words,
    "max_words": lambda d, c: len(d.words) > c.max_words,
    "mean_word_length": _mean_word_length,
    "symbol_ratio": _symbol_ratio,
    "bullet_lines": lambda d, c: _share(d.lines, lambda ln: ln.lstrip().startswith(BULLETS))
    > c.max_bullet_lines,
    "ellipsis_lines": lambda d, c: _share(d.lines, lambda ln: ln.rstrip().endswith(("...", "…")))
    > c.max_ellipsis_lines,
    "alpha_words": lambda d, c: bool(d.words) and sum(compress(d.counts.values(), map(
        _HAS_LETTER.search, d.counts))) < c.min_alpha_words * len(d.words),
    "stop_words": lambda d, c: len(STOP_WORDS & d.counts.keys()) < c.min_stop_words,
    "dup_lines": lambda d, c: d.repeats[0] > c.max_dup_lines,
    "dup_line_chars": lambda d, c: d.repeats[1] > c.max_dup_line_chars,
    "top_2gram": _top_2gram,
    "lorem_ipsum": lambda d, c: _LOREM.search(d.text) is not None,
}


def failed_rules(text: str, config: FilterConfig | None = None) -> list[str]:
    """Every rule of ``config.rules`` that ``text`` fails (for inspection and the tests)."""
    config = config or FilterConfig()
    d = _Doc(text)
    return [r for r in config.rules if _TESTS[r](d, config)]


def first_failure(text: str, config: FilterConfig | None = None) -> str | None:
    """The first rule of ``config.rules`` (in ``RULES`` order) that ``text`` fails, or None."""
    config = config or FilterConfig()
    d = _Doc(text)
    for r in RULES:
        if r in config.rules and _TESTS[r](d, config):
            return r
    return None
