"""Grouped matmul over tile-padded expert groups, one function for every backend.

`gmm(lhs_GK, rhs_EKN, padded_sizes_E, tm=..., backend=...)` computes, for each expert e,
its rows of lhs times rhs[e]. The rows come from `permute` in the expert-sorted layout:
expert e owns the contiguous rows [offset_e, offset_e + padded_sizes_E[e]), every padded size
is a multiple of `tm`, and rows past sum(padded_sizes_E) (the static slack of the layout)
give zero output and zero gradient. So each tm-row tile belongs to exactly one expert,
which is what the `xla` and `pallas` backends exploit.

Backends:
  xla        a scan over tiles, each a [tm, K] @ [K, N] matmul with its expert's weight
             (slack tiles skipped by a cond); the MoE layer uses `gmm_swiglu` instead, whose
             xla path is one fused loop per expert (below). The CPU default: forward + backward measured
             (benchmarks/gmm_cpu.py, tm=128) at 1.2-1.7x one dense matmul of the unpadded
             FLOPs, the rest being group padding; `jax.lax.ragged_dot` on XLA:CPU computes
             every group for every row (58x dense there). Batching tiles with per-tile gathered
             weights measured slower (the weight copies), and so did tm = 64.
  pallas     the project's kernels (gmm_pallas.py): Mosaic style on TPU, Triton style on GPU,
             interpret mode on CPU.
  megablox   jax's megablox gmm/tgmm (TPU kernels; interpret mode elsewhere).
  ragged_dot jax.lax.ragged_dot; XLA:GPU lowers it to a grouped GEMM, so the GPU default.
  tokamax    tokamax.ragged_dot if the optional package is installed (not a dependency).
`auto`: cpu -> xla; tpu -> pallas (compiled for v5p at OLMoE's per-device size, the
project's kernels stream less HBM than megablox as called here, tiling (tm, 128, 128), and
than megablox at (tm, 512, 1024): docs/tpu_kernels.md, benchmarks/tpu_kernels_aot.py; an
estimate, not a TPU timing); gpu -> ragged_dot (XLA's own grouped GEMM, no extra
dependency; the Triton-style `pallas` kernels and tokamax's are untimed here: no GPU).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from olmoe_jax.kernels import gmm_pallas

BACKENDS = ("auto", "xla", "pallas", "megablox", "ragged_dot", "tokamax")


def default_backend(platform: str | None = None) -> str:
    platform = platform or jax.default_backend()
    return {"cpu": "xla", "tpu": "pallas", "gpu": "ragged_dot"}.get(platform, "xla")


class Engine(NamedTuple):
    """How the dropless MoE runs on this platform, decided once by `resolve`."""
    backend: str  # the grouped-matmul backend (never "auto")
    platform: str  # cpu | tpu | gpu: picks the Pallas style (Triton on gpu, Mosaic otherwise)
    interpret: bool  # Pallas kernels interpreted (the target devices are CPUs)
    rows: str  # permute / unpermute: "pallas" (the Mosaic row kernels) or "xla" (gathers)
    router: str  # the fused router: "pallas" or "xla"
    tm: int  # rows per grouped-matmul tile


def tile_rows(num_slots: int, num_experts: int, backend: str = "pallas") -> int:
    """Rows per grouped-matmul tile: 128 (the MXU/lane size) unless the average group is
    smaller, then the next power of two >= 16 above it, so that small problems do not pay
    E * (tm - 1) rows of padding. On the `xla` backend (CPU) always 16: its loop takes each
    group in 128-row chunks and only the rest in tm-row tiles, so tm sets the padding, not the
    matmul size; measured fwd+bwd, T=2048, 64 experts top-8 (one interleaved run), tm 16 beat
    32 by 4% and 64 by 8%."""
    if backend == "xla":
        return 16
    avg = -(-num_slots // num_experts)
    return int(min(128, max(16, 1 << (avg - 1).bit_length())))


def resolve(backend: str = "auto", num_slots: int = 1, num_experts: int = 1,
            platform: str | None = None, target: str | None = None) -> Engine:
    """The one place that turns a requested backend into an `Engine` for `num_slots` rows
    spread over `num_experts` groups: `auto` per platform (default_backend), interpret mode,
    the tile size, and which row and router kernels go with it.

    target: the platform of the devices the program is compiled for (a mesh's devices; an
    ahead-of-time TPU compile runs on a CPU host); default jax's backend. Pallas kernels are
    interpreted when it is cpu. platform: the kernel style (Triton on gpu, Mosaic otherwise),
    default the target; tests run the GPU style interpreted on CPU with platform="gpu".

    The project's row kernels serve only the all-Pallas path (they are Mosaic-TPU kernels,
    interpreted on CPU); elsewhere XLA's gathers are at least as fast as one row per step. The
    fused router kernel runs where the MoE runs Pallas.
    """
    target = target or jax.default_backend()
    platform = platform or target
    chosen = default_backend(platform) if backend == "auto" else backend
    if chosen not in BACKENDS[1:]:
        raise ValueError(f"gmm: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    pallas = backend == "pallas"
    return Engine(backend=chosen, platform=platform, interpret=target == "cpu",
                  rows="pallas" if pallas and platform in ("tpu", "cpu") else "xla",
                  router="pallas" if pallas else "xla",
                  tm=tile_rows(num_slots, num_experts, chosen))


def tile_owners(padded_sizes_E, num_tiles: int, tm: int):
    """(tile_expert [num_tiles] int32, tile_valid [num_tiles] int32) for tile-padded groups.

    Tail tiles (past every group) get the last expert and valid=0: keeping the expert ids
    non-decreasing lets the Pallas tgmm detect each expert's first tile by a change of id.
    """
    E = padded_sizes_E.shape[0]
    ends_E = jnp.cumsum(padded_sizes_E // tm)
    tiles = jnp.arange(num_tiles, dtype=jnp.int32)
    tile_expert = jnp.searchsorted(ends_E, tiles, side="right").astype(jnp.int32)
    tile_valid = (tiles < ends_E[-1]).astype(jnp.int32)
    return jnp.minimum(tile_expert, E - 1), tile_valid


# ----------------------------------------------------------------------------- xla backend

def _xla_gmm(lhs_GK, rhs_EKN, tile_expert, tile_valid, *, tm):
    G, K = lhs_GK.shape
    N = rhs_EKN.shape[2]

    def tile(_, a):
        x_tK, e, valid = a
        # cond, not a mask: the layout's slack tiles (up to E*(tm-1) rows) cost no FLOPs.
        y_tN = jax.lax.cond(
            valid != 0,
            lambda: jnp.dot(x_tK, rhs_EKN[e], preferred_element_type=jnp.float32),
            lambda: jnp.zeros((tm, N), jnp.float32))
        return None, y_tN.astype(lhs_GK.dtype)

    _, out = jax.lax.scan(tile, None, (lhs_GK.reshape(G // tm, tm, K), tile_expert, tile_valid))
    return out.reshape(G, N)


def _xla_tgmm(lhs_GK, dout_GN, tile_expert, tile_valid, num_experts, *, tm,
              out_dtype=jnp.float32):
    G, K = lhs_GK.shape
    N = dout_GN.shape[1]

    def tile(acc_EKN, a):
        x_tK, d_tN, e, valid = a

        def add(acc):
            part_KN = jax.lax.dot_general(x_tK, d_tN, (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
            return acc.at[e].add(part_KN)

        return jax.lax.cond(valid != 0, add, lambda acc: acc, acc_EKN), None

    acc, _ = jax.lax.scan(
        tile, jnp.zeros((num_experts, K, N), jnp.float32),
        (lhs_GK.reshape(G // tm, tm, K), dout_GN.reshape(G // tm, tm, N), tile_expert, tile_valid))
    return acc.astype(out_dtype)


# ------------------------------------------------- tiled backends share one custom_vjp

def _tiled_ops(impl: str, interpret: bool, live_tiles: int | None = None):
    """impl: xla | pallas (Mosaic style) | pallas_gpu (Triton style); live_tiles: the Pallas
    kernels' cost-estimate hint (gmm_pallas.py)."""
    if impl == "xla":
        return _xla_gmm, _xla_tgmm
    fwd, tfwd = ((gmm_pallas.gmm_gpu, gmm_pallas.tgmm_gpu) if impl == "pallas_gpu"
                 else (gmm_pallas.gmm, gmm_pallas.tgmm))
    return (functools.partial(fwd, interpret=interpret, live_tiles=live_tiles),
            functools.partial(tfwd, interpret=interpret, live_tiles=live_tiles))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _tiled_gmm(lhs_GK, rhs_EKN, padded_sizes_E, tm, impl, interpret, live_tiles):
    out, _ = _tiled_gmm_fwd(lhs_GK, rhs_EKN, padded_sizes_E, tm, impl, interpret, live_tiles)
    return out


def _tiled_gmm_fwd(lhs_GK, rhs_EKN, padded_sizes_E, tm, impl, interpret, live_tiles):
    fwd, _ = _tiled_ops(impl, interpret, live_tiles)
    te, tv = tile_owners(padded_sizes_E, lhs_GK.shape[0] // tm, tm)
    return fwd(lhs_GK, rhs_EKN, te, tv, tm=tm), (lhs_GK, rhs_EKN, padded_sizes_E, te, tv)


def _tiled_gmm_bwd(tm, impl, interpret, live_tiles, res, dout_GN):
    lhs_GK, rhs_EKN, padded_sizes_E, te, tv = res
    fwd, tfwd = _tiled_ops(impl, interpret, live_tiles)
    dout_GN = dout_GN.astype(lhs_GK.dtype)
    if impl == "pallas":  # Mosaic reads w^T blocks in place: no transposed copy of the weights
        dlhs_GK = fwd(dout_GN, rhs_EKN, te, tv, tm=tm, transpose_rhs=True)
    else:
        dlhs_GK = fwd(dout_GN, jnp.swapaxes(rhs_EKN, 1, 2), te, tv, tm=tm)
    drhs_EKN = tfwd(lhs_GK, dout_GN, te, tv, rhs_EKN.shape[0], tm=tm,
                    out_dtype=rhs_EKN.dtype)
    # Experts without a tile are never visited by the Pallas tgmm; their gradient is zero.
    drhs_EKN = jnp.where((padded_sizes_E > 0)[:, None, None], drhs_EKN, 0.0)
    return dlhs_GK, drhs_EKN.astype(rhs_EKN.dtype), None


_tiled_gmm.defvjp(_tiled_gmm_fwd, _tiled_gmm_bwd)


# ------------------------------------------- the whole SwiGLU expert block, xla backend

def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _dot_t(a, b):  # a.T @ b
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _xla_swiglu(lhs_GD, wg_EDF, wu_EDF, wd_EFD, padded_sizes_E, tm):
    out, _ = _xla_swiglu_fwd(lhs_GD, wg_EDF, wu_EDF, wd_EFD, padded_sizes_E, tm)
    return out


def _dot_nt(a, b):  # a @ b.T, without materialising the transpose
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


_CHUNK = 128  # rows per matmul where a group allows: bigger dots run closer to the GEMM peak


def _per_expert(G, padded_sizes_E, tm, carry, expert_init, rows_fn, expert_done):
    """Loops per expert over its group: first in _CHUNK-row chunks, then tm-row tiles for the
    rest, calling carry = rows_fn(w, row, n, carry) for each n-row block at `row` (n static).
    Each expert's weights are sliced once (expert_init(e) -> w) and its results folded in by
    expert_done(e, w, carry); slack rows lie past every group and are never visited."""
    E = padded_sizes_E.shape[0]
    start_E = jnp.cumsum(padded_sizes_E) - padded_sizes_E
    big = _CHUNK if _CHUNK > tm and _CHUNK % tm == 0 and G >= _CHUNK else tm

    def expert(e, carry):
        w, inner = expert_init(e, carry)
        size, row0 = padded_sizes_E[e], start_E[e]
        n_big = size // big
        inner = jax.lax.fori_loop(0, n_big, lambda j, c: rows_fn(w, row0 + j * big, big, c), inner)
        if big != tm:
            row1 = row0 + n_big * big
            inner = jax.lax.fori_loop(0, (size - n_big * big) // tm,
                                      lambda j, c: rows_fn(w, row1 + j * tm, tm, c), inner)
        return expert_done(e, w, inner, carry)

    return jax.lax.fori_loop(0, E, expert, carry)


# XLA:CPU does not update a 16-bit float buffer in place inside a loop: every
# dynamic_update_slice copied the whole [G, D] bf16 buffer (a 16-row loop over [8672, 256]
# measured 30x slower than f32). The loop buffers therefore hold 16-bit floats as uint16 bits,
# which it does update in place; `_bits`/`_floats` convert at the loop's edges and per block.
def _bits(a):
    return jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype.itemsize == 2 else a


def _floats(a, dt):
    return jax.lax.bitcast_convert_type(a, dt) if a.dtype != dt else a


def _rows(a, row, n, dt):
    return _floats(jax.lax.dynamic_slice_in_dim(a, row, n), dt)


def _set_rows(a, row, v, dt):
    return jax.lax.dynamic_update_slice_in_dim(a, _bits(v.astype(dt)), row, 0)


def _xla_swiglu_fwd(lhs_GD, wg_EDF, wu_EDF, wd_EFD, padded_sizes_E, tm):
    G, dt = lhs_GD.shape[0], lhs_GD.dtype
    F, D_out = wg_EDF.shape[2], wd_EFD.shape[2]

    lhs_bits = _bits(lhs_GD)

    def rows_fn(w, row, n, carry):
        wg_DF, wu_DF, wd_FD = w
        out_GD, g_GF, u_GF = carry
        x_nD = _rows(lhs_bits, row, n, dt)
        g_nF = _dot(x_nD, wg_DF).astype(dt)
        u_nF = _dot(x_nD, wu_DF).astype(dt)
        y_nD = _dot(jax.nn.silu(g_nF) * u_nF, wd_FD)
        return (_set_rows(out_GD, row, y_nD, dt), _set_rows(g_GF, row, g_nF, dt),
                _set_rows(u_GF, row, u_nF, dt))

    zeros_GF = _bits(jnp.zeros((G, F), dt))
    out_GD, g_GF, u_GF = _per_expert(
        G, padded_sizes_E, tm, (_bits(jnp.zeros((G, D_out), dt)), zeros_GF, zeros_GF),
        lambda e, carry: ((wg_EDF[e], wu_EDF[e], wd_EFD[e]), carry),
        rows_fn, lambda e, w, inner, carry: inner)
    # g and u stay as bits: the backward reads them in the same loop.
    return _floats(out_GD, dt), (lhs_GD, g_GF, u_GF, wg_EDF, wu_EDF, wd_EFD, padded_sizes_E)


def _xla_swiglu_bwd(tm, res, dout_GD):
    lhs_GD, g_GF, u_GF, wg_EDF, wu_EDF, wd_EFD, padded_sizes_E = res
    dt = lhs_GD.dtype
    lhs_bits, dout_bits = _bits(lhs_GD), _bits(dout_GD.astype(dt))
    f32 = lambda w: jnp.zeros(w.shape, jnp.float32)

    def expert_init(e, carry):
        w = (wg_EDF[e], wu_EDF[e], wd_EFD[e])
        return w, (carry[0], *(f32(a) for a in w))  # weight grads accumulate in a [K, N] carry

    def rows_fn(w, row, n, inner):
        wg_DF, wu_DF, wd_FD = w
        dx_GD, dwg_DF, dwu_DF, dwd_FD = inner
        x_nD, dy_nD = _rows(lhs_bits, row, n, dt), _rows(dout_bits, row, n, dt)
        h_nF, silu_vjp = jax.vjp(lambda g, u: jax.nn.silu(g) * u,
                                 _rows(g_GF, row, n, dt), _rows(u_GF, row, n, dt))
        dg_nF, du_nF = silu_vjp(_dot_nt(dy_nD, wd_FD).astype(dt))
        dx_nD = _dot_nt(dg_nF, wg_DF) + _dot_nt(du_nF, wu_DF)
        return (_set_rows(dx_GD, row, dx_nD, dt), dwg_DF + _dot_t(x_nD, dg_nF),
                dwu_DF + _dot_t(x_nD, du_nF), dwd_FD + _dot_t(h_nF, dy_nD))

    def expert_done(e, w, inner, carry):
        dx_GD, dwg_DF, dwu_DF, dwd_FD = inner
        _, dwg_EDF, dwu_EDF, dwd_EFD = carry
        return (dx_GD, dwg_EDF.at[e].set(dwg_DF), dwu_EDF.at[e].set(dwu_DF),
                dwd_EFD.at[e].set(dwd_FD))

    dx_GD, dwg, dwu, dwd = _per_expert(
        lhs_GD.shape[0], padded_sizes_E, tm, (_bits(jnp.zeros_like(lhs_GD)), f32(wg_EDF), f32(wu_EDF), f32(wd_EFD)),
        expert_init, rows_fn, expert_done)
    return (_floats(dx_GD, dt), dwg.astype(wg_EDF.dtype), dwu.astype(wu_EDF.dtype), dwd.astype(wd_EFD.dtype),
            None)


_xla_swiglu.defvjp(_xla_swiglu_fwd, _xla_swiglu_bwd)


# ----------------------------------------------------------------------------- front end

def gmm(lhs_GK, rhs_EKN, padded_sizes_E, *, tm: int, backend: str = "auto",
        platform: str | None = None, interpret: bool | None = None, live_rows: int | None = None):
    """[G, N] = per-expert lhs rows @ rhs[e]; differentiable in lhs and rhs.

    lhs_GK: [G, K], G a multiple of tm, in the layout `permute` writes.
    rhs_EKN: [E, K, N], same dtype as lhs; the output has lhs's dtype (f32 accumulation).
    padded_sizes_E: [E] int32, each a multiple of tm, summing to at most G.
    platform: the platform to pick kernels for (`auto`, and the Pallas style: Triton on gpu,
      Mosaic otherwise); default jax's backend. Pallas kernels are interpreted when jax runs
      on CPU, so tests can run the GPU style here with platform="gpu".
    interpret: run Pallas kernels in interpret mode; default when jax runs on CPU. Pass
      False (with platform="tpu") to compile the real kernels for a TPU from a CPU host.
    live_rows: how many rows the caller expects routed (a static hint for the Pallas kernels'
      cost estimate; default all G): each expert's group fills up to one partial tile more.
    """
    G, K = lhs_GK.shape
    if G % tm:
        raise ValueError(f"gmm: lhs rows {G} are not a multiple of the tile size tm={tm}")
    if rhs_EKN.ndim != 3 or rhs_EKN.shape[1] != K:
        raise ValueError(f"gmm: rhs must be [E, K={K}, N], got {rhs_EKN.shape}")
    eng = resolve(backend, platform=platform)
    backend, platform = eng.backend, eng.platform
    interpret = eng.interpret if interpret is None else interpret
    padded_sizes_E = padded_sizes_E.astype(jnp.int32)
    if backend == "xla":
        return _tiled_gmm(lhs_GK, rhs_EKN, padded_sizes_E, tm, "xla", interpret, None)
    if backend == "pallas":
        impl = "pallas_gpu" if platform == "gpu" else "pallas"
        live_tiles = None if live_rows is None else -(-live_rows // tm) + rhs_EKN.shape[0]
        return _tiled_gmm(lhs_GK, rhs_EKN, padded_sizes_E, tm, impl, interpret, live_tiles)
    if backend == "megablox":
        return _megablox(lhs_GK, rhs_EKN, padded_sizes_E, tm, interpret=interpret)
    if backend == "ragged_dot":
        out = jax.lax.ragged_dot(lhs_GK, rhs_EKN, padded_sizes_E,
                                 preferred_element_type=jnp.float32)
        return out.astype(lhs_GK.dtype)
    if backend == "tokamax":
        try:
            import tokamax  # optional: not a dependency of this project
        except ImportError as e:
            raise ImportError("model.moe_backend=tokamax needs `pip install tokamax`; "
                              "or pick xla / pallas / megablox / ragged_dot") from e
        out = tokamax.ragged_dot(lhs_GK, rhs_EKN, padded_sizes_E,
                                 preferred_element_type=jnp.float32)
        return out.astype(lhs_GK.dtype)
    raise AssertionError(backend)  # resolve() admits only the backends above


def _megablox(lhs_GK, rhs_EKN, padded_sizes_E, tm, *, interpret):
    from jax.experimental.pallas.ops.tpu.megablox import gmm as megablox_gmm

    # megablox leaves the rows past its last group unwritten (NaN in interpret mode), in the
    # forward and in its backward's dlhs; selecting zeros on both sides keeps the contract.
    rows_G = jnp.arange(lhs_GK.shape[0])
    live_G1 = (rows_G < jnp.sum(padded_sizes_E))[:, None]
    lhs_GK = jnp.where(live_G1, lhs_GK, 0)
    out = megablox_gmm(lhs_GK, rhs_EKN, padded_sizes_E, lhs_GK.dtype, (tm, 128, 128),
                       None, None, False, interpret)
    return jnp.where(live_G1, out, 0)


def gmm_swiglu(lhs_GD, w_gate_EDF, w_up_EDF, w_down_EFD, padded_sizes_E, *, tm: int,
               backend: str = "auto", platform: str | None = None,
               interpret: bool | None = None, live_rows: int | None = None):
    """[G, D'] = per expert e: (silu(lhs @ w_gate[e]) * (lhs @ w_up[e])) @ w_down[e].

    The routed SwiGLU experts on the `permute` layout, as `gmm` defines its rows (slack rows
    give zero output and zero gradient); the weights share lhs's dtype. On the `xla` backend
    one loop over the experts, within each over its group in 128-row chunks and then tm-row
    tiles, does all three products per block, and one such loop the backward (saving only the
    gate and up activations, never a concatenated weight); slack tiles are never visited.
    Other backends run two `gmm` calls on the gate|up concatenation and one on
    w_down. live_rows: as `gmm`.
    """
    G, K = lhs_GD.shape
    if G % tm:
        raise ValueError(f"gmm_swiglu: lhs rows {G} are not a multiple of the tile size tm={tm}")
    eng = resolve(backend, platform=platform)
    backend, platform = eng.backend, eng.platform
    padded_sizes_E = padded_sizes_E.astype(jnp.int32)
    if backend == "xla":
        return _xla_swiglu(lhs_GD, w_gate_EDF, w_up_EDF, w_down_EFD, padded_sizes_E, tm)
    F = w_gate_EDF.shape[2]
    w_gu_EDF2 = jnp.concatenate([w_gate_EDF, w_up_EDF], axis=2)
    run = functools.partial(gmm, tm=tm, backend=backend, platform=platform, interpret=interpret,
                            live_rows=live_rows)
    gu_GF2 = run(lhs_GD, w_gu_EDF2, padded_sizes_E)
    h_GF = jax.nn.silu(gu_GF2[:, :F]) * gu_GF2[:, F:]
    return run(h_GF, w_down_EFD, padded_sizes_E)
