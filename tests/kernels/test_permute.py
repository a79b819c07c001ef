"""The tile-padded layout, and permute / unpermute (XLA and Pallas) against plain references.

The references are written with scatters and jax's own autodiff, so they check the custom
backward passes independently. Tolerances: permute copies rows (exact in any dtype); unpermute
sums k weighted rows in f32: f32 rtol = atol = 1e-6; bf16 rounds the f32 sum once (half-ulp
2^-9), so rtol = 2^-8 and atol = 2^-8 for sums that cancel near zero (terms are O(1)).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmoe_jax.kernels.permute import make_layout, num_rows, permute, unpermute

TOL = {jnp.float32: dict(rtol=1e-6, atol=1e-6), jnp.bfloat16: dict(rtol=2.0 ** -8, atol=2.0 ** -8)}


def topk_ids(rng, T, E, k, skew=None):
    """[T, k] distinct expert ids per token; `skew` favours some experts (empty ones appear)."""
    p = None if skew is None else rng.dirichlet(np.full(E, skew))
    if p is not None:
        p = np.maximum(p, 1e-9)
        p = p / p.sum()
    return np.stack([rng.choice(E, k, replace=False, p=p) for _ in range(T)]).astype(np.int32)


CASES = {
    # name: (T, E, k, tm, how ids are drawn)
    "uniform": (13, 5, 2, 8, None),
    "skewed_with_empty": (21, 8, 3, 8, 0.2),
    "one_expert_takes_all": (19, 4, 1, 8, "all_to_2"),
}


def ids_for(case, rng):
    T, E, k, tm, how = CASES[case]
    if how == "all_to_2":
        return np.full((T, k), 2, np.int32)
    return topk_ids(rng, T, E, k, how)


@pytest.mark.parametrize("case", list(CASES))
def test_layout_invariants(case):
    T, E, k, tm, _ = CASES[case]
    idx = ids_for(case, np.random.default_rng(0))
    lay = jax.tree.map(np.asarray, make_layout(jnp.asarray(idx), E, tm))
    sizes = np.bincount(idx.reshape(-1), minlength=E)
    np.testing.assert_array_equal(lay.group_sizes_E, sizes)
    np.testing.assert_array_equal(lay.padded_sizes_E % tm, 0)
    assert lay.src_slot_G.shape == (num_rows(T * k, E, tm),)
    assert lay.padded_sizes_E.sum() <= lay.src_slot_G.shape[0]
    start = np.concatenate([[0], np.cumsum(lay.padded_sizes_E)])
    dest = lay.dest_row_Tk.reshape(-1)
    assert len(set(dest.tolist())) == T * k  # every slot has its own row
    for n, e in enumerate(idx.reshape(-1)):
        assert start[e] <= dest[n] < start[e] + sizes[e]  # inside its expert's group, packed
        assert lay.src_slot_G[dest[n]] == n
    assert (lay.src_slot_G == T * k).sum() == lay.src_slot_G.shape[0] - T * k


def test_num_rows_covers_the_worst_case():
    # Every expert holding one slot wastes tm - 1 rows each: the bound must still hold.
    T, E, k, tm = 16, 16, 1, 8
    idx = np.arange(T, dtype=np.int32)[:, None]
    lay = make_layout(jnp.asarray(idx), E, tm)
    assert int(lay.padded_sizes_E.sum()) == E * tm == num_rows(T * k, E, tm)


def reference_permute(x_TD, dest_Tk, G):
    T, k = dest_Tk.shape
    return jnp.zeros((G, x_TD.shape[1]), x_TD.dtype).at[dest_Tk.reshape(-1)].set(
        jnp.repeat(x_TD, k, axis=0))


def reference_unpermute(buf_GD, w_Tk, dest_Tk):
    rows = buf_GD[dest_Tk].astype(jnp.float32)
    return jnp.einsum("tkd,tk->td", rows, w_Tk).astype(buf_GD.dtype)


def as64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


DTYPE_CASES = [(jnp.float32, c) for c in CASES] + [(jnp.bfloat16, "skewed_with_empty")]


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("dtype,case", DTYPE_CASES)
def test_permute_unpermute_match_reference(impl, case, dtype):
    T, E, k, tm, _ = CASES[case]
    rng = np.random.default_rng(1)
    idx = ids_for(case, rng)
    D = 16
    lay = make_layout(jnp.asarray(idx), E, tm)
    G = lay.src_slot_G.shape[0]
    x = jnp.asarray(rng.standard_normal((T, D)), dtype)
    w = jnp.asarray(rng.random((T, k)), jnp.float32)
    dbuf = jnp.asarray(rng.standard_normal((G, D)), dtype)
    dy = jnp.asarray(rng.standard_normal((T, D)), dtype)

    # The references run in f32 on the same (bf16-exact) values, so they round only at the
    # end; a bf16 reference would round after each of the k additions of its backward.
    f32 = lambda a: a.astype(jnp.float32)

    @jax.jit  # one compilation instead of many eagerly dispatched ops
    def both(x, w, dbuf, dy, lay):
        buf, vjp_p = jax.vjp(lambda a: permute(a, lay, impl=impl), x)
        buf_ref, vjp_pr = jax.vjp(lambda a: reference_permute(a, lay.dest_row_Tk, G), f32(x))
        y, vjp_u = jax.vjp(lambda b, ww: unpermute(b, ww, lay, impl=impl), buf, w)
        y_ref, vjp_ur = jax.vjp(lambda b, ww: reference_unpermute(b, ww, lay.dest_row_Tk),
                                f32(buf), w)
        got = (buf, vjp_p(dbuf)[0], y, *vjp_u(dy))
        ref = (buf_ref, vjp_pr(f32(dbuf))[0], y_ref, *vjp_ur(f32(dy)))
        return got, ref

    (buf, dx, y, dbuf_got, dw_got), (buf_ref, dx_ref, y_ref, dbuf_ref, dw_ref) = both(
        x, w, dbuf, dy, lay)
    np.testing.assert_array_equal(as64(buf), as64(buf_ref))  # a copy: exact
    np.testing.assert_allclose(as64(dx), as64(dx_ref), **TOL[dtype])
    assert y.dtype == dtype
    np.testing.assert_allclose(as64(y), as64(y_ref), **TOL[dtype])
    np.testing.assert_allclose(as64(dbuf_got), as64(dbuf_ref), **TOL[dtype])
    # dw sums D products in f32 from the same (bf16) operands in both: tight in both dtypes.
    np.testing.assert_allclose(as64(dw_got), as64(dw_ref), rtol=1e-5, atol=1e-5)


def test_round_trip_recovers_weighted_tokens_under_jit():
    rng = np.random.default_rng(2)
    T, E, k, tm, D = 30, 6, 2, 8, 8
    idx = topk_ids(rng, T, E, k)
    x = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
    w = jnp.asarray(rng.random((T, k)), jnp.float32)

    @jax.jit
    def round_trip(x, w, idx):
        lay = make_layout(idx, E, tm)
        return unpermute(permute(x, lay), w, lay)

    np.testing.assert_allclose(round_trip(x, w, jnp.asarray(idx)), x * w.sum(1, keepdims=True),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_row_kernels_over_several_blocks_with_a_padded_tail(dtype):
    # The Pallas row kernels step over 16-row blocks; 37 tokens / 90 rows leave a partial
    # last block (padded with index 0 and weight 0, then cut off). Duplicate indices included.
    from olmoe_jax.kernels import permute_pallas

    rng = np.random.default_rng(3)
    T, k, D, G = 37, 3, 128, 90
    x = jnp.asarray(rng.standard_normal((T, D)), dtype)
    buf = jnp.asarray(rng.standard_normal((G, D)), dtype)
    src = jnp.asarray(rng.integers(0, T, G), jnp.int32)
    scale = jnp.asarray(rng.random(G), jnp.float32)
    dest = jnp.asarray(rng.integers(0, G, (T, k)), jnp.int32)
    w = jnp.asarray(rng.random((T, k)), jnp.float32)
    got_g = permute_pallas.gather_rows(x, src, scale, interpret=True, block_rows=16)
    got_c = permute_pallas.combine_rows(buf, dest, w, interpret=True, block_tokens=16)
    ref_g = as64(x)[np.asarray(src)] * np.asarray(scale, np.float64)[:, None]
    ref_c = np.einsum("tkd,tk->td", as64(buf)[np.asarray(dest)], np.asarray(w, np.float64))
    assert got_g.shape == (G, D) and got_c.shape == (T, D)
    np.testing.assert_allclose(as64(got_g), ref_g, **TOL[dtype])
    np.testing.assert_allclose(as64(got_c), ref_c, **TOL[dtype])
