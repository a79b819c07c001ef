"""The fused router (XLA and Pallas forward, analytic backward) against the pure-XLA reference
differentiated by jax itself.

Tolerances (f32 throughout; the router always runs in f32): ids and counts exact; weights,
prob means and logsumexps within 1e-6 (a few ulps: the kernel computes the softmax with the
same ops in a different fusion); gradients within 1e-6 absolute of values O(0.1-1).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmoe_jax.kernels import router_pallas
from olmoe_jax.kernels.router import router, router_reference


def logits_case(rng, T, E):
    lg = rng.standard_normal((T, E)).astype(np.float32) * 2
    lg[1] = 0.0  # all experts tied: lowest ids first, as jax.lax.top_k
    lg[2, : E // 2] = 3.0  # a tie among the top
    lg[3] = -50.0
    lg[3, 0] = 50.0  # one expert takes all the mass
    return jnp.asarray(lg)


def check_forward(out, ref, T, k):
    assert out.idx_Tk.dtype == jnp.int32 and out.group_sizes_E.dtype == jnp.int32
    np.testing.assert_array_equal(out.idx_Tk, ref.idx_Tk)
    np.testing.assert_array_equal(out.group_sizes_E, ref.group_sizes_E)
    assert int(out.group_sizes_E.sum()) == T * k
    for name in ("weights_Tk", "prob_mean_E", "lse_T"):
        np.testing.assert_allclose(getattr(out, name), getattr(ref, name), rtol=1e-6, atol=1e-6,
                                   err_msg=name)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_forward_and_grad_match_reference(impl, renormalize):
    rng = np.random.default_rng(0)
    T, E, k = 37, 16, 4  # T not a multiple of the 8-row block
    lg = logits_case(rng, T, E)
    check_forward(jax.jit(lambda l: router(l, k, renormalize=renormalize, impl=impl))(lg),
                  router_reference(lg, k, renormalize), T, k)

    # Random cotangents on every differentiable output: weights, prob_mean, lse.
    cw = jnp.asarray(rng.standard_normal((T, k)), jnp.float32)
    cp = jnp.asarray(rng.standard_normal((E,)), jnp.float32)
    cl = jnp.asarray(rng.standard_normal((T,)), jnp.float32)

    def loss(fn):
        def f(lg):
            o = fn(lg)
            return (jnp.sum(o.weights_Tk * cw) + jnp.sum(o.prob_mean_E * cp)
                    + jnp.sum(o.lse_T * cl) + jnp.mean(o.lse_T ** 2))
        return f

    got = jax.jit(jax.grad(loss(lambda l: router(l, k, renormalize=renormalize, impl=impl))))(lg)
    want = jax.jit(jax.grad(loss(lambda l: router_reference(l, k, renormalize))))(lg)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_pallas_blocks_and_padding():
    # Several token blocks, the last one partly padding: padded rows must not count.
    rng = np.random.default_rng(1)
    T, E, k = 37, 8, 2
    lg = logits_case(rng, T, E)
    w, idx, lse, counts, psum = jax.jit(lambda l: router_pallas.route_topk(
        l, k, False, block_tokens=16, interpret=True))(lg)
    ref = router_reference(lg, k)
    np.testing.assert_array_equal(idx, ref.idx_Tk)
    np.testing.assert_array_equal(counts, ref.group_sizes_E)
    np.testing.assert_allclose(psum / T, ref.prob_mean_E, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(w, ref.weights_Tk, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(lse, ref.lse_T, rtol=1e-6)


def test_renormalised_weights_sum_to_one_and_keep_order():
    lg = logits_case(np.random.default_rng(2), 9, 8)
    out = router(lg, 3, renormalize=True, impl="pallas")
    np.testing.assert_allclose(out.weights_Tk.sum(-1), 1.0, rtol=1e-6)
    assert bool(jnp.all(out.weights_Tk[:, :-1] >= out.weights_Tk[:, 1:]))
