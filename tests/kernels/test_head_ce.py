"""The fused, chunked output layer + cross-entropy against the full-logits reference
differentiated by jax itself, and the model's loss through it against logits + cross-entropy.

Tolerances: float32 loss within 1e-6 relative and gradients within 1e-5 of their largest
entry (the same sums in another order); bfloat16 inputs: the gradients' matmuls take the
logit gradient rounded to bfloat16 and the results are bfloat16, so against float32
gradients within 2^-7 of the largest entry (one rounding of each, with margin).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmoe_jax.config import ConfigError, default_config, validate
from olmoe_jax.kernels import head_ce
from olmoe_jax.kernels.head_ce import auto_chunks, head_cross_entropy
from olmoe_jax.model import losses, transformer


def case(seed=0, B=3, T=12, D=16, V=37, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((B, T, D)), dtype)
    w = jnp.asarray(rng.standard_normal((D, V)) * 0.5, dtype)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    mask = jnp.asarray(rng.random((B, T)) > 0.3, jnp.float32)
    return x, w, targets, mask


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 12])
def test_loss_and_grads_equal_the_full_logits_reference(chunks):
    x, w, t, m = case()
    (loss, n), (ref, n_ref) = head_cross_entropy(x, w, t, m, chunks), head_ce.reference(x, w, t, m)
    assert float(n) == float(n_ref) == float(m.sum())
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    # Under jit, and with a cotangent other than 1 (the loss is scaled in the total).
    g = jax.jit(jax.grad(lambda x, w: 3.0 * head_cross_entropy(x, w, t, m, chunks)[0], argnums=(0, 1)))(x, w)
    g_ref = jax.grad(lambda x, w: 3.0 * head_ce.reference(x, w, t, m)[0], argnums=(0, 1))(x, w)
    for a, b in zip(g, g_ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel(a, b) <= 1e-5
    # Masked-out positions get no input gradient.
    assert float(jnp.abs(g[0] * (1 - m)[..., None]).max()) == 0.0


def test_all_masked_is_zero_not_nan():
    x, w, t, _ = case()
    m = jnp.zeros(t.shape, jnp.float32)
    loss, n = head_cross_entropy(x, w, t, m, 4)
    dx = jax.grad(lambda x: head_cross_entropy(x, w, t, m, 4)[0])(x)
    assert float(loss) == 0.0 and float(n) == 0.0 and float(jnp.abs(dx).max()) == 0.0


def test_bfloat16_inputs():
    x, w, t, m = case(seed=1, dtype=jnp.bfloat16)
    loss, _ = head_cross_entropy(x, w, t, m, 3)
    ref, _ = head_ce.reference(x, w, t, m)
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    g = jax.grad(lambda x, w: head_cross_entropy(x, w, t, m, 3)[0], argnums=(0, 1))(x, w)
    g32 = jax.grad(lambda x, w: head_ce.reference(x, w, t, m)[0], argnums=(0, 1))(
        x.astype(jnp.float32), w.astype(jnp.float32))
    for a, b in zip(g, g32):
        assert a.dtype == jnp.bfloat16 and rel(a, b) <= 2.0 ** -7


def test_auto_chunks():
    assert auto_chunks(8, 256, 8192) == 4  # 16.8M logits -> 4 chunks of 4.2M
    assert auto_chunks(8, 256, 8192, devices=8) == 1
    assert auto_chunks(1, 4096, 50304) == 64  # OLMoE: one sequence, 3.2M logits a chunk
    assert auto_chunks(1, 7, 1 << 30) == 7  # never more chunks than positions
    # Accelerators take 1 GiB chunks: olmoe_1b7b with 4 sequences a device (v5p:4x8x8).
    assert auto_chunks(1024, 4096, 50304, devices=256, platform="tpu") == 4
    assert auto_chunks(1024, 4096, 50304, devices=256, platform="cpu") == 256
    for b, s, v in [(4, 96, 1000), (16, 2048, 50304), (3, 10, 1 << 22)]:
        n = auto_chunks(b, s, v)
        assert s % n == 0 and (b * s * v // n <= head_ce.CHUNK_LOGITS['cpu'] or n == s)


def test_chunks_must_divide_the_sequence():
    x, w, t, m = case()
    with pytest.raises(ValueError, match="5 chunks do not divide the sequence length 12"):
        head_cross_entropy(x, w, t, m, 5)
    cfg = default_config()
    cfg.model.ce_chunks = 3
    cfg.data.update(seq_len=256)
    with pytest.raises(ConfigError, match="model.ce_chunks=3 does not divide data.seq_len=256"):
        validate(cfg)


@pytest.mark.parametrize("tied", [False, True])
def test_model_loss_equals_logits_then_cross_entropy(tied):
    """loss_fn (hidden states -> fused head CE) against apply's logits -> cross_entropy, value
    and gradients of every parameter."""
    cfg = default_config()
    cfg.model.update(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     num_experts=4, top_k=2, expert_dim=16, max_seq_len=16, tie_embeddings=tied,
                     ce_chunks=4)
    cfg.data.update(seq_len=16, batch_size=2)
    validate(cfg)
    params = transformer.init(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batch = {"inputs": jnp.asarray(rng.integers(0, 97, (2, 16)), jnp.int32),
             "targets": jnp.asarray(rng.integers(0, 97, (2, 16)), jnp.int32),
             "loss_mask": jnp.asarray(rng.random((2, 16)) > 0.2, jnp.float32)}

    def unfused(p):
        logits, aux = transformer.apply(p, batch["inputs"], cfg)
        ce, _ = losses.cross_entropy(logits, batch["targets"], batch["loss_mask"])
        return ce + losses.router_losses(aux, cfg)[0]

    (total, metrics), g = jax.value_and_grad(losses.loss_fn, has_aux=True)(params, batch, cfg)
    ref, g_ref = jax.value_and_grad(unfused)(params)
    np.testing.assert_allclose(total, ref, rtol=1e-6)
    assert float(metrics["tokens"]) == float(batch["loss_mask"].sum())
    for path, a in jax.tree_util.tree_leaves_with_path(g):
        b = g_ref
        for key in path:
            b = b[key.key]
        assert rel(a, b) <= 1e-5, jax.tree_util.keystr(path)
