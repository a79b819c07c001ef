"""The expert-parallel MoE block (model/moe_ep.py) against one-device references, forward,
router statistics and gradients (weights and input, through the router too).

Dropless token choice must equal the one-device block on the global batch (the train-step
layouts are in tests/train/test_train_sharding.py); here the uneven worst case. Capacity
routing and expert choice route each batch shard on its own (moe_ep.py says why), so they
are checked against the one-device block applied to each shard of the batch in turn.
Tolerances: f32 sums in a different order (per shard, per exchange round, grouped vs
bucketed): outputs and statistics within 1e-5 as in test_moe_impls.py; gradients within 1e-5
of each leaf's largest entry, as in tests/train/test_train_sharding.py. A weight-gradient
entry is a sum over every token its expert saw (all 128 under uneven routing, gathered over
8 exchange rounds): where terms of size ~10 cancel to ~0.1, the order moved it by 2e-5
(1.4e-6 of the leaf's largest entry), whereas a lost or doubled token moves it at 1e-2.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from olmoe_jax.config import default_config, validate
from olmoe_jax.model import moe, moe_ep, transformer
from olmoe_jax.parallel import expert, rules
from olmoe_jax.parallel.mesh import make_mesh

B, T = 8, 16


def _cfg(layout, **model):
    c = default_config()
    c.model.update(dict(dict(vocab_size=64, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2,
                             max_seq_len=T, num_experts=8, top_k=2, expert_dim=24,
                             compute_dtype="float32", moe_impl="dropless"), **model))
    c.data.update(seq_len=T, batch_size=B)
    c.mesh.update(dict(zip(("data", "fsdp", "expert", "tensor"), layout)))
    return validate(c, num_devices=8)


def _inputs(cfg, seed=0):
    m = cfg.model
    D, E, F = m.d_model, m.num_experts, m.expert_dim
    rng = np.random.default_rng(seed)
    shapes = {"router": (D, E), "w_gate": (E, D, F), "w_up": (E, D, F), "w_down": (E, F, D)}
    if m.num_shared_experts:
        S = m.num_shared_experts * F
        shapes.update(shared_gate=(D, S), shared_up=(D, S), shared_down=(S, D))
    p = {k: jnp.asarray(rng.normal(size=s) * (0.5 if k == "router" else 0.2), jnp.float32)
         for k, s in shapes.items()}
    x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    return p, x, cot


def _objective(y, st, cot):
    # Every statistic the losses use, with a gradient through prob_mean and z_loss.
    return (jnp.sum(y * cot) + jnp.sum(st["tokens_per_expert"] * st["prob_mean"]) + st["z_loss"]
            + st["dropped_frac"])


def _on_mesh(cfg, p, x, cot):
    """value, (y, stats), grads of the block run expert-parallel on cfg's 8-device mesh."""
    mesh = make_mesh(cfg)
    axes = {k: v[1:] for k, v in transformer.logical_axes(cfg)["layers"]["moe"].items()}

    def f(p, x):
        y, st = moe.moe_block(p, x, cfg, mesh=mesh, weight_axes=axes)
        return _objective(y, st, cot), (y, st)

    p = {k: jax.device_put(v, NamedSharding(mesh, rules.logical_spec(axes[k]))) for k, v in p.items()}
    x = jax.device_put(x, NamedSharding(mesh, rules.activation_spec(("batch", "length", "embed"))))
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(p, x)


def _per_shard(cfg, p, x, cot, shards, impl):
    """The same on one device: the block on each of `shards` batch shards (in the mesh's
    order: the batch is split data-major over data x fsdp x expert), statistics combined as
    the expert-parallel block combines them."""
    one = validate(cfg.copy_and_resolve_references())
    one.model.moe_impl = impl

    def f(p, x):
        outs = [moe.moe_block(p, xs, one) for xs in jnp.split(x, shards)]
        y = jnp.concatenate([o[0] for o in outs])
        st = {"tokens_per_expert": sum(o[1]["tokens_per_expert"] for o in outs)}
        for name in ("prob_mean", "z_loss", "dropped_frac"):
            st[name] = sum(o[1][name] for o in outs) / shards
        st["topk_idx"] = jnp.concatenate([o[1]["topk_idx"] for o in outs])
        return _objective(y, st, cot), (y, st)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(p, x)


def _assert_same(got, ref):
    (v, (y, st)), (gp, gx) = got
    (v_ref, (y_ref, st_ref)), (gp_ref, gx_ref) = ref
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    for name in ("tokens_per_expert", "prob_mean", "z_loss", "dropped_frac"):
        np.testing.assert_allclose(st[name], st_ref[name], rtol=1e-5, atol=1e-7, err_msg=name)
    np.testing.assert_array_equal(st["topk_idx"], st_ref["topk_idx"])
    for name, g, g_ref in [(n, gp[n], gp_ref[n]) for n in gp_ref] + [("dx", gx, gx_ref)]:
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(g_ref))),
                                   err_msg=name)


def test_uneven_routing_stays_dropless_and_exact():
    """Expert 0 is every token's first choice: on mesh.expert=8 (one expert per device)
    every device sends all its tokens to device 0, the buffer's worst case."""
    cfg = _cfg((1, 1, 8, 1))
    p, x, cot = _inputs(cfg)
    x = x.at[..., 0].set(3.0 + jnp.abs(x[..., 0]))
    p = dict(p, router=p["router"].at[0, 0].set(50.0))
    got = _on_mesh(cfg, p, x, cot)
    assert float(got[0][1][1]["tokens_per_expert"][0]) == B * T
    assert float(got[0][1][1]["dropped_frac"]) == 0.0
    # In every exchange round all the round's tokens go to device 0: its receive rows from
    # every source are exactly full (S = tokens per round, as min(k, L) = 1).
    n = B * T // 8 // moe_ep.exchange_rounds(cfg, B * T // 8, 8)
    assert moe_ep.rows_per_shard(cfg, n, 8) == n
    _assert_same(got, _per_shard(cfg, p, x, cot, 1, "dropless"))


@pytest.mark.parametrize("layout", [(2, 1, 4, 1)], ids=["2x1x4x1"])
def test_capacity_routing_per_shard(layout):
    """Token choice with a capacity: drops happen, are counted, and match the one-device block
    on each batch shard."""
    cfg = _cfg(layout, capacity_factor=1.0, moe_impl="capacity")
    p, x, cot = _inputs(cfg, seed=1)
    p = dict(p, router=p["router"] * 4.0)  # a peaked router overflows some experts
    got = _on_mesh(cfg, p, x, cot)
    assert float(got[0][1][1]["dropped_frac"]) > 0.05
    _assert_same(got, _per_shard(cfg, p, x, cot, 8, "capacity"))


@pytest.mark.parametrize("layout", [(1, 2, 2, 2)], ids=["1x2x2x2"])
def test_expert_choice_per_shard_with_shared_expert(layout):
    """Expert choice (each expert's top C among a shard's tokens) with a shared expert, on a
    layout that splits FSDP, experts and the FFN hidden dim (tensor)."""
    cfg = _cfg(layout, router_type="expert_choice", capacity_factor=2.0, num_shared_experts=1)
    p, x, cot = _inputs(cfg, seed=2)
    _assert_same(_on_mesh(cfg, p, x, cot), _per_shard(cfg, p, x, cot, 4, "capacity"))


def test_send_positions():
    dest = jnp.array([1, 0, 1, 1, 0], jnp.int32)
    send = jnp.array([True, True, False, True, True])
    np.testing.assert_array_equal(expert.send_positions(dest, send, 2, 2), [2, 0, 4, 3, 1])
    # A full block sends nothing more: the second assignment to device 1 gets no row.
    np.testing.assert_array_equal(expert.send_positions(dest, send, 2, 1), [1, 0, 2, 2, 2])


def test_rows_per_shard():
    # Dropless: a token's k experts are distinct, so a device gets at most min(k, L) of them.
    assert moe_ep.rows_per_shard(_cfg((1, 1, 8, 1)), 16, 8) == 16 * 1
    assert moe_ep.rows_per_shard(_cfg((2, 1, 4, 1)), 16, 4) == 16 * 2
    # Capacity C = ceil(1.0 * 16 * 2 / 8) = 4 per expert, L = 2 experts per device.
    assert moe_ep.rows_per_shard(_cfg((2, 1, 4, 1), capacity_factor=1.0, moe_impl="capacity"), 16, 4) == 8
    cfg = _cfg((1, 2, 2, 2), router_type="expert_choice", capacity_factor=2.0)
    assert moe_ep.rows_per_shard(cfg, 16, 2) == 4 * 8
    # Dropless sends in rounds (the largest divisor of the local tokens up to mesh.expert);
    # a capacity already bounds the buffers: one round.
    assert moe_ep.exchange_rounds(_cfg((1, 1, 8, 1)), 16, 8) == 8
    assert moe_ep.exchange_rounds(_cfg((1, 1, 8, 1)), 12, 8) == 6
    assert moe_ep.exchange_rounds(cfg, 16, 2) == 1
