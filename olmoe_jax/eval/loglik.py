"""Log-likelihood of continuations given contexts: the one scorer behind `olmoe eval --tasks`
and the lm-evaluation-harness adapter.

Each request is a pair of token lists (context, continuation). The scorer runs context +
continuation through the model in one forward pass (no KV cache) and sums the log-probability
of the continuation's tokens; it also says whether every continuation token was the model's
argmax (lm-eval's `is_greedy`). Requests are batched: rows are right-padded to a length bucket
(a power of two, at least 16) and a bucket's batches all have the same number of rows, so a
handful of programs serve any task. Right padding is invisible to a causal model with dropless
token-choice routing (each token's output depends only on itself and earlier tokens); with
capacity or expert-choice routing the batch's other tokens change the routing, as they do in
training.

Longer than `model.max_seq_len` + 1 tokens: the context is cut from the left (the continuation
is kept whole if it fits), as lm-eval's own models do.
"""
from __future__ import annotations

import functools
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from olmoe_jax.model import transformer

MIN_BUCKET = 16


class Score(NamedTuple):
    logprob: float  # sum of log p(continuation token | everything before), nats
    is_greedy: bool  # every continuation token was the argmax


def encode_pair(tokenizer, context: str, continuation: str, prefix_id: int) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's causal models make them.

    Trailing whitespace of the context moves to the continuation; context + continuation is
    encoded whole and split after the context's own tokens, so the continuation's first token
    is the one the model would really see. An empty context becomes [prefix_id] (EOS: the
    models here have no BOS).
    """
    if not context:
        return [prefix_id], list(tokenizer.encode(continuation))
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = list(tokenizer.encode(context + continuation))
    ctx = list(tokenizer.encode(context))
    return ctx, whole[len(ctx):]


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_len: int) -> Iterator[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that score every token of `tokens` exactly once with up to
    `max_len` tokens of input each: disjoint windows of max_len predictions, each conditioned
    on the tokens just before it (the first on [prefix_id]); lm-eval's rolling windows with
    context_len 1."""
    tokens = list(tokens)
    for start in range(0, len(tokens), max_len):
        cont = tokens[start:start + max_len]
        # input = (ctx + cont)[:-1] holds at most max_len tokens
        ctx = [prefix_id] if start == 0 else tokens[max(0, start - (max_len - len(cont) + 1)):start]
        yield ctx, cont


def _bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("cfg",))
def _token_scores(params, inputs_BT, targets_BT, cfg):
    """(log p(target) [B, T] float32, target == argmax [B, T] bool)."""
    logits_BTV, _ = transformer.apply(params, inputs_BT, cfg)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return logp_BT, jnp.argmax(logits_BTV, axis=-1) == targets_BT


class Scorer:
    """Scores (context ids, continuation ids) requests with one model.

    params: on one device or sharded, as `checkpoint.load_params` gives them; cfg: the
    model's config. tokens_per_batch bounds rows x bucket length per forward pass (the
    [B, T, V] float32 logits are the largest buffer: 8192 tokens of a 50k vocabulary is 1.6 GB).
    """

    def __init__(self, params, cfg, *, tokens_per_batch: int = 8192):
        self.params, self.cfg = params, cfg
        self.max_len = cfg.model.max_seq_len
        self.tokens_per_batch = tokens_per_batch
        self._fcfg = ml_collections.FrozenConfigDict(cfg)

    def _row(self, ctx: Sequence[int], cont: Sequence[int]) -> tuple[list[int], int]:
        """(model input + last target, number of scored tokens at the end)."""
        if not cont:
            raise ValueError("a continuation must have at least one token")
        if not ctx:
            raise ValueError("a context must have at least one token (pass the prefix id)")
        full = list(ctx) + list(cont)
        full = full[-(self.max_len + 1):]
        return full, min(len(cont), len(full) - 1)

    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Score]:
        """One Score per (context ids, continuation ids), in the order given."""
        rows = [self._row(c, x) for c, x in requests]
        out: list[Score | None] = [None] * len(rows)
        by_bucket: dict[int, list[int]] = {}
        for i, (full, _) in enumerate(rows):
            by_bucket.setdefault(_bucket(len(full) - 1), []).append(i)
        for T, idx in sorted(by_bucket.items()):
            B = max(1, self.tokens_per_batch // T)
            for start in range(0, len(idx), B):
                chunk = idx[start:start + B]
                inputs = np.zeros((B, T), np.int32)
                targets = np.zeros((B, T), np.int32)
                for r, i in enumerate(chunk):
                    full = rows[i][0]
                    inputs[r, :len(full) - 1] = full[:-1]
                    targets[r, :len(full) - 1] = full[1:]
                logp, greedy = jax.device_get(_token_scores(self.params, inputs, targets, cfg=self._fcfg))
                for r, i in enumerate(chunk):
                    full, n = rows[i]
                    sl = slice(len(full) - 1 - n, len(full) - 1)
                    out[i] = Score(float(np.sum(logp[r, sl], dtype=np.float64)), bool(np.all(greedy[r, sl])))
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, token_lists: Sequence[Sequence[int]], prefix_id: int) -> list[float]:
        """Total log-likelihood (nats) of each whole token list, in max_seq_len windows."""
        pairs, owner = [], []
        for j, tokens in enumerate(token_lists):
            for pair in rolling_windows(tokens, prefix_id, self.max_len):
                pairs.append(pair)
                owner.append(j)
        totals = [0.0] * len(token_lists)
        for j, s in zip(owner, self.loglikelihood(pairs)):
            totals[j] += s.logprob
        return totals
