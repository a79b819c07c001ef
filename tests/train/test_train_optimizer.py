"""The OLMoE optimizer recipe: schedule values, weight decay on all params, clipping."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from olmoe_jax.model import transformer
from olmoe_jax.train.optimizer import make_optimizer, make_schedule

PEAK, WARMUP, TOTAL, RATIO = 4e-4, 10, 110, 0.1
F32_TOL = 2 * 2.0 ** -23  # two float32 roundings, relative


def _cfg(synthetic, schedule="cosine", **more):
    return synthetic.tiny_config(**{"optim.lr": PEAK, "optim.warmup_steps": WARMUP, "train.steps": TOTAL,
                                    "optim.final_lr_ratio": RATIO, "optim.schedule": schedule, **more})


def _lr(cfg, count):
    return float(make_schedule(cfg)(count))


def test_warmup_peak_and_cosine_to_final_ratio(synthetic):
    cfg = _cfg(synthetic)
    # Update counts from 0; the update with count c runs at step c + 1 (OLMo counts from 1).
    assert _lr(cfg, 0) == pytest.approx(PEAK / WARMUP, rel=1e-6)
    assert _lr(cfg, 4) == pytest.approx(PEAK * 5 / WARMUP, rel=1e-6)
    assert _lr(cfg, WARMUP - 1) == pytest.approx(PEAK, rel=1e-6)
    mid = WARMUP + (TOTAL - WARMUP) // 2 - 1  # half way through the decay: cos(pi/2) = 0
    assert _lr(cfg, mid) == pytest.approx(PEAK * (1 + RATIO) / 2, rel=1e-5)
    assert _lr(cfg, TOTAL - 1) == pytest.approx(PEAK * RATIO, rel=1e-6)
    assert _lr(cfg, TOTAL + 500) == pytest.approx(PEAK * RATIO, rel=1e-6)  # flat after the end


def test_linear_and_constant_schedules_and_decay_steps(synthetic):
    lin = _cfg(synthetic, "linear")
    assert _lr(lin, WARMUP - 1) == pytest.approx(PEAK, rel=1e-6)
    assert _lr(lin, WARMUP + 50 - 1) == pytest.approx(PEAK + (PEAK * RATIO - PEAK) * 0.5, rel=1e-6)
    assert _lr(lin, TOTAL - 1) == pytest.approx(PEAK * RATIO, rel=1e-6)
    const = _cfg(synthetic, "constant")
    assert _lr(const, 0) == pytest.approx(PEAK / WARMUP, rel=1e-6)
    assert _lr(const, TOTAL - 1) == pytest.approx(PEAK, rel=1e-6)
    # optim.decay_steps, when set, ends the decay there instead of at train.steps
    short = _cfg(synthetic, **{"optim.decay_steps": 60})
    assert _lr(short, 59) == pytest.approx(PEAK * RATIO, rel=1e-6)


def _one_update(cfg):
    """(params before, after) one update with zero gradients, as float64 numpy trees.

    float64 so the expected p * factor is exact; the float32 update rounds at most twice
    (the factor, the product), hence F32_TOL. Decay itself moves weights by lr * wd = 4e-6
    relative, 17x that tolerance."""
    tx = make_optimizer(cfg)

    @jax.jit  # one compile instead of one per op
    def run(key):
        params = transformer.init(cfg, key)
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        return params, optax.apply_updates(params, updates)

    params, after = run(jax.random.PRNGKey(0))
    as64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)  # noqa: E731
    return as64(params), as64(after)


def test_weight_decay_reaches_norms_and_embeddings(synthetic):
    # With zero gradients Adam's update is 0, so only decoupled weight decay moves a weight:
    # p <- p * (1 - lr * wd), lr = PEAK / WARMUP on the first update.
    cfg = _cfg(synthetic)
    before, after = _one_update(cfg)
    factor = 1 - PEAK / WARMUP * cfg.optim.weight_decay
    for name in ("final_norm", "embed", "lm_head"):
        np.testing.assert_allclose(after[name], before[name] * factor, rtol=F32_TOL)
    np.testing.assert_allclose(after["layers"]["attn_norm"], before["layers"]["attn_norm"] * factor, rtol=F32_TOL)
    assert not np.array_equal(after["final_norm"], before["final_norm"])


def test_decay_all_params_off_spares_norms_and_embedding(synthetic):
    cfg = _cfg(synthetic, **{"optim.decay_all_params": False})
    before, after = _one_update(cfg)
    factor = 1 - PEAK / WARMUP * cfg.optim.weight_decay
    for name in ("final_norm", "embed"):
        np.testing.assert_array_equal(after[name], before[name])
    np.testing.assert_array_equal(after["layers"]["q_norm"], before["layers"]["q_norm"])
    np.testing.assert_allclose(after["lm_head"], before["lm_head"] * factor, rtol=F32_TOL)
    np.testing.assert_allclose(after["layers"]["moe"]["w_up"], before["layers"]["moe"]["w_up"] * factor, rtol=F32_TOL)


def test_gradients_are_clipped_to_global_norm(synthetic):
    # Adam's first update is g / (|g| + eps): with eps = 1 it shows the gradient's scale, so
    # a constant gradient of 3 clipped to global norm 1 becomes g_c = 1 / sqrt(n) per element.
    cfg = _cfg(synthetic, **{"optim.clip_norm": 1.0, "optim.eps": 1.0, "optim.weight_decay": 0.0})
    params = transformer.abstract_params(cfg)
    n = sum(p.size for p in jax.tree.leaves(params))
    tx = make_optimizer(cfg)

    @jax.jit
    def run():
        grads = jax.tree.map(lambda p: jnp.full(p.shape, 3.0, p.dtype), params)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), params)
        return tx.update(grads, tx.init(zeros), zeros)[0]

    updates = run()
    g_c = 1 / np.sqrt(n)
    want = -PEAK / WARMUP * g_c / (g_c + 1.0)
    for u in jax.tree.leaves(updates):
        np.testing.assert_allclose(np.asarray(u), want, rtol=1e-5)  # float32 sums over n elements
