"""Checks of lesson 03b (the data pipeline: MinHash, LSH bands, a quality rule)."""
import numpy as np

from lessonkit.exercise import exercise
from minillm.data.filters import repeated_lines
from minillm.data.minhash import MinHasher, candidate_probability


def _max_instead_of_min(x, a, b):
    v = a[:, None] * np.asarray(x, dtype=np.uint64)[None, :] + b[:, None]
    return (v.max(axis=1) >> np.uint64(32)).astype(np.uint32)


@exercise("03b.minhash_signature", broken=_max_instead_of_min)
def check_minhash_signature(minhash_signature):
    """The learner's signature against the library's MinHasher on random shingle sets."""
    rng = np.random.default_rng(0)
    mh = MinHasher(bands=4, rows=4, seed=1)
    for n in (1, 7, 300):
        x = rng.integers(0, 2 ** 32, size=n, dtype=np.uint64)
        want = mh.signatures_of_sets(x)[0]
        got = np.asarray(minhash_signature(x, mh.a.copy(), mh.b.copy()))
        assert got.shape == want.shape, (f"a signature has one value per hash function: shape "
                                         f"{want.shape}, yours is {got.shape}")
        bad = np.flatnonzero(got.astype(np.uint64) != want.astype(np.uint64))
        assert not bad.size, (f"with {n} shingles, hash function {bad[0]} gives {got[bad[0]]}, "
                              f"expected {want[bad[0]]}. Hint: the minimum over shingles of "
                              "(a*x + b) in uint64 (it wraps mod 2**64), then >> 32")


@exercise("03b.band_probability", broken=lambda s, bands, rows: 1 - (1 - s ** bands) ** rows)
def check_band_probability(band_probability):
    for bands, rows in ((20, 6), (8, 4), (1, 1), (50, 2)):
        for s in (0.0, 0.3, 0.6, 0.8, 1.0):
            want = float(candidate_probability(s, bands, rows))
            got = float(band_probability(s, bands, rows))
            assert abs(got - want) < 1e-9, (
                f"s={s}, bands={bands}, rows={rows}: you give {got:.6f}, expected {want:.6f}. "
                "Hint: one band matches with probability s**rows; the pair is a candidate "
                "unless every band misses")


def _counts_every_copy(text):
    lines = [ln for ln in text.split("\n") if ln.strip()]
    return sum(lines.count(ln) > 1 for ln in lines) / len(lines) if lines else 0.0


@exercise("03b.repeated_line_share", broken=_counts_every_copy)
def check_repeated_line_share(repeated_line_share):
    docs = ["a\nb\nc", "a\na\na\nb", "x\n\n\ny\nx\ny\nx", "", "only one line",
            "the same\nthe same\n   \nthe same"]
    for doc in docs:
        want = repeated_lines(doc)[0]
        got = repeated_line_share(doc)
        assert abs(got - want) < 1e-12, (
            f"for {doc!r} you give {got}, expected {want}. Hint: among the non-blank lines, count "
            "those equal to an earlier line (the first copy is not a repeat)")
