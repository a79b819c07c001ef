"""`olmoe train --experiment NAME [--workdir W] [--set k=v ...]`: train, or resume, a run.

The workdir defaults to train.workdir, else runs/<experiment>. A workdir that already holds a
training checkpoint is resumed from its newest one (only train.steps and the log / eval /
checkpoint cadence may change); one that holds a params-only checkpoint (import-hf, upcycle)
starts from those params. Without --experiment, the workdir's config.json is used, so
`olmoe train --workdir W --set train.steps=2000` extends a run.
"""
from __future__ import annotations

import argparse
import json

from launch.cli import UsageError
from launch.common import add_config_arguments, resolve_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--workdir", "-w", default=None,
                        help="run folder (default: train.workdir, else runs/<experiment>)")


def run(args) -> int:
    from olmoe_jax.train.loop import train  # pylint: disable=import-outside-toplevel

    if not args.experiment and not args.workdir:
        raise UsageError("pass --experiment NAME (see `olmoe experiments`) or --workdir of an existing run")
    cfg = resolve_config(args.experiment, args.overrides, args.workdir)
    workdir = args.workdir or cfg.train.workdir or f"runs/{cfg.name}"
    cfg.train.workdir = workdir
    summary = train(cfg, workdir)
    print(json.dumps({"workdir": workdir, **summary}, default=float))
    return 0
