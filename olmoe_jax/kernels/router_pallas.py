"""Pallas fused router: softmax, top-k, optional renormalisation and per-block statistics.

One grid step routes a block of `bt` tokens with all E logits in registers: the softmax, the
logsumexp (z-loss), k rounds of arg-max (k <= 8 for OLMoE, static), and the block's per-expert
slot counts and probability sums. The statistics go out per block ([num_blocks, 1, E]) and
are summed by the caller, so no grid step depends on another (the grid is parallel).
Plain BlockSpecs only (no scalar prefetch): the same kernel lowers for Mosaic-TPU and, asked
for explicitly, Triton (jax 0.10 otherwise picks Mosaic-GPU for GPUs, whose pallas_call
lowering rejects reductions along an axis). Triton wants power-of-two blocks: E and k should
be powers of two on GPU (OLMoE: 64 and 8).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def _router_kernel(num_tokens, k, renormalize, logits_ref, w_ref, idx_ref, lse_ref,
                   counts_ref, psum_ref):
    x_bE = logits_ref[...].astype(jnp.float32)
    bt, E = x_bE.shape
    m_b1 = jnp.max(x_bE, axis=1, keepdims=True)
    ex_bE = jnp.exp(x_bE - m_b1)
    s_b1 = jnp.sum(ex_bE, axis=1, keepdims=True)
    p_bE = ex_bE / s_b1
    lse_ref[...] = m_b1 + jnp.log(s_b1)

    row_b1 = pl.program_id(0) * bt + jax.lax.broadcasted_iota(jnp.int32, (bt, 1), 0)
    live_b1 = row_b1 < num_tokens  # the caller pads T up to a multiple of bt
    iota_bE = jax.lax.broadcasted_iota(jnp.int32, (bt, E), 1)
    iota_bk = jax.lax.broadcasted_iota(jnp.int32, (bt, k), 1)
    cur_bE = p_bE
    w_bk = jnp.zeros((bt, k), jnp.float32)
    idx_bk = jnp.zeros((bt, k), jnp.int32)
    chosen_bE = jnp.zeros((bt, E), jnp.int32)
    for j in range(k):
        top_b1 = jnp.max(cur_bE, axis=1, keepdims=True)
        # Lowest index among equal maxima: the tie rule of jax.lax.top_k.
        arg_b1 = jnp.min(jnp.where(cur_bE == top_b1, iota_bE, E), axis=1, keepdims=True)
        hit_bE = iota_bE == arg_b1
        w_bk = jnp.where(iota_bk == j, top_b1, w_bk)
        idx_bk = jnp.where(iota_bk == j, arg_b1, idx_bk)
        chosen_bE = chosen_bE + hit_bE.astype(jnp.int32)
        cur_bE = jnp.where(hit_bE, -1.0, cur_bE)  # probabilities are >= 0
    if renormalize:
        w_bk = w_bk / jnp.sum(w_bk, axis=1, keepdims=True)
    w_ref[...] = w_bk
    idx_ref[...] = idx_bk
    counts_ref[...] = jnp.sum(jnp.where(live_b1, chosen_bE, 0), axis=0, keepdims=True)
    psum_ref[...] = jnp.sum(jnp.where(live_b1, p_bE, 0.0), axis=0, keepdims=True)


def _cost(nb: int, bt: int, E: int, k: int) -> pl.CostEstimate:
    """Vector ops per (token, expert) element, counted from the kernel: 4 for the softmax
    (max, subtract, sum, divide), 6 per top-k round (max, compare, select the index, min,
    compare, mask out) and 4 for the statistics; exp per element and one log per token.
    Bytes: the f32 logits in; [rows, k] weights and ids, [rows] lse and per block the [E]
    counts and probability sums out (4 bytes each)."""
    rows = nb * bt
    return pl.CostEstimate(flops=rows * E * (8 + 6 * k), transcendentals=rows * (E + 1),
                           bytes_accessed=4 * (rows * (E + 2 * k + 1) + 2 * nb * E))


def route_topk(logits_TE, k: int, renormalize: bool, *, block_tokens: int = 256,
               interpret: bool, platform: str = "tpu"):
    """(weights_Tk f32, idx_Tk int32, lse_T f32, counts_E int32, prob_sum_E f32)."""
    T, E = logits_TE.shape
    bt = min(block_tokens, -(-T // 8) * 8)  # a multiple of 8 sublanes
    nb = -(-T // bt)
    logits = jnp.pad(logits_TE.astype(jnp.float32), ((0, nb * bt - T), (0, 0)))
    tok = lambda b: (b, 0)
    blk = lambda b: (b, 0, 0)
    w, idx, lse, counts, psum = pl.pallas_call(
        functools.partial(_router_kernel, T, k, renormalize),
        grid=(nb,),
        in_specs=[pl.BlockSpec((bt, E), tok)],
        out_specs=[pl.BlockSpec((bt, k), tok), pl.BlockSpec((bt, k), tok),
                   pl.BlockSpec((bt, 1), tok),
                   pl.BlockSpec((None, 1, E), blk), pl.BlockSpec((None, 1, E), blk)],
        out_shape=[jax.ShapeDtypeStruct((nb * bt, k), jnp.float32),
                   jax.ShapeDtypeStruct((nb * bt, k), jnp.int32),
                   jax.ShapeDtypeStruct((nb * bt, 1), jnp.float32),
                   jax.ShapeDtypeStruct((nb, 1, E), jnp.int32),
                   jax.ShapeDtypeStruct((nb, 1, E), jnp.float32)],
        compiler_params=pltriton.CompilerParams() if platform == "gpu" and not interpret else None,
        cost_estimate=_cost(nb, bt, E, k),
        interpret=interpret,
    )(logits)
    return w[:T], idx[:T], lse[:T, 0], jnp.sum(counts, axis=(0, 1)), jnp.sum(psum, axis=(0, 1))
