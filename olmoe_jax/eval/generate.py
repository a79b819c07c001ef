"""Autoregressive generation with the KV cache: jitted prefill, then a jitted decode loop.

Prompts of different lengths share one batch without any pad token reaching attention: each
row is right-padded and keeps its *own* cache write index (the model's cache has a scalar index,
so the model is vmapped over rows). After the prefill a row's index is set back to its true
length, so its first decode step overwrites the first pad slot, and the cache's validity mask
(slots < index) hides the rest. Positions are therefore the plain 0..n-1 of every row, which is
what makes a batched row equal the same prompt run alone.

Sampling: temperature 0 is greedy (argmax, first index on ties, like torch); otherwise logits /
temperature, restricted to the smallest set of tokens whose probability reaches top_p (nucleus).
A row stops after EOS; the loop stops when every row has stopped or after max_new_tokens.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from olmoe_jax.model import transformer

_BUCKET = 16
_CACHE_AXES = {"k": 1, "v": 1, "index": 0}  # [L, B, S, K, hd] caches, one index per row


class Generation(NamedTuple):
    tokens: list[list[int]]  # generated ids per prompt, up to and including EOS
    prefill_s: float  # wall time of the prefill (compiled beforehand, so no compile time)
    decode_s: float
    num_tokens: int  # generated tokens, summed over rows

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / max(self.prefill_s + self.decode_s, 1e-9)


def _row_apply(params, tokens_T, cache_row, cfg):
    """apply() on one row with its own cache (k, v [L, S, K, hd], index [])."""
    cache = {
        "k": cache_row["k"][:, None],
        "v": cache_row["v"][:, None],
        "index": cache_row["index"],
    }
    logits, aux = transformer.apply(params, tokens_T[None], cfg, cache=cache)
    new = aux["cache"]
    return logits[0], {"k": new["k"][:, 0], "v": new["v"][:, 0], "index": new["index"]}


def _batched_apply(params, tokens_BT, cache, cfg):
    fn = jax.vmap(
        functools.partial(_row_apply, cfg=cfg),
        in_axes=(None, 0, _CACHE_AXES),
        out_axes=(0, _CACHE_AXES),
    )
    return fn(params, tokens_BT, cache)


def _nucleus_floor(probs_BV, top_p):
    """[B, 1]: the smallest probability in each row's nucleus (the fewest most likely tokens whose
    mass reaches top_p), i.e. the largest t with mass(p >= t) >= top_p.

    Positive float32s order like their int32 bit patterns, so a bisection over the bits finds t
    exactly in 32 passes of O(V); sorting a 50k vocabulary every step is several times slower
    on CPU.
    """
    bits = jax.lax.bitcast_convert_type(probs_BV, jnp.int32)

    def mass(t_B):
        return jnp.sum(jnp.where(bits >= t_B[:, None], probs_BV, 0.0), axis=-1)

    def step(_, lo_hi):  # invariant: mass(lo) >= top_p (or lo == 0: keep all), mass(hi) < top_p
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        ok = mass(mid) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo = jnp.zeros(bits.shape[:1], jnp.int32)
    hi = jnp.max(bits, axis=-1) + 1
    lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)[:, None]


def sample(logits_BV, rng, temperature, top_p, *, greedy: bool):
    """Next token per row [B] int32 from float32 logits [B, V].

    greedy: argmax (temperature and top_p unused). Otherwise temperature > 0 and top_p in
    (0, 1] may be traced values, so one compiled decode loop serves every setting.
    """
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    # top_p == 1 keeps every token, even where the float sum of probabilities falls short of 1.
    keep_BV = (probs_BV >= _nucleus_floor(probs_BV, top_p)) | (top_p >= 1.0)
    logits_BV = jnp.where(keep_BV, logits_BV, -jnp.inf)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _prefill(params, tokens_BP, lengths_B, cache, cfg):
    logits_BPV, cache = _batched_apply(params, tokens_BP, cache, cfg)
    cache = dict(cache, index=lengths_B)  # forget the pad slots: decode overwrites them
    last_BV = jnp.take_along_axis(logits_BPV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return last_BV, cache


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "greedy"))
def _decode(params, logits_BV, cache, rng, eos_id, pad_id, temperature, top_p, *,
            cfg, steps, greedy):
    B = logits_BV.shape[0]

    def cond(state):
        step, _, _, _, done, _ = state
        return (step < steps) & ~jnp.all(done)

    def body(state):
        step, logits, cache, out, done, rng = state
        rng, key = jax.random.split(rng)
        tok = sample(logits, key, temperature, top_p, greedy=greedy)
        tok = jnp.where(done, pad_id, tok)
        out = out.at[:, step].set(tok)
        done = done | (tok == eos_id)
        logits, cache = _batched_apply(params, tok[:, None], cache, cfg)
        return step + 1, logits[:, 0], cache, out, done, rng

    out = jnp.full((B, steps), pad_id, jnp.int32)
    init = (jnp.zeros((), jnp.int32), logits_BV, cache, out, jnp.zeros((B,), bool), rng)
    step, _, _, out, done, _ = jax.lax.while_loop(cond, body, init)
    return out, step, done


def generate(
    params,
    cfg,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    pad_id: int = 0,
) -> Generation:
    """Continues each prompt (a list of token ids) by up to max_new_tokens tokens.

    eos_id: a row stops after emitting it (None: never). The cache holds max prompt length +
    max_new_tokens positions, which must fit model.max_seq_len.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    B, longest = len(prompts), max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.model.max_seq_len:
        raise ValueError(
            f"prompt length {longest} + max_new_tokens {max_new_tokens} exceeds "
            f"model.max_seq_len={cfg.model.max_seq_len}"
        )
    # Pad the prompt width up to a multiple of _BUCKET (within max_seq_len): prompts of nearby
    # lengths then share one compiled prefill and decode loop.
    P = min(-(-longest // _BUCKET) * _BUCKET, cfg.model.max_seq_len - max_new_tokens)
    tokens = np.full((B, P), pad_id, np.int32)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    cache = transformer.init_cache(cfg, B, P + max_new_tokens, jnp.dtype(cfg.model.compute_dtype))
    cache = dict(cache, index=jnp.zeros((B,), jnp.int32))
    eos = -1 if eos_id is None else int(eos_id)

    # Compiled ahead of the timed calls, so the times are the computation's (the compilations
    # are cached per config and shape for later calls).
    frozen = ml_collections.FrozenConfigDict(cfg)
    prefill = _prefill.lower(params, tokens, lengths, cache, cfg=frozen).compile()
    t0 = time.perf_counter()
    logits, cache = prefill(params, tokens, lengths, cache)
    jax.block_until_ready(logits)
    t1 = time.perf_counter()

    rng = jax.random.PRNGKey(seed)
    scalars = (np.int32(eos), np.int32(pad_id), np.float32(temperature), np.float32(top_p))
    decode = _decode.lower(params, logits, cache, rng, *scalars, cfg=frozen,
                           steps=max_new_tokens, greedy=temperature == 0).compile()
    t2 = time.perf_counter()
    out, _, _ = decode(params, logits, cache, rng, *scalars)
    out = np.asarray(out)
    t3 = time.perf_counter()

    rows = []
    for row in out:
        ids = row.tolist()
        if eos in ids:
            ids = ids[: ids.index(eos) + 1]
        rows.append(ids)
    return Generation(rows, t1 - t0, t3 - t2, sum(len(r) for r in rows))
