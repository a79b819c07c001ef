"""Pallas row-gather kernels behind permute/unpermute (Mosaic-TPU; interpret mode on CPU).

Both move whole rows of D features chosen by index tables. Each grid step handles a block of
rows: its slice of the index table is blocked into SMEM (so SMEM holds one block, never the
whole [T, k] or [G] table: at OLMoE's 8,192 tokens x top-8 a whole [T, k] table padded to
SMEM's 128-word rows took 4 MB of a 1 MB SMEM), the source array stays in HBM, and the step
starts one row DMA per index into VMEM, waits for all of them, then scales / sums the rows
with vector ops and writes its output block, which the pipeline copies back.

Rows per step: `block_rows` for gather (output rows), `block_tokens` for combine (output
tokens; each step DMAs block_tokens * k rows). Defaults keep the VMEM row buffer near 2 MB at
D = 2048 bf16. The row counts are padded up to a multiple of the block (index 0, weight 0).
Compiled for TPU v5p and v6e at OLMoE's size by tests/kernels/test_tpu_compile.py; not timed
on a TPU (none here).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _block(n: int, want: int) -> int:
    """Rows per step: a multiple of 16 (bf16 packs two rows per 32-bit sublane), at most
    `want`; one dividing n if n is a multiple of 16 (no padded copy of the output to cut)."""
    if n % 16 == 0:
        return max(b for b in range(16, min(n, max(want, 16)) + 1, 16) if n % b == 0)
    return max(16, min(want, -(-n // 16) * 16) // 16 * 16)


def _pad_rows(a, rows: int):
    return jnp.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1))


def _smem_rows(n: int):
    """One grid step's n indices, in SMEM. The table is passed as [steps, 1, n]: SMEM pads a
    2D array's last axis to 128 words, so [T, k] (k = 8) would take 16x its size, and Mosaic's
    rank-1 block rules need n a multiple of 1024 or a power of two >= 128."""
    return pl.BlockSpec((None, 1, n), lambda i: (i, 0, 0), memory_space=pltpu.SMEM)


def _dma_rows(src_hbm, index_ref, dst, num: int, sem, dst_at):
    """Copies src_hbm[index_ref[n]] into dst_at(n) for n < num: all started, then all awaited."""
    def copy(n):
        return pltpu.make_async_copy(src_hbm.at[pl.ds(index_ref[0, n], 1)], dst_at(dst, n), sem)

    def start(n, c):
        copy(n).start()
        return c

    def wait(n, c):
        copy(n).wait()
        return c

    jax.lax.fori_loop(0, num, start, 0)
    jax.lax.fori_loop(0, num, wait, 0)


def _gather_kernel(src_ref, scale_ref, x_hbm, out_ref, rows_ref, sem):
    R = out_ref.shape[0]
    _dma_rows(x_hbm, src_ref, rows_ref, R, sem.at[0], lambda d, n: d.at[pl.ds(n, 1)])
    out_ref[...] = (rows_ref[:, 0, :].astype(jnp.float32) * scale_ref[...]).astype(out_ref.dtype)


def gather_rows(x_TD, src_G, scale_G, *, interpret: bool, block_rows: int = 256):
    """out[r] = scale[r] * x[src[r]]  ([G, D], x's dtype). src in [0, T); scale f32."""
    T, D = x_TD.shape
    G = src_G.shape[0]
    R = _block(G, block_rows)
    Gp = -(-G // R) * R
    it = x_TD.dtype.itemsize
    out = pl.pallas_call(
        _gather_kernel,
        grid=(Gp // R,),
        in_specs=[_smem_rows(R),
                  pl.BlockSpec((R, 1), lambda i: (i, 0)),
                  pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((R, D), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((Gp, D), x_TD.dtype),
        scratch_shapes=[pltpu.VMEM((R, 1, D), x_TD.dtype), pltpu.SemaphoreType.DMA((1,))],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        # One multiply per element; each output row read once from x and written once.
        cost_estimate=pl.CostEstimate(flops=Gp * D, transcendentals=0,
                                      bytes_accessed=2 * Gp * D * it + 8 * Gp),
        interpret=interpret,
    )(_pad_rows(src_G.astype(jnp.int32), Gp).reshape(Gp // R, 1, R),
      _pad_rows(scale_G.astype(jnp.float32), Gp)[:, None], x_TD.reshape(T, 1, D))
    return out[:G]


def _combine_kernel(k, dest_ref, w_ref, buf_hbm, out_ref, rows_ref, sem):
    R = out_ref.shape[0]
    # Slot n = t * k + j of the block lands in rows_ref[j, t]. (lax.div/rem: jnp's floor
    # division lowers through `sign`, which Mosaic lowers only on a TPU host.)
    _dma_rows(buf_hbm, dest_ref, rows_ref, R * k, sem.at[0],
              lambda d, n: d.at[jax.lax.rem(n, k), pl.ds(jax.lax.div(n, k), 1)])
    w_Rk = w_ref[...]
    acc_RD = jnp.zeros(out_ref.shape, jnp.float32)
    for j in range(k):  # k is small and static (the router's top-k)
        acc_RD = acc_RD + w_Rk[:, j:j + 1] * rows_ref[j, :, 0, :].astype(jnp.float32)
    out_ref[...] = acc_RD.astype(out_ref.dtype)


def combine_rows(buf_GD, dest_Tk, w_Tk, *, interpret: bool, block_tokens: int | None = None):
    """y[t] = sum_j w[t, j] * buf[dest[t, j]]  ([T, D], buf's dtype, f32 accumulation).

    Each step reads its tokens' k rows each and writes its output block once (no reduction
    axis, so the grid is parallel).
    """
    G, D = buf_GD.shape
    T, k = dest_Tk.shape
    it = buf_GD.dtype.itemsize
    if block_tokens is None:  # a VMEM row buffer of about 2 MB
        block_tokens = max(16, (2 << 20) // (k * D * it))
    R = _block(T, block_tokens)
    Tp = -(-T // R) * R
    dest_N = _pad_rows(dest_Tk.astype(jnp.int32), Tp).reshape(Tp // R, 1, R * k)
    out = pl.pallas_call(
        functools.partial(_combine_kernel, k),
        grid=(Tp // R,),
        in_specs=[_smem_rows(R * k),
                  pl.BlockSpec((R, k), lambda i: (i, 0)),
                  pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((R, D), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((Tp, D), buf_GD.dtype),
        scratch_shapes=[pltpu.VMEM((k, R, 1, D), buf_GD.dtype), pltpu.SemaphoreType.DMA((1,))],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        # A multiply-add per gathered element; k rows read per token, one row written.
        cost_estimate=pl.CostEstimate(flops=2 * Tp * k * D, transcendentals=0,
                                      bytes_accessed=(Tp * k + Tp) * D * it + 8 * Tp * k),
        interpret=interpret,
    )(dest_N, _pad_rows(w_Tk.astype(jnp.float32), Tp), buf_GD.reshape(G, 1, D))
    return out[:T]
