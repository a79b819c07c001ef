"""The mesh from config and the logical-axis rules table."""
from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

from olmoe_jax.config import ConfigError, default_config
from olmoe_jax.model import transformer
from olmoe_jax.parallel import rules
from olmoe_jax.parallel.mesh import AXES, make_mesh


def _cfg(batch=8, **mesh):
    c = default_config()
    c.model.update(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   num_experts=4, top_k=2, expert_dim=16, mlp_dim=64)
    c.data.update(seq_len=16, batch_size=batch)
    c.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
    c.mesh.update(**mesh)
    return c


def test_mesh_axes_and_free_axis():
    mesh = make_mesh(_cfg(fsdp=2, expert=2))
    assert mesh.axis_names == AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
    assert dict(make_mesh(_cfg(data=1, fsdp=-1), jax.devices()[:4]).shape)["fsdp"] == 4


@pytest.mark.parametrize("mesh, message", [
    ({"data": 3}, "mesh sizes multiply to 3 but there are 8 devices"),
    ({"data": -1, "fsdp": -1}, "only one mesh axis may be -1"),
    ({"fsdp": 3}, "does not divide the 8 devices"),
    ({"data": 1, "expert": 8}, "mesh.expert=8 must divide model.num_experts=4"),
    ({"data": 1, "tensor": 4, "fsdp": 2}, "mesh.tensor=4 must divide model.num_kv_heads=2"),
    ({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, "multiply to 1 but there are 8 devices"),
    ({"data": 1, "fsdp": 4, "expert": 2, "tensor": 1, "batch": 4},
     r"data.batch_size=4 must be divisible by mesh.data\*mesh.fsdp\*mesh.expert=8"),
])
def test_bad_mesh_sizes_name_the_key(mesh, message):
    mesh = dict(mesh)
    with pytest.raises(ConfigError, match=message):
        make_mesh(_cfg(batch=mesh.pop("batch", 8), **mesh))


def test_constrain_is_the_activation_table():
    """constrain() places an activation by ACTIVATION_RULES, and is a no-op without a mesh."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    cfg = _cfg(data=2, fsdp=2, expert=2)
    mesh = make_mesh(cfg)
    x = jnp.zeros((8, 4, 32))
    assert rules.constrain(x, ("batch", "length", "embed"), None) is x
    y = jax.jit(lambda a: rules.constrain(a * 2, ("batch", "length", "embed"), mesh))(x)
    assert y.sharding.spec[0] == ("data", "fsdp", "expert")
    assert y.sharding.shard_shape(x.shape) == (1, 4, 32)


def test_every_logical_axis_has_a_rule():
    names = {r[0] for r in rules.RULES}
    act_names = {r[0] for r in rules.ACTIVATION_RULES}
    for variant in ({}, {"ffn_type": "dense"}, {"num_shared_experts": 1}):
        c = _cfg()
        c.model.update(**variant)
        used = {a for axes in jax.tree.leaves(transformer.logical_axes(c), is_leaf=lambda x: isinstance(x, tuple))
                for a in axes}
        assert used <= names, f"logical axes without a rule: {used - names}"
    assert {"batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab"} <= act_names


def test_param_and_batch_specs():
    specs = rules.tree_specs(transformer.logical_axes(_cfg()))
    assert specs["embed"] == P("tensor", "fsdp")  # (vocab, embed)
    assert specs["lm_head"] == P("fsdp", "tensor")  # (embed, vocab)
    assert specs["layers"]["wq"] == P(None, "fsdp", "tensor", None)
    assert specs["layers"]["wo"] == P(None, "tensor", None, "fsdp")
    assert specs["layers"]["moe"]["w_gate"] == P(None, "expert", "fsdp", "tensor")
    assert specs["layers"]["moe"]["w_down"] == P(None, "expert", "tensor", "fsdp")
    assert specs["layers"]["moe"]["router"] == P(None, "fsdp", None)
    assert specs["layers"]["attn_norm"] == P(None, "fsdp")
    assert rules.batch_sharding(make_mesh(_cfg())).spec == P(("data", "fsdp", "expert"), None)


def test_shards_on_a_full_mesh():
    cfg = _cfg(data=1, fsdp=2, expert=2, tensor=2)
    sh = transformer.param_shardings(cfg, make_mesh(cfg))
    L, E, D, F = 2, 4, 32, 16
    assert sh["layers"]["moe"]["w_up"].shard_shape((L, E, D, F)) == (L, E // 2, D // 2, F // 2)
    assert sh["embed"].shard_shape((128, D)) == (64, D // 2)
    batch = rules.batch_sharding(make_mesh(_cfg(fsdp=2)))  # data 4 x fsdp 2
    assert batch.shard_shape((8, 16)) == (1, 16)
    # The expert axis splits the batch too (outside the MoE block it is data-parallel).
    batch = rules.batch_sharding(make_mesh(_cfg(data=2, expert=4)))
    assert batch.shard_shape((8, 16)) == (1, 16)


def test_uneven_split_names_the_param_and_key():
    cfg = _cfg(data=1, fsdp=4, tensor=2)
    cfg.model.vocab_size = 129
    with pytest.raises(ConfigError, match=r"param \['embed'\] dim 0 has size 129, which mesh.tensor=2"):
        transformer.param_shardings(cfg, make_mesh(cfg))
