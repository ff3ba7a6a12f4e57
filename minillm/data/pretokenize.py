"""GPT-2 pre-tokenisation: the regex that cuts text into "words" before BPE runs inside each.

BPE never merges across these pieces, so " the" and "the," stay separate units and the
learned tokens look like words, word pieces, numbers and runs of punctuation or spaces.

The GPT-2 pattern is written with Unicode properties (``\\p{L}`` letters, ``\\p{N}`` numbers)
that Python's ``re`` does not understand. tiktoken runs the pattern itself (in Rust), which is
what encoding uses; the BPE *trainer* is plain Python, so here the same pattern is spelled out
for ``re`` with explicit character classes built from ``unicodedata``:

- ``\\p{L}`` = general categories Lu Ll Lt Lm Lo, ``\\p{N}`` = Nd Nl No;
- ``\\s`` = the Unicode White_Space property. Python's own ``\\s`` is *not* that: it also
  matches the control characters U+001C..U+001F, so we never use it.

The tests check on real text that this split and tiktoken's agree token for token. (Characters
assigned after Python's Unicode version, 14.0 for Python 3.11, could still differ.)

The BPE trainer counts words with ``fast_split_words``: the same pattern run by the third-party
``regex`` module (which tiktoken itself depends on), compiled in about a millisecond and 2-3x
faster than the spelled-out classes; the tests check the two splits are equal.

Where text may be cut without changing the split (``safe_cut``): between a character that is not
white space and one that is. No piece of the pattern holds both kinds of character (letters,
numbers and punctuation runs may start with one space, never end with one; white-space runs hold
only white space), so a piece always ends there, and the matching that follows starts afresh.
Special-token strings hold no white space, so a cut never splits one either. Encoding chunks cut
there equals encoding the whole text (``encode_iterable``), and so does counting them (the trainer's
parallel counts).
"""
import functools
import re
import unicodedata

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Unicode's White_Space property (PropList.txt), stable since Unicode 6.3.
_WHITE_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
                (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F),
                (0x3000, 0x3000)]


def _ranges(major: str) -> list[tuple[int, int]]:
    """Code point ranges whose general category starts with ``major`` ('L' or 'N')."""
    out: list[tuple[int, int]] = []
    for cp in range(0x110000):
        if unicodedata.category(chr(cp))[0] == major:
            if out and out[-1][1] == cp - 1:
                out[-1] = (out[-1][0], cp)
            else:
                out.append((cp, cp))
    return out


def _class_body(ranges: list[tuple[int, int]]) -> str:
    """The inside of a ``[...]`` class for ``re``, with every character escaped."""
    def esc(cp: int) -> str:
        return f"\\U{cp:08x}"
    return "".join(esc(a) if a == b else f"{esc(a)}-{esc(b)}" for a, b in ranges)


@functools.lru_cache(maxsize=1)
def stdlib_gpt2_regex() -> re.Pattern:
    """GPT2_PATTERN compiled for the standard library ``re`` (built once, ~0.3 s)."""
    L = _class_body(_ranges("L"))
    N = _class_body(_ranges("N"))
    S = _class_body(_WHITE_SPACE)
    pattern = (rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+"""
               rf"""|[{S}]+(?![^{S}])|[{S}]+""")
    return re.compile(pattern)


def split_words(text: str) -> list[str]:
    """Cut ``text`` into GPT-2 pre-tokens; ``"".join(split_words(t)) == t``."""
    return stdlib_gpt2_regex().findall(text)


@functools.lru_cache(maxsize=1)
def _fast_regex():
    import regex  # a dependency of tiktoken; understands \\p{L} and \\p{N} as tiktoken does
    return regex.compile(GPT2_PATTERN)


def fast_split_words(text: str) -> list[str]:
    """``split_words`` through the ``regex`` module: the same pieces, faster, no build cost."""
    return _fast_regex().findall(text)


_WS = "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in _WHITE_SPACE)
_CUT = re.compile(f"[^{_WS}](?=[{_WS}])")   # a non-space followed by a space: cut after it


def safe_cut(text: str, lo: int = 0) -> int:
    """The last position > ``lo`` where ``text`` may be cut (see above), or -1 if there is none."""
    end = len(text)
    while end > lo:                           # windows from the tail back: cuts are usually near it
        start = max(lo, end - 4096)
        last = -1
        for m in _CUT.finditer(text, start, min(len(text), end + 1)):
            last = m.end()
        if last > 0:
            return last
        end = start
    return -1


def first_safe_cut(text: str, pos: int) -> int:
    """The first position >= ``pos`` where ``text`` may be cut, or -1 if there is none."""
    m = _CUT.search(text, max(0, pos - 1))
    return m.end() if m else -1


def safe_chunks(pieces, min_chars: int = 1 << 16):
    """Re-cut an iterable of text pieces into chunks of at least ``min_chars`` characters (the
    last may be shorter) that end at safe cuts. Memory holds one chunk, or the longest run of text
    without white space if that is longer."""
    buf, size, want = [], 0, min_chars
    for piece in pieces:
        buf.append(piece)
        size += len(piece)
        if size < want:
            continue
        text = "".join(buf)
        cut = safe_cut(text, min(min_chars, len(text)) // 2)
        if cut > 0:
            yield text[:cut]
            buf, size, want = [text[cut:]], len(text) - cut, min_chars
        else:                                 # no cut yet: wait for twice as much text
            buf, want = [text], 2 * size
    tail = "".join(buf)
    if tail:
        yield tail


def split_specials(text: str, specials) -> list[tuple[str, bool]]:
    """Cut ``text`` around special-token strings: ``[(chunk, is_special), ...]``.

    Longer specials are tried first so one that contains another wins.
    """
    if not specials:
        return [(text, False)] if text else []
    alternatives = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
    parts = re.split(f"({alternatives})", text)
    # re.split with one capturing group alternates: ordinary, special, ordinary, ...
    return [(p, i % 2 == 1) for i, p in enumerate(parts) if p]
