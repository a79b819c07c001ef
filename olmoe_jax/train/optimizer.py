"""AdamW with OLMoE's recipe: warmup then cosine (or linear / constant) decay, global-norm clip.

From `cfg.optim` (paper Table 10: lr 4e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on
*all* parameters, clip 1.0, 2,500 warmup steps, cosine to 0.1 x peak).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from olmoe_jax.model import transformer


def schedule_length(cfg) -> int:
    """Steps from the start to the end of the decay: optim.decay_steps, or train.steps if 0."""
    return cfg.optim.decay_steps or cfg.train.steps


def make_schedule(cfg) -> Callable[[jax.Array], jax.Array]:
    """lr as a function of the optimizer's update count (0 for the first update).

    The update with count c uses n = c + 1, as OLMo counts steps from 1: the first update
    already moves the weights (peak / warmup) instead of being a no-op at lr 0. Linear warmup
    to the peak at n = warmup_steps, then decay to final_lr_ratio x peak at n = decay length
    (warmup included), constant after. A run shorter than its warmup (a smoke run) just never
    reaches the peak.
    """
    o = cfg.optim
    peak, final = o.lr, o.lr * o.final_lr_ratio
    warmup, total = o.warmup_steps, schedule_length(cfg)

    def lr(count):
        n = jnp.asarray(count, jnp.float32) + 1.0
        warm = peak * jnp.minimum(n / warmup, 1.0) if warmup > 0 else jnp.float32(peak)
        frac = jnp.clip((n - warmup) / max(total - warmup, 1), 0.0, 1.0)
        if o.schedule == "cosine":
            decayed = final + (peak - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        elif o.schedule == "linear":
            decayed = peak + (final - peak) * frac
        else:  # constant
            decayed = jnp.float32(peak)
        return jnp.where(n <= warmup, warm, decayed).astype(jnp.float32)

    return lr


def decay_mask(cfg) -> Any:
    """True for the params that get weight decay: all of them when optim.decay_all_params
    (OLMoE), else all but the norm scales and the input embedding (the usual LM recipe)."""
    specs = transformer.param_specs(cfg)
    if cfg.optim.decay_all_params:
        return jax.tree.map(lambda s: True, specs, is_leaf=lambda x: isinstance(x, transformer.ParamSpec))

    def one(path, spec):
        is_norm = spec.init == "ones"  # norm scales are the only weights initialised to one
        is_embedding = jax.tree_util.keystr(path) == "['embed']"
        return not (is_norm or is_embedding)

    return jax.tree_util.tree_map_with_path(one, specs, is_leaf=lambda x: isinstance(x, transformer.ParamSpec))


def make_optimizer(cfg) -> optax.GradientTransformation:
    """clip_by_global_norm(optim.clip_norm) (skipped if 0) then AdamW with the schedule.

    Weight decay is decoupled and scaled by the lr (torch.optim.AdamW, as OLMo trains):
    p <- p - lr * (adam_update + weight_decay * p).
    """
    o = cfg.optim
    adamw = optax.adamw(make_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps,
                        weight_decay=o.weight_decay, mask=decay_mask(cfg))
    if o.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw)
    return adamw
