"""minillm.data: text sources, tokenizers (char, byte-level BPE, GPT-2), token datasets, sampler.

The path text takes: ``load_source`` -> a tokenizer's ``encode`` -> ``prepare_dataset`` writes
``train.bin`` / ``val.bin`` -> ``TokenDataset`` memory-maps them -> ``BatchSampler`` cuts
(x, y) windows for each training step.
"""
from minillm.data.bpe_train import BPETrainResult, train_bpe
from minillm.data.dataset import (TokenDataset, default_dataset_dir, ensure_dataset, find_dataset,
                                  prepare_dataset, read_meta, token_dtype)
from minillm.data.pretokenize import GPT2_PATTERN, split_words
from minillm.data.sampler import BatchSampler
from minillm.data.sources import load_source
from minillm.data.tokenizers import (DEFAULT_BPE_VOCAB, ENDOFTEXT, TOKENIZER_KINDS, BPETokenizer,
                                     CharTokenizer, GPT2Tokenizer, get_tokenizer, load_tokenizer)

__all__ = [
    "BPETokenizer", "BPETrainResult", "BatchSampler", "CharTokenizer", "DEFAULT_BPE_VOCAB",
    "ENDOFTEXT", "GPT2Tokenizer", "GPT2_PATTERN", "TOKENIZER_KINDS", "TokenDataset",
    "default_dataset_dir", "ensure_dataset", "find_dataset", "get_tokenizer", "load_source",
    "load_tokenizer", "prepare_dataset", "read_meta", "split_words", "token_dtype", "train_bpe",
]
