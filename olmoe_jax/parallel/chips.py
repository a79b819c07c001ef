"""TPU chips and slice names: the one table of published per-chip figures, and the mapping
from a slice name to the topology that `jax.experimental.topologies` builds.

Figures (per chip) are Google Cloud's published specifications (cloud.google.com/tpu/docs/
v4, v5e, v5p, v6e), except `hbm_usable_gib`, which is what the TPU compiler (libtpu 0.0.42.1)
reports as available HBM per device in its RESOURCE_EXHAUSTED message (measured here).
`ici_bytes_per_s` is the chip's one-way inter-chip bandwidth over all its links together
(Cloud's "interchip interconnect BW": v5p 4800 Gbps, v5e 1600 Gbps; v6e half of its
800 GB/s bidirectional figure); Cloud publishes none for v4, whose value here is 6 links x
45 GB/s one-way (the JAX scaling book's table): treat it as approximate.

Slice names:
  Cloud accelerator types: `v4-N` and `v5p-N` count TensorCores (2 per chip: v5p-8 is 4
  chips, 2x2x1; v5p-256 is 128 chips, 4x4x8; v5p-512 is 256 chips, 4x8x8); `v5litepod-N`,
  `v5e-N` and `v6e-N` count chips (v5e-256 is 16x16).
  Explicit topologies: `v5p:4x8x8`, `v4:2x2x2`, `v5e:4x4` (also `v5litepod:4x4`), `v6e:2x4`:
  chips per axis, as libtpu spells them.
This module imports nothing from the model: `parallel/` stays a leaf.
"""
from __future__ import annotations

import dataclasses
import math
import re


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures of one TPU generation."""
    name: str  # libtpu's topology prefix: v4, v5p, v5e, v6e
    peak_bf16_flops: float  # FLOP/s per chip, dense bf16
    hbm_gib: float  # published HBM capacity per chip
    hbm_usable_gib: float  # HBM per device as the TPU compiler reports it available
    hbm_bytes_per_s: float  # HBM bandwidth per chip
    ici_bytes_per_s: float  # one-way ICI bandwidth per chip, all links together
    cores_per_chip: int  # TensorCores
    dims: int  # torus dimensions of a slice (3: v4, v5p; 2: v5e, v6e)
    cloud_name_counts_cores: bool  # Cloud's `vX-N` counts TensorCores (else chips)


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 275e12, 32, 15.25 * 2, 1200e9, 270e9, 2, 3, True),
    "v5p": Chip("v5p", 459e12, 95, 95.74, 2765e9, 600e9, 2, 3, True),
    "v5e": Chip("v5e", 197e12, 16, 15.75, 819e9, 200e9, 1, 2, False),
    "v6e": Chip("v6e", 918e12, 32, 31.25, 1638e9, 400e9, 1, 2, False),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}

FORMS = ("v5p-256 (Cloud accelerator type: v4-/v5p- count TensorCores, v5litepod-/v5e-/v6e- "
         "count chips)", "v5p:4x8x8 (chips per torus axis)")


class TopologyError(ValueError):
    """A slice name that is not one of the accepted forms; the message lists them."""


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice: chip generation and libtpu topology name (e.g. `v5p:4x8x8`)."""
    chip: Chip
    topology: str
    chips: int


def _bad(name: str, why: str) -> TopologyError:
    kinds = ", ".join(sorted(CHIPS))
    return TopologyError(f"--topology {name!r}: {why}; accepted forms: {FORMS[0]}, or {FORMS[1]}; "
                         f"chips: {kinds}")


def _chip(prefix: str, name: str) -> Chip:
    prefix = _ALIASES.get(prefix, prefix)
    if prefix not in CHIPS:
        raise _bad(name, f"unknown TPU generation {prefix!r}")
    return CHIPS[prefix]


def balanced_shape(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud's default slice shape for a power-of-two chip count: the most even split into
    powers of two, ascending (v5p: 8 -> 2x2x2, 128 -> 4x4x8, 256 -> 4x8x8; v5e: 32 -> 4x8),
    with axes of 1 last (v5p 4 chips -> 2x2x1)."""
    shape = [1] * dims
    for _ in range(int(math.log2(chips))):
        shape[shape.index(min(shape))] *= 2
    big = sorted(s for s in shape if s > 1)
    return tuple(big + [1] * (dims - len(big)))


def parse_slice(name: str) -> Slice:
    """`v5p-256` (Cloud accelerator type) or `v5p:4x8x8` (explicit) -> Slice; TopologyError
    naming the accepted forms otherwise."""
    text = name.strip().lower()
    explicit = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", text)
    if explicit:
        chip = _chip(explicit.group(1), name)
        shape = tuple(int(v) for v in explicit.group(2).split("x"))
        if len(shape) != chip.dims or min(shape) < 1:
            raise _bad(name, f"{chip.name} slices have {chip.dims} axes")
        return Slice(chip, f"{chip.name}:{'x'.join(map(str, shape))}", math.prod(shape))
    cloud = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if not cloud:
        raise _bad(name, "not a slice name")
    chip = _chip(cloud.group(1), name)
    count = int(cloud.group(2))
    chips = count // chip.cores_per_chip if chip.cloud_name_counts_cores else count
    if chips < 1 or chips & (chips - 1) or (chip.cloud_name_counts_cores and count % chip.cores_per_chip):
        raise _bad(name, f"{count} does not name a power-of-two number of {chip.name} chips")
    shape = balanced_shape(chips, chip.dims)
    return Slice(chip, f"{chip.name}:{'x'.join(map(str, shape))}", chips)


def chip_of_device_kind(kind: str) -> Chip | None:
    """The table row of a jax device_kind ('TPU v5', 'TPU v5 lite', 'TPU v6 lite', 'TPU v4');
    None for anything else (CPU, GPU)."""
    return {"tpu v4": CHIPS["v4"], "tpu v5": CHIPS["v5p"], "tpu v5p": CHIPS["v5p"],
            "tpu v5 lite": CHIPS["v5e"], "tpu v5e": CHIPS["v5e"], "tpu v6 lite": CHIPS["v6e"],
            "tpu v6e": CHIPS["v6e"]}.get(kind.strip().lower())
