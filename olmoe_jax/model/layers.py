"""Norms, rotary embeddings, SwiGLU and attention (with an optional KV cache) as pure functions.

Shapes: B batch, T query positions, S key positions, D model width, H query heads, K kv heads,
G = H // K heads per kv head, hd head dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x, scale, eps: float):
    """RMSNorm over the trailing axes covered by `scale` (all of them when scale is None).

    Computed in float32, returned in x.dtype. `scale` may span several trailing axes: OLMoE's
    QK-norm normalises the whole H*hd projection, which is stored as [H, hd].
    """
    nd = 1 if scale is None else scale.ndim
    axes = tuple(range(x.ndim - nd, x.ndim))
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=axes, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)


def layer_norm(x, eps: float, num_axes: int = 1):
    """Non-parametric LayerNorm (no scale, no bias; the paper's norm ablation)."""
    axes = tuple(range(x.ndim - num_axes, x.ndim))
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=axes, keepdims=True)
    return ((xf - mu) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def norm(x, scale, cfg, num_axes: int = 1):
    """The configured norm: RMSNorm with `scale`, or non-parametric LayerNorm (scale unused)."""
    if cfg.model.norm_type == "rmsnorm":
        return rms_norm(x, scale, cfg.model.norm_eps)
    return layer_norm(x, cfg.model.norm_eps, num_axes)


def rope(x_BTHd, positions_BT, theta: float):
    """Rotary embedding, rotate-half convention (HF Llama/OLMoE): pairs (i, i + hd/2)."""
    hd = x_BTHd.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    ang_BTf = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    cos = jnp.cos(ang_BTf)[:, :, None, :]
    sin = jnp.sin(ang_BTf)[:, :, None, :]
    xf = x_BTHd.astype(jnp.float32)
    x1, x2 = xf[..., : hd // 2], xf[..., hd // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHd.dtype)


def swiglu(x, w_gate, w_up, w_down):
    """down(silu(x @ gate) * (x @ up)); weights [D, F], [D, F], [F, D]."""
    return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


def attention(p, x_BTD, positions_BT, cfg, cache=None):
    """Causal multi-head attention with GQA, OLMoE QK-norm and RoPE.

    p: one layer's weights {wq [D,H,hd], wk/wv [D,K,hd], wo [H,hd,D], q_norm [H,hd], k_norm [K,hd]}.
    cache: None, or {"k": [B,S,K,hd], "v": [B,S,K,hd], "index": int32 []}: the new keys and values
    are written at positions index..index+T, and queries attend to everything written so far.
    Returns (y_BTD, new_cache or None).
    """
    m = cfg.model
    dt = x_BTD.dtype
    q = jnp.einsum("btd,dhk->bthk", x_BTD, p["wq"].astype(dt))
    k = jnp.einsum("btd,dhk->bthk", x_BTD, p["wk"].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", x_BTD, p["wv"].astype(dt))
    if m.qk_norm:  # over the whole projection, before RoPE (OLMoE)
        q = norm(q, p.get("q_norm"), cfg, num_axes=2)
        k = norm(k, p.get("k_norm"), cfg, num_axes=2)
    q = rope(q, positions_BT, m.rope_theta)
    k = rope(k, positions_BT, m.rope_theta)

    B, T, H, hd = q.shape
    K = k.shape[2]
    if cache is None:
        keys, values, new_cache = k, v, None
        k_pos_BS = positions_BT
        valid_BS = jnp.ones(k_pos_BS.shape, bool)
    else:
        idx = cache["index"]
        keys = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, idx, 0, 0))
        values = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, idx, 0, 0))
        new_cache = {"k": keys, "v": values, "index": idx + T}
        S = keys.shape[1]
        k_pos_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        valid_BS = k_pos_BS < idx + T
        keys, values = keys.astype(dt), values.astype(dt)

    q = q.reshape(B, T, K, H // K, hd)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, keys).astype(jnp.float32) * (hd ** -0.5)
    mask_BTS = (k_pos_BS[:, None, :] <= positions_BT[:, :, None]) & valid_BS[:, None, :]
    logits = jnp.where(mask_BTS[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, values).reshape(B, T, H, hd)
    y = jnp.einsum("bthk,hkd->btd", out, p["wo"].astype(dt))
    return y, new_cache
