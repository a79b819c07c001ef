"""`olmoe sweep FAMILY|EXPERIMENT [AXIS ...] --out DIR [--scale tiny|full] [--seeds N] [--set k=v ...]`.

FAMILY runs every variant of a registry family at one scale (default tiny: the CPU twins);
EXPERIMENT runs one registry entry. AXIS arguments add a grid over either (every combination):
`model.num_experts=8,32 model.top_k=1,4` is four runs; keys joined by ':' vary together,
`model.num_experts:model.top_k=8:1,32:4` is two. `--seeds N` repeats every run with
train.seed 0..N-1. Runs go one after another through `olmoe train`'s loop, each in
DIR/runs/<id>; running the command again skips finished runs and resumes an interrupted one.
`olmoe sweep --status DIR` says where a sweep stands. DIR gets summary.json, summary.md
(final validation loss per domain, tokens/s, wall time, diverged) and loss_curves.png.
"""
from __future__ import annotations

import argparse
import json

from launch.cli import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="*", metavar="FAMILY|EXPERIMENT [AXIS ...]",
                        help="a family (`olmoe experiments` lists them) or an experiment, then grid axes KEY=V1,V2")
    parser.add_argument("--out", "-o", help="sweep folder (one workdir per run under DIR/runs)")
    parser.add_argument("--scale", choices=("tiny", "full"), default="tiny",
                        help="for a family: its CPU twins (tiny, default) or the paper's settings (full)")
    parser.add_argument("--seeds", type=int, default=1, help="repeat every run with train.seed 0..N-1")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value in every run (repeatable)")
    parser.add_argument("--status", metavar="DIR", help="print where the sweep in DIR stands, run nothing")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their overrides, run nothing")


def plan(args):
    """The sweep's runs from the command line (validated configs; nothing is written)."""
    # pylint: disable=import-outside-toplevel
    import experiments
    from olmoe_jax.config import validate
    from olmoe_jax.train import sweep

    if not args.spec:
        raise UsageError("name a family or an experiment to sweep (`olmoe experiments` lists both)")
    if args.seeds < 1:
        raise UsageError(f"--seeds {args.seeds} must be at least 1")
    head, axes = args.spec[0], args.spec[1:]
    if head in experiments.families():
        entries = experiments.family_entries(head, args.scale)
        if not entries:
            raise UsageError(f"family {head} has no {args.scale}-scale experiments; try --scale "
                             f"{'full' if args.scale == 'tiny' else 'tiny'}")
    else:
        entries = [experiments.entry(head)]  # ConfigError names the registry when unknown
    bases = [(e.name.rsplit("/", 1)[-1], e.name, experiments.get(e.name)) for e in entries]
    runs = sweep.expand(bases, axes, args.seeds, args.overrides)
    for run in runs:
        validate(run.cfg)
    return runs


def run(args) -> int:
    # pylint: disable=import-outside-toplevel
    from olmoe_jax.train import sweep

    if args.status:
        if args.spec or args.out:
            raise UsageError("--status DIR takes no FAMILY, axes or --out")
        rows = sweep.summary_rows(args.status, sweep.load_plan(args.status))
        print(sweep.markdown(rows), end="")
        left = sum(r["state"] != "done" for r in rows)
        print(f"{len(rows) - left} of {len(rows)} runs done" + (f"; {left} left" if left else ""))
        return 0
    runs = plan(args)
    if args.dry_run:
        for r in runs:
            print(" ".join([f"{r.id}: olmoe train --experiment {r.experiment}"]
                           + [f"--set {o}" for o in r.overrides]))
        return 0
    if not args.out:
        raise UsageError("pass --out DIR, the folder for the sweep's runs and summary")
    _preflight(args.out, runs)
    from olmoe_jax.train.loop import train
    rows = sweep.run_sweep(args.out, runs, train)
    print(sweep.markdown(rows), end="")
    print(json.dumps({"out": args.out, "runs": len(rows), "diverged": [r["id"] for r in rows if r["diverged"]]}))
    return 0


def _preflight(out, runs) -> None:
    """Every run checked before the first one starts: the plan against DIR, configs against this
    machine, data, and each run's workdir (a different config there is refused)."""
    # pylint: disable=import-outside-toplevel
    import os

    import jax

    from olmoe_jax import data as data_lib
    from olmoe_jax.config import validate
    from olmoe_jax.train import loop, sweep

    if os.path.exists(os.path.join(out, sweep.PLAN)):
        sweep.write_plan(out, runs)  # only compares: ConfigError if DIR holds another sweep
    elif os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UsageError(f"--out {out} exists and is not a sweep folder; choose a new or empty folder")
    for run in runs:
        cfg = validate(run.cfg, num_devices=jax.device_count())
        data_lib.check_data(cfg)
        wd = sweep.workdir(out, run)
        cfg.train.workdir = wd
        loop.workdir_mode(cfg, wd)
