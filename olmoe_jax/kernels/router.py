"""Fused token-choice router: softmax over experts, top-k, optional renormalisation, and the
statistics the losses need, with a hand-written backward.

Differentiable outputs and what they feed: `weights_Tk` (the combine weights), `prob_mean_E`
(the load-balancing loss, which multiplies it by stop-gradient slot counts) and `lse_T` (the
z-loss, mean(lse^2)). `idx_Tk` and `group_sizes_E` are integers and carry no gradient.

The backward needs only the softmax p = softmax(logits) (recomputed from the logits) and the
chosen ids: with v_j = p[idx_j] and, when renormalising, w_j = v_j / s, s = sum_j v_j,
  dv_j = dw_j                                   (no renormalisation)
  dv_j = (dw_j - sum_i dw_i w_i) / s            (renormalisation)
  g[t, e] = sum_j [idx_tj = e] dv_tj + dprob_mean_e / T
  dlogits = p * (g - <g, p>) + dlse * p          (softmax's vjp; d lse / d logits = p)
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from olmoe_jax.kernels import router_pallas
from olmoe_jax.kernels.gmm import resolve


class RouterOut(NamedTuple):
    weights_Tk: jax.Array  # f32 combine weights (renormalised to sum 1 if asked)
    idx_Tk: jax.Array  # int32 chosen experts, in descending probability
    group_sizes_E: jax.Array  # int32 slots per expert (sums to T*k)
    prob_mean_E: jax.Array  # f32 mean router probability per expert
    lse_T: jax.Array  # f32 logsumexp of each token's logits (z-loss = mean(lse^2))


def router_reference(logits_TE, k: int, renormalize: bool = False) -> RouterOut:
    """Pure XLA; differentiable by jax's own autodiff (the check for the custom backward)."""
    logits_TE = logits_TE.astype(jnp.float32)
    E = logits_TE.shape[1]
    p_TE = jax.nn.softmax(logits_TE, axis=-1)
    w_Tk, idx_Tk = jax.lax.top_k(p_TE, k)
    if renormalize:
        w_Tk = w_Tk / jnp.sum(w_Tk, axis=-1, keepdims=True)
    idx_Tk = idx_Tk.astype(jnp.int32)
    sizes_E = jnp.zeros((E,), jnp.int32).at[idx_Tk.reshape(-1)].add(1)
    return RouterOut(w_Tk, idx_Tk, sizes_E, jnp.mean(p_TE, axis=0),
                     jax.nn.logsumexp(logits_TE, axis=-1))


def _forward(logits_TE, k, renormalize, impl, interpret) -> RouterOut:
    if impl == "xla":
        return router_reference(logits_TE, k, renormalize)
    if impl == "pallas":
        w, idx, lse, counts, psum = router_pallas.route_topk(
            logits_TE, k, renormalize, interpret=interpret, platform=jax.default_backend())
        return RouterOut(w, idx, counts, psum / logits_TE.shape[0], lse)
    raise ValueError(f"router: unknown impl {impl!r}; expected xla or pallas")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _router(logits_TE, k, renormalize, impl, interpret):
    return _forward(logits_TE, k, renormalize, impl, interpret)


def _router_fwd(logits_TE, k, renormalize, impl, interpret):
    out = _forward(logits_TE, k, renormalize, impl, interpret)
    return out, (logits_TE, out.weights_Tk, out.idx_Tk)


def _router_bwd(k, renormalize, impl, interpret, res, cot: RouterOut):
    logits_TE, w_Tk, idx_Tk = res
    T, E = logits_TE.shape
    p_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
    dw_Tk = cot.weights_Tk.astype(jnp.float32)
    if renormalize:
        s_T1 = jnp.sum(jnp.take_along_axis(p_TE, idx_Tk, axis=1), axis=1, keepdims=True)
        dv_Tk = (dw_Tk - jnp.sum(dw_Tk * w_Tk, axis=1, keepdims=True)) / s_T1
    else:
        dv_Tk = dw_Tk
    g_TE = jnp.zeros((T, E), jnp.float32).at[jnp.arange(T)[:, None], idx_Tk].add(dv_Tk)
    g_TE = g_TE + cot.prob_mean_E.astype(jnp.float32)[None, :] / T
    dlogits_TE = p_TE * (g_TE - jnp.sum(g_TE * p_TE, axis=1, keepdims=True))
    dlogits_TE = dlogits_TE + cot.lse_T.astype(jnp.float32)[:, None] * p_TE
    return (dlogits_TE.astype(logits_TE.dtype),)


_router.defvjp(_router_fwd, _router_bwd)


def router(logits_TE, k: int, *, renormalize: bool = False, impl: str = "xla",
           interpret: bool | None = None) -> RouterOut:
    """Routes T tokens by their logits [T, E] (float32): top-k of softmax(logits).

    impl: "xla" (reference forward) or "pallas" (the fused kernel: Mosaic on TPU, Triton on
    GPU, interpreted when jax runs on CPU). Both use the analytic backward above.
    """
    if interpret is None:
        interpret = resolve().interpret
    return _router(logits_TE, k, renormalize, impl, interpret)
