"""The experiment registry: a name -> a function returning a complete, validated ConfigDict.

Every module of this package that registers experiments is a family (its module name), found
by walking the package (modules such as reproduce.py, which register none, are tools):
olmoe_1b7b (the paper's model and recipe), tiny (the CPU-scale main job) and one module per
ablation of the paper (granularity, lb_loss, ...). Modules whose name starts with "_" hold
shared helpers. A family registers its experiments with `@register` (the function name is
the experiment's name) or `register_entry` (names such as "granularity/e32k4", usable as
CLI arguments and as workdir paths); `get(name)` builds one.

Each entry has a scale: "full" (the paper's setting) or "tiny" (a CPU twin running the same
code path in minutes); ablation families give every variant both (`name` and `name-tiny`).
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Callable

import ml_collections

from olmoe_jax.config import ConfigError, validate

SCALES = ("full", "tiny")


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    family: str
    scale: str  # full | tiny
    build: Callable[[], ml_collections.ConfigDict]
    doc: str  # first line: what it is; then the command that runs it


_REGISTRY: dict[str, Entry] = {}
_FAMILY_DOCS: dict[str, str] = {}


def register_entry(name: str, family: str, scale: str, build: Callable[[], ml_collections.ConfigDict],
                   doc: str) -> None:
    if name in _REGISTRY:
        raise ValueError(f"experiment {name} registered twice")
    if scale not in SCALES:
        raise ValueError(f"experiment {name}: scale {scale!r} is not one of {SCALES}")
    _REGISTRY[name] = Entry(name, family, scale, build, doc.strip())


def register(fn=None, *, scale: str = "full"):
    """`@register` or `@register(scale="tiny")`: registers `fn` under its function name in the
    family of its module; its docstring describes it (first line) and says how to run it."""
    def wrap(f):
        register_entry(f.__name__, f.__module__.rsplit(".", 1)[-1], scale, f, f.__doc__ or "")
        return f
    return wrap(fn) if fn is not None else wrap


def _load() -> None:
    if _FAMILY_DOCS:
        return
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            mod = importlib.import_module(f"{__name__}.{info.name}")
            if any(e.family == info.name for e in _REGISTRY.values()):  # tools (reproduce) register none
                _FAMILY_DOCS[info.name] = (mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else ""


def names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def entry(name: str) -> Entry:
    _load()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown experiment {name!r}; `olmoe experiments` lists them")
    return _REGISTRY[name]


def families() -> dict[str, str]:
    """{family: its one-line description}, sorted by name."""
    _load()
    return dict(_FAMILY_DOCS)


def family_entries(family: str, scale: str | None = None) -> list[Entry]:
    """The family's experiments in registration order (only `scale`'s when given)."""
    _load()
    if family not in _FAMILY_DOCS:
        raise ConfigError(f"unknown experiment family {family!r}; families: {', '.join(_FAMILY_DOCS)}")
    return [e for e in _REGISTRY.values() if e.family == family and (scale is None or e.scale == scale)]


def describe(name: str) -> str:
    doc = entry(name).doc.splitlines()
    return doc[0] if doc else ""


def get(name: str) -> ml_collections.ConfigDict:
    """The experiment's config, named and validated (mesh sizes are checked at launch)."""
    cfg = entry(name).build()
    cfg.name = name
    return validate(cfg)
