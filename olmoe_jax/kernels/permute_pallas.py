"""Pallas row-gather kernels behind permute/unpermute.

Both move whole rows of D features, chosen by scalar-prefetched index tables that drive the
BlockSpec index maps, so the pipeline DMAs exactly the rows needed. Arrays are viewed as
[rows, 1, D] so a one-row block (1, D) equals the full trailing dims, which Mosaic-TPU's
block rules accept for any D. One grid step per output row keeps them simple; a production
TPU kernel would batch rows per step with manual DMAs. The index tables are scalar-prefetched
whole into SMEM (8 bytes per buffer row), so SMEM's size bounds the buffer on TPU: an
OLMoE-1B layer at 8192 tokens (~7x10^4 rows) needs ~0.6 MB of tables, which may not fit.
Unchecked on a TPU; the dropless MoE uses these only with model.moe_backend=pallas.
interpret=True runs them on CPU.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _gather_kernel(src_ref, scale_ref, x_ref, out_ref):
    del src_ref  # consumed by the index map
    r = pl.program_id(0)
    out_ref[...] = (x_ref[...].astype(jnp.float32) * scale_ref[r]).astype(out_ref.dtype)


def gather_rows(x_TD, src_G, scale_G, *, interpret: bool):
    """out[r] = scale[r] * x[src[r]]  ([G, D], x's dtype). src in [0, T); scale f32."""
    T, D = x_TD.shape
    G = src_G.shape[0]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(G,),
        in_specs=[pl.BlockSpec((None, 1, D), lambda r, src, sc: (src[r], 0, 0))],
        out_specs=pl.BlockSpec((None, 1, D), lambda r, src, sc: (r, 0, 0)),
    )
    out = pl.pallas_call(
        _gather_kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((G, 1, D), x_TD.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
    )(src_G.astype(jnp.int32), scale_G.astype(jnp.float32), x_TD.reshape(T, 1, D))
    return out.reshape(G, D)


def _combine_kernel(k, dest_ref, w_ref, *refs):
    del dest_ref  # consumed by the index maps
    rows, out_ref = refs[:k], refs[k]
    t = pl.program_id(0)
    acc = jnp.zeros(out_ref.shape, jnp.float32)
    for j in range(k):  # k is small and static (the router's top-k)
        acc = acc + w_ref[t, j] * rows[j][...].astype(jnp.float32)
    out_ref[...] = acc.astype(out_ref.dtype)


def combine_rows(buf_GD, dest_Tk, w_Tk, *, interpret: bool):
    """y[t] = sum_j w[t, j] * buf[dest[t, j]]  ([T, D], buf's dtype, f32 accumulation).

    The buffer is passed k times, once per choice, each with its own index map, so a step
    reads exactly its token's k rows and writes its output row once (no reduction axis).
    """
    G, D = buf_GD.shape
    T, k = dest_Tk.shape

    def row_spec(j):
        return pl.BlockSpec((None, 1, D), lambda t, dest, w: (dest[t, j], 0, 0))

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(T,),
        in_specs=[row_spec(j) for j in range(k)],
        out_specs=pl.BlockSpec((None, 1, D), lambda t, dest, w: (t, 0, 0)),
    )
    buf = buf_GD.reshape(G, 1, D)
    out = pl.pallas_call(
        lambda *refs: _combine_kernel(k, *refs),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((T, 1, D), buf_GD.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
    )(dest_Tk.astype(jnp.int32), w_Tk.astype(jnp.float32), *([buf] * k))
    return out.reshape(T, D)
