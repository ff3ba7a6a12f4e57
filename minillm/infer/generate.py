"""Batched generation: prompts of different lengths decoded together over one preallocated KV cache.

Layout of a batch (B rows, the cache's L filled positions, block_size = capacity):

    row 0   . . . p p p p g g      p: prompt, g: generated, .: padding (masked out)
    row 1   p p p p p p p g g      every row's newest token sits in the same column, so one
    row 2   . . . . . p p g g      forward of (B, 1) tokens decodes a token for every row

Prompts are left-padded, so all rows end in the same column and share the cache's length. Each row
has its own positions (counted from its first real token, so padding shifts nothing) and a mask
that hides its padding from attention. A row's tokens therefore see exactly what they would see
alone: greedy decoding gives the same tokens as one prompt at a time (tested).

The batch changes while it runs (``Batch.add`` / ``remove``), which is what a server needs:
a finished row's slot is refilled by the last row; new prompts are prefilled in a side cache and
copied in right-aligned (the cache shifts right when a prompt is longer than the batch so far);
when the cache is full, columns that no row uses any more are dropped, and when a row's own
context has reached block_size the window slides and the batch is recomputed from each row's
last block_size tokens, exactly as GPT.generate does for one prompt.
"""
from dataclasses import dataclass, field

import numpy

from minillm import backend
from minillm.autograd.tensor import no_grad
from minillm.infer.text import TextStream
from minillm.model.kv_cache import KVCache
from minillm.model.sampling import check_sampling, sample_next


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple = ()

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        check_sampling(self.temperature, self.top_k, self.top_p)
        self.stop = tuple(self.stop or ())


@dataclass(eq=False)  # rows are found by identity: two equal prompts are two sequences
class Sequence:
    """One prompt being continued: its tokens, sampling state and (with a decoder) its text."""
    prompt: list
    params: SamplingParams = field(default_factory=SamplingParams)
    decode: object = None                 # ids -> str; needed for stop strings and text
    tokens: list = field(init=False)
    finish_reason: str | None = None      # "length" | "stop" | "cancelled" once done

    def __post_init__(self):
        if not len(self.prompt):
            raise ValueError("a prompt needs at least one token")
        self.tokens = [int(t) for t in self.prompt]
        self.rng = numpy.random.default_rng(self.params.seed)
        self.stream = TextStream(self.decode, self.params.stop) if self.decode else None
        if self.params.stop and not self.decode:
            raise ValueError("stop strings need a decode function (a tokenizer's decode)")

    @property
    def generated(self):
        return self.tokens[len(self.prompt):]

    @property
    def done(self):
        return self.finish_reason is not None

    @property
    def text(self):
        return self.stream.text if self.stream else None

    def sample(self, logits):
        p = self.params
        return int(sample_next(logits[None], p.temperature, p.top_k, self.rng, p.top_p)[0])

    def append(self, token):
        """Add a sampled token; return the text it released ('' without a decoder)."""
        self.tokens.append(int(token))
        piece = self.stream.push(token) if self.stream else ""
        if self.stream and self.stream.stopped:
            self.finish_reason = "stop"
        elif len(self.generated) >= self.params.max_new_tokens:
            self.finish_reason = "length"
            piece += self.stream.finish() if self.stream else ""
        return piece

    def cancel(self):
        if not self.done:
            self.finish_reason = "cancelled"


class Batch:
    """Rows decoding together over one KV cache of ``max_rows`` rows x block_size positions."""

    def __init__(self, model, max_rows):
        self.model = model.eval()
        self.bs = model.config.block_size
        self.cache = KVCache(model.config.n_layer, capacity=self.bs, rows=max_rows)
        self.valid = numpy.zeros((max_rows, self.bs), dtype=bool)   # (R, cap): real key columns
        self.next_pos = numpy.zeros(max_rows, dtype=numpy.int64)     # position of each pending token
        self.rows = []                                               # the Sequences, row by row
        self.max_rows = max_rows

    def __len__(self):
        return len(self.rows)

    @property
    def free(self):
        return self.max_rows - len(self.rows)

    # ---------------------------------------------------------------- admitting and leaving
    def add(self, seqs):
        """Prefill new sequences into free rows and sample their first token.
        Returns [(seq, token, text piece)]; sequences that finish at once are not kept."""
        seqs = list(seqs)
        if not seqs:
            return []
        if len(seqs) > self.free:
            raise ValueError(f"{len(seqs)} new sequences but {self.free} free rows")
        if not self.rows:
            logits = self._prefill(seqs, self.cache, first_row=0)
        else:
            Tp = max(len(s.tokens[-self.bs:]) for s in seqs)
            side = KVCache(self.model.config.n_layer, capacity=Tp, rows=len(seqs))
            B0 = len(self.rows)
            logits = self._prefill(seqs, side, first_row=B0)
            L = self.cache.length
            if Tp > L:  # a longer prompt than the batch so far: make room on the left
                self.cache.shift(Tp - L)
                self.valid[:B0] = numpy.roll(self.valid[:B0], Tp - L, axis=1)
                L = Tp
            self.cache.write_rows(B0, side, at=L - Tp)
            self.valid[B0:B0 + len(seqs), L - Tp:L] = self.valid[B0:B0 + len(seqs), :Tp].copy()
            self.valid[B0:B0 + len(seqs), :L - Tp] = False
        self.rows += seqs
        return self._sample(seqs, logits)

    def remove(self, seq):
        """Free a sequence's row (finished or cancelled): the last row moves into it."""
        i, last = self.rows.index(seq), len(self.rows) - 1
        self.cache.move_row(last, i)
        self.valid[i], self.next_pos[i] = self.valid[last], self.next_pos[last]
        self.rows[i] = self.rows[last]
        self.rows.pop()
        if not self.rows:
            self.cache.set_length(0)

    # ---------------------------------------------------------------- decoding
    def step(self):
        """One new token for every row. Returns [(seq, token, text piece)]."""
        if not self.rows:
            return []
        B, L = len(self.rows), self.cache.length
        if L + 1 > self.bs:
            unused = int(numpy.argmax(self.valid[:B, :L].any(axis=0)))  # leading columns no row uses
            if unused:
                self.cache.drop_front(unused)
                self.valid[:B] = numpy.roll(self.valid[:B], -unused, axis=1)
                self.valid[:B, L - unused:] = False
                L -= unused
        if L + 1 > self.bs:  # some row's context is block_size long: slide every window
            rows = list(self.rows)
            self.cache.set_length(0)
            return self._sample(rows, self._prefill(rows, self.cache, first_row=0))
        self.valid[:B, L] = True
        idx = numpy.array([[s.tokens[-1]] for s in self.rows], dtype=numpy.int64)   # (B, 1)
        mask = self.valid[:B, :L + 1]
        logits = self._forward(idx, self.cache, mask, self.next_pos[:B, None])
        self.next_pos[:B] += 1
        return self._sample(list(self.rows), logits)

    def _prefill(self, seqs, cache, first_row):
        """Run the last block_size tokens of each sequence, left-padded, through ``cache``;
        record rows first_row.. in valid / next_pos. Returns last-position logits (B, V)."""
        ctx = [s.tokens[-self.bs:] for s in seqs]
        Tp = max(len(c) for c in ctx)
        idx = numpy.zeros((len(ctx), Tp), dtype=numpy.int64)                    # (B, Tp)
        pos = numpy.zeros((len(ctx), Tp), dtype=numpy.int64)
        valid = self.valid[first_row:first_row + len(ctx)]
        valid[:] = False
        for r, c in enumerate(ctx):
            pad = Tp - len(c)
            idx[r, pad:], pos[r, pad:], valid[r, pad:Tp] = c, numpy.arange(len(c)), True
            self.next_pos[first_row + r] = len(c)
        return self._forward(idx, cache, valid[:, :Tp], pos)

    def _forward(self, idx, cache, valid, positions):
        """Last-position logits (B, V) on the host; the mask is left out when nothing is padded
        (then attention takes the fused causal path, as for a single prompt)."""
        mask = None if valid.all() else backend.asarray(valid[:, None, None, :])   # (B, 1, 1, Tk)
        with no_grad():
            logits, _ = self.model(backend.asarray(idx), cache=cache, attn_mask=mask,
                                   positions=positions)
        return backend.to_numpy(logits.data[:, -1, :])                             # (B, V)

    def _sample(self, seqs, logits):
        events = [(s, tok, s.append(tok)) for s, tok in
                  ((s, s.sample(logits[r])) for r, s in enumerate(seqs))]
        for s, _, _ in events:
            if s.done and s in self.rows:
                self.remove(s)
        return events


@dataclass
class Completion:
    tokens: list              # the generated token ids (the prompt not included)
    text: str | None          # their text, up to a stop string (with a tokenizer)
    finish_reason: str


def generate(model, prompts, max_new_tokens=64, temperature=1.0, top_k=None, top_p=None,
             seed=None, stop=(), tokenizer=None, max_batch=None):
    """Continue every prompt (token lists, or strings with a ``tokenizer``) in one batch.

    ``seed``: an int gives prompt i the seed seed + i (as ``minillm sample --num-samples``), a
    list gives each its own; prompt i's tokens then equal those of generating it alone with that
    seed. ``max_batch`` bounds the rows decoded at once (the rest wait for free rows).
    Returns a Completion per prompt, in order.
    """
    seeds = list(seed) if isinstance(seed, (list, tuple)) else \
        [None if seed is None else seed + i for i in range(len(prompts))]
    decode = tokenizer.decode if tokenizer is not None else None
    seqs = [Sequence(tokenizer.encode(p) if isinstance(p, str) else list(p),
                     SamplingParams(max_new_tokens, temperature, top_k, top_p, s, tuple(stop)), decode)
            for p, s in zip(prompts, seeds)]
    was_training = model.training
    batch = Batch(model, max_batch or len(seqs))
    waiting = list(seqs)
    try:
        while waiting or len(batch):
            if waiting and batch.free:
                batch.add([waiting.pop(0) for _ in range(min(batch.free, len(waiting)))])
            else:
                batch.step()
    finally:
        model.train(was_training)
    return [Completion(s.generated, s.text, s.finish_reason) for s in seqs]
