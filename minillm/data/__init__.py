"""minillm.data: text sources, tokenizers (char, byte-level BPE, GPT-2), token datasets, sampler,
and the streaming data pipeline (clean, filter, dedup, shard).

The path text takes: ``load_source`` -> a tokenizer's ``encode`` -> ``prepare_dataset`` writes
``train.bin`` / ``val.bin`` -> ``TokenDataset`` memory-maps them -> ``BatchSampler`` cuts
(x, y) windows for each training step. At scale, ``prepare_sharded`` streams a corpus through
``clean_text``, the quality ``filters``, exact and MinHash ``dedup`` and tokenization into
fixed-size shards; ``TokenDataset`` reads those the same way.
"""
from minillm.data.bpe_train import BPETrainResult, train_bpe
from minillm.data.clean import clean_text
from minillm.data.dataset import (TokenDataset, default_dataset_dir, ensure_dataset, find_dataset,
                                  prepare_dataset, read_meta, token_dtype)
from minillm.data.pretokenize import GPT2_PATTERN, split_words
from minillm.data.dedup import DedupConfig
from minillm.data.filters import FilterConfig
from minillm.data.minhash import MinHasher
from minillm.data.pipeline import PrepareConfig, prepare_sharded
from minillm.data.sampler import BatchSampler
from minillm.data.shards import ShardedTokens
from minillm.data.sources import load_source
from minillm.data.tokenizers import (DEFAULT_BPE_VOCAB, ENDOFTEXT, TOKENIZER_KINDS, BPETokenizer,
                                     CharTokenizer, GPT2Tokenizer, get_tokenizer, load_tokenizer)

__all__ = [
    "BPETokenizer", "BPETrainResult", "BatchSampler", "CharTokenizer", "DEFAULT_BPE_VOCAB",
    "DedupConfig", "ENDOFTEXT", "FilterConfig", "GPT2Tokenizer", "GPT2_PATTERN", "MinHasher",
    "PrepareConfig", "ShardedTokens", "TOKENIZER_KINDS", "TokenDataset", "clean_text",
    "default_dataset_dir", "ensure_dataset", "find_dataset", "get_tokenizer", "load_source",
    "load_tokenizer", "prepare_dataset", "prepare_sharded", "read_meta", "split_words",
    "token_dtype", "train_bpe",
]
