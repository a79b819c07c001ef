"""Shared command-line pieces: resolving `--experiment NAME --set k=v` into a validated config."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import ml_collections

from olmoe_jax.config import ConfigError, apply_overrides, default_config, validate


def add_config_arguments(parser: argparse.ArgumentParser, *, experiment_required: bool = False) -> None:
    parser.add_argument("--experiment", "-e", required=experiment_required,
                        help="registry name (`olmoe experiments` lists them)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.num_experts=32 (repeatable)")


def config_from_json(text: str, source: str) -> ml_collections.ConfigDict:
    """A config saved as JSON, checked against the schema (unknown or missing keys are errors)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source} is not valid JSON ({e}); restore it or start a new workdir") from e
    cfg = ml_collections.ConfigDict(raw)
    ref = default_config()
    # JSON has no int/float distinction for whole numbers: coerce to the schema's types.
    for section in ref.keys():
        if section in cfg and isinstance(ref[section], ml_collections.ConfigDict):
            for key in ref[section].keys():
                if key in cfg[section] and isinstance(ref[section][key], float) \
                        and isinstance(cfg[section][key], int) and not isinstance(cfg[section][key], bool):
                    with cfg[section].ignore_type():
                        cfg[section][key] = float(cfg[section][key])
    try:
        return validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e


def resolve_config(experiment: str | None, overrides: list[str],
                   workdir: str | None = None) -> ml_collections.ConfigDict:
    """The config for a command: the experiment's (plus overrides), or the workdir's saved one.

    With both an experiment and a workdir holding a config, the experiment's wins only if it is
    the same experiment; callers that resume (train) compare the two themselves.
    """
    import experiments  # pylint: disable=import-outside-toplevel

    saved = Path(workdir) / "config.json" if workdir else None
    if experiment:
        cfg = experiments.get(experiment)
    elif saved is not None and saved.exists():
        cfg = config_from_json(saved.read_text(), str(saved))
    elif saved is not None:
        raise ConfigError(f"{workdir} has no config.json; pass --experiment NAME (see `olmoe experiments`)")
    else:
        raise ConfigError("pass --experiment NAME (see `olmoe experiments`)")
    apply_overrides(cfg, overrides)
    return validate(cfg)
