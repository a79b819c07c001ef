"""The logical-axis tables (weights and activations) and the shardings derived from them.

A leaf of the package: it knows mesh axes and logical names, not the model. Logical names on
weights come from `transformer.param_specs`; activations are named where the model constrains
them (`constrain`). flax.linen's partitioning helpers resolve a tuple of logical names to a
PartitionSpec: each rule assigns its mesh axes to the first matching array dimension if those
mesh axes are still free in that array, so one mesh axis is never used twice by one array.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from olmoe_jax.config import ConfigError

# Weights: logical axis -> mesh axis (or tuple of axes, or None: replicated).
RULES: tuple[tuple[str, Any], ...] = (
    # FSDP shards the model width; experts go to the expert axis (each device holds
    # E / expert of them, FSDP-sharded within the expert group); attention heads and FFN
    # hidden units are split over tensor.
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

# Activations: the batch is split over every axis that does not split the math of a token
# (data, FSDP, and expert: outside the MoE block the expert axis is one more data-parallel
# axis, and inside it tokens leave for their experts' devices by all-to-all). Positions and
# the model width stay whole on a device; heads, FFN units and the vocabulary follow tensor.
ACTIVATION_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("vocab", "tensor"),
)

# The mesh axes a batch is split over, in order (the data loader's and the MoE's view).
BATCH_AXES: tuple[str, ...] = dict(ACTIVATION_RULES)["batch"]

# Where a failed divisibility check points the user, by mesh axis.
_MESH_KEY = {"data": "mesh.data", "fsdp": "mesh.fsdp", "expert": "mesh.expert", "tensor": "mesh.tensor"}


def logical_spec(axes: tuple[str, ...]) -> PartitionSpec:
    """The PartitionSpec of one weight whose dims carry the logical names `axes`."""
    return nn.logical_to_mesh_axes(axes, RULES)


def activation_spec(axes: tuple[str, ...]) -> PartitionSpec:
    """The PartitionSpec of one activation whose dims carry the logical names `axes`."""
    return nn.logical_to_mesh_axes(axes, ACTIVATION_RULES)


def constrain(x: jax.Array, axes: tuple[str, ...], mesh: Mesh | None) -> jax.Array:
    """x with a sharding constraint from the activation table; unchanged when mesh is None
    (single-device code: generation, tests, the HF reference) or has one device.

    Without these, GSPMD infers activation layouts from the FSDP-sharded weights and can keep
    a layer's activations for the whole global batch on every chip.
    """
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, activation_spec(axes)))


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


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def tree_specs(axes_tree: Any) -> Any:
    """PartitionSpecs for a tree whose leaves are tuples of logical weight-axis names."""
    return jax.tree.map(logical_spec, axes_tree, is_leaf=_is_axes)


def tree_shardings(axes_tree: Any, abstract_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of weights (leaves: logical axis names, and ShapeDtypeStructs
    of the same structure); ConfigError naming the weight and mesh key if a dim does not split."""
    def one(path, spec, leaf):
        _check_divisible(f"param {jax.tree_util.keystr(path)}", leaf.shape, spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(
        one, tree_specs(axes_tree), abstract_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [B, T] batch array: B over (data, fsdp, expert), T whole."""
    return NamedSharding(mesh, activation_spec(("batch", "length")))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (scalars, metrics, the step counter)."""
    return NamedSharding(mesh, PartitionSpec())
