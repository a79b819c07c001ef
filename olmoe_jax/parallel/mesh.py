"""The device mesh: one `jax.sharding.Mesh` with axes (data, fsdp, expert, tensor).

Sizes come from `cfg.mesh` (one of them may be -1: every device the others leave);
`config.mesh_shape` checks that they multiply to the device count and divide the batch,
the experts and the kv heads, so a bad layout fails here with a ConfigError naming the key,
before anything compiles.
"""
from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh

from olmoe_jax.config import mesh_shape

AXES = ("data", "fsdp", "expert", "tensor")


def make_mesh(cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all of `jax.devices()`) shaped by `cfg.mesh`.

    Axis types are Auto: shardings are given at jit boundaries and XLA (GSPMD) propagates them
    through the model, which is written without sharding-aware types.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    # jax.make_mesh orders devices to follow the physical topology (TPU torus, GPU NVLink).
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
