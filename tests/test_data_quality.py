"""Cleaning, quality rules, MinHash/LSH and deduplication on hand-made and planted documents."""
import numpy as np
import pytest

from minillm.data.clean import clean_text
from minillm.data.dedup import DedupConfig, candidate_pairs, exact_duplicates, near_duplicates
from minillm.data.filters import RULES, FilterConfig, failed_rules, first_failure
from minillm.data.minhash import (MinHasher, batch_shingle_hashes, candidate_probability,
                                  estimated_jaccard, jaccard, shingle_hashes)
from minillm.data.stages import doc_hash
from minillm.data.synth import CorpusSpec, WordSampler, generate
from minillm.errors import UserError

GOOD = ("The history of the river is the history of the town that grew up with it. "
        "Boats came to the harbour and the people who lived there traded with the villages "
        "along the valley. In the spring the water rose, and in the summer the fields were "
        "green with wheat and barley. Children learned to swim before they learned to read, "
        "and the old bridge that crosses the river has stood for more than three hundred years.")


# ---------------------------------------------------------------- cleaning

def test_clean_rules():
    raw = "\ufeffcafe\u0301 \t\r\n\r\n\r\n\r\n  indented line  \n\x00te\x07xt\x85\r\r\nend\n\n"
    assert clean_text(raw) == "caf\u00e9\n\n  indented line\ntext\n\nend"
    assert clean_text(clean_text(raw)) == clean_text(raw)                 # idempotent
    assert clean_text(" \n\n \t\n") == ""                                # only white space: empty
    assert clean_text("a\n \n\t\n\nb") == "a\n\nb"                        # blank runs -> one
    assert clean_text("e\u0301") == clean_text("\u00e9") == "\u00e9"       # NFC


# ---------------------------------------------------------------- quality rules

def _lines(n, text):
    return "\n".join(f"{text} {i}" for i in range(n))


BAD = {
    "min_words": "The cat sat on the mat with the dog.",
    "max_words": " ".join(["the river and the town"] * 30),
    "mean_word_length": GOOD.replace(" ", " a b c d e f g h i j ") ,
    "symbol_ratio": GOOD + " #tag" * 20,
    "bullet_lines": "\n".join(f"- the item number {i} of the list and more words here" for i in range(10)),
    "ellipsis_lines": "\n".join(f"the story goes on and on with line {i}..." for i in range(10)),
    "alpha_words": GOOD + " 12 34 56 78" * 10,
    "stop_words": " ".join(f"alpha{i} beta gamma delta epsilon" for i in range(15)),
    "dup_lines": "\n".join(["the same line of text is repeated here"] * 6 + [GOOD]),
    "dup_line_chars": "\n".join([GOOD[:100]] * 3 + [GOOD[100:]]),
    "top_2gram": GOOD + " of the" * 60,
    "lorem_ipsum": GOOD + " Lorem Ipsum dolor sit amet.",
}
LIMITS = FilterConfig(max_words=120)   # so max_words can be shown on a short document


def test_good_document_passes_every_rule():
    assert failed_rules(GOOD, LIMITS) == [] and first_failure(GOOD, LIMITS) is None


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_on_a_hand_made_document(rule):
    doc = BAD[rule]
    assert rule in failed_rules(doc, LIMITS), (rule, failed_rules(doc, LIMITS))
    only = FilterConfig(rules=(rule,), max_words=120)
    assert first_failure(doc, only) == rule
    others = FilterConfig(rules=tuple(r for r in RULES if r != rule), max_words=120)
    assert first_failure(GOOD, others) is None


def test_filter_thresholds_and_config_errors():
    doc = " ".join(["word"] * 49)
    assert first_failure(doc, FilterConfig(rules=("min_words",))) == "min_words"
    assert first_failure(doc + " word", FilterConfig(rules=("min_words",))) is None   # 50 words
    with pytest.raises(UserError, match="unknown filter rule 'min_word'.*min_words"):
        FilterConfig(rules=("min_word",))
    with pytest.raises(UserError, match="must be >= 0"):
        FilterConfig(min_words=-1)


# ---------------------------------------------------------------- MinHash, LSH

def test_shingles_and_exact_jaccard():
    assert len(shingle_hashes("a b c d e f g")) == 3                      # 5-grams
    assert len(shingle_hashes("a b")) == 1 and len(shingle_hashes("  ")) == 0
    assert jaccard("A b c d e f", "a  B c d e\nf") == 1.0                # case, white space
    assert jaccard("a b c d e f", "a b c d e g") == pytest.approx(1 / 3)
    x, owner = batch_shingle_hashes(["a b c d e f", "", "x y"])
    assert owner.tolist() == [0, 0, 2]
    assert x.tolist() == shingle_hashes("a b c d e f").tolist() + shingle_hashes("x y").tolist()


def test_minhash_estimates_jaccard():
    rng = np.random.default_rng(0)
    words = WordSampler(5000)
    mh = MinHasher(bands=16, rows=8)
    errors = []
    for i in range(60):
        a = words.paragraph(rng, 300)
        b = words.paragraph(rng, 300) if i % 4 == 0 else \
            " ".join(w if rng.random() > i / 200 else "x" for w in a.split())
        errors.append(estimated_jaccard(mh.signature(a), mh.signature(b)) - jaccard(a, b))
    errors = np.array(errors)
    sd = np.sqrt(0.25 / mh.num_perm)                       # the binomial standard deviation at most
    assert abs(errors.mean()) < 3 * sd / np.sqrt(len(errors)) + 0.01
    assert np.abs(errors).max() < 4.5 * sd
    docs = [words.paragraph(rng, 50) for _ in range(5)]
    assert (mh.signatures(docs) == np.stack([mh.signature(d) for d in docs])).all()


def test_lsh_candidate_rate_follows_the_s_curve():
    """Pairs of known similarity become candidates at the rate 1 - (1 - s^r)^b."""
    rng = np.random.default_rng(1)
    mh = MinHasher(bands=8, rows=4)
    n = 400                                   # two sets of n hashes sharing c: J = c / (2n - c)
    for s in (0.3, 0.5, 0.7):
        common = int(round(2 * n * s / (1 + s)))
        hits = 0
        for t in range(150):
            base = rng.integers(0, 2 ** 32, size=2 * n - common, dtype=np.uint64)
            a, b = base[:n], base[n - common:]
            keys = mh.band_keys(np.concatenate([mh.signatures_of_sets(v) for v in (a, b)]))
            hits += bool((keys[0] == keys[1]).any())
        true_s = common / (2 * n - common)
        p = float(candidate_probability(true_s, 8, 4))
        assert abs(hits / 150 - p) < 4 * np.sqrt(p * (1 - p) / 150) + 0.02, (s, hits, p)


# ---------------------------------------------------------------- dedup

def test_exact_duplicates_keep_the_first():
    h = np.array([5, 3, 5, 7, 3, 5], dtype=np.uint64)
    assert exact_duplicates(h).tolist() == [-1, -1, 0, -1, 1, 0]
    keys = np.array([[1, 9], [2, 9], [1, 8], [3, 7]], dtype=np.uint64)
    assert candidate_pairs(keys).tolist() == [[0, 1], [0, 2]]


def test_dedup_finds_planted_copies_and_keeps_boilerplate_neighbours():
    spec = CorpusSpec(n_docs=600, exact_rate=0.08, near_rate=0.08, near_edit=0.01, junk_rate=0,
                      mean_words=250, seed=3)
    docs, labels = zip(*generate(spec))
    rng = np.random.default_rng(5)
    sampler = WordSampler(seed=5)
    footer = sampler.paragraph(rng, 120)                    # boilerplate shared by 40 documents
    boiler = [sampler.paragraph(rng, 180) + "\n\n" + footer for _ in range(40)]
    docs, labels = list(docs) + boiler, list(labels) + ["boilerplate"] * 40
    sims = [jaccard(boiler[0], b) for b in boiler[1:]]
    assert 0.2 < max(sims) < 0.6                            # similar, but well below 0.8

    cfg = DedupConfig()
    mh = MinHasher(cfg.bands, cfg.rows, cfg.ngram, cfg.seed)
    sig = mh.signatures(docs)
    exact_of = exact_duplicates(np.array([doc_hash(d.encode()) for d in docs], dtype=np.uint64))
    near_of, info = near_duplicates(mh.band_keys(sig), lambda idx: sig[idx], cfg.threshold,
                                    alive=exact_of < 0)
    kind = np.array([lab.split(":")[0] for lab in labels])
    source = np.array([int(lab.split(":")[1]) if ":" in lab else -1 for lab in labels])
    removed_exact, removed_near = exact_of >= 0, near_of >= 0
    assert (removed_exact == (kind == "exact")).all()       # every byte copy, nothing else
    assert (exact_of[removed_exact] == source[removed_exact]).all()
    assert not removed_near[kind == "unique"].any()         # no original is lost
    assert not (removed_exact | removed_near)[kind == "boilerplate"].any()
    near = np.flatnonzero(kind == "near")
    truth = np.array([jaccard(docs[i], docs[source[i]]) for i in near])
    assert removed_near[near][truth >= 0.9].all()           # clear copies: all found
    assert removed_near[near][truth >= 0.8].mean() > 0.9    # at the threshold: the estimate's noise
    assert not removed_near[near][truth < 0.65].any()
    for i in np.flatnonzero(removed_near):                  # each removal is close to its kept doc
        assert jaccard(docs[i], docs[near_of[i]]) > 0.65
    assert info["verified_pairs"] >= removed_near.sum()


def test_dedup_config_errors():
    with pytest.raises(UserError, match="--dedup-threshold"):
        DedupConfig(threshold=1.5)
    with pytest.raises(UserError, match="--dedup-bands"):
        DedupConfig(bands=0)
    d = DedupConfig().describe()
    assert d["num_perm"] == 120 and d["p_candidate_at_threshold"] > 0.99
