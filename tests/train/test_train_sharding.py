"""Train steps on 8-device meshes give the one-device losses, gradients and updated params,
for every kind of layout (data, fsdp, expert, tensor), with the MoE expert-parallel (a
shard_map exchanging tokens by all_to_all; olmoe_jax/model/moe_ep.py)."""
from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from olmoe_jax.parallel.mesh import make_mesh
from olmoe_jax.train import step as step_lib

STEPS = 5  # from the second step on Adam also runs on the sharded moments

# (data, fsdp, expert, tensor): each axis alone, and mixes of them.
LAYOUTS = [(8, 1, 1, 1), (1, 8, 1, 1), (1, 1, 8, 1), (2, 2, 2, 1), (1, 2, 2, 2), (2, 1, 4, 1)]

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


def _config(synthetic, layout):
    # 8 experts top-2: on mesh.expert=8 each device owns one expert. Dropless, so the routing
    # of a batch shard equals the one-device routing of the global batch.
    # seq_len 12 keeps B * T (96) apart from every model size (see _assert_no_token_all_gather).
    data, fsdp, expert, tensor = layout
    return synthetic.tiny_config(**{
        "model.num_experts": 8, "model.moe_impl": "dropless", "optim.eps": ADAM_EPS, "data.seq_len": 12,
        "mesh.data": data, "mesh.fsdp": fsdp, "mesh.expert": expert, "mesh.tensor": tensor})


def _run(cfg, devices, batches):
    """(params after step 1, params after the last step, metrics per step, compiled step)."""
    mesh = make_mesh(cfg, devices)
    sh = step_lib.state_shardings(cfg, mesh)
    state = step_lib.init_state(cfg, sh)
    batches = [step_lib.global_batch(b, mesh) for b in batches]
    compiled = step_lib.lower_train_step(cfg, mesh, sh, state, batches[0]).compile()
    metrics, first = [], None
    for b in batches:
        state, m = compiled(state, b)
        metrics.append(jax.device_get(m))
        first = jax.device_get(state.params) if first is None else first
    return first, jax.device_get(state.params), metrics, compiled


@pytest.fixture(scope="module")
def one_device(synthetic):
    cfg = _config(synthetic, (1, 1, 1, 1))
    batches = [synthetic.dataset(cfg)[i] for i in range(STEPS)]
    return batches, _run(cfg, jax.devices()[:1], batches)


def _close(a, b, err_msg=""):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=err_msg)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "x".join(map(str, l)))
def test_sharded_steps_match_one_device(synthetic, one_device, layout):
    assert jax.device_count() == 8
    batches, (first1, params1, m1, _) = one_device
    first8, params8, m8, compiled = _run(_config(synthetic, layout), jax.devices(), batches)

    for step, (a, b) in enumerate(zip(m8, m1)):
        for key in ("loss", "ce_loss", "lb_loss", "z_loss", "grad_norm"):
            _close(a[key], b[key], f"step {step} {key}")
        _close(a["expert_load"], b["expert_load"], f"step {step} expert_load")
        assert np.all(a["dropped_frac"] == 0)
    # Params after one step carry the step-0 gradients (see ADAM_EPS); after the last, all.
    jax.tree.map(_close, first8, first1)
    jax.tree.map(_close, params8, params1)
    # The updates are not trivially small: the comparison would catch a layout that skipped one.
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(first1)))
    assert moved > 100 * ATOL

    hlo = compiled.as_text()
    if layout[2] > 1:
        assert " all-to-all(" in hlo, "expert parallelism without an all-to-all"
    if layout == (1, 1, 8, 1):
        _assert_no_token_all_gather(hlo, _config(synthetic, layout))


def _assert_no_token_all_gather(hlo: str, cfg):
    """On mesh.expert=8 alone, every non-trivial collective runs over the expert axis. Token
    activations have a dim of the local batch x positions (B/8 * T rows, or [B/8, T]); one
    gathered over the expert axis would hold the global batch: B rows, or B * T (* k) rows.
    Every all-gather's result is checked for such a dim (the weights' dims are model sizes:
    D 32, F 32, E 8, V 128, heads 2, head_dim 16; none equals B * T = 96 or B * T * k)."""
    B, T, k = cfg.data.batch_size, cfg.data.seq_len, cfg.model.top_k
    token_dims = {B * T, B * T * k}
    gathers = re.findall(r"= (\S+) all-gather\(", hlo) + re.findall(r"= (\S+) all-gather-start\(", hlo)
    for shape in gathers:
        dims = {int(d) for d in re.findall(r"\d+", shape.split("]")[0].split("[")[-1])}
        assert not dims & token_dims, f"all-gather of token activations: {shape}"
    # The global batch dim B itself: B = 8 also is the expert count, so check the batch-major
    # activation shape [B, T, ...] instead.
    assert not re.search(rf"\[{B},{T}[,\]]\S* all-gather", hlo), "all-gather of a [B, T, ...] activation"
