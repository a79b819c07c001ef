"""The MoE feed-forward block: router, routed experts, shared experts, router statistics.

`cfg.model.moe_impl` picks how the routed experts are computed; every implementation computes
the same function as `dense` for the same `Routing` (see routing.py).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from olmoe_jax.model import layers
from olmoe_jax.model.routing import Routing, combine_matrix, route


def dense_experts(p, x_TD, r: Routing, cfg):
    """Reference: every expert on every token, combined with the dense [T, E] weights.

    Costs E/k times the FLOPs of a sparse implementation; used to check the others.
    """
    dt = x_TD.dtype
    T, E = x_TD.shape[0], p["w_gate"].shape[0]
    g_TEF = jnp.einsum("td,edf->tef", x_TD, p["w_gate"].astype(dt))
    u_TEF = jnp.einsum("td,edf->tef", x_TD, p["w_up"].astype(dt))
    h_TEF = jax.nn.silu(g_TEF) * u_TEF
    y_TED = jnp.einsum("tef,efd->ted", h_TEF, p["w_down"].astype(dt))
    c_TE = combine_matrix(r, T, E)
    return jnp.einsum("ted,te->td", y_TED.astype(jnp.float32), c_TE).astype(dt)


# name -> fn(p, x_TD, routing, cfg) -> y_TD. Other implementations register themselves here.
IMPLS: dict[str, Callable] = {"dense": dense_experts}


def register_impl(name: str, fn: Callable) -> None:
    IMPLS[name] = fn


def _impl(cfg) -> Callable:
    name = cfg.model.moe_impl
    if name not in IMPLS:
        # Implementations outside this file register on import of their module.
        import olmoe_jax.model.moe_impls  # noqa: F401  pylint: disable=import-outside-toplevel
    return IMPLS[name]


def moe_block(p, x_BTD, cfg, mesh=None):
    """One layer's MoE FFN. p: {router [D,E], w_gate/w_up [E,D,F], w_down [E,F,D], shared_*}.

    Returns (y_BTD, stats) with stats {tokens_per_expert [E], prob_mean [E], z_loss [],
    dropped_frac [], topk_idx [B,T,k]}. Tokens of the whole (local) batch are routed together.
    mesh: the device mesh under a sharded jit (expert parallelism), or None.
    """
    B, T, D = x_BTD.shape
    x_TD = x_BTD.reshape(B * T, D)
    # Router in float32: softmax over 64 experts in bf16 changes the top-k choice.
    logits_TE = jnp.einsum("td,de->te", x_TD.astype(jnp.float32), p["router"].astype(jnp.float32))
    r = route(logits_TE, cfg)
    y_TD = _impl(cfg)(p, x_TD, r, cfg)
    if "shared_gate" in p:
        dt = x_TD.dtype
        y_TD = y_TD + layers.swiglu(x_TD, p["shared_gate"].astype(dt), p["shared_up"].astype(dt),
                                    p["shared_down"].astype(dt))
    stats = {
        "tokens_per_expert": r.tokens_per_expert_E,
        "prob_mean": r.prob_mean_E,
        "z_loss": r.z_loss,
        "dropped_frac": r.dropped_frac,
        "topk_idx": r.topk_idx_Tk.reshape(B, T, -1),
    }
    return y_TD.reshape(B, T, D), stats
