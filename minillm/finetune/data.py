"""Fine-tuning data: JSONL conversations -> tokenized examples -> packed rows with a loss mask.

Each example is one conversation (ids, and per token whether the loss counts it). The model reads
``ids[:-1]`` and is scored on ``ids[1:]`` where the mask is True; everywhere else the target is
``IGNORE`` (-100), so prompt tokens cost nothing and teach nothing.

Packing puts several examples in one row of block_size positions (short chats would otherwise
leave most of a row padding). ``doc`` says which example each position belongs to, and the model
gets ``document_mask(doc)``, so no example attends to another. The order is a function of
(seed, epoch) only: a run is reproducible.
"""
from dataclasses import dataclass

import numpy

from minillm.data.chat import encode_chat, read_jsonl, row_messages
from minillm.errors import UserError

IGNORE = -100


@dataclass
class Example:
    ids: numpy.ndarray      # (L,) token ids of the whole conversation
    train: numpy.ndarray    # (L,) True where the loss counts the token (assistant answers)

    @property
    def inputs(self):
        return self.ids[:-1]

    @property
    def targets(self):
        return numpy.where(self.train[1:], self.ids[1:], IGNORE)


def tokenize_rows(rows, tok, block_size) -> list:
    """Examples from (where, row) pairs; a row that is malformed or longer than block_size + 1
    tokens is a UserError naming it."""
    out = []
    for where, row in rows:
        ids, train = encode_chat(tok, row_messages(row, where), where)
        if len(ids) - 1 > block_size:
            raise UserError(f"{where}: the chat is {len(ids)} tokens, longer than model.block_size + 1 = "
                            f"{block_size + 1}; shorten it or drop the row")
        out.append(Example(numpy.asarray(ids, numpy.int64), numpy.asarray(train, bool)))
    return out


def load_examples(path, tok, block_size) -> list:
    return tokenize_rows(read_jsonl(path), tok, block_size)


def split_examples(examples, val_fraction, seed):
    """(train, val): a seeded shuffle, then the last val_fraction held out (at least one example
    when val_fraction > 0 and there are two or more)."""
    order = numpy.random.default_rng([seed, 7]).permutation(len(examples))
    n_val = 0 if val_fraction <= 0 or len(examples) < 2 else max(1, int(len(examples) * val_fraction))
    cut = len(examples) - n_val
    return [examples[i] for i in order[:cut]], [examples[i] for i in order[cut:]]


def pack(examples, block_size, pack=True):
    """Rows (x, y, doc), each (R, T): examples in the given order, several per row when ``pack``
    (a new row starts when the next one does not fit), one per row otherwise. Unused positions
    hold token 0, target IGNORE and document -1 (a padding document of its own)."""
    rows, row = [], []
    used = 0
    for ex in examples:
        n = len(ex.ids) - 1
        if row and (not pack or used + n > block_size):
            rows.append(row)
            row, used = [], 0
        row.append(ex)
        used += n
    if row:
        rows.append(row)
    R, T = len(rows), block_size
    x = numpy.zeros((R, T), numpy.int64)
    y = numpy.full((R, T), IGNORE, numpy.int64)
    doc = numpy.full((R, T), -1, numpy.int64)
    for r, exs in enumerate(rows):
        pos = 0
        for d, ex in enumerate(exs):
            n = len(ex.ids) - 1
            x[r, pos:pos + n], y[r, pos:pos + n], doc[r, pos:pos + n] = ex.inputs, ex.targets, d
            pos += n
    return x, y, doc


class PackedBatches:
    """``batch(step)`` -> (x, y, doc) of ``batch_size`` rows: epochs of packed rows, each epoch
    a fresh seeded shuffle of the examples, read one after another."""

    def __init__(self, examples, block_size, batch_size, seed=0, pack=True):
        if not examples:
            raise UserError("no fine-tuning examples to train on")
        self.examples, self.T, self.B, self.seed, self.pack = examples, block_size, batch_size, seed, pack
        self._rows, self._len = {}, {}   # packed rows of recent epochs; row count of every epoch seen

    def epoch(self, e):
        if e not in self._rows:
            order = numpy.random.default_rng([self.seed, e]).permutation(len(self.examples))
            self._rows = {k: v for k, v in self._rows.items() if k >= e - 1}  # keep two epochs
            self._rows[e] = pack([self.examples[i] for i in order], self.T, self.pack)
            self._len[e] = len(self._rows[e][0])
        return self._rows[e]

    def rows_per_epoch(self, e=0):
        if e not in self._len:
            self.epoch(e)
        return self._len[e]

    def batch(self, step):
        parts, need, e, start = [], self.B, 0, step * self.B
        while start >= self.rows_per_epoch(e):  # epochs pack to slightly different row counts
            start -= self.rows_per_epoch(e)
            e += 1
        while need:
            x, y, doc = self.epoch(e)
            take = min(need, len(x) - start)
            parts.append((x[start:start + take], y[start:start + take], doc[start:start + take]))
            need -= take
            start, e = 0, e + 1
        return tuple(numpy.concatenate([p[i] for p in parts]) for i in range(3))
