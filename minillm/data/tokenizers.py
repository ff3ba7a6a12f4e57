"""Tokenizers: text <-> integer ids, three ways, one interface.

Every tokenizer has ``encode(text) -> list[int]`` (special-token strings become their ids),
``encode_ordinary(text)`` (special-token strings are plain text), ``encode_iterable(pieces)``
(yields the ids of the concatenated pieces with bounded memory, equal to ``encode`` of the whole
text), ``decode(ids) -> str``, ``vocab_size``, ``name`` ("char" | "bpe" | "gpt2"), ``eot_id``
(the ``<|endoftext|>`` id, or None) and ``save(dir)``; ``load_tokenizer(dir)`` reads one back
from ``dir/tokenizer.json``.

- CharTokenizer: one id per character seen in the training text. Tiny vocabulary, long
  sequences, no way to spell a character it never saw. Optionally special tokens after the
  characters (the sharded pipeline gives it ``<|endoftext|>`` to end documents).
- BPETokenizer: byte-level BPE learned from scratch (see bpe_train.py). Any text, including
  emoji or invalid UTF-8, is some sequence of byte tokens, so nothing is ever unknown.
- GPT2Tokenizer: OpenAI's GPT-2 BPE (50257 tokens), through tiktoken.
- AddedTokens: any of them plus special tokens appended after its vocabulary (fine-tuning).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from minillm.choices import TOKENIZERS
from minillm.data.bpe_train import train_bpe
from minillm.data.pretokenize import GPT2_PATTERN, safe_chunks, split_specials, split_words
from minillm.errors import UserError
from minillm.fileio import write_atomic

TOKENIZER_FILE = "tokenizer.json"
ENDOFTEXT = "<|endoftext|>"
DEFAULT_BPE_VOCAB = 512
TOKENIZER_KINDS = TOKENIZERS  # the one list: minillm.choices


def _write_json_atomic(path: Path, obj) -> None:
    # readers see the old file or the whole new one, never half of it
    write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1), "tokenizer")


def _check_ids(ids, vocab_size: int) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1}); "
                        "decode ids made by the same tokenizer")
    return ids


class _Streaming:
    """``encode_iterable`` for every tokenizer, built on its ``encode``."""

    def encode_iterable(self, pieces):
        """Yield the ids of ``"".join(pieces)`` one by one, holding about 64K characters at a
        time: the text is re-cut where pre-tokenisation cuts anyway (``safe_chunks``), so the
        ids equal ``encode`` of the whole text."""
        for chunk in safe_chunks(pieces):
            yield from self.encode(chunk)


class CharTokenizer(_Streaming):
    """Vocabulary = the sorted set of characters of the training text (then any specials)."""
    name = "char"

    def __init__(self, chars, special_tokens: dict[str, int] | None = None):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.special_tokens = dict(special_tokens or {})
        if sorted(self.special_tokens.values()) != list(range(len(self.chars),
                                                              self.vocab_size)):
            raise UserError("tokenizer file: char special tokens must follow the characters' ids; "
                            "prepare the dataset again")
        self._table = None

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + len(self.special_tokens)

    @property
    def eot_id(self):
        return self.special_tokens.get(ENDOFTEXT)

    def _lookup(self, text: str) -> np.ndarray:
        """Ids of every character as an int64 array, -1 for characters not in the vocabulary
        (a table indexed by code point: one vectorised gather instead of a loop)."""
        if self._table is None:
            top = max((ord(c) for c in self.chars), default=0)
            self._table = np.full(top + 2, -1, dtype=np.int64)
            self._table[[ord(c) for c in self.chars]] = np.arange(len(self.chars))
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        return self._table[np.minimum(cps, len(self._table) - 1)]

    def encode_ordinary(self, text: str) -> list[int]:
        ids = self._lookup(text)
        if ids.size and ids.min() < 0:
            unknown = sorted(set(text) - set(self.stoi))
            shown = ", ".join(repr(c) for c in unknown[:10])
            more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
            raise UserError(f"prompt contains characters not in the vocabulary: {shown}{more}; "
                            "use characters from the training text")
        return ids.tolist()

    def encode(self, text: str) -> list[int]:
        if not self.special_tokens:
            return self.encode_ordinary(text)
        ids: list[int] = []
        for chunk, is_special in split_specials(text, self.special_tokens):
            ids.extend([self.special_tokens[chunk]] if is_special else self.encode_ordinary(chunk))
        return ids

    def decode(self, ids) -> str:
        names = self.chars + sorted(self.special_tokens, key=self.special_tokens.get)
        return "".join(names[i] for i in _check_ids(ids, len(names)))

    def to_dict(self) -> dict:
        d = {"kind": "char", "chars": self.chars}
        if self.special_tokens:   # files without specials stay exactly as before
            d["special_tokens"] = self.special_tokens
        return d

    def save(self, directory) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        _write_json_atomic(path, self.to_dict())
        return path


class BPETokenizer(_Streaming):
    """Byte-level BPE: ids 0..255 are bytes, then one id per learned merge, then specials."""
    name = "bpe"

    def __init__(self, merges, special_tokens: dict[str, int] | None = None,
                 pattern: str = GPT2_PATTERN):
        if pattern != GPT2_PATTERN:
            raise UserError("this tokenizer file uses an unknown pre-tokenisation pattern; "
                            "prepare the dataset again with this version of minillm")
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.pattern = pattern
        self.vocab = [bytes([i]) for i in range(256)]          # vocab[id] = the token's bytes
        for a, b in self.merges:
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self.ranks = {tok: i for i, tok in enumerate(self.vocab)}
        if len(self.ranks) != len(self.vocab):
            raise UserError("tokenizer file has two merges with the same bytes; "
                            "prepare the dataset again")
        n = len(self.vocab)
        self.special_tokens = dict(special_tokens) if special_tokens is not None \
            else {ENDOFTEXT: n}
        self._special_bytes = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        self._tiktoken = None

    @classmethod
    def train(cls, text: str, vocab_size: int = DEFAULT_BPE_VOCAB, verbose: bool = False,
              specials=(ENDOFTEXT,), workers: int = 1):
        """Learn ``vocab_size - 256 - len(specials)`` merges; the special tokens take the last
        ids, in order. Their strings in ``text`` are never merged with anything."""
        vocab_size, specials = int(vocab_size), list(dict.fromkeys(specials))
        if vocab_size < 256 + len(specials):
            raise UserError(f"bpe vocab_size={vocab_size} is too small: it needs 256 byte tokens "
                            f"plus {len(specials)} special token(s); use --vocab-size "
                            f"{256 + len(specials)} or more")
        result = train_bpe(text, vocab_size - 256 - len(specials), specials=specials,
                           verbose=verbose, workers=workers)
        n = 256 + len(result.merges)
        return cls(result.merges, {s: n + k for k, s in enumerate(specials)})

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + len(self.special_tokens)

    @property
    def eot_id(self):
        return self.special_tokens.get(ENDOFTEXT)

    def tiktoken_encoding(self):
        """The same tokenizer as a tiktoken ``Encoding`` (built on first use; fast, Rust)."""
        if self._tiktoken is None:
            import tiktoken
            self._tiktoken = tiktoken.Encoding(
                name=f"minillm-bpe-{self.vocab_size}", pat_str=self.pattern,
                mergeable_ranks=self.ranks, special_tokens=self.special_tokens)
        return self._tiktoken

    def encode(self, text: str) -> list[int]:
        """Fast path (tiktoken). ``<|endoftext|>`` in the text becomes the special token."""
        return self.tiktoken_encoding().encode(text, allowed_special="all")

    def encode_ordinary(self, text: str) -> list[int]:
        """Like ``encode`` but special-token strings are encoded as plain text."""
        return self.tiktoken_encoding().encode_ordinary(text)

    def _bpe_piece(self, piece: bytes) -> list[int]:
        """Merge the adjacent pair whose joined bytes have the lowest rank, until none has one."""
        parts = [bytes([b]) for b in piece]
        ranks = self.ranks
        while len(parts) > 1:
            best, best_rank = None, None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        return [ranks[p] for p in parts]

    def encode_reference(self, text: str) -> list[int]:
        """The readable (slow) encoder; ``encode`` must give the same ids."""
        ids: list[int] = []
        for chunk, is_special in split_specials(text, self.special_tokens):
            if is_special:
                ids.append(self.special_tokens[chunk])
                continue
            for word in split_words(chunk):
                ids.extend(self._bpe_piece(word.encode("utf-8")))
        return ids

    def decode_bytes(self, ids) -> bytes:
        vocab, specials, n = self.vocab, self._special_bytes, len(self.vocab)
        return b"".join(vocab[i] if i < n else specials[i] for i in _check_ids(ids, self.vocab_size))

    def decode(self, ids) -> str:
        # A token sequence can end mid-character (or be any bytes at all): never fail on it.
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, i: int) -> bytes:
        return self.decode_bytes([i])

    def to_dict(self) -> dict:
        return {"kind": "bpe", "pattern": self.pattern, "merges": [list(m) for m in self.merges],
                "special_tokens": self.special_tokens}

    def save(self, directory) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        _write_json_atomic(path, self.to_dict())
        return path


class GPT2Tokenizer(_Streaming):
    """OpenAI's GPT-2 tokenizer via ``tiktoken.get_encoding("gpt2")``."""
    name = "gpt2"

    def __init__(self):
        import tiktoken
        try:
            self.encoding = tiktoken.get_encoding("gpt2")
        except Exception as e:  # no network and no cache: requests/urllib/hash errors
            raise UserError("cannot load the GPT-2 tokenizer files: set TIKTOKEN_CACHE_DIR to a "
                            "folder holding tiktoken's gpt2 files, or connect to the internet "
                            f"({type(e).__name__})") from None

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def eot_id(self) -> int:
        return self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode_bytes(self, ids) -> bytes:
        return self.encoding.decode_bytes(_check_ids(ids, self.vocab_size))

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": "gpt2"}

    def save(self, directory) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        _write_json_atomic(path, self.to_dict())
        return path


class AddedTokens:
    """A tokenizer plus special tokens appended after its vocabulary (chat roles, say).

    The added tokens get ids ``base.vocab_size, base.vocab_size + 1, ...``, so a model grows its
    embedding by ``len(added)`` rows and every old id keeps its meaning. ``encode`` turns the
    added strings in a text into their ids and encodes the rest with the base tokenizer;
    ``encode_plain`` never makes a special token (for user content, which must not be able to
    forge a role marker). Saved as the base's tokenizer.json plus an ``added_tokens`` list.
    """

    def __init__(self, base, tokens):
        if isinstance(base, AddedTokens):
            base, tokens = base.base, base.added + [t for t in tokens if t not in base.added]
        self.base, self.added = base, list(tokens)
        self.name = base.name
        self.ids = {t: base.vocab_size + i for i, t in enumerate(self.added)}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in self.added) + ")") if self.added else None

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size + len(self.added)

    @property
    def eot_id(self):
        return self.base.eot_id

    def token_id(self, token: str) -> int:
        return self.ids[token]

    def encode_plain(self, text: str) -> list[int]:
        return (getattr(self.base, "encode_ordinary", None) or self.base.encode)(text)

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self.base.encode(text)
        ids = []
        for piece in self._split.split(text):
            ids += [self.ids[piece]] if piece in self.ids else self.base.encode(piece) if piece else []
        return ids

    def _runs(self, ids):
        """(base ids, None) and (None, added token) runs of ``ids`` in order."""
        n, run = self.base.vocab_size, []
        for i in _check_ids(ids, self.vocab_size):
            if i < n:
                run.append(i)
                continue
            if run:
                yield run, None
                run = []
            yield None, self.added[i - n]
        if run:
            yield run, None

    def decode(self, ids) -> str:
        return "".join(tok if run is None else self.base.decode(run) for run, tok in self._runs(ids))

    def decode_bytes(self, ids) -> bytes:
        enc = getattr(self.base, "decode_bytes", None) or (lambda run: self.base.decode(run).encode("utf-8"))
        return b"".join(tok.encode("utf-8") if run is None else enc(run) for run, tok in self._runs(ids))

    def to_dict(self) -> dict:
        return dict(self.base.to_dict(), added_tokens=list(self.added))

    def save(self, directory) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        _write_json_atomic(path, self.to_dict())
        return path


def _check_kind(kind: str) -> str:
    if kind not in TOKENIZER_KINDS:
        raise UserError(f"unknown tokenizer {kind!r}; choose one of: {', '.join(TOKENIZER_KINDS)}")
    return kind


def get_tokenizer(kind: str, text: str | None = None, vocab_size: int | None = None):
    """Build a tokenizer: ``char`` and ``bpe`` are trained on ``text``; ``gpt2`` is fixed."""
    _check_kind(kind)
    if kind == "gpt2":
        tok = GPT2Tokenizer()
        if vocab_size and int(vocab_size) != tok.vocab_size:
            raise UserError(f"the gpt2 tokenizer has vocab_size {tok.vocab_size}, not {vocab_size};"
                            " drop --vocab-size")
        return tok
    if text is None:
        raise ValueError(f"the {kind} tokenizer is trained on text: pass text=")
    if not text:
        raise UserError(f"cannot train a {kind} tokenizer on empty text; use a non-empty source")
    if kind == "char":
        if vocab_size:
            raise UserError("the char tokenizer's vocab_size is set by the text; drop --vocab-size "
                            "or use --tokenizer bpe")
        return CharTokenizer.train(text)
    return BPETokenizer.train(text, vocab_size or DEFAULT_BPE_VOCAB)


def tokenizer_from_dict(d: dict):
    kind = _check_kind(d.get("kind"))
    if kind == "char":
        tok = CharTokenizer(d["chars"], d.get("special_tokens"))
    elif kind == "bpe":
        tok = BPETokenizer(d["merges"], d["special_tokens"], d.get("pattern", GPT2_PATTERN))
    else:
        tok = GPT2Tokenizer()
    return AddedTokens(tok, d["added_tokens"]) if d.get("added_tokens") else tok


def load_tokenizer(path):
    """Read the tokenizer saved in a dataset dir (or the ``tokenizer.json`` path itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"no tokenizer at {path}; run `minillm prepare` to create the dataset")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a valid tokenizer file ({e}); prepare the dataset again") \
            from None
    return tokenizer_from_dict(d)
