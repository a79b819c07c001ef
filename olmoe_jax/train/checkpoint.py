"""Workdir checkpoints: config.json, Orbax train-state + grain-iterator checkpoints, params-only.

Layout (docs/interfaces.md): `<workdir>/config.json`, `<workdir>/checkpoints/<step>/` with the
item `state` (a TrainState) and, for training runs, `data` (the grain iterator state); a
params-only checkpoint (written by import-hf and upcycle) has the single item `params`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from olmoe_jax.config import ConfigError, from_json
from olmoe_jax.model import transformer

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"


def save_config(workdir, cfg: ml_collections.ConfigDict) -> None:
    """Writes the resolved config to `<workdir>/config.json` (atomically; process 0 only)."""
    if jax.process_index() != 0:
        return
    path = Path(workdir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(cfg.to_json(indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)  # a crash mid-write never leaves a half-written config


def load_config(workdir) -> ml_collections.ConfigDict:
    """The workdir's config.json, checked against the schema; ConfigError if absent or bad."""
    path = Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"{path} does not exist; is {workdir} a workdir written by `olmoe train`, "
                          "`olmoe import-hf` or `olmoe upcycle`?")
    return from_json(path.read_text(), str(path))


def step_items(workdir, step: int) -> set[str]:
    """Names of the items saved at `step` ('state', 'data', 'params'); empty if none."""
    d = Path(workdir).absolute() / CHECKPOINTS / str(step)
    return {p.name for p in d.iterdir() if p.is_dir()} if d.is_dir() else set()


def _manager(workdir, *, read_only: bool, keep: int | None = None,
             keep_every: int | None = None) -> ocp.CheckpointManager:
    directory = Path(workdir).absolute() / CHECKPOINTS
    # keep_period: milestones (steps divisible by it) survive max_to_keep's deletions.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every, create=not read_only,
                                           read_only=read_only, save_interval_steps=0 if read_only else 1)
    if not read_only:
        return ocp.CheckpointManager(directory, options=options)
    # Orbax logs a warning for every read-only manager ("directory is read only"): reading a
    # checkpoint is what the user asked for, so keep those notes off their terminal.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        return ocp.CheckpointManager(directory, options=options)
    finally:
        absl_logger.setLevel(level)


def checkpoint_steps(workdir) -> list[int]:
    """Steps with a checkpoint of any kind, ascending (no directory: none)."""
    if not (Path(workdir) / CHECKPOINTS).is_dir():
        return []
    mgr = _manager(workdir, read_only=True)
    try:
        return sorted(mgr.all_steps())
    finally:
        mgr.close()


class Checkpointer:
    """Full training checkpoints of one workdir: the TrainState and the data iterator.

    `save` writes when `step` is a multiple of `save_every` or when forced (the last step), and
    returns while the arrays are written in the background (Orbax async checkpointing);
    `close` waits for the writes to finish. The `keep` newest checkpoints are kept, and every
    one at a multiple of `keep_every` (milestones, e.g. for the routing-saturation analysis).
    """

    def __init__(self, workdir, *, keep: int, save_every: int, keep_every: int | None = None):
        self._workdir = workdir
        self._save_every = save_every
        self._mgr = _manager(workdir, read_only=False, keep=keep, keep_every=keep_every)

    def latest_step(self) -> int | None:
        """The newest step holding a train state (params-only checkpoints do not count)."""
        steps = [s for s in self._mgr.all_steps() if "state" in step_items(self._workdir, s)]
        return max(steps) if steps else None

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` without force writes: every `save_every` steps."""
        return step % self._save_every == 0

    def save(self, step: int, state, data_iter=None, force: bool = False) -> bool:
        """Saves state (and the iterator's position) at `step`; True if it wrote."""
        if not (force or self.should_save(step)):
            return False
        if step in self._mgr.all_steps():
            self._mgr.wait_until_finished()  # an async save of this step may still be writing
            if "state" in step_items(self._workdir, step):
                return False  # already saved (e.g. the end of a run that stopped on a save step)
            raise ConfigError(f"{Path(self._workdir) / CHECKPOINTS / str(step)} already holds a params-only "
                              "checkpoint; move it away or train in another workdir")
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        # Our own cadence decides; Orbax's interval policy would also save the first step.
        return self._mgr.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state, data_iter=None):
        """The TrainState at `step`, placed by the shardings in `abstract_state`
        (ShapeDtypeStructs); `data_iter` is moved to the saved position in place."""
        have = step_items(self._workdir, step)
        if "state" not in have:
            raise ConfigError(f"{Path(self._workdir) / CHECKPOINTS / str(step)} holds no train state "
                              f"(items: {sorted(have) or 'none'}); delete it or use another workdir")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            if "data" not in have:
                raise ConfigError(f"{Path(self._workdir) / CHECKPOINTS / str(step)} has no data iterator "
                                  "state, so training cannot resume its data order; use a new workdir")
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self._mgr.restore(step, args=ocp.args.Composite(**items)).state

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()


def save_params(workdir, params, cfg, step: int = 0) -> None:
    """A params-only checkpoint plus config.json: the start point of a later `olmoe train`."""
    save_config(workdir, cfg)
    mgr = _manager(workdir, read_only=False)
    try:
        mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
        mgr.wait_until_finished()
    finally:
        mgr.close()


def load_params(workdir, step: int | None = None, *, shardings: Any = None):
    """Params from a params-only or a full training checkpoint (the newest when step is None).

    shardings: a params-shaped tree of Shardings to place them with (e.g.
    `transformer.param_shardings(cfg, mesh)`); default: all on this process's first device
    (in a multi-process run, pass shardings: a replicated or sharded layout over the mesh).
    """
    cfg = load_config(workdir)
    steps = checkpoint_steps(workdir)
    if not steps:
        raise ConfigError(f"{Path(workdir) / CHECKPOINTS} holds no checkpoint; train or import one first")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ConfigError(f"{workdir} has no checkpoint at step {step}; it has steps {steps}")
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: one, transformer.abstract_params(cfg))
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          transformer.abstract_params(cfg), shardings)
    have = step_items(workdir, step)
    mgr = _manager(workdir, read_only=True)
    try:
        if "params" in have:
            return mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
        # A training checkpoint: read only the params out of the saved TrainState.
        item = {"params": target}
        args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                      partial_restore=True)
        return mgr.restore(step, args=ocp.args.Composite(state=args)).state["params"]
    finally:
        mgr.close()
