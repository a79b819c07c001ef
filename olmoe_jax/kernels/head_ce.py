"""The output layer and the cross-entropy in one pass, in sequence chunks, with the gradients
computed on the way forward.

`head_cross_entropy(x_BTD, w_DV, targets_BT, mask_BT, chunks)` equals
`cross_entropy(einsum(x, w) in float32, targets, mask)` (the reference below) but never holds
the [B, T, V] logits: a scan over `chunks` slices of the sequence makes each slice's logits,
its log-sum-exp and target logit, and, when differentiated, its softmax - one_hot, the input
gradient of the slice and its share of the weight gradient. Cross-entropy is the last
operation of the loss, so those gradients only need the incoming scalar cotangent as a factor:
the backward pass is two multiplications, and no logits are kept or recomputed.

Why: the logits are the largest activation of a language model (OLMoE: 50,304 x 4,096 floats
per sequence, 0.8 GB), and for the train step of benchmarks/train_step.py (2,048 tokens,
vocab 8,192) the unchunked head + cross-entropy forward + backward measured 0.42 s against
0.30 s in 4 chunks (16 MB of logits each; 1 chunk 0.34 s, 16 chunks 0.33 s).

Without differentiation (evaluation) only the loss is computed, chunk by chunk.
Chunks run along the sequence, so a batch sharded over devices stays sharded.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Auto chunking aims at this many logits per chunk and device. CPU: 16 MB in float32 (the
# measurement in the module docstring). Accelerators: 1 GiB. Every chunk reads the output
# layer and reads and writes its float32 gradient (12 bytes per weight), so small chunks turn
# the head into weight traffic: olmoe_1b7b on v5p:4x8x8 (16,384 tokens a device) in 256 chunks
# of 16 MB spent 77 ms of its estimated step there, in 4 chunks none (docs/tpu.md).
CHUNK_LOGITS = {"cpu": 1 << 22, "tpu": 1 << 28, "gpu": 1 << 28}


def auto_chunks(batch: int, seq: int, vocab: int, devices: int = 1, platform: str = "cpu") -> int:
    """The fewest sequence chunks (a divisor of seq) with at most CHUNK_LOGITS[platform]
    logits per chunk on each of `devices` (the batch split over them)."""
    per_device = -(-batch // devices) * seq * vocab
    target = CHUNK_LOGITS.get(platform, CHUNK_LOGITS["cpu"])
    for n in range(1, seq + 1):
        if seq % n == 0 and per_device // n <= target:
            return n
    return seq


def reference(x_BTD, w_DV, targets_BT, mask_BT):
    """(mean masked token NLL, token count) through the full [B, T, V] float32 logits."""
    logits = jnp.einsum("btd,dv->btv", x_BTD, w_DV, preferred_element_type=jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    n = jnp.sum(mask_BT)
    return jnp.sum((logz - tgt) * mask_BT) / jnp.maximum(n, 1.0), n


def _split(a, n):
    """[B, T, ...] -> [n, B, T/n, ...]: the scan's chunks of the sequence."""
    B, T = a.shape[:2]
    return jnp.moveaxis(a.reshape(B, n, T // n, *a.shape[2:]), 1, 0)


def _chunk_logits(x_c, w_DV, t_c):
    logits = jnp.einsum("btd,dv->btv", x_c, w_DV, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
    return logits, lse, tgt


def _loss_only(x_BTD, w_DV, targets_BT, mask_BT, chunks):
    def body(total, c):
        x_c, t_c, m_c = c
        _, lse, tgt = _chunk_logits(x_c, w_DV, t_c)
        return total + jnp.sum((lse - tgt) * m_c), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                            (_split(x_BTD, chunks), _split(targets_BT, chunks), _split(mask_BT, chunks)))
    n = jnp.sum(mask_BT)
    return total / jnp.maximum(n, 1.0), n


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _head_ce(x_BTD, w_DV, targets_BT, mask_BT, chunks):
    return _loss_only(x_BTD, w_DV, targets_BT, mask_BT, chunks)


def _head_ce_fwd(x_BTD, w_DV, targets_BT, mask_BT, chunks):
    n = jnp.sum(mask_BT)
    inv_n = 1.0 / jnp.maximum(n, 1.0)
    dt = x_BTD.dtype

    def body(carry, c):
        total, dw_DV = carry
        x_c, t_c, m_c = c
        logits, lse, tgt = _chunk_logits(x_c, w_DV, t_c)
        # d(mean NLL)/d logits = (softmax - one_hot) * mask / n, rounded to the compute dtype so
        # that in bf16 the two matmuls run as bf16 matmuls (autodiff of the f32-output einsum
        # would run them in f32). Error against an all-f32 run, bf16 inputs, [4, 64] tokens,
        # vocab 500: dx 3.4e-3 / dw 2.9e-3 of the largest entry, autodiff's 3.0e-3 / 2.7e-3.
        d = jnp.exp(logits - lse[..., None]) - jax.nn.one_hot(t_c, logits.shape[-1], dtype=jnp.float32)
        d = (d * (m_c * inv_n)[..., None]).astype(dt)
        dx_c = jnp.einsum("btv,dv->btd", d, w_DV, preferred_element_type=jnp.float32).astype(dt)
        dw_DV = dw_DV + jnp.einsum("btd,btv->dv", x_c, d, preferred_element_type=jnp.float32)
        return (total + jnp.sum((lse - tgt) * m_c), dw_DV), dx_c

    (total, dw_DV), dx = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), jnp.zeros(w_DV.shape, jnp.float32)),
        (_split(x_BTD, chunks), _split(targets_BT, chunks), _split(mask_BT, chunks)))
    dx_BTD = jnp.moveaxis(dx, 0, 1).reshape(x_BTD.shape)
    return (total * inv_n, n), (dx_BTD, dw_DV.astype(w_DV.dtype))


def _head_ce_bwd(chunks, res, cot):
    dx_BTD, dw_DV = res
    g = cot[0]  # the token count is not differentiable
    return (g * dx_BTD).astype(dx_BTD.dtype), (g * dw_DV).astype(dw_DV.dtype), None, None


_head_ce.defvjp(_head_ce_fwd, _head_ce_bwd)


def head_cross_entropy(x_BTD, w_DV, targets_BT, mask_BT, chunks: int = 0, batch_shards: int | None = None,
                       platform: str | None = None):
    """(mean token cross-entropy over mask, token count) of logits x @ w (float32), without
    materialising them; differentiable in x and w. chunks: sequence chunks (a divisor of T);
    0 picks `auto_chunks` for this batch split over `batch_shards` devices on `platform`
    (defaults: every device of this process's backend, and that backend; pass the mesh's when
    compiling for another machine, whose devices this host does not count)."""
    B, T, _ = x_BTD.shape
    if chunks <= 0:
        shards = jax.device_count() if batch_shards is None else batch_shards
        chunks = auto_chunks(B, T, w_DV.shape[1], shards, platform or jax.default_backend())
    if T % chunks:
        raise ValueError(f"head_cross_entropy: {chunks} chunks do not divide the sequence length {T} "
                         "(model.ce_chunks)")
    return _head_ce(x_BTD, w_DV, targets_BT, mask_BT.astype(jnp.float32), chunks)
