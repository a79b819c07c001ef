"""The train state: one pytree that the step transforms and the checkpoint saves."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """step: int32 [] updates done; params: the model's nested dict; opt_state: optax's state;
    rng: uint32 [2] raw PRNG key (raw, not a typed key, so Orbax saves it as a plain array).

    Nothing in the model is random today (no dropout); the key is kept so that a stochastic
    component added later resumes reproducibly: draw with `jax.random.fold_in(rng, step)`.
    """
    step: jax.Array
    params: Any
    opt_state: optax.OptState
    rng: jax.Array


def create(params, tx: optax.GradientTransformation, rng) -> TrainState:
    """A state at step 0 with a fresh optimizer for `params`."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)
