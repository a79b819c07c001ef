"""Sparse upcycling: at initialisation the MoE computes the dense model's function when the top-k
weights are renormalised; without renormalisation its FFN is scaled by the top-k probability mass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmoe_jax.config import ConfigError, default_config
from olmoe_jax.interop.upcycle import upcycle, upcycle_config
from olmoe_jax.model import layers, transformer
from olmoe_jax.model.moe import moe_block


@pytest.fixture(scope="module")
def dense(random_params):
    c = default_config()
    c.model.update(
        vocab_size=71,
        d_model=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=32,
        ffn_type="dense",
        mlp_dim=44,
        moe_impl="dense",
        init_std=0.2,
    )
    c.data.seq_len = 32
    return c, random_params(c)


TOKENS = np.random.RandomState(1).randint(0, 71, (2, 13)).astype(np.int32)


def _logits(params, cfg):
    return np.asarray(jax.jit(lambda p, t: transformer.apply(p, t, cfg)[0])(params, TOKENS))


@pytest.mark.parametrize("experts, k, renorm", [(4, 2, True), (3, 3, False), (5, 1, False)])
def test_function_preserved_when_weights_sum_to_one(dense, experts, k, renorm):
    """Weights sum to one (renormalised, or top_k == E): same logits. Top-1 unnormalised: not."""
    cfg, params = dense
    moe_cfg = upcycle_config(cfg, num_experts=experts, top_k=k, norm_topk_prob=renorm)
    moe = upcycle(params, moe_cfg, jax.random.PRNGKey(7))
    assert moe["layers"]["moe"]["w_gate"].shape == (2, experts, 32, 44)
    want, got = _logits(params, cfg), _logits(moe, moe_cfg)
    if renorm or k == experts:
        # Equal up to rounding of the k weights' sum (one float32 ulp per layer), not bit-exact.
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    else:
        assert np.abs(got - want).max() > 1e-3 * np.abs(want).max()  # the scaled FFN shows


def test_without_renormalisation_ffn_is_scaled_by_topk_mass(dense):
    cfg, params = dense
    moe_cfg = upcycle_config(cfg, num_experts=6, top_k=2, norm_topk_prob=False)
    moe = upcycle(params, moe_cfg, jax.random.PRNGKey(3))
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 5, 32))
    p = jax.tree.map(lambda w: w[1], moe["layers"]["moe"])  # layer 1
    y, _ = moe_block(p, x, moe_cfg)
    mlp = jax.tree.map(lambda w: w[1], params["layers"]["mlp"])
    f = layers.swiglu(x, mlp["w_gate"], mlp["w_up"], mlp["w_down"])
    probs = jax.nn.softmax(jnp.einsum("btd,de->bte", x, p["router"]), axis=-1)
    mass = jnp.sum(jax.lax.top_k(probs, 2)[0], axis=-1, keepdims=True)
    assert float(mass.min()) < 0.9  # a real scaling, not ~1
    np.testing.assert_allclose(np.asarray(y), np.asarray(mass * f), rtol=1e-5, atol=1e-6)


def test_router_fresh_and_noise_reinitialises_a_fraction(dense):
    cfg, params = dense
    moe_cfg = upcycle_config(cfg, num_experts=4, top_k=2, norm_topk_prob=True)
    clean = upcycle(params, moe_cfg, jax.random.PRNGKey(0))
    noisy = upcycle(params, moe_cfg, jax.random.PRNGKey(0), noise=0.5)
    router = np.asarray(clean["layers"]["moe"]["router"])
    assert router.shape == (2, 32, 4) and 0.15 < router.std() < 0.25  # init_std 0.2, truncated
    w = np.asarray(clean["layers"]["moe"]["w_up"])
    assert all(
        np.array_equal(w[:, e], np.asarray(params["layers"]["mlp"]["w_up"])) for e in range(4)
    )
    changed = np.asarray(noisy["layers"]["moe"]["w_up"]) != w
    assert 0.45 < changed.mean() < 0.55
    assert not np.array_equal(changed[:, 0], changed[:, 1])  # experts now differ from each other
    np.testing.assert_array_equal(noisy["embed"], params["embed"])


def test_refuses_moe_source_and_bad_noise(dense):
    cfg, params = dense
    moe_cfg = upcycle_config(cfg, num_experts=4, top_k=2, norm_topk_prob=True)
    with pytest.raises(ConfigError, match="needs a dense model"):
        upcycle_config(moe_cfg, num_experts=4, top_k=2, norm_topk_prob=True)
    with pytest.raises(ConfigError, match="top_k=5 exceeds"):
        upcycle_config(cfg, num_experts=4, top_k=5, norm_topk_prob=True)
    with pytest.raises(ConfigError, match="noise"):
        upcycle(params, moe_cfg, jax.random.PRNGKey(0), noise=1.5)
