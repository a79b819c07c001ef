"""Expert-parallel token exchange over one mesh axis, for use inside a `jax.shard_map`.

A leaf: arrays and axis names only, no model. Each of the X devices on the axis holds N
assignments (local token, destination device, a small integer tag such as the expert id on
the destination, combine weight). They travel in a padded send buffer of X blocks of S rows,
block j for device j; one `all_to_all` delivers block j of every device to device j, in
source order, so each device receives X*S rows [source, row] with their tags. After the
experts ran on them, the reverse `all_to_all` brings the results back to the same rows, and
each token sums its assignments' rows times their weights.

S must bound the rows any device sends to any one device (the caller sizes it: the dropless
worst case, or a capacity); an assignment past S would not be sent (`send_positions` marks it
unsent, and its result row reads as zero). Padded `all_to_all` is what XLA:CPU implements;
`jax.lax.ragged_all_to_all` (TPU, GPU) could send only the occupied rows, but not yet here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def send_positions(dest_N, send_N, num_dest: int, rows_per_dest: int):
    """Row of each assignment in the [num_dest * rows_per_dest] send buffer: its destination's
    block plus its rank among the sent assignments to that destination (in assignment order);
    num_dest * rows_per_dest (past the buffer: not sent) where send_N is False or the block is
    full. dest_N int32 [N], send_N bool [N] -> int32 [N]."""
    X, S = num_dest, rows_per_dest
    onehot_NX = (dest_N[:, None] == jnp.arange(X, dtype=dest_N.dtype)) & send_N[:, None]
    # One-hot running counts: O(N * X) integer adds, no sort.
    rank_N = jnp.sum(jnp.cumsum(onehot_NX, axis=0, dtype=jnp.int32) * onehot_NX, axis=1) - 1
    ok_N = send_N & (rank_N < S)
    return jnp.where(ok_N, dest_N * S + rank_N, X * S).astype(jnp.int32)


def dispatch(x_TD, token_N, tag_N, pos_N, num_rows: int, axis_name: str, empty_tag: int):
    """Sends each assignment's token row to its destination: (recv_RD, recv_tag_R).

    x_TD: this device's tokens; token_N, tag_N int32 [N]; pos_N from send_positions;
    num_rows R = X * S. Received row j*S + i is row i of source j's block for this device;
    rows nobody filled are zero with tag `empty_tag`. Differentiable in x_TD (the backward
    is the reverse all_to_all and a scatter-add into the tokens).
    """
    T, D = x_TD.shape
    src_R = jnp.full((num_rows,), T, jnp.int32).at[pos_N].set(token_N, mode="drop")
    x_pad = jnp.concatenate([x_TD, jnp.zeros((1, D), x_TD.dtype)])  # row T: empty rows
    send_RD = jnp.take(x_pad, src_R, axis=0)
    tag_R = jnp.full((num_rows,), empty_tag, jnp.int32).at[pos_N].set(tag_N, mode="drop")
    recv_RD = jax.lax.all_to_all(send_RD, axis_name, 0, 0, tiled=True)
    recv_tag_R = jax.lax.all_to_all(tag_R, axis_name, 0, 0, tiled=True)
    return recv_RD, recv_tag_R


def combine(out_RD, pos_N, token_N, weight_N, num_tokens: int, axis_name: str):
    """Returns the rows `dispatch` delivered (now results, [R, D]) to their senders and sums
    them per token: y[t] = sum over t's assignments n of weight[n] * row pos[n] (float32
    accumulation, out_RD's dtype). Unsent assignments (pos = R) contribute zero."""
    back_RD = jax.lax.all_to_all(out_RD, axis_name, 0, 0, tiled=True)
    D = back_RD.shape[1]
    back_pad = jnp.concatenate([back_RD, jnp.zeros((1, D), back_RD.dtype)])
    contrib_ND = jnp.take(back_pad, pos_N, axis=0).astype(jnp.float32) * weight_N[:, None]
    y_TD = jax.ops.segment_sum(contrib_ND, token_N, num_segments=num_tokens)
    return y_TD.astype(out_RD.dtype)


def gather_weight(w, spec, keep: dict[int, str]):
    """The shard of weight `w` that a device computes with, inside a shard_map whose in_spec
    for it is `spec`: every sharded dim is all-gathered over its mesh axes, except dims in
    `keep` ({dim: mesh axis}) which stay split over that axis. The all-gather's transpose is
    a reduce-scatter, so the gradient leaves the shard_map FSDP-sharded as the weight came."""
    for dim, assigned in enumerate(tuple(spec)):
        if assigned is None:
            continue
        axes = assigned if isinstance(assigned, tuple) else (assigned,)
        if keep.get(dim) in axes:
            if len(axes) > 1:
                raise ValueError(f"gather_weight: dim {dim} is split over {axes}; expected "
                                 f"{keep[dim]!r} alone")
            continue
        w = jax.lax.all_gather(w, axes if len(axes) > 1 else axes[0], axis=dim, tiled=True)
    return w
