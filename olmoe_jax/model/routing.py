"""Routers: which tokens go to which experts, with what weight.

Every router returns the same `Routing`: a flat list of N static-size assignments
(token, expert, weight). Token choice has N = T*k (slot-major order is token-major: slot
n = t*k + j); expert choice has N = E*C. A dropped assignment keeps its place with weight 0
and `kept` False, so shapes never depend on the data. Every MoE implementation consumes this
one structure, which is what lets them all be checked against the dense reference.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from olmoe_jax import kernels


class Routing(NamedTuple):
    token_N: jax.Array  # int32 token index in [0, T)
    expert_N: jax.Array  # int32 expert index in [0, E)
    weight_N: jax.Array  # float32 combine weight (0 where dropped)
    kept_N: jax.Array  # bool: False where dropped by capacity
    topk_idx_Tk: jax.Array  # int32 the router's top-k choice per token (for analyses)
    tokens_per_expert_E: jax.Array  # float32 number of top-k slots per expert, before any drop
    prob_mean_E: jax.Array  # float32 mean router probability per expert (differentiable)
    z_loss: jax.Array  # float32 [] mean(logsumexp(logits)^2)
    dropped_frac: jax.Array  # float32 [] share of assignments dropped (TC) / tokens unrouted (EC)


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(factor * T * k / E), at least 1 and at most T."""
    return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def route(logits_TE, cfg, engine: kernels.Engine | None = None) -> Routing:
    """Routes T tokens given router logits [T, E] (float32) by `cfg.model.router_type`.

    engine: the MoE's resolved kernels (kernels.resolve); default: resolved from
    `model.moe_backend` here."""
    m = cfg.model
    logits_TE = logits_TE.astype(jnp.float32)
    if m.router_type == "expert_choice":
        return _expert_choice(logits_TE, cfg)
    T, E = logits_TE.shape
    k = m.top_k
    engine = engine or kernels.resolve(m.moe_backend)
    # The fused router kernel (softmax, top-k, renormalisation, statistics; analytic backward).
    out = kernels.router(logits_TE, k, renormalize=m.norm_topk_prob, impl=engine.router,
                         interpret=engine.interpret)
    z_loss = jnp.mean(jnp.square(out.lse_T))
    token_N = jnp.repeat(jnp.arange(T, dtype=jnp.int32), k)
    expert_N = out.idx_Tk.reshape(-1)
    weight_N = out.weights_Tk.reshape(-1)
    if m.capacity_factor > 0:
        C = capacity(T, E, k, m.capacity_factor)
        # GShard priority: all first choices before any second choice, then token order.
        order_kT = jnp.transpose(jax.nn.one_hot(out.idx_Tk, E, dtype=jnp.int32), (1, 0, 2))
        pos_kTE = jnp.cumsum(order_kT.reshape(k * T, E), axis=0).reshape(k, T, E) - 1
        pos_Tk = jnp.sum(jnp.transpose(pos_kTE * order_kT, (1, 0, 2)), axis=-1)
        kept_N = (pos_Tk < C).reshape(-1)
    else:
        kept_N = jnp.ones_like(token_N, bool)
    weight_N = jnp.where(kept_N, weight_N, 0.0)
    dropped = 1.0 - jnp.mean(kept_N.astype(jnp.float32))
    return Routing(token_N, expert_N, weight_N, kept_N, out.idx_Tk,
                   out.group_sizes_E.astype(jnp.float32), out.prob_mean_E, z_loss, dropped)


def _expert_choice(logits_TE, cfg) -> Routing:
    """Each expert takes its C highest-probability tokens; a token may get 0..E experts."""
    m = cfg.model
    T, E = logits_TE.shape
    k = m.top_k
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    z_loss = jnp.mean(jnp.square(jax.nn.logsumexp(logits_TE, axis=-1)))
    top_idx_Tk = jax.lax.top_k(probs_TE, k)[1].astype(jnp.int32)  # preference, for analyses
    C = capacity(T, E, k, m.capacity_factor)
    ec_w_EC, ec_tok_EC = jax.lax.top_k(probs_TE.T, C)
    token_N = ec_tok_EC.reshape(-1).astype(jnp.int32)
    expert_N = jnp.repeat(jnp.arange(E, dtype=jnp.int32), C)
    weight_N = ec_w_EC.reshape(-1)
    kept_N = jnp.ones_like(token_N, bool)
    routed_T = jnp.zeros((T,), bool).at[token_N].set(True)
    dropped = 1.0 - jnp.mean(routed_T.astype(jnp.float32))
    return Routing(token_N, expert_N, weight_N, kept_N, top_idx_Tk,
                   jnp.full((E,), float(C), jnp.float32), jnp.mean(probs_TE, axis=0), z_loss, dropped)


def router_logits(router_DE, x_TD):
    """[T, E] float32 logits. The router runs in float32: a softmax over 64 experts in bf16
    changes the top-k choice."""
    return jnp.einsum("td,de->te", x_TD.astype(jnp.float32), router_DE.astype(jnp.float32))


def block_stats(r: Routing, B: int, T: int) -> dict:
    """The MoE block's statistics from a routing of B*T tokens (see moe.moe_block)."""
    return {"tokens_per_expert": r.tokens_per_expert_E, "prob_mean": r.prob_mean_E,
            "z_loss": r.z_loss, "dropped_frac": r.dropped_frac,
            "topk_idx": r.topk_idx_Tk.reshape(B, T, -1)}


def combine_matrix(r: Routing, num_tokens: int, num_experts: int):
    """Dense [T, E] combine weights (the reference form of any routing)."""
    return jnp.zeros((num_tokens, num_experts), jnp.float32).at[r.token_N, r.expert_N].add(r.weight_N)
