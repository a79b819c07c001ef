"""The implementations of the routed experts, listed in `IMPLS`, and the grouped computation
they share with expert parallelism (moe_ep.py).

Every implementation computes the same function as `dense` for the same `Routing`:
y[t] = sum over t's kept assignments (expert e, weight w) of w * SwiGLU_e(x[t]).

dense     the reference: every expert on every token, combined with the dense [T, E] weights.
capacity  GShard-style buckets: each expert gets C = routing.capacity(...) rows, filled with
          its kept assignments; one batched matmul [E, C, D] x [E, D, F]. Dropped assignments
          (token choice with a capacity factor) have no bucket row and weight 0; expert choice
          fills every bucket exactly, so it is also what `dropless` runs for expert choice.
dropless  token choice: the T*k slots sorted by expert into tile-padded groups
          (kernels.permute), three grouped matmuls (kernels.gmm_swiglu; backend, tile size and
          interpret mode from kernels.resolve), and the weighted combine back
          (kernels.unpermute). Nothing is dropped. On the xla backend the three products run
          in one fused loop over tiles; elsewhere gate and up share one grouped matmul over
          [E, D, 2F].
Signature of each: fn(p, x_TD, routing, cfg, engine) -> y_TD, engine a kernels.Engine.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from olmoe_jax import kernels
from olmoe_jax.model import layers
from olmoe_jax.model.routing import Routing, capacity, combine_matrix


def engine(cfg, num_slots: int, num_experts: int, mesh=None) -> kernels.Engine:
    """The MoE's kernels for `num_slots` routed rows over `num_experts` groups, from
    `model.moe_backend` (kernels.resolve: the one place these choices are made), for the
    platform of `mesh`'s devices (an ahead-of-time TPU compile on a CPU host) or jax's."""
    target = mesh.devices.flat[0].platform if mesh is not None else None
    return kernels.resolve(cfg.model.moe_backend, num_slots, num_experts, target=target)


def dense_experts(p, x_TD, r: Routing, cfg, eng=None):
    """Reference: every expert on every token, combined with the dense [T, E] weights.

    Costs E/k times the FLOPs of a sparse implementation; used to check the others.
    """
    del cfg, eng
    dt = x_TD.dtype
    T, E = x_TD.shape[0], p["w_gate"].shape[0]
    g_TEF = jnp.einsum("td,edf->tef", x_TD, p["w_gate"].astype(dt))
    u_TEF = jnp.einsum("td,edf->tef", x_TD, p["w_up"].astype(dt))
    h_TEF = jax.nn.silu(g_TEF) * u_TEF
    y_TED = jnp.einsum("tef,efd->ted", h_TEF, p["w_down"].astype(dt))
    c_TE = combine_matrix(r, T, E)
    return jnp.einsum("ted,te->td", y_TED.astype(jnp.float32), c_TE).astype(dt)


def grouped_swiglu(p, x_TD, idx_Tk, w_Tk, eng: kernels.Engine, *, unrouted: bool = False,
                   live_rows: int | None = None):
    """y[t] = sum_j w[t, j] * SwiGLU_{idx[t, j]}(x[t]) through the sorted, tile-padded layout.

    p: {w_gate, w_up [E, D, F], w_down [E, F, D]}; idx_Tk int32 [T, k]; w_Tk f32 [T, k].
    unrouted: idx may hold E, "no expert": such slots form one more group after the real ones,
    which the grouped matmul treats as slack (no FLOPs, zero output). live_rows: how many
    slots are expected routed, for the kernels' cost estimate (kernels.gmm).
    """
    E = p["w_gate"].shape[0]
    dt = x_TD.dtype
    ws = [p[k].astype(dt) for k in ("w_gate", "w_up", "w_down")]
    layout = kernels.make_layout(idx_Tk, E + int(unrouted), eng.tm)
    buf_GD = kernels.permute(x_TD, layout, impl=eng.rows, interpret=eng.interpret)
    out_GD = kernels.gmm_swiglu(buf_GD, *ws, layout.padded_sizes_E[:E], tm=eng.tm,
                                backend=eng.backend, platform=eng.platform,
                                interpret=eng.interpret, live_rows=live_rows)
    return kernels.unpermute(out_GD, w_Tk, layout, impl=eng.rows, interpret=eng.interpret)


def dropless_experts(p, x_TD, r: Routing, cfg, eng: kernels.Engine):
    m = cfg.model
    if m.router_type == "expert_choice":
        return capacity_experts(p, x_TD, r, cfg, eng)  # fixed, full buckets: nothing to sort
    T, k = x_TD.shape[0], m.top_k
    # Token-choice routings list slot n = t*k + j (routing.py), so [T, k] is a reshape.
    return grouped_swiglu(p, x_TD, r.expert_N.reshape(T, k), r.weight_N.reshape(T, k), eng)


def capacity_experts(p, x_TD, r: Routing, cfg, eng=None):
    del eng
    m = cfg.model
    T, D = x_TD.shape
    E = p["w_gate"].shape[0]
    C = capacity(T, E, m.top_k, m.capacity_factor)
    N = r.expert_N.shape[0]
    # Bucket position of each kept assignment: its rank among its expert's kept assignments.
    # The router guarantees at most C kept per expert; the order within a bucket is free.
    key_N = jnp.where(r.kept_N, r.expert_N, E)
    order_N = jnp.argsort(key_N, stable=True)
    count_E1 = jnp.zeros((E + 1,), jnp.int32).at[key_N].add(1)
    start_E1 = jnp.cumsum(count_E1) - count_E1
    rank_sorted_N = jnp.arange(N, dtype=jnp.int32) - start_E1[key_N[order_N]]
    rank_N = jnp.zeros((N,), jnp.int32).at[order_N].set(rank_sorted_N)
    slot_N = jnp.where(r.kept_N, r.expert_N * C + rank_N, E * C)  # E*C: the dropped row
    src_S = jnp.full((E * C + 1,), T, jnp.int32).at[slot_N].set(r.token_N)[: E * C]

    dt = x_TD.dtype
    x_pad = jnp.concatenate([x_TD, jnp.zeros((1, D), dt)])  # row T: empty bucket rows
    buf_ECD = x_pad[src_S].reshape(E, C, D)
    g_ECF = jnp.einsum("ecd,edf->ecf", buf_ECD, p["w_gate"].astype(dt))
    u_ECF = jnp.einsum("ecd,edf->ecf", buf_ECD, p["w_up"].astype(dt))
    out_ECD = jnp.einsum("ecf,efd->ecd", jax.nn.silu(g_ECF) * u_ECF, p["w_down"].astype(dt))
    out_SD = jnp.concatenate([out_ECD.reshape(E * C, D), jnp.zeros((1, D), dt)])
    contrib_ND = out_SD[slot_N].astype(jnp.float32) * r.weight_N[:, None]
    y_TD = jax.ops.segment_sum(contrib_ND, r.token_N, num_segments=T)
    return y_TD.astype(dt)


def shared_experts(p, y_TD, x_TD):
    """y plus the always-on shared experts' SwiGLU of x, if p has them."""
    if "shared_gate" not in p:
        return y_TD
    dt = x_TD.dtype
    return y_TD + layers.swiglu(x_TD, p["shared_gate"].astype(dt), p["shared_up"].astype(dt),
                                p["shared_down"].astype(dt))


# name (model.moe_impl) -> fn(p, x_TD, routing, cfg, engine) -> y_TD.
IMPLS: dict[str, Callable] = {
    "dense": dense_experts,
    "capacity": capacity_experts,
    "dropless": dropless_experts,
}
