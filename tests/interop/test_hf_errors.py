"""Bad HF folders and inexpressible models: one clear error, raised before anything is written."""

import json
import os

import pytest
from hf_reference import build_hf
from safetensors.numpy import load_file, save_file

from olmoe_jax.config import default_config
from olmoe_jax.interop.hf_config import HFFormatError
from olmoe_jax.interop.hf_export import export_hf
from olmoe_jax.interop.hf_import import import_hf


@pytest.fixture
def hf_dir(tmp_path):
    build_hf("k2_gqa_nonorm", tmp_path / "hf")
    return tmp_path / "hf"


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_weights(folder, fn):
    tensors = load_file(str(folder / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _import_error(folder, base_cfg):
    with pytest.raises(HFFormatError) as e:
        import_hf(str(folder), base_cfg)
    return str(e.value)


def test_missing_files(hf_dir, base_cfg, tmp_path):
    assert "no such folder" in _import_error(tmp_path / "nope", base_cfg)
    os.remove(hf_dir / "model.safetensors")
    assert "neither model.safetensors nor" in _import_error(hf_dir, base_cfg)
    os.remove(hf_dir / "config.json")
    assert "has no config.json" in _import_error(hf_dir, base_cfg)


def test_index_names_missing_shard(hf_dir, base_cfg):
    keys = list(load_file(str(hf_dir / "model.safetensors")))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in keys}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert "model-00001-of-00002.safetensors" in _import_error(hf_dir, base_cfg)


def test_wrong_model_type(hf_dir, base_cfg):
    _edit_config(hf_dir, model_type="mixtral")
    msg = _import_error(hf_dir, base_cfg)
    assert "model_type='mixtral'" in msg and "olmoe" in msg


def test_unsupported_config_fields(hf_dir, base_cfg):
    _edit_config(hf_dir, clip_qkv=8.0)
    assert "clip_qkv" in _import_error(hf_dir, base_cfg)
    _edit_config(
        hf_dir,
        clip_qkv=None,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
    )
    assert "RoPE type 'linear'" in _import_error(hf_dir, base_cfg)


def test_shape_mismatch(hf_dir, base_cfg):
    _edit_config(hf_dir, intermediate_size=24)
    msg = _import_error(hf_dir, base_cfg)
    assert (
        "shape mismatch" in msg
        and "gate_proj.weight has shape [20, 48], config.json implies [24, 48]" in msg
    )


def test_unknown_and_missing_keys(hf_dir, base_cfg):
    def edit(t):
        t["model.layers.0.mlp.shared_expert.weight"] = t["model.norm.weight"]
        del t["model.layers.1.self_attn.k_norm.weight"]

    _edit_weights(hf_dir, edit)
    msg = _import_error(hf_dir, base_cfg)
    assert "1 tensor(s) missing: model.layers.1.self_attn.k_norm.weight" in msg
    assert (
        "unknown tensor(s) that config.json does not explain: "
        "model.layers.0.mlp.shared_expert.weight"
        in msg
    )


def _export_cfg(**change):
    """A one-layer model to export, with `change` applied to its model section."""
    cfg = default_config()
    cfg.model.update(
        vocab_size=50,
        d_model=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        num_experts=2,
        top_k=1,
        expert_dim=8,
        mlp_dim=8,
        **change,
    )
    return cfg


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(num_shared_experts=1), "no shared experts"),
        (
            dict(router_type="expert_choice", capacity_factor=1.0, moe_impl="capacity"),
            "router_type=expert_choice",
        ),
        (dict(norm_type="layernorm"), "uses RMSNorm"),
        (dict(qk_norm=False), "always applies QK RMSNorm"),
        (dict(ffn_type="dense"), "no HF dense architecture"),
        (
            dict(ffn_type="dense", qk_norm=False, norm_type="layernorm", norm_eps=1e-6),
            "eps 1e-05 fixed",
        ),
    ],
)
def test_export_refuses_before_writing(change, reason, tmp_path, random_params):
    cfg = _export_cfg(**change)
    params = random_params(cfg)  # never read: the refusal comes first
    with pytest.raises(HFFormatError, match=reason):
        export_hf(params, cfg, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")


def test_export_refuses_nonempty_out(tmp_path, random_params):
    cfg = _export_cfg()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(HFFormatError, match="not empty"):
        export_hf(random_params(cfg), cfg, str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
