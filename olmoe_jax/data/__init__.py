"""The data layer: sources (built-in corpus, OLMo .npy memmaps, jsonl, TFDS), tokenizers, and
the grain pipeline that packs, shuffles, shards and batches them. See docs/data.md."""
from olmoe_jax.data.errors import DataError
from olmoe_jax.data.pipeline import make_eval_batches, make_train_iterator, unigram_entropy
from olmoe_jax.data.sources import check_data
from olmoe_jax.data.tokenizers import Tokenizer, make_tokenizer

__all__ = ["DataError", "Tokenizer", "check_data", "make_eval_batches", "make_tokenizer",
           "make_train_iterator", "unigram_entropy"]
