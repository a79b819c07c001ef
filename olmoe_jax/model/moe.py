"""The MoE feed-forward block: router, routed experts, shared experts, router statistics.

The MoE engine, one way: this front end -> moe_ep.py (expert parallelism, given a mesh) ->
moe_impls.py (the implementations, `IMPLS`) -> routing.py (the routers) -> kernels
(`kernels.resolve` decides backend, platform, tile size and interpret mode once).
`cfg.model.moe_impl` picks how the routed experts are computed; every implementation
computes the same function as `dense` for the same `Routing` (see routing.py).
"""
from __future__ import annotations

from olmoe_jax.model import moe_ep, moe_impls
from olmoe_jax.model.routing import block_stats, route, router_logits


def moe_block(p, x_BTD, cfg, mesh=None, weight_axes=None):
    """One layer's MoE FFN. p: {router [D,E], w_gate/w_up [E,D,F], w_down [E,F,D], shared_*}.

    Returns (y_BTD, stats) with stats {tokens_per_expert [E], prob_mean [E], z_loss [],
    dropped_frac [], topk_idx [B,T,k]}.
    mesh: the device mesh under a sharded jit, or None. With a mesh of several devices the
    block runs expert-parallel (moe_ep.py): each batch shard is routed on its own and its
    tokens travel to their experts' devices; weight_axes (p's logical axis names, as
    transformer.apply passes them) give the weights' shardings. The `dense` reference runs
    under GSPMD instead, routing the whole batch at once.
    Without a mesh, the tokens of the whole (local) batch are routed together.
    """
    if mesh is not None and mesh.size > 1 and cfg.model.moe_impl != "dense":
        return moe_ep.moe_block_ep(p, x_BTD, cfg, mesh, weight_axes)
    B, T, D = x_BTD.shape
    x_TD = x_BTD.reshape(B * T, D)
    eng = moe_impls.engine(cfg, B * T * cfg.model.top_k, p["w_gate"].shape[0], mesh)
    r = route(router_logits(p["router"], x_TD), cfg, eng)
    y_TD = moe_impls.IMPLS[cfg.model.moe_impl](p, x_TD, r, cfg, eng)
    y_TD = moe_impls.shared_experts(p, y_TD, x_TD)
    return y_TD.reshape(B, T, D), block_stats(r, B, T)
