"""MoE in every n-th layer and layer-shared experts, against plain references.

moe_every: a Python loop over the layers (no scan, no grouping) with each layer's own weights.
Layer-shared: the usual per-layer MoE whose every layer holds a copy of the shared experts
computes the same function, and the shared experts' gradient is the sum of those copies'.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmoe_jax.config import ConfigError, validate
from olmoe_jax.interop.hf_config import HFFormatError, hf_model_type
from olmoe_jax.model import layers, transformer
from olmoe_jax.model.moe import moe_block


def _tokens(cfg, B=2, T=12):
    return jax.random.randint(jax.random.key(1), (B, T), 0, cfg.model.vocab_size)


def _loop_reference(params, tok, cfg):
    """Logits by an explicit loop over layers: layer i is MoE iff (i + 1) % moe_every == 0."""
    m = cfg.model
    x = jnp.take(params["embed"], tok, axis=0)
    pos = jnp.broadcast_to(jnp.arange(tok.shape[1]), tok.shape)
    i_moe = i_mlp = 0
    for i in range(m.num_layers):
        p = {k: v[i] for k, v in params["layers"].items() if k not in ("moe", "mlp")}
        a, _ = layers.attention(p, layers.norm(x, p.get("attn_norm"), cfg), pos, cfg, None)
        x = x + a
        h = layers.norm(x, p.get("mlp_norm"), cfg)
        if (i + 1) % m.moe_every == 0:
            y, _ = moe_block(jax.tree.map(lambda w: w[i_moe], params["layers"]["moe"]), h, cfg)
            i_moe += 1
        else:
            q = jax.tree.map(lambda w: w[i_mlp], params["layers"]["mlp"])
            y = layers.swiglu(h, q["w_gate"], q["w_up"], q["w_down"])
            i_mlp += 1
        x = x + y
    x = layers.norm(x, params.get("final_norm"), cfg)
    return jnp.einsum("btd,dv->btv", x, params["lm_head"])


@pytest.fixture
def every2(tiny_cfg):
    tiny_cfg.model.update(num_layers=4, moe_every=2)
    return validate(tiny_cfg)


def test_moe_every_second_layer_matches_layer_loop(every2, random_params):
    params = random_params(every2, std=0.1)
    assert params["layers"]["moe"]["w_gate"].shape[0] == 2 and params["layers"]["mlp"]["w_gate"].shape[0] == 2
    assert params["layers"]["wq"].shape[0] == 4
    tok = _tokens(every2)
    out, aux = transformer.apply(params, tok, every2, return_routing=True)
    np.testing.assert_allclose(out, _loop_reference(params, tok, every2), rtol=1e-5, atol=1e-5)
    assert aux["tokens_per_expert"].shape == (2, every2.model.num_experts)  # MoE layers only
    assert aux["routing"].shape == (2, 2, 12, every2.model.top_k)
    every2.model.remat = "full"  # the group of layers is what is rematerialised
    np.testing.assert_allclose(transformer.apply(params, tok, every2)[0], out, rtol=1e-6, atol=1e-6)


def test_moe_every_kv_cache_decoding_matches_full_forward(every2, random_params):
    params = random_params(every2, std=0.1)
    tok = _tokens(every2, T=8)
    full, _ = transformer.apply(params, tok, every2)
    logits, aux = transformer.apply(params, tok[:, :5], every2, cache=transformer.init_cache(every2, 2, 16))
    outs = [logits]
    for i in range(5, 8):
        logits, aux = transformer.apply(params, tok[:, i:i + 1], every2, cache=aux["cache"])
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_moe_every_counts_and_refusals(every2, tiny_cfg):
    total, active = transformer.count_params(every2)
    m = every2.model
    D, E, F, k, Fd = m.d_model, m.num_experts, m.expert_dim, m.top_k, m.mlp_dim
    dense_ffn = 3 * D * Fd
    by_hand = total - 2 * (E - k) * 3 * D * F  # two MoE layers, each using k of E experts
    assert active == by_hand
    assert total - active == 2 * (E - k) * 3 * D * F and total > 2 * dense_ffn
    with pytest.raises(HFFormatError, match="moe_every"):
        hf_model_type(every2)
    bad = every2.copy_and_resolve_references()
    bad.model.moe_every = 3
    with pytest.raises(ConfigError, match="moe_every=3 must divide model.num_layers=4"):
        validate(bad)


@pytest.fixture
def shared_cfg(tiny_cfg):
    tiny_cfg.model.update(num_layers=3, moe_shared_layers=True, num_experts=6, top_k=2)
    return validate(tiny_cfg)


def _tiled(params, cfg):
    """The per-layer MoE params equal to `params`' layer-shared ones (every layer a copy)."""
    L = cfg.model.num_layers
    moe = dict(params["layers"]["moe"])
    for k, w in params["layer_shared_experts"].items():
        moe[k] = jnp.broadcast_to(w, (L,) + w.shape)
    out = {k: v for k, v in params.items() if k != "layer_shared_experts"}
    return dict(out, layers=dict(params["layers"], moe=moe))


def test_layer_shared_moe_is_a_per_layer_moe_with_tied_experts(shared_cfg, random_params):
    params = random_params(shared_cfg, std=0.1)
    assert params["layer_shared_experts"]["w_gate"].shape == (6, 48, 20)  # [E, D, F], stored once
    assert params["layers"]["moe"]["router"].shape == (3, 48, 6)  # a router per layer
    plain = shared_cfg.copy_and_resolve_references()
    plain.model.moe_shared_layers = False
    tok = _tokens(shared_cfg)
    loss = lambda p, c: jnp.mean(transformer.apply(p, tok, c)[0] ** 2)  # noqa: E731
    out, _ = transformer.apply(params, tok, shared_cfg)
    np.testing.assert_allclose(out, transformer.apply(_tiled(params, shared_cfg), tok, plain)[0], rtol=1e-6,
                               atol=1e-6)
    g_shared = jax.grad(loss)(params, shared_cfg)
    g_plain = jax.grad(loss)(_tiled(params, shared_cfg), plain)
    for k in ("w_gate", "w_up", "w_down"):  # the tied weight's gradient sums its uses
        np.testing.assert_allclose(g_shared["layer_shared_experts"][k], g_plain["layers"]["moe"][k].sum(0),
                                   rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_shared["layers"]["wq"], g_plain["layers"]["wq"], rtol=1e-5, atol=1e-7)


def test_layer_shared_counts_experts_once_in_total_and_per_layer_in_active(shared_cfg):
    m = shared_cfg.model
    total, active = transformer.count_params(shared_cfg)
    plain = shared_cfg.copy_and_resolve_references()
    plain.model.moe_shared_layers = False
    p_total, p_active = transformer.count_params(plain)
    per_expert = 3 * m.d_model * m.expert_dim
    assert p_total - total == (m.num_layers - 1) * m.num_experts * per_expert  # stored once, not L times
    assert active == p_active  # each layer's k experts multiply the token: the same FLOPs
    with pytest.raises(HFFormatError, match="moe_shared_layers"):
        hf_model_type(shared_cfg)


def test_z_loss_types_against_hand_computed_logsumexp(tiny_cfg):
    """layers: sum over layers of mean_t lse^2 / layers; layers_tokens_topk: the sum over layers
    and tokens of lse^2 / (layers x tokens x top_k), computed here from the router logits."""
    from olmoe_jax.model import losses  # pylint: disable=import-outside-toplevel
    m = tiny_cfg.model
    rng = np.random.default_rng(0)
    L, T = 3, 10
    logits = rng.normal(size=(L, T, m.num_experts)) * 3
    lse2 = np.log(np.exp(logits).sum(-1)) ** 2  # [L, T]
    aux = {"tokens_per_expert": jnp.ones((L, m.num_experts)), "prob_mean": jnp.ones((L, m.num_experts)) / 6,
           "z_loss": jnp.asarray(lse2.mean(-1), jnp.float32), "dropped_frac": jnp.zeros((L,))}
    _, got = losses.router_losses(aux, tiny_cfg)
    np.testing.assert_allclose(got["z_loss"], lse2.mean(-1).sum() / L, rtol=1e-6)
    tiny_cfg.model.z_loss_type = "layers_tokens_topk"
    total, got = losses.router_losses(aux, tiny_cfg)
    np.testing.assert_allclose(got["z_loss"], lse2.sum() / (L * T * m.top_k), rtol=1e-6)
    lb = float(got["lb_loss"])
    np.testing.assert_allclose(total, m.lb_loss_weight * lb + m.z_loss_weight * lse2.sum() / (L * T * m.top_k),
                               rtol=1e-6)
