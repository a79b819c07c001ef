"""Gradient accumulation (train.microbatches): the cross-entropy and its gradient equal the
whole batch's; the router losses are the mean of each slice's own; remat policies keep the
function."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmoe_jax.config import ConfigError, validate
from olmoe_jax.model import losses
from olmoe_jax.parallel.mesh import make_mesh
from olmoe_jax.train import step as step_lib

# float32; slices change only how the batch's sums are split: measured differences of a few
# 1e-7 relative, so 1e-5 is far below what a wrong weighting gives (1e-2 and up).
RTOL, ATOL = 1e-5, 1e-7
# Those differences were measured on code compiled at XLA's default LLVM level (3), as runs
# compile it; at the suite's -O0 (tests/conftest.py) the embedding gradient's scatter-add
# rounds differently (1.2e-7 absolute on one element, 8 ulps of the leaf's largest entry).
DEFAULT_CODEGEN = {"xla_backend_optimization_level": 3}


def _grads(cfg, params, batch, compiler_options=None):
    fn = jax.jit(functools.partial(step_lib.loss_and_grads, cfg=step_lib.frozen(cfg)),
                 compiler_options=compiler_options)
    return jax.device_get(fn(params, batch))


def test_cross_entropy_and_its_gradient_equal_the_whole_batch(synthetic, random_params):
    base = synthetic.tiny_config(**{"model.lb_loss_weight": 0.0, "model.z_loss_weight": 0.0})
    params = random_params(base)
    batch = synthetic.dataset(base)[0]
    batch["loss_mask"][1, :5] = 0.0  # slices with unequal token counts must still weigh right
    m1, g1 = _grads(base, params, batch, DEFAULT_CODEGEN)
    for num in (2, 4):
        cfg = synthetic.tiny_config(**{"model.lb_loss_weight": 0.0, "model.z_loss_weight": 0.0,
                                       "train.microbatches": num})
        m, g = _grads(cfg, params, batch, DEFAULT_CODEGEN)
        np.testing.assert_allclose(m["ce_loss"], m1["ce_loss"], rtol=RTOL)
        np.testing.assert_allclose(m["loss"], m1["loss"], rtol=RTOL)
        assert m["tokens"] == m1["tokens"] == 8 * 16 - 5
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), g, g1)


def test_router_losses_are_the_mean_over_slices(synthetic, random_params):
    cfg = synthetic.tiny_config(**{"train.microbatches": 2})
    params = random_params(cfg)
    batch = synthetic.dataset(cfg)[0]
    m, g = _grads(cfg, params, batch)
    # Reference: each strided slice (rows j, j+2, ...) through loss_fn on its own (jitted: one
    # program each rather than hundreds of op-by-op compiles).
    slices = [{k: v[j::2] for k, v in batch.items()} for j in range(2)]
    slice_metrics = jax.jit(lambda p, b: losses.loss_fn(p, b, cfg)[1])  # one compile for both
    parts = [jax.device_get(slice_metrics(params, s)) for s in slices]
    for key in ("lb_loss", "z_loss"):
        np.testing.assert_allclose(m[key], np.mean([p[key] for p in parts]), rtol=RTOL)
    extra = np.mean([p["loss"] - p["ce_loss"] for p in parts])
    np.testing.assert_allclose(m["loss"] - m["ce_loss"], extra, rtol=1e-4)
    # The gradient is that of ce(batch) + mean of the slices' router terms.
    whole = jax.jit(jax.grad(lambda p, b: losses.loss_fn(p, b, cfg)[1]["ce_loss"]))(params, batch)
    router_grad = jax.jit(jax.grad(lambda p, b: (lambda t, mm: t - mm["ce_loss"])(*losses.loss_fn(p, b, cfg))))
    router = [router_grad(params, s) for s in slices]
    want = jax.tree.map(lambda w, a, b: w + (a + b) / 2, whole, *router)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, jax.device_get(want))


def test_sharded_microbatched_step_equals_one_device(synthetic):
    """data 4 x fsdp 2, 2 slices of 4 rows (each slice split 8 ways... of 8 rows: one row per
    device per slice) against one device without slices: same losses and params."""
    over = {"model.lb_loss_weight": 0.0, "model.z_loss_weight": 0.0, "optim.eps": 1.0}
    single = synthetic.tiny_config(**over, **{"mesh.data": 1})
    sharded = synthetic.tiny_config(**over, **{"mesh.data": 4, "mesh.fsdp": 2, "train.microbatches": 1})
    sharded.data.batch_size = 16
    single.data.batch_size = 16
    sharded.train.microbatches = 2
    batches = [synthetic.dataset(single)[i] for i in range(2)]

    def run(cfg, devices):
        mesh = make_mesh(cfg, devices)
        sh = step_lib.state_shardings(cfg, mesh)
        state = step_lib.init_state(cfg, sh)
        step = step_lib.make_train_step(cfg, mesh, sh)
        out = []
        for b in batches:
            state, m = step(state, step_lib.global_batch(b, mesh))
            out.append(jax.device_get(m))
        return out, jax.device_get(state.params)

    m1, p1 = run(validate(single), jax.devices()[:1])
    m8, p8 = run(validate(sharded), jax.devices())
    for a, b in zip(m8, m1):
        for key in ("loss", "ce_loss", "grad_norm"):
            np.testing.assert_allclose(a[key], b[key], rtol=RTOL, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), p8, p1)


def test_microbatches_must_divide_the_batch(synthetic):
    with pytest.raises(ConfigError, match="train.microbatches=3 does not divide data.batch_size=8"):
        synthetic.tiny_config(**{"train.microbatches": 3})
    cfg = synthetic.tiny_config(**{"train.microbatches": 2})
    with pytest.raises(ConfigError, match=r"train.microbatches=2 x mesh.data\*mesh.fsdp\*mesh.expert=8"):
        validate(cfg, num_devices=8)  # 8 rows: 2 slices of 4 cannot split over 8 devices


@pytest.mark.parametrize("remat", ["full", "dots", "offload"])
def test_remat_policies_keep_the_gradient(synthetic, random_params, remat):
    base = synthetic.tiny_config()
    params = random_params(base)
    batch = synthetic.dataset(base)[0]
    _, g1 = _grads(base, params, batch)
    _, g = _grads(synthetic.tiny_config(**{"model.remat": remat}), params, batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), g, g1)


def test_slices_cut_activation_memory(synthetic):
    """The compiled step's temporaries shrink with the slice size (activations of B / M rows)."""
    def temp_bytes(num):
        cfg = synthetic.tiny_config(**{"train.microbatches": num, "model.moe_impl": "dropless"})
        cfg.data.update(batch_size=32, seq_len=16)
        mesh = make_mesh(cfg, jax.devices()[:1])
        sh = step_lib.state_shardings(cfg, mesh)
        state = step_lib.abstract_state(cfg, sh)
        batch = {k: jax.ShapeDtypeStruct((32, 16), jnp.float32 if k == "loss_mask" else jnp.int32)
                 for k in ("inputs", "targets", "loss_mask")}
        return step_lib.lower_train_step(cfg, mesh, sh, state, batch).compile().memory_analysis().temp_size_in_bytes

    one, four = temp_bytes(1), temp_bytes(4)
    assert four < 0.5 * one, (one, four)
