"""The OLMoE decoder as pure functions: param_specs -> init / logical_axes / count_params; apply.

Every weight is declared once in `param_specs` (shape, logical axes, initializer); everything
else is derived from that tree. Layer weights are stacked on a leading `layers` axis and run
with `jax.lax.scan`, so compile time does not grow with depth.
"""
from __future__ import annotations

import math
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from olmoe_jax.config import head_dim
from olmoe_jax.model import layers
from olmoe_jax.model.moe import moe_block
from olmoe_jax.parallel import rules


class ParamSpec(NamedTuple):
    shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical axis names, one per dim
    init: str  # "normal" (the configured weight init) | "ones"


def param_specs(cfg) -> dict[str, Any]:
    """The tree of every weight; see docs/interfaces.md for the layout."""
    m = cfg.model
    V, D, L, H, K, hd = m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, head_dim(cfg)
    rms = m.norm_type == "rmsnorm"
    w = lambda shape, axes: ParamSpec(tuple(shape), tuple(axes), "normal")  # noqa: E731
    ones = lambda shape, axes: ParamSpec(tuple(shape), tuple(axes), "ones")  # noqa: E731

    lay: dict[str, Any] = {
        "wq": w((L, D, H, hd), ("layers", "embed", "heads", "head_dim")),
        "wk": w((L, D, K, hd), ("layers", "embed", "kv_heads", "head_dim")),
        "wv": w((L, D, K, hd), ("layers", "embed", "kv_heads", "head_dim")),
        "wo": w((L, H, hd, D), ("layers", "heads", "head_dim", "embed")),
    }
    if rms:
        lay["attn_norm"] = ones((L, D), ("layers", "embed"))
        lay["mlp_norm"] = ones((L, D), ("layers", "embed"))
        if m.qk_norm:
            lay["q_norm"] = ones((L, H, hd), ("layers", "heads", "head_dim"))
            lay["k_norm"] = ones((L, K, hd), ("layers", "kv_heads", "head_dim"))
    L_moe, L_mlp = moe_layer_counts(cfg)
    if L_moe:
        E, F = m.num_experts, m.expert_dim
        # Layer-shared: one set of experts (outside `layers`) that every layer's router uses.
        Le = () if m.moe_shared_layers else (L_moe,)
        la = () if m.moe_shared_layers else ("layers",)
        experts = {
            "w_gate": w(Le + (E, D, F), la + ("expert", "embed", "mlp")),
            "w_up": w(Le + (E, D, F), la + ("expert", "embed", "mlp")),
            "w_down": w(Le + (E, F, D), la + ("expert", "mlp", "embed")),
        }
        moe = {"router": w((L_moe, D, E), ("layers", "embed", "router_expert"))}
        if not m.moe_shared_layers:
            moe.update(experts)
        if m.num_shared_experts:
            SF = m.num_shared_experts * F  # S experts of width F == one SwiGLU of width S*F
            moe["shared_gate"] = w((L_moe, D, SF), ("layers", "embed", "mlp"))
            moe["shared_up"] = w((L_moe, D, SF), ("layers", "embed", "mlp"))
            moe["shared_down"] = w((L_moe, SF, D), ("layers", "mlp", "embed"))
        lay["moe"] = moe
    if L_mlp:
        F = m.mlp_dim
        lay["mlp"] = {
            "w_gate": w((L_mlp, D, F), ("layers", "embed", "mlp")),
            "w_up": w((L_mlp, D, F), ("layers", "embed", "mlp")),
            "w_down": w((L_mlp, F, D), ("layers", "mlp", "embed")),
        }
    specs: dict[str, Any] = {"embed": w((V, D), ("vocab", "embed")), "layers": lay}
    if L_moe and m.moe_shared_layers:
        specs["layer_shared_experts"] = experts
    if rms:
        specs["final_norm"] = ones((D,), ("embed",))
    if not m.tie_embeddings:
        specs["lm_head"] = w((D, V), ("embed", "vocab"))
    return specs


def moe_layer_counts(cfg) -> tuple[int, int]:
    """(MoE layers, dense-FFN layers). With model.moe_every = n the layers run in groups of n,
    the last of each group MoE and the others dense (n = 2: layers 1, 3, 5, ... are MoE)."""
    m = cfg.model
    if m.ffn_type != "moe":
        return 0, m.num_layers
    n_moe = m.num_layers // m.moe_every
    return n_moe, m.num_layers - n_moe


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def logical_axes(cfg):
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def abstract_params(cfg):
    dtype = jnp.dtype(cfg.model.param_dtype)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(cfg), is_leaf=_is_spec)


def param_shardings(cfg, mesh):
    """NamedShardings of the params on `mesh`, from the logical axes and parallel/rules.py's
    table; ConfigError naming the weight and the mesh key when a sharded dim does not divide."""
    return rules.tree_shardings(logical_axes(cfg), abstract_params(cfg), mesh)


def init(cfg, rng) -> dict[str, Any]:
    """Initialises every weight: normal or truncated normal (std, cutoff in stds); norms to one.

    Each leaf's key is folded from its path, so adding a weight does not change the others.
    """
    m = cfg.model
    dtype = jnp.dtype(m.param_dtype)

    def one(path, spec: ParamSpec):
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        name = jax.tree_util.keystr(path)
        key = jax.random.fold_in(rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)
        if m.init == "truncated_normal":
            c = m.init_cutoff
            x = jax.random.truncated_normal(key, -c, c, spec.shape, jnp.float32)
        else:
            x = jax.random.normal(key, spec.shape, jnp.float32)
        return (x * m.init_std).astype(dtype)

    return jax.tree_util.tree_map_with_path(one, param_specs(cfg), is_leaf=_is_spec)


def count_params(cfg) -> tuple[int, int]:
    """(total, active per token). Active counts top_k routed experts (token choice) or
    top_k * capacity_factor on average (expert choice) per MoE layer, the whole router, both
    embeddings. Layer-shared experts are stored once (total) but multiply every token in every
    layer (active), so active counts them once per layer: the parameters that set the FLOPs."""
    m = cfg.model
    sizes = jax.tree.map(lambda s: math.prod(s.shape), param_specs(cfg), is_leaf=_is_spec)
    total = sum(jax.tree.leaves(sizes))
    active = total
    L_moe, _ = moe_layer_counts(cfg)
    if L_moe:
        used = m.top_k if m.router_type == "token_choice" else m.top_k * m.capacity_factor
        names = ("w_gate", "w_up", "w_down")
        if m.moe_shared_layers:
            per_expert = sum(sizes["layer_shared_experts"][k] for k in names) // m.num_experts
            active = total - m.num_experts * per_expert + int(round(L_moe * used * per_expert))
        else:
            per_expert = sum(sizes["layers"]["moe"][k] for k in names) // m.num_experts
            active = total - int(round((m.num_experts - used) * per_expert))
    return total, active


def init_cache(cfg, batch: int, max_len: int, dtype=jnp.float32):
    """An empty KV cache for `apply`: k, v [L, B, S, K, hd] and the write index."""
    m = cfg.model
    shape = (m.num_layers, batch, max_len, m.num_kv_heads, head_dim(cfg))
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.zeros((), jnp.int32)}


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The same matmul outputs, parked in pinned host memory between forward and backward:
    # device memory of "full" at the recompute cost of "dots" plus host<->device copies.
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def head_weights(params, cfg):
    """The output layer [D, V] in the compute dtype (the embedding's transpose when tied)."""
    head = params["embed"].T if cfg.model.tie_embeddings else params["lm_head"]
    return head.astype(jnp.dtype(cfg.model.compute_dtype))


def apply(params, tokens_BT, cfg, *, positions_BT=None, cache=None, return_routing=False,
          return_hidden=False, mesh=None):
    """Logits [B, T, V] (float32) and aux (router statistics per layer; see docs/interfaces.md).

    tokens_BT: int32 token ids. positions_BT: defaults to 0..T-1, or cache index + 0..T-1.
    cache: from `init_cache`; the returned aux["cache"] holds the keys/values written.
    return_hidden: return the final-norm hidden states [B, T, D] (compute dtype) instead of
    the logits, for a loss that applies `head_weights` itself (kernels.head_cross_entropy).
    mesh: the device mesh when called under a sharded jit: activations are constrained by
    parallel/rules.py's activation table (batch split over data x fsdp x expert) and the MoE
    block runs expert-parallel over it. None: no constraints (one device, generation).
    """
    m = cfg.model
    dt = jnp.dtype(m.compute_dtype)
    B, T = tokens_BT.shape
    in_order = positions_BT is None and cache is None  # lets attention skip future key blocks
    if positions_BT is None:
        start = 0 if cache is None else cache["index"]
        positions_BT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
    act = lambda a, names: rules.constrain(a, names, mesh)  # noqa: E731
    # One layer's MoE weight axes (no `layers` dim): the expert-parallel block's in_specs.
    moe_axes = None
    if mesh is not None and m.ffn_type == "moe":  # layer-shared experts have no `layers` dim
        axes = logical_axes(cfg)
        both = {**axes["layers"]["moe"], **axes.get("layer_shared_experts", {})}
        moe_axes = {k: v[1:] if v[:1] == ("layers",) else v for k, v in both.items()}
    BTD = ("batch", "length", "embed")
    x_BTD = act(jnp.take(params["embed"], tokens_BT, axis=0).astype(dt), BTD)

    L_moe, _ = moe_layer_counts(cfg)
    n = m.moe_every if L_moe else 1  # layers per scan step: n - 1 dense, then one MoE
    G = m.num_layers // n
    shared = params.get("layer_shared_experts", {})

    def at(tree, j):  # layer j of a group (with one layer per group the scan slice is the layer)
        return tree if n == 1 else jax.tree.map(lambda a: a[j], tree)

    def sublayer(x_BTD, p, kv, q):
        """One layer; q: its dense FFN weights, or None for the MoE layer."""
        c = None if kv is None else {"k": kv[0], "v": kv[1], "index": cache["index"]}
        h_BTD = act(layers.norm(x_BTD, p.get("attn_norm"), cfg), BTD)
        a_BTD, c = layers.attention(p, h_BTD, positions_BT, cfg, c, in_order=in_order, mesh=mesh)
        x_BTD = act(x_BTD + a_BTD, BTD)
        h_BTD = act(layers.norm(x_BTD, p.get("mlp_norm"), cfg), BTD)
        if q is None:
            y_BTD, stats = moe_block({**p["moe"], **shared}, h_BTD, cfg, mesh=mesh, weight_axes=moe_axes)
            if not return_routing:
                stats = {k: v for k, v in stats.items() if k != "topk_idx"}
        else:
            y_BTD, stats = layers.swiglu(h_BTD, q["w_gate"].astype(dt), q["w_up"].astype(dt),
                                         q["w_down"].astype(dt), mesh=mesh), None
        new_kv = None if c is None else (c["k"], c["v"])
        return act(x_BTD + y_BTD, BTD), stats, new_kv

    def group(x_BTD, xs):
        p, kv = xs  # one group of n layers: attention weights [n, ...], mlp [n - 1, ...], moe [...]
        attn = {k: v for k, v in p.items() if k not in ("moe", "mlp")}
        stats, new_kv = {}, []
        for j in range(n):
            pj = at(attn, j)
            if L_moe and j == n - 1:
                pj["moe"], q = p["moe"], None
            else:
                q = at(p["mlp"], j)
            x_BTD, s, c = sublayer(x_BTD, pj, None if kv is None else at(kv, j), q)
            stats = s if s is not None else stats
            new_kv.append(c)
        if kv is not None:
            new_kv = new_kv[0] if n == 1 else tuple(jnp.stack([c[i] for c in new_kv]) for i in range(2))
        return x_BTD, (stats, new_kv if kv is not None else None)

    if m.remat != "none":
        group = jax.checkpoint(group, policy=_REMAT[m.remat], prevent_cse=False)

    def by_group(a):  # [count, ...] -> [G, count / G, ...]; the MoE weights: one per group
        return a if n == 1 else a.reshape((G, a.shape[0] // G) + a.shape[1:])

    stack = {k: jax.tree.map(by_group, v) for k, v in params["layers"].items() if k != "moe"}
    if L_moe:
        stack["moe"] = params["layers"]["moe"]
    kv = None if cache is None else (by_group(cache["k"]), by_group(cache["v"]))
    x_BTD, (stats, new_kv) = jax.lax.scan(group, x_BTD, (stack, kv), unroll=1 if m.scan_layers else G)
    if new_kv is not None and n > 1:
        new_kv = tuple(a.reshape((m.num_layers,) + a.shape[2:]) for a in new_kv)
    x_BTD = act(layers.norm(x_BTD, params.get("final_norm"), cfg), BTD)
    if return_hidden:
        out = x_BTD
    else:
        out = act(jnp.einsum("btd,dv->btv", x_BTD, head_weights(params, cfg),
                             preferred_element_type=jnp.float32), ("batch", "length", "vocab"))

    aux = dict(stats)
    if "topk_idx" in aux:
        aux["routing"] = aux.pop("topk_idx")
    if cache is not None:
        aux["cache"] = {"k": new_kv[0], "v": new_kv[1], "index": cache["index"] + T}
    return out, aux
