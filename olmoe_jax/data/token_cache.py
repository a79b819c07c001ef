"""Token streams: every source as flat arrays of token ids with EOS after each document.

Text sources are tokenized once per (documents, tokenizer) pair and cached as .npy files
under <data_dir>/tokens/<source fingerprint>-<tokenizer fingerprint>/, so later runs only
memory-map them. npy sources already are token streams and are used in place.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Sequence

import numpy as np

from olmoe_jax.data import sources
from olmoe_jax.data.errors import DataError
from olmoe_jax.data.tokenizers import Tokenizer
from olmoe_jax.io import default_data_dir, file_lock

Streams = dict[str, dict[str, list[sources.Span]]]  # split -> domain -> token spans
SPLITS = ("train", "validation")
_ENCODE_BATCH = 512  # documents per encode call: large enough for the tokenizers' threads


def cache_dir(cfg, tokenizer: Tokenizer) -> str:
    """The folder for this data + tokenizer pair (token arrays, unigram entropies)."""
    if cfg.data.source == "npy":
        held_out = sources.files_fingerprint(cfg.data.eval_path) if cfg.data.eval_path else ""
        name = f"npy-{sources.files_fingerprint(cfg.data.path, cfg.data.npy_dtype, held_out)}"
    else:
        name = sources.text_fingerprint(cfg)
    root = default_data_dir(cfg.data.data_dir)
    return os.path.join(root, "tokens", f"{name}-{tokenizer.fingerprint}")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def encode_documents(texts: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """The documents' tokens, each followed by EOS, concatenated: [sum(len_i + 1)]."""
    parts = []
    for start in range(0, len(texts), _ENCODE_BATCH):
        for ids in tokenizer.encode_batch(texts[start:start + _ENCODE_BATCH]):
            parts.append(np.asarray(ids + [tokenizer.eos_id], dtype=np.int64))
    if not parts:
        return np.zeros((0,), token_dtype(tokenizer.vocab_size))
    out = np.concatenate(parts)
    return out.astype(token_dtype(tokenizer.vocab_size))


def _build(cfg, tokenizer: Tokenizer, folder: str) -> None:
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    index: dict = {}
    for split in SPLITS:
        by_domain: dict[str, list[str]] = {}
        for domain, text in sources.text_documents(cfg, split):
            by_domain.setdefault(domain, []).append(text)
        index[split] = {}
        for i, domain in enumerate(sorted(by_domain)):
            tokens = encode_documents(by_domain[domain], tokenizer)
            file = f"{split}-{i}.npy"  # domain names come from data files: keep them out of paths
            np.save(os.path.join(tmp, file), tokens)
            index[split][domain] = {"file": file, "docs": len(by_domain[domain]),
                                    "tokens": int(tokens.size)}
    if not index["train"]:
        raise DataError(f"data.source={cfg.data.source} data.path={cfg.data.path!r}: "
                        "no training documents")
    with open(os.path.join(tmp, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)  # the folder appears complete or not at all


def token_streams(cfg, tokenizer: Tokenizer) -> Streams:
    """{split: {domain: [token spans]}} with EOS after every document.

    First call per text source and tokenizer: tokenizes and caches (about 2 s for the
    built-in corpus with sentencepiece); later calls only open the files.
    """
    if cfg.data.source == "npy":
        return sources.npy_streams(cfg)
    folder = cache_dir(cfg, tokenizer)
    if not os.path.exists(os.path.join(folder, "index.json")):
        data_dir = default_data_dir(cfg.data.data_dir)
        with file_lock(data_dir, "tokens"):
            if not os.path.exists(os.path.join(folder, "index.json")):
                _build(cfg, tokenizer, folder)
    with open(os.path.join(folder, "index.json")) as f:
        index = json.load(f)
    dtype = token_dtype(tokenizer.vocab_size).name  # the .npy headers say the same
    return {split: {domain: [sources.open_token_file(os.path.join(folder, entry["file"]), dtype)]
                    for domain, entry in index[split].items()}
            for split in SPLITS}
