"""Ahead-of-time compilation of the train step for a TPU slice, from any host.

With libtpu installed, `jax.experimental.topologies` describes a slice's devices without
owning them, and `jit(...).lower(ShapeDtypeStructs with shardings).compile()` runs the real
TPU compiler on this host. `compile_report(cfg, devices)` compiles the one train step
(`step.lower_train_step`: the jit, state shardings, batch sharding and donation that training
uses) over a mesh of those devices and reports, per chip:

- memory: the compiler's argument / output / alias / temporary bytes, their total, and the
  HBM the compiler says it has (a step that does not fit raises `DoesNotFit`);
- model FLOPs per step (`metrics.model_flops_per_token` x tokens) and per chip;
- collectives by kind with counts and bytes, loop bodies counted per iteration (hlo_stats);
- an estimated step time: XLA ops and Pallas kernels each by a per-op roofline (max of
  FLOPs / peak and bytes / HBM bandwidth; the two run serially on the TensorCore), plus
  collectives as ring traffic over the chip's ICI bandwidth. `step_s` adds all three (no
  overlap: an upper estimate); `step_s_overlapped` assumes collectives hide under compute.
  MFU = model FLOPs per chip / (step time x peak). Chip figures: parallel/chips.py.

The model picks its kernels by `jax.default_backend()` at trace time; on a CPU host that is
"cpu", which would trace the CPU path into a TPU program. So the step is traced with
`jax.default_backend` answering the target platform, as it does on a TPU host.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from olmoe_jax.config import mesh_shape
from olmoe_jax.parallel import chips as chips_lib
from olmoe_jax.parallel import rules
from olmoe_jax.parallel.mesh import make_mesh
from olmoe_jax.train import hlo_stats, step
from olmoe_jax.train.metrics import model_flops_per_token

GIB = float(1 << 30)


class AotError(ValueError):
    """The step cannot be compiled for the target (no libtpu, a bad topology, a model path
    that does not lower for TPU); a user-facing message."""


class DoesNotFit(AotError):
    """The step needs more HBM per chip than the chip has; the message carries the numbers."""


def tpu_devices(slice_name: str) -> tuple[list, chips_lib.Slice]:
    """The devices of a TPU slice (`v5p-256`, `v5p:4x8x8`) and its Slice, without owning them.

    Raises AotError without libtpu, chips_lib.TopologyError for a name it cannot read.
    """
    sl = chips_lib.parse_slice(slice_name)
    if importlib.util.find_spec("libtpu") is None:
        raise AotError("compiling for TPU needs libtpu on this host: pip install -e '.[tpu]'")
    # Other processes (tests, other users) may hold libtpu: compiling only, share it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    try:
        topo = topologies.get_topology_desc(topology_name=sl.topology, platform="tpu")
    except Exception as e:  # libtpu rejects shapes it does not build (JaxRuntimeError)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise chips_lib.TopologyError(
            f"--topology {slice_name!r} ({sl.topology}): libtpu cannot build it ({first}); "
            f"accepted forms: {chips_lib.FORMS[0]}, or {chips_lib.FORMS[1]}") from e
    return list(topo.devices), sl


@contextlib.contextmanager
def _traced_for(platform: str):
    """jax.default_backend() answers `platform` while the step is traced (see module doc)."""
    if platform == jax.default_backend():
        yield
        return
    original = jax.default_backend
    jax.default_backend = lambda: platform
    try:
        yield
    finally:
        jax.default_backend = original


def abstract_batch(cfg, mesh) -> dict:
    """ShapeDtypeStructs of one global training batch, sharded as training shards it."""
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    sh = rules.batch_sharding(mesh)
    return {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh),
            "targets": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh),
            "loss_mask": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh)}


def _hbm_message(text: str) -> str | None:
    """The compiler's own out-of-memory numbers, e.g. 'HLO temporaries (664.50G) exceeds
    available HBM (95.74G)'."""
    m = re.search(r"total memory required for (.*?exceeds available HBM \([\d.]+\w?\))", text)
    if m:
        return m.group(1)
    m = re.search(r"RESOURCE_EXHAUSTED:\s*([^\n]{0,300})", text)
    return m.group(1) if m else None


def compile_train_step(cfg, mesh):
    """The train step lowered and compiled for `mesh` (abstract state and batch); returns
    (compiled, seconds to lower, seconds to compile). DoesNotFit when HBM runs out."""
    platform = mesh.devices.flat[0].platform
    shardings = step.state_shardings(cfg, mesh)
    state = step.abstract_state(cfg, shardings)
    t0 = time.perf_counter()
    with _traced_for(platform):
        try:
            lowered = step.lower_train_step(cfg, mesh, shardings, state, abstract_batch(cfg, mesh))
        except NotImplementedError as e:  # e.g. a Mosaic kernel under automatic partitioning
            raise AotError(f"the train step does not lower for {platform}: {str(e).splitlines()[0]}") from e
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # XlaRuntimeError; only out-of-memory is a user-facing answer
        why = _hbm_message(str(e))
        if why is None:
            raise
        raise DoesNotFit(why) from e
    return compiled, t1 - t0, time.perf_counter() - t1


def _memory(compiled, hbm_bytes: float | None) -> dict[str, Any]:
    m = compiled.memory_analysis()
    out = {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
           "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
           "code_bytes": m.generated_code_size_in_bytes}
    # Donated (aliased) outputs reuse their argument's buffer.
    out["total_bytes"] = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                          + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    out["hbm_bytes"] = hbm_bytes
    return out


def compile_report(cfg, devices: Sequence, sl: chips_lib.Slice | None = None) -> dict[str, Any]:
    """Compiles cfg's train step over `devices` (a TPU slice's, or this host's) and returns
    the report dict described in the module docstring. `sl`: the slice the devices form
    (chip figures); None for this host's devices (figures looked up by device kind).

    Raises ConfigError for a mesh that does not fit the devices, AotError / DoesNotFit.
    """
    devices = list(devices)
    mesh_shape(cfg, len(devices))  # ConfigError naming the mesh key, before tracing
    try:
        mesh = make_mesh(cfg, devices)
    except NotImplementedError as e:  # jax.make_mesh: a mesh axis that is no product of torus axes
        raise AotError(f"mesh {mesh_shape(cfg, len(devices))} does not map onto the slice's torus: "
                       f"{str(e).splitlines()[0]}") from e
    chip = sl.chip if sl else chips_lib.chip_of_device_kind(devices[0].device_kind)
    n_chips = sl.chips if sl else len(devices)
    per_chip = len(devices) / n_chips  # devices per chip (v4's libtpu topology: 2 TensorCores)
    hbm = chip.hbm_usable_gib * GIB / per_chip if chip else None
    report: dict[str, Any] = {
        "experiment": cfg.name,
        "target": sl.topology if sl else f"host:{devices[0].platform}",
        "chip": chip.name if chip else devices[0].device_kind,
        "chips": n_chips, "devices": len(devices),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "batch": {"sequences": cfg.data.batch_size, "seq_len": cfg.data.seq_len,
                  "microbatches": int(cfg.train.get("microbatches", 1))},
    }
    try:
        compiled, lower_s, compile_s = compile_train_step(cfg, mesh)
    except DoesNotFit as e:
        raise DoesNotFit(f"{report['target']} ({n_chips} chips, mesh "
                         f"{' '.join(f'{k}={v}' for k, v in report['mesh'].items())}): {e}") from e
    report["compile_seconds"] = {"lower": round(lower_s, 2), "compile": round(compile_s, 2)}
    report["memory"] = _memory(compiled, hbm)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    flops_step = model_flops_per_token(cfg) * tokens
    report["model_flops"] = {"per_token": model_flops_per_token(cfg), "per_step": flops_step,
                             "per_device": flops_step / len(devices)}
    text = compiled.as_text()
    peak = chip.peak_bf16_flops / per_chip if chip else None
    stats = hlo_stats.analyze(text, num_devices=len(devices), peak_flops=peak or 1.0,
                              hbm_bytes_per_s=(chip.hbm_bytes_per_s / per_chip) if chip else 1.0)
    report["collectives"] = stats["collectives"]
    report["loops"] = stats["loops"]
    report["unknown_trip_counts"] = stats["unknown_trip_counts"]
    report["hotspots"] = stats["hotspots"]
    ca = compiled.cost_analysis() or {}
    report["xla_cost_analysis"] = {k: float(ca[k]) for k in ("flops", "bytes accessed", "optimal_seconds") if k in ca}
    report["compiled"] = {"xla_flops": stats["xla"]["flops"], "xla_bytes": stats["xla"]["bytes"],
                          "pallas_calls": stats["pallas"]["calls"], "pallas_flops": stats["pallas"]["flops"],
                          "pallas_bytes": stats["pallas"]["bytes"],
                          "pallas_without_cost_estimate": stats["pallas"]["without_cost"]}
    report["estimate"] = _estimate(stats, chip, per_chip, report["model_flops"]["per_device"]) if chip else None
    report["_hlo_text"] = text
    if hbm is not None and report["memory"]["total_bytes"] > hbm:
        mem = report["memory"]
        raise DoesNotFit(f"{report['target']} ({n_chips} chips): {mem['total_bytes'] / GIB:.2f} GiB per device "
                         f"(arguments {mem['argument_bytes'] / GIB:.2f}, temporaries {mem['temp_bytes'] / GIB:.2f}) "
                         f"exceeds available HBM ({hbm / GIB:.2f} GiB)")
    return report


def _estimate(stats: dict, chip: chips_lib.Chip, per_chip: float, model_flops_device: float) -> dict:
    peak = chip.peak_bf16_flops / per_chip
    ici = chip.ici_bytes_per_s / per_chip
    xla_s, pallas_s = stats["xla"]["seconds"], stats["pallas"]["seconds"]
    wire = sum(c["wire_bytes"] for c in stats["collectives"].values())
    coll_s = wire / ici
    compute_s = xla_s + pallas_s
    serial = compute_s + coll_s
    overlapped = max(compute_s, coll_s)
    # The compiled program does about the model's FLOPs or more (remat, padding); the model
    # count (6N) also charges the input embedding, a gather in the program, hence the factor
    # 0.5 of slack. Counting less means the HLO walk missed part of the program (a kernel or
    # loop it cannot weigh): the times are then a lower bound and an MFU from them would be
    # wrong (olmoe_1b7b on v5p:4x8x8 counted 0.16 of the model's FLOPs and gave "200%": the
    # parser stopped at a multi-line kernel config, which hlo_text now reads and flags).
    counted = stats["xla"]["flops"] + stats["pallas"]["flops"]
    incomplete = None
    if stats.get("incomplete"):
        incomplete = (f"{len(stats['incomplete'])} computations of the compiled program could not be read "
                      f"whole ({', '.join(stats['incomplete'][:3])}): the times are a lower bound and no "
                      "MFU is given")
    elif counted < 0.5 * model_flops_device:
        incomplete = (f"the compiled program's counted FLOPs ({counted:.3g} per device) are below the "
                      f"model's ({model_flops_device:.3g}): part of the program was not weighed, so the "
                      "times are a lower bound and no MFU is given")
    mfu = lambda s: model_flops_device / (s * peak) if s > 0 and not incomplete else None  # noqa: E731
    return {"xla_ops_s": xla_s, "pallas_s": pallas_s, "collectives_s": coll_s,
            "step_s": serial, "step_s_overlapped": overlapped, "mfu": mfu(serial),
            "mfu_overlapped": mfu(overlapped), "incomplete": incomplete,
            "figures": {"peak_flops_per_device": peak, "hbm_bytes_per_s": chip.hbm_bytes_per_s / per_chip,
                        "ici_bytes_per_s": ici},
            "covers": "XLA ops and Pallas kernels: per-op roofline max(FLOPs/peak, bytes/HBM BW), "
                      "serial; collectives: ring traffic / ICI BW; step_s adds all three (no overlap), "
                      "step_s_overlapped hides collectives under compute. Both assume every op runs at its "
                      "roofline and ignore launch and pipeline overheads: optimistic."}
