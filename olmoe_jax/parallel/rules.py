"""The one table mapping logical axis names to mesh axes, and the shardings derived from it.

Logical names come from `transformer.param_specs` (weights) and from the batch layout
(`batch`, `length`). flax.linen's partitioning helpers resolve a tuple of logical names to a
PartitionSpec with this table: each rule assigns its mesh axes to the first matching array
dimension if those mesh axes are still free in that array, so one mesh axis is never used
twice by the same array.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from olmoe_jax.config import ConfigError
from olmoe_jax.model import transformer

# Logical axis -> mesh axis (or tuple of axes, or None: replicated).
RULES: tuple[tuple[str, Any], ...] = (
    # Activations: the batch is split over every data-parallel axis (FSDP is data parallel
    # with sharded weights); sequence positions stay whole on a device.
    ("batch", ("data", "fsdp")),
    ("length", None),
    # Weights: FSDP shards the model width; experts go to the expert axis (each device holds
    # E / expert of them); attention heads and FFN hidden units are split over tensor.
    ("embed", "fsdp"),
    ("expert", "expert"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    # The router is tiny and every token needs all of it; layers are scanned, so splitting
    # that axis would move whole layers between devices at every scan step.
    ("router_expert", None),
    ("layers", None),
    ("head_dim", None),
)

# Where a failed divisibility check points the user, by mesh axis.
_MESH_KEY = {"data": "mesh.data", "fsdp": "mesh.fsdp", "expert": "mesh.expert", "tensor": "mesh.tensor"}


def logical_spec(axes: tuple[str, ...]) -> PartitionSpec:
    """The PartitionSpec of one array whose dims carry the logical names `axes`."""
    return nn.logical_to_mesh_axes(axes, RULES)


def _check_divisible(name: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> None:
    for dim, (size, assigned) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
        if assigned is None:
            continue
        mesh_axes = assigned if isinstance(assigned, tuple) else (assigned,)
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        if size % ways:
            keys = "*".join(_MESH_KEY[a] for a in mesh_axes)
            raise ConfigError(
                f"{name} dim {dim} has size {size}, which {keys}={ways} does not divide; "
                f"change {keys} or the model size")


def param_specs(cfg) -> Any:
    """PartitionSpecs for the params tree (same structure as `transformer.init(cfg, ...)`)."""
    return jax.tree.map(logical_spec, transformer.logical_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def param_shardings(cfg, mesh: Mesh) -> Any:
    """NamedShardings for the params; ConfigError if a sharded dim does not split evenly."""
    specs = param_specs(cfg)
    abstract = transformer.abstract_params(cfg)

    def one(path, spec, leaf):
        _check_divisible(f"param {jax.tree_util.keystr(path)}", leaf.shape, spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(
        one, specs, abstract, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [B, T] batch array: B over (data, fsdp), T whole."""
    return NamedSharding(mesh, logical_spec(("batch", "length")))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (scalars, metrics, the step counter)."""
    return NamedSharding(mesh, PartitionSpec())
