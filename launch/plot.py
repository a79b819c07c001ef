"""`olmoe plot W [W ...] --out loss.png [--metric loss] [--label NAME ...]`: curves of one or
several runs from their metrics.jsonl (training loss by default; val/<domain> or val/mean for
validation loss, or any logged scalar: ce_loss, lb_loss, z_loss, grad_norm, lr)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workdirs", nargs="+", help="training workdirs (each with metrics.jsonl)")
    parser.add_argument("--out", "-o", required=True, help="PNG file to write")
    parser.add_argument("--metric", default="loss", help="loss (default), val/mean, val/<domain>, ce_loss, ...")
    parser.add_argument("--label", action="append", default=[], help="legend label per workdir (default: its name)")
    parser.add_argument("--logx", action="store_true", help="log-scale steps")


def run(args) -> int:
    # pylint: disable=import-outside-toplevel
    import os

    from launch.cli import UsageError
    from olmoe_jax.analysis import curves, plots

    if args.label and len(args.label) != len(args.workdirs):
        raise UsageError(f"{len(args.label)} --label for {len(args.workdirs)} workdirs; give one per workdir or none")
    labels = args.label or [os.path.basename(os.path.normpath(w)) for w in args.workdirs]
    series = [(label, *curves.series(w, args.metric)) for label, w in zip(labels, args.workdirs)]
    plots.curves(series, args.out, ylabel=args.metric, logx=args.logx)
    for label, steps, values in series:
        print(f"{label}: {args.metric} {values[-1]:.4f} at step {steps[-1]}")
    print(f"wrote {args.out}")
    return 0
