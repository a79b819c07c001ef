"""`olmoe compile --experiment NAME [--topology v5p-256] [--set k=v ...] [--json OUT]`: compile
the train step ahead of time for a TPU slice (needs libtpu, no TPU) or for this host, and
report per-chip memory, model FLOPs, collectives and an estimated step time / MFU.

A step that does not fit HBM is one line with the numbers and exit code 2.
Report logic: olmoe_jax/train/aot.py; chip figures and slice names: olmoe_jax/parallel/chips.py.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from launch.cli import UsageError
from launch.common import add_config_arguments, resolve_config

GIB = float(1 << 30)
DISTRIBUTED = False  # one process compiles for the whole slice; it joins no multi-process run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, experiment_required=True)
    parser.add_argument("--topology", "-t", default=None,
                        help="TPU slice: a Cloud accelerator type (v5p-256 = 128 chips: v4-/v5p- count "
                             "TensorCores; v5litepod-/v5e-/v6e- count chips) or chips per axis "
                             "(v5p:4x8x8); default: this host's devices")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON")
    parser.add_argument("--hlo", default=None, metavar="OUT", help="also write the compiled HLO text")


def run(args) -> int:
    # pylint: disable=import-outside-toplevel
    cfg = resolve_config(args.experiment, args.overrides)
    from olmoe_jax.parallel.chips import TopologyError
    from olmoe_jax.train import aot

    try:
        if args.topology:
            devices, sl = aot.tpu_devices(args.topology)
        else:
            import jax
            devices, sl = jax.devices(), None
        report = aot.compile_report(cfg, devices, sl)
    except (TopologyError, aot.AotError) as e:
        prefix = "does not fit: " if isinstance(e, aot.DoesNotFit) else ""
        raise UsageError(prefix + str(e)) from e
    hlo = report.pop("_hlo_text")
    if args.hlo:
        Path(args.hlo).write_text(hlo)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(summary(report))
    return 0


def summary(r: dict) -> str:
    """The report as a few human-readable lines."""
    mem, est, fl = r["memory"], r["estimate"], r["model_flops"]
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    b = r["batch"]
    lines = [f"{r['experiment']} on {r['target']} ({r['chips']} {r['chip']} chips, {r['devices']} devices), "
             f"mesh {mesh}; batch {b['sequences']} x {b['seq_len']}, microbatches {b['microbatches']}",
             f"compile: lower {r['compile_seconds']['lower']} s, compile {r['compile_seconds']['compile']} s"]
    hbm = f" of {mem['hbm_bytes'] / GIB:.2f} GiB HBM" if mem["hbm_bytes"] else ""
    lines.append(f"memory per device: {mem['total_bytes'] / GIB:.2f} GiB{hbm} (arguments "
                 f"{mem['argument_bytes'] / GIB:.2f}, outputs {mem['output_bytes'] / GIB:.2f}, aliased "
                 f"{mem['alias_bytes'] / GIB:.2f}, temporaries {mem['temp_bytes'] / GIB:.2f}, code "
                 f"{mem['code_bytes'] / GIB:.2f})")
    lines.append(f"model FLOPs: {fl['per_token']:.3g} per token, {fl['per_step']:.3e} per step, "
                 f"{fl['per_device']:.3e} per device; compiled: XLA {r['compiled']['xla_flops']:.3e}, "
                 f"Pallas {r['compiled']['pallas_flops']:.3e} per device")
    if r["collectives"]:
        lines.append("collectives per step per device: " + "; ".join(
            f"{k} x{v['count']:.0f} {v['bytes'] / GIB:.3f} GiB (wire {v['wire_bytes'] / GIB:.3f})"
            for k, v in r["collectives"].items()))
    else:
        lines.append("collectives: none")
    if r["unknown_trip_counts"]:
        lines.append(f"loops of unknown trip count (counted once): {', '.join(r['unknown_trip_counts'])}")
    if est and est.get("incomplete"):
        lines.append(f"estimated step: at least {est['step_s_overlapped'] * 1e3:.1f} ms (XLA ops "
                     f"{est['xla_ops_s'] * 1e3:.1f} + Pallas {est['pallas_s'] * 1e3:.1f}, collectives "
                     f"{est['collectives_s'] * 1e3:.1f}); {est['incomplete']}")
    elif est:
        lines.append(f"estimated step: {est['step_s'] * 1e3:.1f} ms (XLA ops {est['xla_ops_s'] * 1e3:.1f} + "
                     f"Pallas {est['pallas_s'] * 1e3:.1f} + collectives {est['collectives_s'] * 1e3:.1f}), "
                     f"MFU {est['mfu']:.1%}; collectives overlapped: {est['step_s_overlapped'] * 1e3:.1f} ms, "
                     f"MFU {est['mfu_overlapped']:.1%}")
        if r["compiled"]["pallas_without_cost_estimate"]:
            lines.append(f"note: {r['compiled']['pallas_without_cost_estimate']} Pallas kernels carry no "
                         "CostEstimate: counted by their operand bytes only")
    else:
        lines.append(f"estimated step: no chip figures for {r['chip']} (parallel/chips.py lists TPUs)")
    if est and r.get("hotspots"):
        lines.append("largest parts of the estimate (roofline time per step, by source line): " + "; ".join(
            f"{h['where']} {h['seconds'] * 1e3:.1f} ms" for h in r["hotspots"][:5]))
    return "\n".join(lines)
