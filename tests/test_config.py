"""Config validation: every invalid combination is one ConfigError naming the key."""
import json

import pytest

from olmoe_jax.config import ConfigError, apply_overrides, default_config, mesh_shape, validate


@pytest.mark.parametrize("overrides, key", [
    (["model.num_heads=5"], "model.num_heads"),
    (["model.num_kv_heads=3"], "model.num_kv_heads"),
    (["model.top_k=65"], "model.top_k"),
    (["model.norm_type=batchnorm"], "model.norm_type"),
    (["model.moe_impl=fast"], "model.moe_impl"),
    (["model.d_model=0"], "model.d_model"),
    (["optim.lr=-1.0"], "optim.lr"),
    (["optim.final_lr_ratio=2.0"], "optim.final_lr_ratio"),
    (["data.seq_len=8192"], "data.seq_len"),
    (["model.router_type=expert_choice"], "model.capacity_factor"),
    (["model.capacity_factor=1.25"], "model.moe_impl"),
    (["model.head_dim=7"], "head dim"),
    (["model.attention_impl=flash"], "model.attention_impl"),
    (["model.attention_impl=splash", "data.seq_len=200"], "model.attention_impl=splash"),
    (["model.attention_impl=cudnn"], "model.attention_impl=cudnn"),
])
def test_invalid_values_name_their_key(overrides, key):
    cfg = apply_overrides(default_config(), overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_unknown_and_mistyped_keys():
    cfg = default_config()
    with pytest.raises(ConfigError, match="unknown config key model.num_expert"):
        apply_overrides(cfg, ["model.num_expert=3"])
    with pytest.raises(ConfigError, match="expected int"):
        apply_overrides(cfg, ["model.num_experts=many"])
    with pytest.raises(ConfigError, match="true or false"):
        apply_overrides(cfg, ["model.qk_norm=3"])
    with pytest.raises(ConfigError, match="expected int"):
        apply_overrides(cfg, ["model.num_experts={[1]: 2}"])  # literal_eval raises TypeError
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides(cfg, ["model.qk_norm"])
    cfg.model.unlock()
    cfg.model.extra = 1
    with pytest.raises(ConfigError, match="unknown config key model.extra"):
        validate(cfg)


def test_overrides_parse_types():
    cfg = apply_overrides(default_config(), ["model.num_experts=32", "optim.lr=1e-3", "model.qk_norm=false",
                                             "model.norm_type=layernorm", "optim.final_lr_ratio=0"])
    assert cfg.model.num_experts == 32 and cfg.optim.lr == 1e-3 and cfg.model.qk_norm is False
    assert cfg.model.norm_type == "layernorm" and isinstance(cfg.optim.final_lr_ratio, float)
    validate(cfg)


def test_mesh_shapes_against_device_count():
    cfg = default_config()
    cfg.data.batch_size = 8
    assert mesh_shape(cfg, 8) == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}
    cfg.mesh.update(data=-1, fsdp=2, expert=2)
    assert mesh_shape(cfg, 8) == {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
    cfg.mesh.update(data=3, fsdp=1, expert=1)
    with pytest.raises(ConfigError, match="there are 8 devices"):
        mesh_shape(cfg, 8)
    cfg.mesh.update(data=-1, expert=3)
    with pytest.raises(ConfigError, match="does not divide the 8 devices"):
        mesh_shape(cfg, 8)
    cfg.mesh.update(data=1, expert=8)
    cfg.model.num_experts = 12
    with pytest.raises(ConfigError, match="mesh.expert=8 must divide model.num_experts=12"):
        mesh_shape(cfg, 8)


def test_from_json_refuses_non_objects_with_a_config_error():
    from olmoe_jax.config import from_json
    with pytest.raises(ConfigError, match="w/config.json holds a JSON list"):
        from_json("[1, 2]", "w/config.json")
    raw = default_config().to_dict()
    raw["model"] = 3
    with pytest.raises(ConfigError, match="w/config.json: model must be a section"):
        from_json(json.dumps(raw), "w/config.json")
    assert from_json(default_config().to_json(), "w/config.json") == default_config()


def test_tokamax_backend_needs_the_optional_package():
    import importlib.util
    if importlib.util.find_spec("tokamax") is not None:
        pytest.skip("tokamax is installed here")
    cfg = apply_overrides(default_config(), ["model.moe_backend=tokamax", "data.batch_size=8"])
    validate(cfg)  # a config for another machine may name it
    with pytest.raises(ConfigError, match="model.moe_backend=tokamax needs"):
        validate(cfg, num_devices=8)  # a run here may not


def test_a_saved_config_without_newer_keys_takes_their_defaults():
    """A workdir's config.json from before a key existed loads with the key's default."""
    from olmoe_jax.config import from_json  # pylint: disable=import-outside-toplevel
    raw = default_config().to_dict()
    del raw["train"]["microbatches"], raw["model"]["remat"]
    cfg = from_json(json.dumps(raw), "old/config.json")
    assert cfg.train.microbatches == 1 and cfg.model.remat == "none"
    raw["train"]["bogus"] = 1
    with pytest.raises(ConfigError, match="unknown config key train.bogus"):
        from_json(json.dumps(raw), "old/config.json")
