"""The grain input pipeline: packed rows of tokens, shuffled, sharded by process, batched.

Packing is concat-then-split over whole token streams: every document's tokens followed by
EOS, all documents of the split concatenated, cut into rows of seq_len + 1 tokens. A row
may hold the end of one document, EOS, and the start of the next; no training row is
padded, and over one epoch each token is in exactly one row (only the last, partial row of
the split is left out). The model reads `inputs = row[:-1]` and predicts `targets = row[1:]`.

Sharding: global batch s is elements [sB, (s+1)B) of the global stream of rows (shuffled
per epoch by `data.seed`); process p reads its contiguous block [sB + pb, sB + (p+1)b),
b = B / process_count. Put together in process order (as `make_array_from_process_local_data`
does when process p's devices hold rows [pb, (p+1)b)), the processes' batches are row for
row the batch one process alone would read, so a multi-process run sees the same data.
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

import grain
import numpy as np

from olmoe_jax.config import parse_mixture
from olmoe_jax.data.errors import DataError
from olmoe_jax.data.sources import Span
from olmoe_jax.data.token_cache import cache_dir, token_streams
from olmoe_jax.data.tokenizers import Tokenizer
from olmoe_jax.io import atomic_write_text

ENTROPY_MAX_TOKENS = 1 << 26  # unigram statistics of huge npy validation sets use a prefix


class PackedRows:
    """Row i = tokens [i * row_len, (i + 1) * row_len) of the spans' concatenation, int32.

    A grain random-access source. With `pad_tail`, the last partial row is kept and padded
    with `pad_id`, and rows past the end are all padding (for eval); `real_tokens(i)` says
    how many tokens of row i are data.
    """

    def __init__(self, spans: Sequence[Span], row_len: int, *, pad_tail: bool = False,
                 pad_id: int = 0):
        self._spans = [s for s in spans if len(s)]
        self._starts = np.cumsum([0] + [len(s) for s in self._spans])
        self.total = int(self._starts[-1])
        self.row_len, self.pad_id = row_len, pad_id
        self._len = math.ceil(self.total / row_len) if pad_tail else self.total // row_len
        self._arrays: list[np.ndarray] | None = None

    def __getstate__(self):
        # Memmaps are reopened in each process (grain workers), not pickled as data.
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return self._len

    def real_tokens(self, i: int) -> int:
        return int(min(max(self.total - i * self.row_len, 0), self.row_len))

    def __getitem__(self, i: int) -> np.ndarray:
        """[row_len] int32."""
        if self._arrays is None:
            self._arrays = [s.read() for s in self._spans]
        out = np.full((self.row_len,), self.pad_id, np.int32)
        begin = i * self.row_len
        pos, end = begin, min(begin + self.row_len, self.total)
        k = int(np.searchsorted(self._starts, pos, side="right")) - 1
        while pos < end:  # a row may cross from one span (file, domain) into the next
            take = min(end, int(self._starts[k + 1])) - pos
            local = pos - int(self._starts[k])
            out[pos - begin:pos - begin + take] = self._arrays[k][local:local + take]
            pos, k = pos + take, k + 1
        return out


def _example(rows_BL: np.ndarray, real_B: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """rows [B, T+1] -> inputs, targets [B, T] int32 and loss_mask [B, T] float32; without
    `real_B` (tokens of data per row) every target counts."""
    targets = rows_BL[:, 1:]
    if real_B is None:
        mask = np.ones(targets.shape, np.float32)
    else:
        mask = (np.arange(1, rows_BL.shape[1])[None, :] < real_B[:, None]).astype(np.float32)
    return {"inputs": rows_BL[:, :-1].astype(np.int32), "targets": targets.astype(np.int32),
            "loss_mask": mask}


def local_batch_size(cfg, process_index: int, process_count: int) -> int:
    """This process's share of `data.batch_size` (sequences)."""
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} is outside process_count={process_count}")
    if cfg.data.batch_size % process_count:
        raise DataError(f"data.batch_size={cfg.data.batch_size} is not divisible by the "
                        f"{process_count} processes; change data.batch_size")
    return cfg.data.batch_size // process_count


def train_rows(cfg, tokenizer: Tokenizer) -> PackedRows:
    """The training rows of seq_len + 1 tokens; all domains, in sorted order, in one stream."""
    train = token_streams(cfg, tokenizer)["train"]
    rows = PackedRows([s for d in sorted(train) for s in train[d]], cfg.data.seq_len + 1)
    if len(rows) < cfg.data.batch_size:
        raise DataError(
            f"the training data holds {rows.total} tokens, {len(rows)} rows of data.seq_len+1="
            f"{cfg.data.seq_len + 1}, fewer than one batch "
            f"(data.batch_size={cfg.data.batch_size}); "
            "lower data.seq_len or data.batch_size, or add data")
    return rows


def mixed_rows(cfg, tokenizer: Tokenizer) -> grain.MapDataset:
    """Endless training rows drawn from the domains of data.mixture in its proportions: each
    named domain packed on its own, shuffled (per epoch of that domain) and repeated, then
    interleaved by grain's weighted mix. Domains the mixture does not name are left out."""
    train = token_streams(cfg, tokenizer)["train"]
    weights = parse_mixture(cfg.data.mixture)
    missing = sorted(set(weights) - set(train))
    if missing:
        raise DataError(f"data.mixture names {', '.join(missing)}, but the training data has the domains "
                        f"{', '.join(sorted(train))}; fix data.mixture")
    parts = []
    for i, domain in enumerate(weights):
        rows = PackedRows(train[domain], cfg.data.seq_len + 1)
        if not len(rows):
            raise DataError(f"data.mixture: domain {domain} holds {rows.total} tokens, less than one row of "
                            f"data.seq_len+1={cfg.data.seq_len + 1}; drop it from data.mixture or add data")
        ds = grain.MapDataset.source(rows)
        if cfg.data.shuffle:
            ds = ds.shuffle(seed=cfg.data.seed + i)
        parts.append(ds.repeat())
    return grain.MapDataset.mix(parts, list(weights.values()))


def make_train_iterator(cfg, tokenizer: Tokenizer, *, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this process's training batches:
    {inputs int32 [B, T], targets int32 [B, T], loss_mask float32 [B, T]},
    B = data.batch_size // process_count, T = data.seq_len. Each epoch is reshuffled.
    With data.mixture the rows come from its domains in its proportions (mixed_rows).

    Save and restore it with grain.checkpoint.CheckpointSave / CheckpointRestore.
    """
    b = local_batch_size(cfg, process_index, process_count)
    if cfg.data.mixture:
        ds = mixed_rows(cfg, tokenizer)
    else:
        ds = grain.MapDataset.source(train_rows(cfg, tokenizer))
        if cfg.data.shuffle:
            ds = ds.shuffle(seed=cfg.data.seed)
        ds = ds.repeat()
    ds = ds.batch(b, drop_remainder=True)[process_index::process_count].map(_example)
    # Rows are memmap slices: two threads and a short buffer keep up without hogging the CPU.
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if cfg.data.num_workers > 0:
        # grain's worker processes read its absl flags, which only absl.app parses; elsewhere
        # (pytest, a plain script) take their defaults instead of failing on first read.
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.num_workers))
    return iter(it_ds)


def make_eval_batches(cfg, tokenizer: Tokenizer, *, process_index: int = 0,
                      process_count: int = 1) -> dict[str, list[dict[str, np.ndarray]]]:
    """{domain: up to data.eval_batches batches} from the validation split, the same every call
    ({} when data.eval_batches is 0, so nothing is evaluated).

    Each domain is packed on its own, so a domain's loss is over that domain's text only.
    The last row of a domain is padded with the tokenizer's pad id, and the last batch with
    rows of padding; their targets have loss_mask 0. Batches are shaped as in training.
    """
    b = local_batch_size(cfg, process_index, process_count)
    big_b = cfg.data.batch_size
    out = {}
    for domain, spans in sorted(token_streams(cfg, tokenizer)["validation"].items()):
        rows = PackedRows(spans, cfg.data.seq_len + 1, pad_tail=True, pad_id=tokenizer.pad_id)
        batches = []
        for j in range(min(cfg.data.eval_batches, math.ceil(len(rows) / big_b))):
            idx = range(j * big_b + process_index * b, j * big_b + (process_index + 1) * b)
            rows_BL = np.stack([rows[i] for i in idx])
            batches.append(_example(rows_BL, np.array([rows.real_tokens(i) for i in idx])))
        if batches:  # data.eval_batches=0: no domain at all, rather than a loss of 0 over 0 tokens
            out[domain] = batches
    return out


def _entropy_nats(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def unigram_entropy(cfg, tokenizer: Tokenizer) -> dict[str, float]:
    """{domain: entropy in nats/token of the validation split's unigram token distribution}.

    The loss of a model that knows token frequencies and nothing else, the baseline to
    print beside the validation loss. Cached beside the token arrays.
    """
    path = os.path.join(cache_dir(cfg, tokenizer), "unigram_entropy.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    out = {}
    for domain, spans in sorted(token_streams(cfg, tokenizer)["validation"].items()):
        counts = np.zeros((tokenizer.vocab_size,), np.int64)
        left = ENTROPY_MAX_TOKENS
        for span in spans:
            tokens = np.asarray(span.read()[:left])
            counts += np.bincount(tokens, minlength=tokenizer.vocab_size)[:tokenizer.vocab_size]
            left -= tokens.size
        out[domain] = _entropy_nats(counts)
    atomic_write_text(path, json.dumps(out, indent=1))
    return out
