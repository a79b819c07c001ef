"""The expert-sorted, tile-padded token layout, and the permute / unpermute pair.

Token choice gives every token k (token, expert) slots, slot n = t*k + j. `make_layout` sorts
the slots by expert (stable, so token order within an expert) and pads each expert's group to
a multiple of the tile `tm`, so every tm-row tile of the buffer belongs to one expert (what
`gmm` needs). The buffer has a static number of rows, `num_rows(T*k, E, tm)`: enough for the
worst case, sum_e ceil(n_e / tm) * tm <= T*k + min(E, T*k) * (tm - 1).

permute:   buf[r] = x[token of slot r] (zero on padding rows)            [T, D] -> [G, D]
unpermute: y[t] = sum_j w[t, j] * buf[dest_row[t, j]]                    [G, D] -> [T, D]
Each is the other's transpose, which is how their custom_vjps are written: the backward of
permute is an unweighted unpermute, the backward of unpermute a weighted permute (plus the
weight gradient <dy[t], buf[dest_row[t, j]]>). `impl="xla"` uses gathers; `impl="pallas"` the
row kernels of permute_pallas.py: Mosaic-TPU (scalar prefetch, which Triton lacks, so not for
GPUs), interpreted when jax runs on CPU.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from olmoe_jax.kernels import permute_pallas
from olmoe_jax.kernels.gmm import resolve


class Layout(NamedTuple):
    dest_row_Tk: jax.Array  # int32 row of slot (t, j) in the buffer
    src_slot_G: jax.Array  # int32 slot t*k + j held by buffer row r; T*k on padding rows
    group_sizes_E: jax.Array  # int32 slots per expert
    padded_sizes_E: jax.Array  # int32 group sizes rounded up to multiples of tm


def num_rows(num_slots: int, num_experts: int, tm: int) -> int:
    """Static buffer rows: the worst-case padded total, a multiple of tm (at least one tile)."""
    nonempty = min(num_experts, num_slots)
    return max(1, (num_slots + nonempty * (tm - 1)) // tm) * tm


def make_layout(idx_Tk, num_experts: int, tm: int) -> Layout:
    """Layout for top-k expert ids idx_Tk [T, k] (int32)."""
    T, k = idx_Tk.shape
    N = T * k
    expert_N = idx_Tk.reshape(N).astype(jnp.int32)
    order_N = jnp.argsort(expert_N, stable=True).astype(jnp.int32)  # slots sorted by expert
    group_sizes_E = jnp.zeros((num_experts,), jnp.int32).at[expert_N].add(1)
    padded_sizes_E = (group_sizes_E + tm - 1) // tm * tm
    start_E = jnp.cumsum(group_sizes_E) - group_sizes_E
    padded_start_E = jnp.cumsum(padded_sizes_E) - padded_sizes_E
    sorted_expert_N = expert_N[order_N]
    rank_N = jnp.arange(N, dtype=jnp.int32) - start_E[sorted_expert_N]
    row_of_sorted_N = padded_start_E[sorted_expert_N] + rank_N
    dest_row_N = jnp.zeros((N,), jnp.int32).at[order_N].set(row_of_sorted_N)
    G = num_rows(N, num_experts, tm)
    src_slot_G = jnp.full((G,), N, jnp.int32).at[row_of_sorted_N].set(order_N)
    return Layout(dest_row_N.reshape(T, k), src_slot_G, group_sizes_E, padded_sizes_E)


# --------------------------------------------------------------------- the two directions

def _gather(x_TD, src_G, scale_G, impl, interpret):
    """out[r] = scale[r] * x[src[r]]; src may equal T (padding), read as a zero row."""
    T = x_TD.shape[0]
    src_G = jnp.minimum(src_G, T - 1)  # padding rows have scale 0, any row will do
    if impl == "pallas":
        return permute_pallas.gather_rows(x_TD, src_G, scale_G, interpret=interpret)
    rows_GD = jnp.take(x_TD, src_G, axis=0).astype(jnp.float32)
    return (rows_GD * scale_G[:, None]).astype(x_TD.dtype)


def _combine(buf_GD, dest_Tk, w_Tk, impl, interpret):
    if impl == "pallas":
        return permute_pallas.combine_rows(buf_GD, dest_Tk, w_Tk, interpret=interpret)
    rows_TkD = jnp.take(buf_GD, dest_Tk, axis=0).astype(jnp.float32)
    return jnp.einsum("tkd,tk->td", rows_TkD, w_Tk.astype(jnp.float32)).astype(buf_GD.dtype)


def _row_scale(layout: Layout, w_Tk=None):
    """Per buffer row: the slot's weight (1 if w is None), 0 on padding rows."""
    N = layout.dest_row_Tk.size
    live_G = layout.src_slot_G < N
    if w_Tk is None:
        return live_G.astype(jnp.float32)
    w_N = jnp.concatenate([w_Tk.reshape(N).astype(jnp.float32), jnp.zeros((1,), jnp.float32)])
    return w_N[layout.src_slot_G]


# ---------------------------------------------------------------------------- permute

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _permute(x_TD, layout, impl, interpret):
    k = layout.dest_row_Tk.shape[1]
    return _gather(x_TD, layout.src_slot_G // k, _row_scale(layout), impl, interpret)


def _permute_fwd(x_TD, layout, impl, interpret):
    return _permute(x_TD, layout, impl, interpret), layout


def _permute_bwd(impl, interpret, layout, dbuf_GD):
    ones_Tk = jnp.ones(layout.dest_row_Tk.shape, jnp.float32)
    dx_TD = _combine(dbuf_GD, layout.dest_row_Tk, ones_Tk, impl, interpret)
    return dx_TD, jax.tree.map(lambda _: None, layout)


_permute.defvjp(_permute_fwd, _permute_bwd)


def permute(x_TD, layout: Layout, *, impl: str = "xla", interpret: bool | None = None):
    """[G, D] expert-sorted, tile-padded copy of the k slots of each token; zero padding."""
    return _permute(x_TD, layout, impl, _interpret(interpret))


# -------------------------------------------------------------------------- unpermute

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _unpermute(buf_GD, w_Tk, layout, impl, interpret):
    return _combine(buf_GD, layout.dest_row_Tk, w_Tk, impl, interpret)


def _unpermute_fwd(buf_GD, w_Tk, layout, impl, interpret):
    return _unpermute(buf_GD, w_Tk, layout, impl, interpret), (buf_GD, w_Tk, layout)


def _unpermute_bwd(impl, interpret, res, dy_TD):
    buf_GD, w_Tk, layout = res
    k = layout.dest_row_Tk.shape[1]
    dbuf_GD = _gather(dy_TD.astype(buf_GD.dtype), layout.src_slot_G // k,
                      _row_scale(layout, w_Tk), impl, interpret)
    rows_TkD = jnp.take(buf_GD, layout.dest_row_Tk, axis=0)
    dw_Tk = jnp.einsum("tkd,td->tk", rows_TkD.astype(jnp.float32), dy_TD.astype(jnp.float32))
    return dbuf_GD, dw_Tk.astype(w_Tk.dtype), jax.tree.map(lambda _: None, layout)


_unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


def unpermute(buf_GD, w_Tk, layout: Layout, *, impl: str = "xla", interpret: bool | None = None):
    """[T, D] = sum over each token's k slots of weight * its buffer row (f32 accumulation)."""
    return _unpermute(buf_GD, w_Tk, layout, impl, _interpret(interpret))


def _interpret(interpret: bool | None) -> bool:
    return resolve().interpret if interpret is None else interpret
