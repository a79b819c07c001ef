"""The project's Pallas grouped-matmul kernels on tile-padded groups, in two styles.

Every `tm`-row tile of the lhs belongs to one expert (the groups are padded to multiples of
`tm` by `permute`), so a kernel never splits a tile between experts.

Mosaic style (`gmm`, `tgmm`; TPU, and interpret mode on CPU): the expert of each tile is a
scalar-prefetched table that drives the rhs BlockSpec's index map, so the pipeline DMAs the
right weight block. Block shapes follow Mosaic-TPU's rules (last two dims multiples of
(8, 128) or the full dims). The weight gradient accumulates an expert's tiles over
consecutive grid steps into one resident output block.

Triton style (`gmm_gpu`, `tgmm_gpu`; GPU): Triton has no scalar prefetch, but every ref is a
pointer into global memory, so the kernel reads the tile's expert id itself and indexes the
whole weight array with it. GPU programs run in no fixed order, so the weight gradient gives
each (expert, K block, N block) to one program that loops over that expert's tiles. Triton
wants power-of-two block dims: tm, K, N and the tile tables (padded here) should be powers
of two. The Mosaic style compiles for TPU v5p / v6e through libtpu from this CPU machine, at
OLMoE's size too (tests/kernels/test_compile.py); the Triton style only lowers (compiling
needs the CUDA plugin). Neither has been timed on an accelerator here (docs/tpu_kernels.md
has the compiler's estimates).

Every pallas_call carries a pl.CostEstimate, which a TPU program's cost_analysis reports:
HBM bytes count each block as often as the grid streams it (every tile's lhs and output
blocks, valid or not: the index maps fetch them all), FLOPs count the valid tiles only (the
kernels skip the others). Which tiles are valid is data; the estimate, fixed at trace time,
takes all tiles unless the caller passes `live_tiles`, the number it expects valid (expert
parallelism's receive buffers are sized for the worst case, about X times the rows a device
receives on average: moe_ep.py).

Shapes: lhs [G, K] with G = num_tiles * tm; rhs [E, K, N]; tile_expert, tile_valid
[num_tiles] int32. Rows of invalid (tail) tiles get zero output.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton


def _lane_block(n: int, want: int = 512) -> int:
    # A multiple of the 128-wide lanes dividing n, at most `want`; an axis that is not a
    # multiple of 128 is taken whole.
    if n % 128:
        return n
    return max(b for b in range(128, min(n, want) + 1, 128) if n % b == 0)


def _live_rows(G: int, tm: int, live_tiles: int | None) -> int:
    """The rows of the tiles expected to be valid (all G without a hint)."""
    return G if live_tiles is None else min(G, live_tiles * tm)


def _cost(flops: int, *arrays_times_read) -> pl.CostEstimate:
    """The kernel's FLOPs and HBM bytes: sum of (bytes of an array) * (times it is streamed)."""
    return pl.CostEstimate(flops=int(flops), transcendentals=0,
                           bytes_accessed=int(sum(n * r for n, r in arrays_times_read)))


def _gmm_kernel(transpose_rhs, tile_expert_ref, tile_valid_ref, lhs_ref, rhs_ref, out_ref):
    del tile_expert_ref  # consumed by the index maps
    i = pl.program_id(1)

    @pl.when(tile_valid_ref[i] != 0)
    def _():
        # rhs block [K, tn], or [tn, K] read as its transpose (the MXU takes either).
        contract = (((1,), (1 if transpose_rhs else 0,)), ((), ()))
        acc = jax.lax.dot_general(lhs_ref[...], rhs_ref[...], contract,
                                  preferred_element_type=jnp.float32)
        out_ref[...] = acc.astype(out_ref.dtype)

    @pl.when(tile_valid_ref[i] == 0)
    def _():
        out_ref[...] = jnp.zeros_like(out_ref)


def gmm(lhs_GK, rhs, tile_expert, tile_valid, *, tm: int, interpret: bool,
        transpose_rhs: bool = False, live_tiles: int | None = None):
    """out[G, N]: each tile's rows times its expert's [K, N] (full K per block).

    rhs: [E, K, N], or [E, N, K] with transpose_rhs (the backward's dlhs = dout @ w^T reads
    the forward's weights in place instead of a transposed copy of all of them).
    The grid runs the N blocks outside and the tiles inside: consecutive tiles of one expert
    keep the same weight block, which the pipeline then does not fetch again, so the weights
    stream about once and the lhs N / tn times (tn up to 512).
    """
    G, K = lhs_GK.shape
    E, N = rhs.shape[0], rhs.shape[1 if transpose_rhs else 2]
    tn = _lane_block(N)
    if transpose_rhs:
        rhs_spec = pl.BlockSpec((None, tn, K), lambda j, i, te, tv: (te[i], j, 0))
    else:
        rhs_spec = pl.BlockSpec((None, K, tn), lambda j, i, te, tv: (te[i], 0, j))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(N // tn, G // tm),
        in_specs=[pl.BlockSpec((tm, K), lambda j, i, te, tv: (i, 0)), rhs_spec],
        out_specs=pl.BlockSpec((tm, tn), lambda j, i, te, tv: (i, j)),
    )
    it = lhs_GK.dtype.itemsize
    return pl.pallas_call(
        functools.partial(_gmm_kernel, transpose_rhs),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((G, N), lhs_GK.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        # Weights: each expert's block once per N block (an upper bound: only when the expert
        # owns a tile); the tile tables are negligible.
        cost_estimate=_cost(2 * _live_rows(G, tm, live_tiles) * K * N, (G * K * it, N // tn),
                            (E * K * N * it, 1), (G * N * it, 1)),
        interpret=interpret,
    )(tile_expert, tile_valid, lhs_GK, rhs)


def _tgmm_kernel(tile_expert_ref, tile_valid_ref, lhs_ref, dout_ref, out_ref, acc_ref):
    i, last_step = pl.program_id(2), pl.num_programs(2) - 1
    # Tiles are sorted by expert, so an expert's output block stays resident over a run of
    # consecutive grid steps: the f32 accumulator is zeroed on the run's first tile and
    # written out (in the output dtype) on its last.
    e = tile_expert_ref[i]
    first = jnp.logical_or(i == 0, e != tile_expert_ref[jnp.maximum(i - 1, 0)])
    last = jnp.logical_or(i == last_step, e != tile_expert_ref[jnp.minimum(i + 1, last_step)])

    @pl.when(first)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(tile_valid_ref[i] != 0)
    def _():
        # lhs_tile^T @ dout_tile: contracting the row axis of both in the kernel keeps the
        # lhs block (tm, tk) legal for any tm that is a multiple of 8 (a transposed (tk, tm)
        # block needs tm % 128 == 0) and saves an XLA transpose of the whole lhs.
        acc_ref[...] += jax.lax.dot_general(lhs_ref[...], dout_ref[...], (((0,), (0,)), ((), ())),
                                            preferred_element_type=jnp.float32)

    @pl.when(last)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs_GK, dout_GN, tile_expert, tile_valid, num_experts: int, *, tm: int, interpret: bool,
         out_dtype=jnp.float32, live_tiles: int | None = None):
    """out[E, K, N]: per expert, the sum over its tiles of lhs_tile^T @ dout_tile, summed in
    f32 and rounded once to out_dtype.

    Experts that own no tile are never visited; the caller zeroes them.
    """
    G, K = lhs_GK.shape
    N = dout_GN.shape[1]
    tk, tn = _lane_block(K), _lane_block(N)
    it = lhs_GK.dtype.itemsize
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(K // tk, N // tn, G // tm),
        in_specs=[
            pl.BlockSpec((tm, tk), lambda a, b, i, te, tv: (i, a)),
            pl.BlockSpec((tm, tn), lambda a, b, i, te, tv: (i, b)),
        ],
        out_specs=pl.BlockSpec((None, tk, tn), lambda a, b, i, te, tv: (te[i], a, b)),
        scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
    )
    return pl.pallas_call(
        _tgmm_kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((num_experts, K, N), out_dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        # Every (K block, N block) pass streams all tiles of its lhs and dout blocks.
        cost_estimate=_cost(2 * _live_rows(G, tm, live_tiles) * K * N, (G * K * it, N // tn),
                            (G * N * it, K // tk), (num_experts * K * N * jnp.dtype(out_dtype).itemsize, 1)),
        interpret=interpret,
    )(tile_expert, tile_valid, lhs_GK, dout_GN)


# ----------------------------------------------------------------- Triton (GPU) style

def _pad_pow2(a_X):
    n = a_X.shape[0]
    return jnp.pad(a_X, (0, (1 << max(0, (n - 1).bit_length())) - n))


def _whole(shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _check_blocks(**dims):
    # The grid is dim // block: a remainder would be silently left uncomputed.
    for name, (size, block) in dims.items():
        if size % block:
            raise ValueError(f"gmm (Triton style): {name}={size} is not a multiple of its block "
                             f"{block}; use sizes below 128 or multiples of 128 (powers of two)")


def _gpu_params(interpret):
    return None if interpret else pltriton.CompilerParams()


def _gmm_gpu_kernel(tn, tile_expert_ref, tile_valid_ref, lhs_ref, rhs_ref, out_ref):
    i, j = pl.program_id(0), pl.program_id(1)
    w_KN = rhs_ref[tile_expert_ref[i], :, pl.ds(j * tn, tn)]
    acc = jnp.dot(lhs_ref[...], w_KN, preferred_element_type=jnp.float32)
    out_ref[...] = jnp.where(tile_valid_ref[i] != 0, acc, 0.0).astype(out_ref.dtype)


def gmm_gpu(lhs_GK, rhs_EKN, tile_expert, tile_valid, *, tm: int, interpret: bool,
            live_tiles: int | None = None):
    """As `gmm`, Triton style."""
    G, K = lhs_GK.shape
    N = rhs_EKN.shape[2]
    tn = min(N, 128)
    _check_blocks(N=(N, tn))
    it = lhs_GK.dtype.itemsize
    te, tv = _pad_pow2(tile_expert), _pad_pow2(tile_valid)
    return pl.pallas_call(
        functools.partial(_gmm_gpu_kernel, tn),
        grid=(G // tm, N // tn),
        in_specs=[_whole(te.shape), _whole(tv.shape),
                  pl.BlockSpec((tm, K), lambda i, j: (i, 0)), _whole(rhs_EKN.shape)],
        out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((G, N), lhs_GK.dtype),
        compiler_params=_gpu_params(interpret),
        # Each (tile, N block) program loads its lhs tile and its expert's [K, tn] block.
        cost_estimate=_cost(2 * _live_rows(G, tm, live_tiles) * K * N, (G * K * it, N // tn),
                            ((G // tm) * K * N * it, 1), (G * N * it, 1)),
        interpret=interpret,
    )(te, tv, lhs_GK, rhs_EKN)


def _tgmm_gpu_kernel(tm, tk, tn, first_tile_ref, num_tiles_ref, lhs_ref, dout_ref, out_ref):
    e, a, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    first = first_tile_ref[e]

    def tile(t, acc_KN):
        rows = pl.ds((first + t) * tm, tm)
        x_tK = lhs_ref[rows, pl.ds(a * tk, tk)]
        d_tN = dout_ref[rows, pl.ds(b * tn, tn)]
        return acc_KN + jax.lax.dot_general(x_tK, d_tN, (((0,), (0,)), ((), ())),
                                            preferred_element_type=jnp.float32)

    out_ref[...] = jax.lax.fori_loop(0, num_tiles_ref[e], tile,
                                     jnp.zeros(out_ref.shape, jnp.float32)).astype(out_ref.dtype)


def tgmm_gpu(lhs_GK, dout_GN, tile_expert, tile_valid, num_experts: int, *, tm: int,
             interpret: bool, out_dtype=jnp.float32, live_tiles: int | None = None):
    """As `tgmm` ([E, K, N] out_dtype), Triton style; experts without tiles come out zero."""
    G, K = lhs_GK.shape
    N = dout_GN.shape[1]
    tk, tn = min(K, 128), min(N, 128)
    _check_blocks(K=(K, tk), N=(N, tn))
    it = lhs_GK.dtype.itemsize
    # Per expert: its first tile and number of valid tiles (tiles are sorted by expert).
    live = tile_valid != 0
    num_tiles_E = jnp.zeros((num_experts,), jnp.int32).at[tile_expert].add(live.astype(jnp.int32))
    first_tile_E = jnp.cumsum(num_tiles_E) - num_tiles_E
    ft, nt = _pad_pow2(first_tile_E), _pad_pow2(num_tiles_E)
    return pl.pallas_call(
        functools.partial(_tgmm_gpu_kernel, tm, tk, tn),
        grid=(num_experts, K // tk, N // tn),
        in_specs=[_whole(ft.shape), _whole(nt.shape), _whole((G, K)), _whole((G, N))],
        out_specs=pl.BlockSpec((None, tk, tn), lambda e, a, b: (e, a, b)),
        out_shape=jax.ShapeDtypeStruct((num_experts, K, N), out_dtype),
        compiler_params=_gpu_params(interpret),
        # An (expert, K block, N block) program reads its expert's rows of both inputs.
        cost_estimate=_cost(2 * _live_rows(G, tm, live_tiles) * K * N, (G * K * it, N // tn),
                            (G * N * it, K // tk), (num_experts * K * N * jnp.dtype(out_dtype).itemsize, 1)),
        interpret=interpret,
    )(ft, nt, lhs_GK, dout_GN)
