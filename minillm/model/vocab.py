"""Padded vocabularies: a model may have more output rows than its tokenizer has tokens.

``model.vocab_size`` may be rounded up (to a multiple of 64, for faster matmuls); the extra ids
are never targets, but their logits are still there, so sampling could pick one the tokenizer
cannot decode. Sampling and evaluation mask them to -inf: the model's distribution over the
tokens that exist.
"""


def mask_padded_logits(logits, n_valid=None):
    """``logits`` (..., V) with ids >= ``n_valid`` set to -inf: a new array (NumPy or CuPy), or
    ``logits`` itself when nothing is padded (``n_valid`` None or >= V)."""
    if n_valid is None or n_valid >= logits.shape[-1]:
        return logits
    out = logits.copy()
    out[..., n_valid:] = float("-inf")
    return out
