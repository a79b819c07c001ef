"""Every MoE implementation and grouped-matmul backend equals the `dense` reference, forward
and gradients (w.r.t. every weight and the input), for every routing variant.

Tolerances. f32: the implementations sum the same products in different orders (a loop over
experts vs a grouped matmul), so they agree to a few f32 ulps of O(1) values: 1e-5.
bf16 compute: every path rounds its intermediates (gate/up, hidden, down, combine) to bf16,
about four roundings of relative size 2^-9; each is checked against the f32 dense result
with a relative-norm bound of 2^-6 (twice that budget), the same bound the bf16 dense
reference itself has to meet.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmoe_jax.config import validate
from olmoe_jax import kernels
from olmoe_jax.model import moe

VARIANTS = {
    # name: (model overrides, implementations to check against dense)
    "token_choice": (dict(), ["dropless"]),
    "token_choice_renorm": (dict(norm_topk_prob=True), ["dropless"]),
    "token_choice_capacity": (dict(capacity_factor=1.0), ["capacity"]),
    "expert_choice": (dict(router_type="expert_choice", capacity_factor=2.0),
                      ["capacity", "dropless"]),
    "shared_expert": (dict(num_shared_experts=1), ["dropless"]),
}
BACKENDS = ["xla", "pallas", "ragged_dot", "megablox"]


def make_params(cfg, rng):
    m = cfg.model
    D, E, F = m.d_model, m.num_experts, m.expert_dim
    p = {"router": rng.normal(size=(D, E)) * 0.5,
         "w_gate": rng.normal(size=(E, D, F)) * 0.2,
         "w_up": rng.normal(size=(E, D, F)) * 0.2,
         "w_down": rng.normal(size=(E, F, D)) * 0.2}
    if m.num_shared_experts:
        S = m.num_shared_experts * F
        p.update(shared_gate=rng.normal(size=(D, S)) * 0.2, shared_up=rng.normal(size=(D, S)) * 0.2,
                 shared_down=rng.normal(size=(S, D)) * 0.2)
    return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


def value_and_grads(cfg, p, x, cot):
    """y, and the gradients of <y, cot> w.r.t. params and x (router logits included)."""
    def f(p, x):
        y, stats = moe.moe_block(p, x, cfg)
        return jnp.sum(y.astype(jnp.float32) * cot), (y, stats)
    (_, (y, stats)), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(p, x)
    return y, stats, grads


def setup(tiny_cfg, variant, seed=0, T=12):
    overrides, impls = VARIANTS[variant]
    tiny_cfg.model.update(**overrides)
    rng = np.random.default_rng(seed)
    p = make_params(tiny_cfg, rng)
    x = jnp.asarray(rng.normal(size=(2, T, tiny_cfg.model.d_model)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    tiny_cfg.model.moe_impl = "dense"
    return impls, p, x, cot, value_and_grads(tiny_cfg, p, x, cot)


def cases():
    # Every backend on OLMoE's routing; the other routing variants on the CPU default (the
    # backends see only the permuted rows, whatever routed them).
    for variant, (_, impls) in VARIANTS.items():
        for impl in impls:
            tc_dropless = impl == "dropless" and variant == "token_choice"
            for backend in (BACKENDS if tc_dropless else ["auto"]):
                yield variant, impl, backend


@pytest.mark.parametrize("variant,impl,backend", list(cases()))
def test_impl_matches_dense_f32(tiny_cfg, variant, impl, backend):
    _, p, x, cot, (y_ref, stats_ref, g_ref) = setup(tiny_cfg, variant)
    tiny_cfg.model.update(moe_impl=impl, moe_backend=backend)
    validate(tiny_cfg)
    y, stats, g = value_and_grads(tiny_cfg, p, x, cot)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for name in g_ref[0]:
        np.testing.assert_allclose(g[0][name], g_ref[0][name], rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(g[1], g_ref[1], rtol=1e-5, atol=1e-5, err_msg="dx")
    for name in ("tokens_per_expert", "prob_mean", "z_loss", "dropped_frac"):
        np.testing.assert_allclose(stats[name], stats_ref[name], rtol=1e-6, err_msg=name)


def test_capacity_drops_are_reported_and_excluded(tiny_cfg):
    # A capacity far below the load drops assignments; the buckets must skip exactly those.
    tiny_cfg.model.capacity_factor = 0.25
    _, p, x, cot, (y_ref, stats_ref, _) = setup(tiny_cfg, "token_choice")  # dense, with drops
    assert float(stats_ref["dropped_frac"]) > 0.3
    tiny_cfg.model.moe_impl = "capacity"
    y, stats, _ = value_and_grads(tiny_cfg, p, x, cot)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert float(stats["dropped_frac"]) == float(stats_ref["dropped_frac"])


@pytest.mark.parametrize("backend", ["xla"])  # Pallas bf16: tests/kernels
def test_dropless_bf16_within_rounding_of_f32_dense(tiny_cfg, backend):
    _, p, x, cot, (y32, _, g32) = setup(tiny_cfg, "token_choice")
    rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
    for impl, be in (("dense", "auto"), ("dropless", backend)):
        tiny_cfg.model.update(moe_impl=impl, moe_backend=be, compute_dtype="bfloat16")
        y, _, g = value_and_grads(tiny_cfg, p, x.astype(jnp.bfloat16), cot)
        assert y.dtype == jnp.bfloat16
        assert rel(y, y32) < 2.0 ** -6, (impl, rel(y, y32))
        for name in ("w_gate", "w_up", "w_down"):
            assert rel(g[0][name], g32[0][name]) < 2.0 ** -6, (impl, name)
        assert rel(g[1], g32[1]) < 2.0 ** -6, (impl, "dx")


def test_one_expert_takes_every_token(tiny_cfg):
    # A router that sends every token to expert 0 first: one full group, the others small.
    _, p, x, cot, _ = setup(tiny_cfg, "token_choice", T=20)
    x = x.at[..., 0].set(3.0 + jnp.abs(x[..., 0]))
    p = dict(p, router=p["router"].at[0, 0].set(50.0))
    tiny_cfg.model.moe_impl = "dense"
    y_ref, stats, g_ref = value_and_grads(tiny_cfg, p, x, cot)
    assert int(stats["tokens_per_expert"][0]) == x.shape[0] * x.shape[1]
    tiny_cfg.model.update(moe_impl="dropless", moe_backend="xla")  # Pallas: tests/kernels
    y, _, g = value_and_grads(tiny_cfg, p, x, cot)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for name in ("w_gate", "w_up", "w_down", "router"):
        np.testing.assert_allclose(g[0][name], g_ref[0][name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_tile_rows():
    assert kernels.tile_rows(8192 * 8, 64) == 128
    assert kernels.tile_rows(24, 6) == 16
    assert kernels.tile_rows(6 * 40, 6) == 64


def test_full_model_dropless_equals_dense_under_scan_remat_jit(tiny_cfg):
    # The custom_vjps of the kernels inside jax.checkpoint inside the layer scan.
    from olmoe_jax.model import transformer
    tiny_cfg.model.remat = "full"
    params = transformer.init(tiny_cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, tiny_cfg.model.vocab_size, (2, 16)),
                         jnp.int32)

    def run():
        loss = lambda p: jnp.mean(transformer.apply(p, tokens, tiny_cfg)[0] ** 2)
        return jax.jit(jax.value_and_grad(loss))(params)

    loss_ref, g_ref = run()
    tiny_cfg.model.update(moe_impl="dropless", moe_backend="xla")
    loss, g = run()
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
