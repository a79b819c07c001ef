"""A train step on an 8-device mesh gives the one-device loss and updated params."""
from __future__ import annotations

import jax
import numpy as np

from olmoe_jax.parallel.mesh import make_mesh
from olmoe_jax.train import step as step_lib

STEPS = 2  # the second step also runs Adam on the sharded moments

# float32 throughout; the layouts differ only in how sums are split across devices, so the
# gradients differ by reduction order: measured up to 6e-7 of each leaf's largest entry.
# 1e-5 relative (1e-7 absolute for values near 0) is 10-100x that, and far below what a wrong
# layout gives (a dropped or double-counted shard moves values at the 1e-1 level).
RTOL, ATOL = 1e-5, 1e-7
# Adam's update g / (|g| + eps) with eps 1e-8 turns reduction-order noise in a gradient entry
# near 0 into an O(lr) change of that weight (its sign can flip), whatever the layout. With
# eps = 1 the update is a smooth function of the gradient, so equal updated params below mean
# equal gradients, and the sharded optimizer moments are still exercised.
ADAM_EPS = 1.0


def _run(cfg, devices, batches):
    mesh = make_mesh(cfg, devices)
    sh = step_lib.state_shardings(cfg, mesh)
    state = step_lib.init_state(cfg, sh)
    init_params = jax.device_get(state.params)
    step = step_lib.make_train_step(cfg, mesh, sh)
    metrics = []
    for b in batches:
        state, m = step(state, step_lib.global_batch(b, mesh))
        metrics.append(jax.device_get(m))
    return init_params, jax.device_get(state.params), metrics


def test_sharded_step_matches_one_device(synthetic):
    """data 2 x fsdp 2 x expert 2: batch split 4 ways, embed dims over fsdp, experts over expert.

    (The tensor axis's specs are checked in tests/parallel; a second compiled layout here would
    cost another minute of the 2-core test budget.)"""
    assert jax.device_count() == 8
    single = synthetic.tiny_config(**{"mesh.data": 1, "optim.eps": ADAM_EPS})
    sharded = synthetic.tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.expert": 2, "optim.eps": ADAM_EPS})
    batches = [synthetic.dataset(single)[i] for i in range(STEPS)]

    init1, params1, m1 = _run(single, jax.devices()[:1], batches)
    init8, params8, m8 = _run(sharded, jax.devices(), batches)

    # The init's random bits do not depend on the layout: both runs start from the same weights.
    jax.tree.map(np.testing.assert_array_equal, init8, init1)
    for a, b in zip(m8, m1):
        for key in ("loss", "ce_loss", "lb_loss", "z_loss", "grad_norm"):
            np.testing.assert_allclose(a[key], b[key], rtol=RTOL, atol=ATOL, err_msg=key)
        np.testing.assert_allclose(a["expert_load"], b["expert_load"], rtol=RTOL, atol=ATOL)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL), params8, params1)
    # The update is not trivially small: the comparison would catch a layout that skipped it.
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(init1)))
    assert moved > 100 * ATOL
