"""The project's Pallas grouped-matmul kernels on tile-padded groups.

Every `tm`-row tile of the lhs belongs to one expert (the groups are padded to multiples of
`tm` by `permute`), so a kernel never splits a tile between experts: the expert of each tile
is a scalar-prefetched table that drives the rhs BlockSpec's index map. The block shapes
follow Mosaic-TPU's rules (last two block dims multiples of (8, 128) or the full dims), and
the kernels run with `interpret=True` on CPU for tests. Scalar prefetch is a Mosaic-TPU
feature: the Triton (GPU) lowering does not take it, which is why `gmm.py` sends GPUs to
`ragged_dot` (XLA:GPU lowers it to a grouped GEMM) rather than here.

Shapes: lhs [G, K] with G = num_tiles * tm; rhs [E, K, N]; tile_expert, tile_valid
[num_tiles] int32. Rows of invalid (tail) tiles get zero output.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _lane_block(n: int) -> int:
    # 128 is the TPU lane width; an axis that is not a multiple of it is taken whole.
    return 128 if n % 128 == 0 else n


def _gmm_kernel(tile_expert_ref, tile_valid_ref, lhs_ref, rhs_ref, out_ref):
    del tile_expert_ref  # consumed by the index maps
    i = pl.program_id(0)

    @pl.when(tile_valid_ref[i] != 0)
    def _():
        acc = jnp.dot(lhs_ref[...], rhs_ref[...], preferred_element_type=jnp.float32)
        out_ref[...] = acc.astype(out_ref.dtype)

    @pl.when(tile_valid_ref[i] == 0)
    def _():
        out_ref[...] = jnp.zeros_like(out_ref)


def gmm(lhs_GK, rhs_EKN, tile_expert, tile_valid, *, tm: int, interpret: bool):
    """out[G, N]: each tile's rows times its expert's [K, N] (full K per block)."""
    G, K = lhs_GK.shape
    E, _, N = rhs_EKN.shape
    tn = _lane_block(N)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(G // tm, N // tn),
        in_specs=[
            pl.BlockSpec((tm, K), lambda i, j, te, tv: (i, 0)),
            pl.BlockSpec((None, K, tn), lambda i, j, te, tv: (te[i], 0, j)),
        ],
        out_specs=pl.BlockSpec((tm, tn), lambda i, j, te, tv: (i, j)),
    )
    return pl.pallas_call(
        _gmm_kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((G, N), lhs_GK.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
    )(tile_expert, tile_valid, lhs_GK, rhs_EKN)


def _tgmm_kernel(tile_expert_ref, tile_valid_ref, lhsT_ref, dout_ref, out_ref):
    i = pl.program_id(2)
    # Tiles are sorted by expert, so an expert's output block stays resident over a run of
    # consecutive grid steps: zero it on the run's first tile, accumulate after.
    prev = tile_expert_ref[jnp.maximum(i - 1, 0)]
    first = jnp.logical_or(i == 0, tile_expert_ref[i] != prev)

    @pl.when(first)
    def _():
        out_ref[...] = jnp.zeros_like(out_ref)

    @pl.when(tile_valid_ref[i] != 0)
    def _():
        out_ref[...] += jnp.dot(lhsT_ref[...], dout_ref[...], preferred_element_type=jnp.float32)


def tgmm(lhs_GK, dout_GN, tile_expert, tile_valid, num_experts: int, *, tm: int, interpret: bool):
    """out[E, K, N] f32: per expert, the sum over its tiles of lhs_tile^T @ dout_tile.

    Experts that own no tile are never visited; the caller zeroes them.
    """
    G, K = lhs_GK.shape
    N = dout_GN.shape[1]
    tk, tn = _lane_block(K), _lane_block(N)
    lhsT_KG = lhs_GK.T  # the MXU wants the contraction on the lhs's last axis
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(K // tk, N // tn, G // tm),
        in_specs=[
            pl.BlockSpec((tk, tm), lambda a, b, i, te, tv: (a, i)),
            pl.BlockSpec((tm, tn), lambda a, b, i, te, tv: (i, b)),
        ],
        out_specs=pl.BlockSpec((None, tk, tn), lambda a, b, i, te, tv: (te[i], a, b)),
    )
    return pl.pallas_call(
        _tgmm_kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((num_experts, K, N), jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(tile_expert, tile_valid, lhsT_KG, dout_GN)
