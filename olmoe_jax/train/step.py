"""Sharded init, train step and eval step: module-level pure functions, each jitted with
explicit shardings and the config as a static argument.

The config is passed frozen (`ml_collections.FrozenConfigDict`, hashable), so jax's own jit
cache serves every call with an equal config and mesh: a second run in the same process
(a sweep, a resumed run, the tests) does not recompile. Init goes eval_shape -> shardings ->
jit(init, out_shardings), so no full-size copy of the params ever lives on one device. The
step donates the old state, so params and optimizer state are updated in place.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from olmoe_jax.config import ConfigError
from olmoe_jax.model import losses, transformer
from olmoe_jax.parallel import rules
from olmoe_jax.train import state as state_lib
from olmoe_jax.train.optimizer import make_optimizer, make_schedule
from olmoe_jax.train.state import TrainState


class NonFiniteError(ConfigError):
    """Training stopped on a non-finite loss or gradient (train.nonfinite); the message names
    the step and what to change."""


def frozen(cfg) -> ml_collections.FrozenConfigDict:
    """The hashable form of cfg that the jitted functions take as a static argument."""
    return cfg if isinstance(cfg, ml_collections.FrozenConfigDict) else ml_collections.FrozenConfigDict(cfg)


def state_shardings(cfg, mesh: Mesh) -> TrainState:
    """A TrainState of NamedShardings: optimizer moments shard like their params, the rest
    (step, counters, rng) is replicated."""
    rep = rules.replicated(mesh)
    p_sh = transformer.param_shardings(cfg, mesh)
    tx = make_optimizer(cfg)
    abs_opt = jax.eval_shape(tx.init, transformer.abstract_params(cfg))
    opt_sh = optax.tree_map_params(
        tx, lambda _, sh: sh, abs_opt, p_sh,
        transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, NamedSharding))
    return TrainState(step=rep, params=p_sh, opt_state=opt_sh, rng=rep)


def _keys(seed: int):
    """(init key, state key) from train.seed: the state's key never equals the init key."""
    key = jax.random.PRNGKey(seed)
    return key, jax.random.fold_in(key, 1)


def _fresh(cfg) -> TrainState:
    init_key, state_key = _keys(cfg.train.seed)
    return state_lib.create(transformer.init(cfg, init_key), make_optimizer(cfg), state_key)


def abstract_state(cfg, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the state: the restore target for Orbax."""
    shapes = jax.eval_shape(lambda: _fresh(cfg))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_state(cfg, shardings: TrainState) -> TrainState:
    """Fresh params (from train.seed) and optimizer, created directly in their shardings."""
    return jax.jit(_fresh, static_argnums=0, out_shardings=shardings)(frozen(cfg))


def _from_params(params, rng, cfg) -> TrainState:
    return state_lib.create(params, make_optimizer(cfg), rng)


def state_from_params(cfg, params, shardings: TrainState) -> TrainState:
    """Step 0 with the given params (a params-only checkpoint) and a fresh optimizer."""
    _, state_key = _keys(cfg.train.seed)
    make = jax.jit(_from_params, static_argnums=2, in_shardings=(shardings.params, shardings.rng),
                   out_shardings=shardings)
    return make(params, state_key, frozen(cfg))


def _microbatches(a, num: int, mesh: Mesh | None):
    """[B, ...] -> [num, B / num, ...] where microbatch j holds rows j, j + num, j + 2 num, ...

    Strided, not contiguous: each device's contiguous share of B then gives every microbatch
    an equal share of its own rows, so no microbatch lives on a subset of the devices and no
    row moves between devices.
    """
    a = a.reshape(a.shape[0] // num, num, *a.shape[1:])
    a = jnp.swapaxes(a, 0, 1)
    names = (None, "batch") + (None,) * (a.ndim - 2)
    return rules.constrain(a, names, mesh) if mesh is not None else a


def loss_and_grads(params, batch, cfg, mesh: Mesh | None = None) -> tuple[dict, Any]:
    """(metrics, gradients) of losses.loss_fn over the batch, in train.microbatches slices.

    With M > 1 slices run one after another (lax.scan) and their gradients are summed, so
    activation memory is that of B / M rows. The cross-entropy and its gradient equal the
    whole batch's (each slice is weighted by its share of the batch's loss tokens); the router
    losses are averaged over the slices, each computed on its own tokens, as a run on B / M
    rows per step would (the load-balancing loss is not linear in the token counts, so it is
    not the whole batch's value). Metrics: as loss_fn's, with ce_loss over the whole batch,
    tokens summed and the router statistics averaged over slices.
    """
    grad_fn = jax.value_and_grad(losses.loss_fn, has_aux=True)
    num = cfg.train.microbatches
    if num == 1:
        (_, metrics), grads = grad_fn(params, batch, cfg, mesh)
        return metrics, grads
    tokens = jnp.sum(batch["loss_mask"])

    def objective(p, micro):
        total, m = losses.loss_fn(p, micro, cfg, mesh)
        # total = ce + router terms: weight ce by this slice's token share, the rest by 1/num.
        share = m["tokens"] / jnp.maximum(tokens, 1.0)
        return total / num + m["ce_loss"] * (share - 1.0 / num), m

    def one(acc, micro):
        (_, m), g = jax.value_and_grad(objective, has_aux=True)(params, micro)
        return jax.tree.map(jnp.add, acc, g), m

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, per = jax.lax.scan(one, zeros, jax.tree.map(lambda a: _microbatches(a, num, mesh), batch))
    metrics = jax.tree.map(lambda v: jnp.mean(v, axis=0), per)
    metrics["tokens"] = tokens
    metrics["ce_loss"] = jnp.sum(per["ce_loss"] * per["tokens"]) / jnp.maximum(tokens, 1.0)
    metrics["loss"] = metrics["ce_loss"] + jnp.mean(per["loss"] - per["ce_loss"])
    return metrics, grads


def train_step(state: TrainState, batch, cfg, mesh: Mesh | None = None) -> tuple[TrainState, dict]:
    """One AdamW update on a batch {inputs, targets int32 [B, T], loss_mask float32 [B, T]}.

    metrics: loss, ce_loss (nats/token), tokens (loss-mask sum), grad_norm (global L2 norm
    before clipping), lr (of this update), nonfinite (int32 1 when the step was skipped), and
    for MoE models lb_loss, z_loss, their per-layer values [L], expert_load [L, E] (share of
    routed slots per expert) and dropped_frac [L]. mesh: the mesh the step is sharded over
    (static; activation constraints and expert parallelism), or None on one device.

    A non-finite loss or gradient norm skips the update: params and optimizer state (Adam's
    count included) stay as they were, while `step` advances with the data iterator, which has
    consumed the batch; the loop applies train.nonfinite (skip or stop) when it next syncs.
    """
    tx = make_optimizer(cfg)
    metrics, grads = loss_and_grads(state.params, batch, cfg, mesh)
    loss = metrics["loss"]
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A select, not lax.cond: both branches' buffers exist anyway, and it fuses into the update.
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                     (params, opt_state), (state.params, state.opt_state))
    metrics = dict(metrics, grad_norm=grad_norm, lr=make_schedule(cfg)(state.step),
                   nonfinite=(~finite).astype(jnp.int32))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, cfg, mesh: Mesh | None = None) -> dict:
    """{ce_sum: summed token cross-entropy (nats), tokens: loss-mask sum} of one batch.

    Sums, not means, so the batches of a domain combine weighted by their real token count.
    """
    _, metrics = losses.loss_fn(params, batch, cfg, mesh)
    return {"ce_sum": metrics["ce_loss"] * metrics["tokens"], "tokens": metrics["tokens"]}


def _jit_train_step(mesh: Mesh, shardings: TrainState):
    return jax.jit(train_step, static_argnums=(2, 3), donate_argnums=0,
                   in_shardings=(shardings, rules.batch_sharding(mesh)),
                   out_shardings=(shardings, rules.replicated(mesh)))


def make_train_step(cfg, mesh: Mesh, shardings: TrainState) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """train_step jitted: state sharded by `shardings` (and donated), batch by
    rules.batch_sharding, metrics replicated."""
    jitted = _jit_train_step(mesh, shardings)
    fcfg = frozen(cfg)
    return lambda state, batch: jitted(state, batch, fcfg, mesh)


def lower_train_step(cfg, mesh: Mesh, shardings: TrainState, state, batch):
    """The train step as make_train_step jits it, lowered for `state` and `batch` (arrays or
    ShapeDtypeStructs): `.compile()` gives the program, its memory and cost analyses."""
    return _jit_train_step(mesh, shardings).lower(state, batch, frozen(cfg), mesh)


def make_eval_step(cfg, mesh: Mesh, param_shardings) -> Callable[[Any, Any], dict]:
    """eval_step jitted: params as sharded for training, batch by rules.batch_sharding."""
    jitted = jax.jit(eval_step, static_argnums=(2, 3),
                     in_shardings=(param_shardings, rules.batch_sharding(mesh)),
                     out_shardings=rules.replicated(mesh))
    fcfg = frozen(cfg)
    return lambda params, batch: jitted(params, batch, fcfg, mesh)


def global_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's share of the batch (numpy [B_local, T]) -> global jax arrays [B, T]."""
    sharding = rules.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
