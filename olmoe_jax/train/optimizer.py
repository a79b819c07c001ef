"""AdamW with OLMoE's recipe: warmup then cosine (or linear / constant) decay, global-norm clip.

From `cfg.optim` (paper Table 10: lr 4e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on
*all* parameters, clip 1.0, 2,500 warmup steps, cosine to 0.1 x peak).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from olmoe_jax.model import transformer


def schedule_length(cfg) -> int:
    """Steps from the start to the end of the decay: optim.decay_steps; if 0, the anneal's start
    when there is an anneal (the main phase ends where the anneal begins), else train.steps."""
    o = cfg.optim
    return o.decay_steps or (o.anneal_start_step if o.anneal_start_step > 0 else cfg.train.steps)


def first_schedule_difference(old_cfg, new_cfg, updates: int) -> int | None:
    """The first update count in [0, updates) whose lr differs between the two configs' schedules,
    or None: a resumed run may change its schedule only after the updates it has done."""
    if updates <= 0:
        return None
    counts = jnp.arange(updates)
    diff = np.flatnonzero(np.asarray(make_schedule(old_cfg)(counts) != make_schedule(new_cfg)(counts)))
    return int(diff[0]) if diff.size else None


def make_schedule(cfg) -> Callable[[jax.Array], jax.Array]:
    """lr as a function of the optimizer's update count (0 for the first update).

    The update with count c uses n = c + 1, as OLMo counts steps from 1: the first update
    already moves the weights (peak / warmup) instead of being a no-op at lr 0. Linear warmup
    to the peak at n = warmup_steps, then decay to final_lr_ratio x peak at n = decay length
    (warmup included), constant after. A run shorter than its warmup (a smoke run) just never
    reaches the peak.

    The anneal (optim.anneal_start_step = a > 0, anneal_steps = s): updates n <= a follow the
    schedule above unchanged, so a run resumed with an anneal continues bit for bit up to a;
    from there the lr falls linearly from the schedule's value at n = a to 0 at n = a + s
    (the recipe's final phase: 100B tokens linear to 0), and stays 0 after.
    """
    o = cfg.optim
    base = _base_schedule(cfg)
    if o.anneal_start_step <= 0:
        return base
    start, length = o.anneal_start_step, o.anneal_steps

    def annealed(count):
        n = jnp.asarray(count, jnp.float32) + 1.0
        at_start = base(start - 1)  # the lr of update n = start
        frac = jnp.clip((n - start) / length, 0.0, 1.0)
        return jnp.where(n <= start, base(count), at_start * (1.0 - frac)).astype(jnp.float32)

    return annealed


def _base_schedule(cfg) -> Callable[[jax.Array], jax.Array]:
    """Warmup then decay (make_schedule without the anneal)."""
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
