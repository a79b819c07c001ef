"""`olmoe experiments`: list the registry; --config NAME prints a resolved config; --params NAME
its parameter counts (via jax.eval_shape: no memory is allocated for the weights)."""
from __future__ import annotations

import argparse

import yaml

from launch.common import resolve_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--config", metavar="NAME", help="print the resolved config of NAME")
    group.add_argument("--params", metavar="NAME", help="print total and active parameter counts of NAME")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value before printing (repeatable)")


def run(args) -> int:
    import experiments  # pylint: disable=import-outside-toplevel

    if args.config:
        # Plain YAML of the values (ConfigDict.to_yaml tags nested sections as Python objects).
        print(yaml.safe_dump(resolve_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")
        return 0
    if args.params:
        cfg = resolve_config(args.params, args.overrides)
        from olmoe_jax.model import transformer  # pylint: disable=import-outside-toplevel
        total, active = transformer.count_params(cfg)
        shapes = transformer.abstract_params(cfg)
        print(f"{args.params}: total {total:,} parameters, active per token {active:,}")
        for path, leaf in _flat(shapes):
            print(f"  {path:<28} {str(tuple(leaf.shape)):<26} {leaf.size:>16,}")
        return 0
    # By family: a header with what the paper found, then one line per experiment.
    width = max(len(n) for n in experiments.names()) + 2
    for family, about in experiments.families().items():
        print(f"{family}: {about}")
        for e in experiments.family_entries(family):
            print(f"  {e.name:<{width}}{e.scale:<6}{experiments.describe(e.name)}")
    print("\n`olmoe experiments --config NAME` shows one; `olmoe sweep FAMILY --out DIR` runs a family.")
    return 0


def _flat(tree, prefix=""):
    for key in sorted(tree):
        value = tree[key]
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            yield from _flat(value, path)
        else:
            yield path, value
