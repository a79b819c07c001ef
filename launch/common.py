"""Shared command-line pieces: resolving `--experiment NAME --set k=v` into a validated config."""
from __future__ import annotations

import argparse

import ml_collections

from olmoe_jax.config import ConfigError, apply_overrides, from_json, validate
from olmoe_jax.train.paths import workdir_path


def add_config_arguments(parser: argparse.ArgumentParser, *, experiment_required: bool = False) -> None:
    parser.add_argument("--experiment", "-e", required=experiment_required,
                        help="registry name (`olmoe experiments` lists them)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.num_experts=32 (repeatable)")


def resolve_config(experiment: str | None, overrides: list[str],
                   workdir: str | None = None) -> ml_collections.ConfigDict:
    """The config for a command: the experiment's (plus overrides), or the workdir's saved one.

    With both an experiment and a workdir holding a config, the experiment's is returned;
    callers that resume (train) compare it with the saved one and refuse a different model.
    """
    import experiments  # pylint: disable=import-outside-toplevel

    saved = workdir_path(workdir) / "config.json" if workdir else None
    if experiment:
        cfg = experiments.get(experiment)
    elif saved is not None and saved.exists():
        cfg = from_json(saved.read_text(), str(saved))
    elif saved is not None:
        raise ConfigError(f"{workdir} has no config.json; pass --experiment NAME (see `olmoe experiments`)")
    else:
        raise ConfigError("pass --experiment NAME (see `olmoe experiments`)")
    apply_overrides(cfg, overrides)
    return validate(cfg)
