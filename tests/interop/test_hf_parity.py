"""Parity with transformers: HF -> ours (logits), ours -> HF (transformers loads it, same logits),
and HF -> ours -> HF -> ours bit-exact, for several OLMoE shapes and the dense architectures."""

import jax
import numpy as np
import pytest
from hf_reference import DENSE_CONFIGS, OLMOE_CONFIGS, build_hf, hf_logits, rel_err
from safetensors import safe_open

from olmoe_jax.interop.hf_export import export_hf
from olmoe_jax.interop.hf_import import import_hf
from olmoe_jax.model import transformer

transformers = pytest.importorskip("transformers")


def _ours(params, cfg, tokens):
    return np.asarray(jax.jit(lambda p, t: transformer.apply(p, t, cfg)[0])(params, tokens))


def _assert_same_params(a, b):
    flat_a, flat_b = (
        jax.tree_util.tree_flatten_with_path(a)[0],
        jax.tree_util.tree_flatten_with_path(b)[0],
    )
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert np.asarray(x).dtype == np.asarray(y).dtype, path
        assert np.array_equal(np.asarray(x), np.asarray(y)), f"{jax.tree_util.keystr(path)} differs"


@pytest.mark.parametrize("name", list(OLMOE_CONFIGS) + list(DENSE_CONFIGS))
def test_import_export_roundtrip(name, tmp_path, base_cfg, tokens):
    model = build_hf(name, tmp_path / "hf")
    ref = hf_logits(model, tokens)
    cfg, params = import_hf(str(tmp_path / "hf"), base_cfg)
    assert rel_err(_ours(params, cfg, tokens), ref) <= 1e-5

    # Small shards: the index and several files are exercised.
    export_hf(params, cfg, str(tmp_path / "out"), eos_id=2, pad_id=0, shard_bytes=30_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert type(back).__name__ == type(model).__name__
    np.testing.assert_array_equal(hf_logits(back.eval(), tokens), ref)  # the very same weights

    cfg2, params2 = import_hf(str(tmp_path / "out"), base_cfg)
    assert cfg2.to_dict() == cfg.to_dict()
    _assert_same_params(params, params2)


def test_export_layout_is_per_expert(tmp_path, base_cfg):
    """The released checkpoint's key layout: per-expert gate/up/down, no fused tensors."""
    build_hf("k2_gqa_nonorm", tmp_path / "hf")
    cfg, params = import_hf(str(tmp_path / "hf"), base_cfg)
    export_hf(params, cfg, str(tmp_path / "out"), eos_id=2, pad_id=0)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "np") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.1.mlp.experts.4.gate_proj.weight").shape == (20, 48)
        assert f.get_tensor("model.layers.1.mlp.experts.4.down_proj.weight").shape == (48, 20)
    assert not any("gate_up_proj" in k for k in keys)
    assert len([k for k in keys if ".mlp.experts." in k]) == 2 * 5 * 3


def test_import_fused_layout(tmp_path, base_cfg, tokens):
    """transformers 5's in-memory layout (gate_up_proj [E, 2F, D], down_proj [E, D, F])."""
    from safetensors.torch import save_file

    model = build_hf("k3_mqa_norm_theta", tmp_path / "hf")
    fused = tmp_path / "fused"
    fused.mkdir()
    state = model.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(fused / "model.safetensors"))
    (fused / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    _, per_expert = import_hf(str(tmp_path / "hf"), base_cfg)
    cfg, params = import_hf(str(fused), base_cfg)
    _assert_same_params(per_expert, params)
    assert rel_err(_ours(params, cfg, tokens), hf_logits(model, tokens)) <= 1e-5


def test_bf16_export(tmp_path, base_cfg, tokens):
    build_hf("k2_gqa_nonorm", tmp_path / "hf")
    cfg, params = import_hf(str(tmp_path / "hf"), base_cfg)
    export_hf(params, cfg, str(tmp_path / "bf16"), dtype="bfloat16", eos_id=2, pad_id=0)
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "np") as f:
        assert str(f.get_tensor("lm_head.weight").dtype) == "bfloat16"
    _, back = import_hf(str(tmp_path / "bf16"), base_cfg)  # read back into float32 params
    rounded = jax.tree.map(
        lambda x: np.asarray(x).astype(jax.numpy.bfloat16).astype(np.float32), params
    )
    _assert_same_params(rounded, back)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "bf16"), dtype="float32"
    )
    ours = _ours(back, cfg, tokens)
    assert rel_err(ours, hf_logits(model.eval(), tokens)) <= 1e-5


@pytest.mark.parametrize("name", ["k2_gqa_nonorm", "k1_mha_norm_tied"])
def test_dropless_matches_transformers(name, tmp_path, base_cfg, tokens):
    """The default MoE implementation (tokens sorted by expert, grouped matmul), not only dense."""
    model = build_hf(name, tmp_path / "hf")
    base_cfg.model.moe_impl = "dropless"
    cfg, params = import_hf(str(tmp_path / "hf"), base_cfg)
    assert rel_err(_ours(params, cfg, tokens), hf_logits(model, tokens)) <= 1e-5


def test_transformers4_style_config(tmp_path, base_cfg, tokens):
    """The released checkpoint's config.json is 4.x style: a top-level rope_theta, torch_dtype."""
    import json

    model = build_hf("k3_mqa_norm_theta", tmp_path / "hf")  # rope theta 500
    path = tmp_path / "hf" / "config.json"
    hf = json.loads(path.read_text())
    hf.pop("rope_parameters")
    hf.update(rope_theta=500.0, rope_scaling=None, torch_dtype=hf.pop("dtype", "float32"))
    path.write_text(json.dumps(hf))
    cfg, params = import_hf(str(tmp_path / "hf"), base_cfg)
    assert cfg.model.rope_theta == 500.0
    assert rel_err(_ours(params, cfg, tokens), hf_logits(model, tokens)) <= 1e-5
