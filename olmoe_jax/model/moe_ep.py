"""Expert parallelism: the MoE block as one explicit `jax.shard_map` over the mesh.

Every mesh axis is manual inside. The batch is split over the batch axes (data, fsdp,
expert: parallel/rules.py), and each device routes only its own tokens: the routing groups
are the batch shards. Token choice without a capacity is therefore exactly the one-device
function of the global batch; with a capacity factor, each expert's capacity C and the
GShard priority apply within a shard's T_local tokens, and under expert choice each expert
picks its top C = capacity(T_local, ...) among a shard's tokens (as GShard groups and
deployed expert-choice systems do); on one device both are the same function applied to each
shard of the batch in turn. The router statistics are summed (counts) or averaged (means;
every shard holds equally many tokens) over the batch axes, so the losses see the global batch.

Then, with X devices on the expert axis, each holding L = E / X experts: tokens go to the
devices of their experts (parallel/expert.py: padded all_to_all), are regrouped by local
expert into the tile-padded layout, run through the grouped SwiGLU (kernels.gmm_swiglu),
come back and are combined with their routing weights. Buffers hold S rows per destination
for the n tokens sent at once: dropless, S = n * min(k, L), the most a device can send to one
device (a token's k experts are distinct), so nothing can drop; since a device may so receive
X * S rows, dropless token choice sends its T_local tokens in up to X rounds
(`exchange_rounds`) of n = T_local / rounds, and the X * S receive rows stay about
T_local * min(k, L). With model.capacity_factor > 0 (capacity routing, expert choice),
S = min(n * min(k, L), L * C) in one round, about capacity_factor times the average, and
nothing drops beyond what the router already dropped and counted.

Weights enter with their own shardings: the expert dim stays split over expert and the FFN
hidden dim over tensor; every other split (FSDP's embed dim) is all-gathered inside, whose
transpose reduce-scatters the gradients (FSDP). The down projections' partial sums over the
tensor-split hidden dim are summed with one psum per layer.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from olmoe_jax.model import moe_impls
from olmoe_jax.model.routing import block_stats, capacity, route, router_logits
from olmoe_jax.parallel import expert, rules

# Logical weight dims that stay split inside the block (their mesh axes are the expert and
# the FFN-hidden split); every other split dim is all-gathered.
_KEPT = ("expert", "mlp")


def moe_block_ep(p, x_BTD, cfg, mesh: Mesh, weight_axes):
    """moe.moe_block on a mesh: (y_BTD, stats) with stats of the global batch.

    weight_axes: {name: logical axis names of p[name]} (one layer's, no `layers` axis).
    """
    if weight_axes is None:
        raise ValueError("moe_block with a mesh needs weight_axes, the logical axes of p "
                         "(transformer.apply passes them)")
    w_specs = {k: rules.logical_spec(weight_axes[k]) for k in p}
    x_spec = rules.activation_spec(("batch", "length", "embed"))
    stat_specs = {"tokens_per_expert": PartitionSpec(), "prob_mean": PartitionSpec(),
                  "z_loss": PartitionSpec(), "dropped_frac": PartitionSpec(), "topk_idx": x_spec}
    expert_axis = w_specs["w_gate"][0]
    body = functools.partial(_local_block, cfg=cfg, mesh=mesh, w_specs=w_specs, weight_axes=weight_axes,
                             batch_axes=_axes(x_spec[0]), expert_axis=expert_axis,
                             num_shards=mesh.shape[expert_axis] if expert_axis else 1)
    # check_vma=False: Pallas calls (megablox, the project's kernels) declare outputs without
    # mesh-axis variance, which a checked shard_map rejects. Unchecked, the transpose sums the
    # gradients of inputs replicated over an axis at the boundary; the tests compare every
    # layout's gradients with one device.
    return jax.shard_map(body, mesh=mesh, in_specs=(w_specs, x_spec),
                         out_specs=(x_spec, stat_specs), check_vma=False)(p, x_BTD)


def _axes(assigned) -> tuple[str, ...]:
    if assigned is None:
        return ()
    return assigned if isinstance(assigned, tuple) else (assigned,)


def _local_block(p, x_BTD, *, cfg, mesh, w_specs, weight_axes, batch_axes, expert_axis, num_shards):
    """One device's part: its weight shards and its batch shard x [B_local, T, D] ->
    (y [B_local, T, D], stats of the global batch)."""
    m = cfg.model
    keep = {k: {d: spec for d, (name, spec) in enumerate(zip(weight_axes[k], w_specs[k]))
                if name in _KEPT} for k in p}
    p = {k: expert.gather_weight(v, w_specs[k], keep[k]) for k, v in p.items()}
    B, T, D = x_BTD.shape
    x_TD = x_BTD.reshape(B * T, D)
    L = p["w_gate"].shape[0]  # local experts
    eng = moe_impls.engine(cfg, B * T * m.top_k, L, mesh)
    r = route(router_logits(p["router"], x_TD), cfg, eng)
    if num_shards == 1:
        y_TD = moe_impls.IMPLS[m.moe_impl](p, x_TD, r, cfg, eng)
    else:
        y_TD = _exchange(p, x_TD, r, cfg, eng, expert_axis, num_shards)
    y_TD = moe_impls.shared_experts(p, y_TD, x_TD)
    hidden_axes = _axes(w_specs["w_gate"][2])
    if hidden_axes:  # partial sums over the split FFN hidden dim
        y_TD = jax.lax.psum(y_TD, hidden_axes)
    stats = block_stats(r, B, T)
    stats["tokens_per_expert"] = jax.lax.psum(stats["tokens_per_expert"], batch_axes)
    for name in ("prob_mean", "z_loss", "dropped_frac"):
        stats[name] = jax.lax.pmean(stats[name], batch_axes)
    return y_TD.reshape(B, T, D), stats


def rows_per_shard(cfg, num_tokens: int, num_shards: int) -> int:
    """S, the send-buffer rows per destination device for `num_tokens` local tokens."""
    m = cfg.model
    E, k = m.num_experts, m.top_k
    L = E // num_shards
    C = capacity(num_tokens, E, k, m.capacity_factor) if m.capacity_factor > 0 else 0
    if m.router_type == "expert_choice":
        return L * C
    worst = num_tokens * min(k, L)
    return min(worst, L * C) if C else worst


def exchange_rounds(cfg, num_tokens: int, num_shards: int) -> int:
    """How many rounds the dropless exchange of `num_tokens` local tokens runs in: the largest
    divisor of num_tokens up to num_shards, so that a round's receive buffer (num_shards *
    S rows for num_tokens / rounds tokens) holds about one round's share of the local slots,
    not num_shards times them. 1 with a capacity (its buffers are bounded already)."""
    m = cfg.model
    if m.router_type == "expert_choice" or m.capacity_factor > 0:
        return 1
    return max(c for c in range(1, num_shards + 1) if num_tokens % c == 0)


def _exchange(p, x_TD, r, cfg, eng, axis: str, num_shards: int):
    """The routed experts with tokens exchanged over `axis`: y_TD for this shard's tokens.

    Dropless token choice runs in rounds over token chunks (a scan whose body is
    rematerialised, so the backward keeps only each round's tokens, not its buffers): the
    worst-case buffers then follow the local batch. Token choice lists slot n = t*k + j, so
    chunk i holds tokens [i*Tc, (i+1)*Tc) and their slots."""
    T, D = x_TD.shape
    rounds = exchange_rounds(cfg, T, num_shards)
    if rounds == 1:
        return _exchange_once(p, x_TD, r.token_N, r.expert_N, r.weight_N, r.kept_N, cfg, eng,
                              axis, num_shards)
    Tc, k = T // rounds, cfg.model.top_k
    token_N = jnp.repeat(jnp.arange(Tc, dtype=jnp.int32), k)

    def one_round(_, xs):
        x_cD, expert_N, weight_N = xs
        return None, _exchange_once(p, x_cD, token_N, expert_N, weight_N,
                                    jnp.ones(expert_N.shape, bool), cfg, eng, axis, num_shards)

    _, y = jax.lax.scan(jax.checkpoint(one_round), None,
                        (x_TD.reshape(rounds, Tc, D), r.expert_N.reshape(rounds, Tc * k),
                         r.weight_N.reshape(rounds, Tc * k)))
    return y.reshape(T, D)


def _exchange_once(p, x_TD, token_N, expert_N, weight_N, kept_N, cfg, eng, axis: str,
                   num_shards: int):
    """One exchange of assignments (token_N, expert_N, weight_N, kept_N) [N] of x_TD's tokens."""
    T = x_TD.shape[0]
    L = p["w_gate"].shape[0]
    S = rows_per_shard(cfg, T, num_shards)
    R = num_shards * S
    pos_N = expert.send_positions(expert_N // L, kept_N, num_shards, S)
    recv_RD, local_R = expert.dispatch(x_TD, token_N, expert_N % L, pos_N, R, axis, L)
    # Received rows come grouped by source; the grouped matmul wants them by local expert.
    # Empty rows carry expert id L, the slack group that costs no FLOPs.
    # The receive buffer is sized for the worst case; balanced routing fills T * k of its R
    # rows on average (expert choice fills its buckets), which the kernels' cost estimate takes.
    live = R if cfg.model.router_type == "expert_choice" else min(R, T * cfg.model.top_k)
    out_RD = moe_impls.grouped_swiglu(p, recv_RD, local_R[:, None], jnp.ones((R, 1), jnp.float32),
                                      eng, unrouted=True, live_rows=live)
    return expert.combine(out_RD, pos_N, token_N, weight_N, T, axis)
