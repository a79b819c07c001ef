"""The experiment registry: a name -> a function returning a complete, validated ConfigDict.

Families live one per module (olmoe_1b7b.py: the paper's model and recipe; tiny.py: CPU-scale
variants). A module registers its experiments with `@register`; `get(name)` builds one.
"""
from __future__ import annotations

import importlib
from typing import Callable

import ml_collections

from olmoe_jax.config import ConfigError, validate

_FAMILIES = ("experiments.olmoe_1b7b", "experiments.tiny")
_REGISTRY: dict[str, Callable[[], ml_collections.ConfigDict]] = {}


def register(fn: Callable[[], ml_collections.ConfigDict]):
    """Registers `fn` under its function name; its docstring's first line describes it."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"experiment {fn.__name__} registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def _load():
    for mod in _FAMILIES:
        importlib.import_module(mod)


def names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def describe(name: str) -> str:
    _load()
    doc = (_REGISTRY[name].__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def get(name: str) -> ml_collections.ConfigDict:
    """The experiment's config, named and validated (mesh sizes are checked at launch)."""
    _load()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown experiment {name!r}; `olmoe experiments` lists: {', '.join(sorted(_REGISTRY))}")
    cfg = _REGISTRY[name]()
    cfg.name = name
    return validate(cfg)
