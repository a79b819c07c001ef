"""Sparse upcycling (Komatsuzaki et al. 2023; the OLMoE paper's upcycling ablation, OLMo-1B ->
8 experts top-2): a dense checkpoint becomes a MoE whose every expert is a copy of the dense
SwiGLU, with a freshly initialised router. Attention, norms and embeddings are kept.

What holds at initialisation: every expert computes the dense FFN f(x), so the MoE block gives
(sum of the k routing weights) * f(x). With `norm_topk_prob` (or top_k == num_experts) the
weights sum to one and the upcycled model computes the dense model's function (up to the
rounding of that sum); without renormalisation the FFN output is scaled per token by the top-k
probability mass s(x) in (k/E, 1], so the function changes from the first step.

Noise (`noise` = p): each element of each expert's weights is, independently with probability
p, replaced by a fresh draw from the model's init distribution, so experts start different
(p=0.5 is the paper's "50% noise" variant, read as re-initialising half of the weights).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from olmoe_jax.config import ConfigError, validate
from olmoe_jax.model import transformer


def upcycle_config(
    dense_cfg, *, num_experts: int, top_k: int, norm_topk_prob: bool
) -> ml_collections.ConfigDict:
    """The MoE config: dense_cfg with ffn_type=moe and experts as wide as the dense FFN."""
    if dense_cfg.model.ffn_type != "dense":
        raise ConfigError(
            f"upcycling needs a dense model (model.ffn_type=dense); this one is "
            f"{dense_cfg.model.ffn_type}"
        )
    cfg = ml_collections.ConfigDict(dense_cfg.to_dict())
    cfg.model.update(
        ffn_type="moe",
        num_experts=num_experts,
        top_k=top_k,
        expert_dim=dense_cfg.model.mlp_dim,
        norm_topk_prob=norm_topk_prob,
        num_shared_experts=0,
        router_type="token_choice",
        capacity_factor=0.0,
    )
    return validate(cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "name"))
def _init_leaf(rng, cfg, name: str):
    # XLA drops every other leaf's work: only this leaf is drawn.
    return transformer.init(cfg, rng)["layers"]["moe"][name]


def _fresh_leaf(cfg, rng, name: str):
    """The leaf a fresh `init` would give (same key derivation), compiled once per config."""
    return _init_leaf(rng, cfg=ml_collections.FrozenConfigDict(cfg), name=name)


def upcycle(dense_params, moe_cfg, rng, *, noise: float = 0.0) -> dict:
    """MoE params for `moe_cfg` (from `upcycle_config`) from dense params; `noise` in [0, 1]."""
    if not 0.0 <= noise <= 1.0:
        raise ConfigError(f"--noise {noise} must be a fraction in [0, 1]")
    E = moe_cfg.model.num_experts
    dtype = jnp.dtype(moe_cfg.model.param_dtype)
    layers = {k: v for k, v in dense_params["layers"].items() if k != "mlp"}
    mlp = dense_params["layers"]["mlp"]
    init_rng, noise_rng = jax.random.split(rng)
    moe = {"router": _fresh_leaf(moe_cfg, init_rng, "router")}
    for i, name in enumerate(("w_gate", "w_up", "w_down")):
        w = jnp.asarray(mlp[name], dtype)  # [L, D, F] or [L, F, D]
        tiled = jnp.broadcast_to(w[:, None], (w.shape[0], E) + w.shape[1:])
        if noise > 0:
            fresh = _fresh_leaf(moe_cfg, init_rng, name)
            keep = jax.random.bernoulli(jax.random.fold_in(noise_rng, i), 1.0 - noise, tiled.shape)
            tiled = jnp.where(keep, tiled, fresh)
        moe[name] = jnp.asarray(tiled)
    layers["moe"] = moe
    out = {k: v for k, v in dense_params.items() if k != "layers"}
    out["layers"] = layers
    return out
