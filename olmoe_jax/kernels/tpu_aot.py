"""Compile for a TPU chip from any host, through libtpu's ahead-of-time compiler.

With the `libtpu` package installed (`jax[tpu]`), `get_topology_desc` describes TPU devices
that need not exist here; jit(...).lower(args placed on them).compile() runs the real TPU
compiler (Mosaic included), so the program's memory and cost analyses are the chip's. Used by
the kernel compile tests and benchmarks/tpu_kernels_aot.py.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import jax

# One chip's slice of a small topology of each generation (a chip, not a core: v5p's two
# TensorCores are one megacore device).
TOPOLOGIES = {"v5p": "v5p:2x2x1", "v6e": "v6e:2x2", "v5e": "v5e:2x2", "v4": "v4:2x2x1"}


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


@functools.cache
def topology_devices(chip: str) -> tuple:
    """The devices of TOPOLOGIES[chip] (compile-only; nothing runs on them)."""
    if chip not in TOPOLOGIES:
        raise ValueError(f"unknown TPU chip {chip!r}; expected one of {', '.join(TOPOLOGIES)}")
    # Other processes may hold libtpu (compiling too); compile-only use may share it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    topo = topologies.get_topology_desc(topology_name=TOPOLOGIES[chip], platform="tpu")
    return tuple(topo.devices)


def compile_on_chip(fn, args, chip: str = "v5p"):
    """jax.jit(fn) compiled for one `chip` with `args` (ShapeDtypeStructs or arrays) on it."""
    sharding = jax.sharding.SingleDeviceSharding(topology_devices(chip)[0])
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
    return jax.jit(fn).lower(*specs).compile()
