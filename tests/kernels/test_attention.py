"""Attention kernels by platform (kernels/attention.py) against the XLA attention.

Splash cannot run on CPU, so its numbers are checked with Mosaic's interpreter (through
`layers.attention`, forward and gradients, and under a CPU mesh through the shard_map), and
its TPU build by compiling forward + backward for v5p through libtpu at OLMoE's attention
size. The cuDNN path cannot even be lowered without the CUDA plugin: only its dispatch is
checked.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding

from olmoe_jax.config import default_config
from olmoe_jax.kernels import attention, tpu_aot
from olmoe_jax.model import layers
from olmoe_jax.parallel.rules import activation_spec


def attn_cfg(impl, H=4, K=2, hd=64):
    c = default_config()
    c.model.update(d_model=H * hd, num_heads=H, num_kv_heads=K, head_dim=hd, attention_impl=impl)
    return c


def attn_params(rng, H, K, hd):
    D = H * hd
    n = lambda *s: jnp.asarray(rng.standard_normal(s) * D ** -0.5, jnp.float32)
    return {"wq": n(D, H, hd), "wk": n(D, K, hd), "wv": n(D, K, hd), "wo": n(H, hd, D),
            "q_norm": 1 + 0.1 * n(H, hd), "k_norm": 1 + 0.1 * n(K, hd)}


def test_splash_matches_xla_attention_forward_and_gradients():
    rng = np.random.default_rng(0)
    B, T, H, K, hd = 2, 256, 4, 2, 64
    p = attn_params(rng, H, K, hd)
    x = jnp.asarray(rng.standard_normal((B, T, H * hd)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))

    def loss_and_grads(impl):
        f = lambda p, x: layers.attention(p, x, pos, attn_cfg(impl), in_order=True)[0]
        y, vjp = jax.vjp(f, p, x)
        return y, vjp(jnp.asarray(np.random.default_rng(1).standard_normal(y.shape), y.dtype))

    (y, (dp, dx)), (y_ref, (dp_ref, dx_ref)) = jax.jit(
        lambda: (loss_and_grads("splash"), loss_and_grads("xla")))()
    # Both in f32; splash's online softmax sums in another order: rounding-level differences.
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
    for name in p:
        np.testing.assert_allclose(dp[name], dp_ref[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_splash_under_a_mesh_splits_batch_and_heads():
    # data=2 x fsdp=2 x tensor=2 on 8 CPU devices, the model's activation layout: each shard
    # runs the kernel on its own examples and heads (kv heads split with their query heads).
    rng = np.random.default_rng(2)
    B, T, H, K, hd = 4, 128, 4, 2, 64
    q = jnp.asarray(rng.standard_normal((B, T, H, hd)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, T, K, hd)), jnp.float32) for _ in range(2))
    mesh = jax.make_mesh((2, 2, 1, 2), ("data", "fsdp", "expert", "tensor"),
                         axis_types=(AxisType.Auto,) * 4)
    q_spec = activation_spec(("batch", "length", "heads", "head_dim"))
    kv_spec = activation_spec(("batch", "length", "kv_heads", "head_dim"))
    assert q_spec[2] == "tensor" and "data" in q_spec[0]  # really split
    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))
    got = jax.jit(lambda q, k, v: attention.splash_attention(q, k, v, mesh, q_spec, kv_spec))(
        put(q, q_spec), put(k, kv_spec), put(v, kv_spec))
    want = attention.splash_attention(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl, platform, dtype, T, want", [
    ("auto", "cpu", jnp.bfloat16, 4096, "xla"),
    ("auto", "tpu", jnp.float32, 4096, "splash"),
    ("auto", "tpu", jnp.bfloat16, 100, "xla"),  # not a multiple of 128
    ("auto", "gpu", jnp.bfloat16, 100, "cudnn"),
    ("auto", "gpu", jnp.float32, 4096, "xla"),  # cuDNN has no f32 attention
    ("xla", "tpu", jnp.bfloat16, 4096, "xla"),
    ("splash", "cpu", jnp.float32, 256, "splash"),  # interpreted
])
def test_resolve_impl_picks_by_platform(impl, platform, dtype, T, want):
    assert attention.resolve_impl(impl, T, dtype, platform) == want


def test_auto_keeps_xla_on_several_tpus_without_the_mesh():
    # GSPMD cannot partition the Mosaic call: without the mesh splash could not be sharded.
    assert attention.resolve_impl("auto", 4096, jnp.bfloat16, "tpu", mesh_known=False) == "xla"


@pytest.mark.parametrize("impl, platform, dtype, T", [
    ("splash", "tpu", jnp.bfloat16, 100), ("cudnn", "cpu", jnp.bfloat16, 256),
    ("cudnn", "gpu", jnp.float32, 256)])
def test_resolve_impl_refuses_what_cannot_run(impl, platform, dtype, T):
    with pytest.raises(ValueError, match=f"model.attention_impl={impl} needs"):
        attention.resolve_impl(impl, T, dtype, platform)


@pytest.mark.skipif(not tpu_aot.libtpu_available(),
                    reason="TPU compiles need the libtpu package (pip install 'jax[tpu]')")
def test_splash_compiles_for_v5p_forward_and_backward():
    # OLMoE's attention: 16 heads of 128, S 4096, bf16, on a 4-chip v5p mesh (data 2 x
    # tensor 2), inside jit through the shard_map, as the model runs it.
    B, T, H, hd = 4, 4096, 16, 128
    devices = np.array(tpu_aot.topology_devices("v5p")).reshape(2, 1, 1, 2)
    mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "expert", "tensor"),
                             axis_types=(AxisType.Auto,) * 4)
    spec = activation_spec(("batch", "length", "heads", "head_dim"))
    arg = jax.ShapeDtypeStruct((B, T, H, hd), jnp.bfloat16, sharding=NamedSharding(mesh, spec))

    def loss(q, k, v):
        out = attention.splash_attention(q, k, v, mesh, spec, spec, interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(arg, arg, arg).compile()
    text = compiled.as_text()
    assert "tpu_custom_call" in text  # the Mosaic kernels, not an XLA fallback
    assert compiled.memory_analysis().temp_size_in_bytes < 16 << 30
