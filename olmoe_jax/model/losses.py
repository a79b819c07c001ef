"""Training losses: masked cross-entropy, load balancing (two forms) and router z-loss.

Load balancing, `lb_loss_type`:
- "olmoe" (default; OLMoE's training code, megablocks): per layer
  E / (T * k) * sum_e tokens_per_expert_e * mean_prob_e, then averaged over layers. Equals 1
  when routing is perfectly balanced. tokens_per_expert counts the k slots.
- "hf" (transformers' `load_balancing_loss_func`, for parity checks): tokens of all layers are
  pooled and the 1/k factor is omitted, so a balanced router scores k.
Router z-loss, `z_loss_type` (OLMo's code combined megablocks' per-layer values in two ways):
- "layers" (default; OLMo's later form): per layer the mean over tokens of logsumexp(logits)^2,
  summed over layers and divided by the number of (MoE) layers.
- "layers_tokens_topk" (the earlier form): the sum over layers and tokens of logsumexp^2
  divided by layers x tokens x top_k, i.e. the "layers" value / top_k.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from olmoe_jax import kernels
from olmoe_jax.model import transformer
from olmoe_jax.parallel import rules


def cross_entropy(logits_BTV, targets_BT, mask_BT):
    """Mean token cross-entropy (nats) over positions where mask is 1; and the token count."""
    logz = jax.nn.logsumexp(logits_BTV, axis=-1)
    tgt = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    nll = (logz - tgt) * mask_BT
    n = jnp.sum(mask_BT)
    return jnp.sum(nll) / jnp.maximum(n, 1.0), n


def load_balancing_per_layer(tokens_per_expert_LE, prob_mean_LE, top_k: int):
    """OLMoE form, one value per layer [L]."""
    E = tokens_per_expert_LE.shape[-1]
    counts = jax.lax.stop_gradient(tokens_per_expert_LE)  # integer counts: no gradient
    T = jnp.sum(counts, axis=-1) / top_k  # tokens routed in each layer
    return E / (T * top_k) * jnp.sum(counts * prob_mean_LE, axis=-1)


def load_balancing_hf(tokens_per_expert_LE, prob_mean_LE, top_k: int):
    """transformers' form: layers pooled, no 1/k."""
    L, E = tokens_per_expert_LE.shape
    counts = jax.lax.stop_gradient(tokens_per_expert_LE)
    T = jnp.sum(counts[0]) / top_k
    frac_E = jnp.sum(counts, axis=0) / (L * T)
    return E * jnp.sum(frac_E * jnp.mean(prob_mean_LE, axis=0))


def router_losses(aux, cfg):
    """(weighted sum to add to the loss, metrics) from apply's aux."""
    m = cfg.model
    if m.ffn_type != "moe":
        return jnp.zeros((), jnp.float32), {}
    tpe, pm = aux["tokens_per_expert"], aux["prob_mean"]
    lb_layers = load_balancing_per_layer(tpe, pm, m.top_k)
    lb = jnp.mean(lb_layers) if m.lb_loss_type == "olmoe" else load_balancing_hf(tpe, pm, m.top_k)
    z_layers = aux["z_loss"]
    z = jnp.mean(z_layers)
    if m.z_loss_type == "layers_tokens_topk":
        z = z / m.top_k
    total = m.lb_loss_weight * lb + m.z_loss_weight * z
    metrics = {
        "lb_loss": lb,
        "z_loss": z,
        "lb_loss_per_layer": lb_layers,
        "z_loss_per_layer": z_layers,
        "expert_load": tpe / jnp.sum(tpe, axis=-1, keepdims=True),  # [L, E], sums to 1
        "dropped_frac": aux["dropped_frac"],
    }
    return total, metrics


def loss_fn(params, batch, cfg, mesh=None):
    """(total loss, metrics) for a batch {inputs, targets, loss_mask} [B, T].

    mesh: the device mesh under a sharded jit (activation constraints, expert parallelism)."""
    # The output layer and the cross-entropy run fused, in sequence chunks (no [B, T, V] logits).
    x, aux = transformer.apply(params, batch["inputs"], cfg, return_hidden=True, mesh=mesh)
    w_DV = transformer.head_weights(params, cfg)
    shards = platform = None
    if mesh is not None:
        # Gathered over FSDP once per step, before the chunk loop: left to GSPMD, every chunk
        # all-reduced partial logits over the FSDP-split width (olmoe_1b7b on v5p:4x8x8:
        # 2.4 TB of all-reduce per chip and step).
        w_DV = rules.constrain(w_DV, ("embed", "vocab"), mesh)
        shards = math.prod(mesh.shape[a] for a in rules.BATCH_AXES)
        platform = mesh.devices.flat[0].platform
    ce, ntok = kernels.head_cross_entropy(x, w_DV, batch["targets"], batch["loss_mask"],
                                          cfg.model.ce_chunks, batch_shards=shards, platform=platform)
    extra, metrics = router_losses(aux, cfg)
    metrics.update(ce_loss=ce, tokens=ntok)
    total = ce + extra
    metrics["loss"] = total
    return total, metrics
