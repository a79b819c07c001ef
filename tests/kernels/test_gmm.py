"""Every grouped-matmul backend against a float64 loop over experts, forward and gradients.

Tolerances. f32: the kernels accumulate in f32, so the error is a few ulps of a K-term sum:
atol = rtol = 1e-5 (the values are O(sqrt K) ~ 10). bf16: the reference is computed in
float64 from the same bf16-rounded inputs, and every backend accumulates in f32 and rounds
once to bf16, whose half-ulp is 2^-9 of the value: rtol = 2^-8 leaves a factor 2 for the f32
sum, and atol = 1e-2 covers values that cancel to near zero (about 2^-8 of the O(10) terms).
"""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmoe_jax.kernels.gmm import default_backend, gmm, gmm_swiglu, tile_owners

TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2.0 ** -8, atol=1e-2)}


def make_case(rng, sizes_E, K, N, tm, dtype, slack_tiles=2):
    """Tile-padded lhs with random rows everywhere (padding rows inside a group are ordinary
    group members; rows in the slack tiles must be ignored), rhs, and a cotangent."""
    sizes_E = np.asarray(sizes_E)
    padded_E = (sizes_E + tm - 1) // tm * tm
    G = int(padded_E.sum()) + slack_tiles * tm
    cast = lambda a: np.asarray(jnp.asarray(a, dtype).astype(jnp.float32), np.float64)
    lhs = cast(rng.standard_normal((G, K)))
    rhs = cast(rng.standard_normal((len(sizes_E), K, N)))
    dout = cast(rng.standard_normal((G, N)))
    return lhs, rhs, dout, padded_E.astype(np.int32)


def loop_reference(lhs, rhs, dout, padded_E):
    """(out, dlhs, drhs) in float64 by an explicit loop over experts."""
    G, N = lhs.shape[0], rhs.shape[2]
    out, dlhs, drhs = np.zeros((G, N)), np.zeros_like(lhs), np.zeros_like(rhs)
    start = 0
    for e, size in enumerate(padded_E):
        rows = slice(start, start + size)
        out[rows] = lhs[rows] @ rhs[e]
        dlhs[rows] = dout[rows] @ rhs[e].T
        drhs[e] = lhs[rows].T @ dout[rows]
        start += size
    return out, dlhs, drhs


def run(backend, lhs, rhs, dout, padded_E, tm, dtype):
    # "pallas_gpu": the Triton-style Pallas kernels, interpreted here.
    platform = "gpu" if backend == "pallas_gpu" else None
    backend = "pallas" if backend == "pallas_gpu" else backend

    @jax.jit  # one compilation instead of many eagerly dispatched ops
    def fwd_bwd(a, b, sizes, d):
        out, vjp = jax.vjp(
            lambda a, b: gmm(a, b, sizes, tm=tm, backend=backend, platform=platform), a, b)
        return (out, *vjp(d))

    out, dlhs, drhs = fwd_bwd(jnp.asarray(lhs, dtype), jnp.asarray(rhs, dtype),
                              jnp.asarray(padded_E), jnp.asarray(dout, dtype))
    assert out.dtype == dtype and dlhs.dtype == dtype and drhs.dtype == dtype
    return [np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (out, dlhs, drhs)]


CASES = {
    # name: (group sizes before padding, K, N, tm)
    "ragged_with_empty": ([5, 0, 17, 1], 64, 96, 8),
    "one_expert_takes_all": ([0, 0, 29, 0, 0], 32, 16, 8),
    "tile_multiples": ([8, 16, 0, 8], 128, 128, 8),
    # skewed random sizes (Dirichlet 0.3 over 6 experts, 40 rows): several empty groups
    "random_skewed": (np.random.default_rng(3).multinomial(
        40, np.random.default_rng(4).dirichlet(np.full(6, 0.3))).tolist(), 32, 48, 8),
}


# Every case in f32; bf16 rounding on the ragged case and on the 128-lane blocks.
DTYPE_CASES = ([(jnp.float32, c) for c in CASES]
               + [(jnp.bfloat16, "ragged_with_empty"), (jnp.bfloat16, "tile_multiples")])


BACKEND_CASES = ([(b, d, c) for b in ("xla", "pallas", "ragged_dot") for d, c in DTYPE_CASES]
                 + [("pallas_gpu", jnp.float32, "ragged_with_empty"),
                    ("pallas_gpu", jnp.float32, "random_skewed"),
                    ("pallas_gpu", jnp.bfloat16, "tile_multiples")])


@pytest.mark.parametrize("backend,dtype,case", BACKEND_CASES)
def test_backend_matches_loop(backend, case, dtype):
    sizes, K, N, tm = CASES[case]
    rng = np.random.default_rng(zlib.crc32(f"{backend}/{case}".encode()))
    lhs, rhs, dout, padded = make_case(rng, sizes, K, N, tm, dtype)
    got = run(backend, lhs, rhs, dout, padded, tm, dtype)
    for name, g, r in zip(("out", "dlhs", "drhs"), got, loop_reference(lhs, rhs, dout, padded)):
        np.testing.assert_allclose(g, r, err_msg=f"{backend} {case} {name}", **TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32])
def test_megablox_matches_loop(dtype):
    # Interpret mode of jax's TPU kernel is slow on CPU: one ragged case with an empty group,
    # f32 only (the wrapper is dtype-blind; bf16 rounding is checked on the other backends).
    sizes, K, N, tm = CASES["ragged_with_empty"]
    rng = np.random.default_rng(7)
    lhs, rhs, dout, padded = make_case(rng, sizes, K, N, tm, dtype)
    got = run("megablox", lhs, rhs, dout, padded, tm, dtype)
    for name, g, r in zip(("out", "dlhs", "drhs"), got, loop_reference(lhs, rhs, dout, padded)):
        np.testing.assert_allclose(g, r, err_msg=f"megablox {name}", **TOL[dtype])


@pytest.mark.parametrize("backend", ["xla", "ragged_dot"])
@pytest.mark.parametrize("case", ["ragged_with_empty", "random_skewed", "long_groups"])
def test_gmm_swiglu_matches_loop(backend, case):
    """The SwiGLU block (fused tile loop on xla) against float64 per expert, f32: output and
    the gradients of lhs and the three weights; slack rows give zero output and gradient."""
    # long_groups: groups over 128 rows, which the xla loop takes in 128-row chunks, then tiles
    sizes, D, F, tm = CASES[case] if case in CASES else ([300, 0, 45, 130], 32, 48, 8)
    rng = np.random.default_rng(zlib.crc32(f"swiglu/{backend}/{case}".encode()))
    lhs, _, _, padded = make_case(rng, sizes, D, F, tm, jnp.float32)
    E, G = len(sizes), lhs.shape[0]
    # Weights scaled by 1/sqrt(fan-in) keep every intermediate O(1), as in a model.
    wg, wu = (rng.standard_normal((E, D, F)) / np.sqrt(D) for _ in range(2))
    wd = rng.standard_normal((E, F, D)) / np.sqrt(F)
    dout = rng.standard_normal((G, D))

    ref = [np.zeros((G, D)), np.zeros((G, D)), np.zeros_like(wg), np.zeros_like(wu),
           np.zeros_like(wd)]
    start = 0
    for e, size in enumerate(padded):
        rows = slice(start, start + size)
        x, dy = lhs[rows], dout[rows]
        a, b = x @ wg[e], x @ wu[e]
        sig = 1 / (1 + np.exp(-a))
        h = a * sig * b
        dh = dy @ wd[e].T
        da, db = dh * b * sig * (1 + a * (1 - sig)), dh * a * sig
        o, dl = h @ wd[e], da @ wg[e].T + db @ wu[e].T
        dg, du, dd = x.T @ da, x.T @ db, h.T @ dy
        ref[0][rows], ref[1][rows] = o, dl
        ref[2][e], ref[3][e], ref[4][e] = dg, du, dd
        start += size

    @jax.jit
    def fwd_bwd(a, g, u, d, sizes, dy):
        out, vjp = jax.vjp(lambda *w: gmm_swiglu(*w, sizes, tm=tm, backend=backend), a, g, u, d)
        return (out, *vjp(dy))

    f32 = lambda v: jnp.asarray(v, jnp.float32)
    got = fwd_bwd(f32(lhs), f32(wg), f32(wu), f32(wd), jnp.asarray(padded), f32(dout))
    for name, g, r in zip(("out", "dlhs", "dw_gate", "dw_up", "dw_down"), got, ref):
        np.testing.assert_allclose(np.asarray(g, np.float64), r, err_msg=f"{backend} {name}",
                                   **TOL[jnp.float32])


def test_tile_owners():
    tm = 4
    te, tv = tile_owners(jnp.asarray([8, 0, 4, 0], jnp.int32), 5, tm)
    np.testing.assert_array_equal(te, [0, 0, 2, 3, 3])  # tail tiles: the last expert id
    np.testing.assert_array_equal(tv, [1, 1, 1, 0, 0])


def test_auto_backend_per_platform():
    assert default_backend("cpu") == "xla"
    assert default_backend("tpu") == "pallas"  # docs/tpu_kernels.md
    assert default_backend("gpu") == "ragged_dot"


def test_errors_name_the_problem():
    lhs = jnp.zeros((12, 4))
    with pytest.raises(ValueError, match="multiple of the tile size"):
        gmm(lhs, jnp.zeros((2, 4, 3)), jnp.asarray([8, 0]), tm=8)
    with pytest.raises(ValueError, match="unknown backend"):
        gmm(jnp.zeros((8, 4)), jnp.zeros((2, 4, 3)), jnp.asarray([8, 0]), tm=8, backend="cuda")
