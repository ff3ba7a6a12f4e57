"""Scoring a model: log-likelihoods of texts and continuations, and greedy answers.

Bits per byte makes losses comparable across tokenizers. A model's loss is nats per *token*, and a
BPE token covers several bytes where a char token covers one, so the two losses measure
different things. Dividing the total nats by ln 2 and by the number of bytes the predicted
tokens spell gives bits per byte of text, whatever the tokenizer:

    bits_per_byte = (loss * n_tokens) / (ln 2 * n_bytes) = loss / (ln 2 * bytes_per_token)
"""
import math

import numpy

import minillm.functional as F
from minillm import backend
from minillm.autograd.tensor import Tensor, no_grad
from minillm.backend import xp
from minillm.model.vocab import mask_padded_logits


def byte_length(tok, ids) -> int:
    """How many UTF-8 bytes the tokens ``ids`` spell."""
    if hasattr(tok, "decode_bytes"):
        return len(tok.decode_bytes(list(ids)))
    return len(tok.decode(list(ids)).encode("utf-8"))


def bits_per_byte(loss, n_tokens, n_bytes) -> float:
    """Mean loss in nats per token -> bits per byte of the text those tokens spell."""
    return loss * n_tokens / (math.log(2) * n_bytes)


def _token_logprobs(model, x, y, n_valid=None):
    """log p(y | x) per position, (B, T) float64 on the host; x, y (B, T) int arrays. Ids at or
    past ``n_valid`` (a padded vocabulary's) get no probability, as in ``minillm eval``. Only the
    (B, T) picked values leave the device, never the (B, T, V) log-probabilities."""
    logits, _ = model(backend.asarray(x))
    logits = Tensor(mask_padded_logits(logits.data, n_valid))                   # (B, T, V)
    logp = F.log_softmax(logits).data                                            # (B, T, V)
    picked = xp.take_along_axis(logp, backend.asarray(y)[..., None], axis=-1)    # (B, T, 1)
    return backend.to_numpy(picked[..., 0]).astype(numpy.float64)               # (B, T)


def text_loss(model, tok, ids, batch_size=8) -> dict:
    """Loss, perplexity and bits per byte of a token sequence, read in windows of block_size
    (every token after the first predicted once, with the window's earlier tokens as context)."""
    ids = numpy.asarray(ids, numpy.int64)
    T = model.config.block_size
    if len(ids) < 2:
        raise ValueError("text_loss needs at least 2 tokens")
    starts = list(range(0, len(ids) - 1, T))
    total = 0.0
    with no_grad():
        for i in range(0, len(starts), batch_size):
            chunk = starts[i:i + batch_size]
            lengths = [min(T, len(ids) - 1 - s) for s in chunk]
            x = numpy.zeros((len(chunk), max(lengths)), numpy.int64)
            y = numpy.zeros_like(x)
            for r, (s, n) in enumerate(zip(chunk, lengths)):
                x[r, :n], y[r, :n] = ids[s:s + n], ids[s + 1:s + 1 + n]
            lp = _token_logprobs(model, x, y, tok.vocab_size)
            total -= sum(lp[r, :n].sum() for r, n in enumerate(lengths))
    n_tok = len(ids) - 1
    n_bytes = byte_length(tok, ids[1:])
    loss = total / n_tok
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "bits_per_byte": bits_per_byte(loss, n_tok, n_bytes),
            "tokens": n_tok, "bytes": n_bytes, "bytes_per_token": n_bytes / n_tok}


def continuation_logprobs(model, pairs, batch_size=16, n_valid=None):
    """For each (context ids, continuation ids): the summed log-probability of the continuation
    after the context. Contexts are cut on the left to fit block_size; sequences of a batch are
    padded on the right, which a causal model never sees."""
    T = model.config.block_size
    seqs = []
    for ctx, cont in pairs:
        if len(cont) > T:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit block_size {T}")
        ctx = list(ctx)[-(T + 1 - len(cont)):] if len(ctx) + len(cont) > T + 1 else list(ctx)
        seqs.append((ctx + list(cont), len(cont)))
    out = []
    with no_grad():
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i:i + batch_size]
            L = max(len(s) for s, _ in chunk) - 1
            x = numpy.zeros((len(chunk), L), numpy.int64)
            y = numpy.zeros((len(chunk), L), numpy.int64)
            for r, (s, _) in enumerate(chunk):
                x[r, :len(s) - 1], y[r, :len(s) - 1] = s[:-1], s[1:]
            lp = _token_logprobs(model, x, y, n_valid)
            for r, (s, n) in enumerate(chunk):
                out.append(float(lp[r, len(s) - 1 - n:len(s) - 1].sum()))
    return out


def greedy_answers(model, prompts, max_new_tokens, stop_id=None, batch_size=64):
    """Greedy continuations (token lists) of each prompt, cut before ``stop_id``. Prompts of the
    same length run as one batch (no padding needed), with the KV cache."""
    by_len = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    out = [None] * len(prompts)
    for n, idx in sorted(by_len.items()):
        for j in range(0, len(idx), batch_size):
            part = idx[j:j + batch_size]
            gen = model.generate(numpy.asarray([prompts[i] for i in part]), max_new_tokens, temperature=0)
            for i, row in zip(part, gen[:, n:].tolist()):
                out[i] = row[:row.index(stop_id)] if stop_id is not None and stop_id in row else row
    return out
