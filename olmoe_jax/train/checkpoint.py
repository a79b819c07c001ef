"""Workdir checkpoints: config.json, Orbax train-state + grain-iterator checkpoints, params-only.

Layout (docs/interfaces.md): `<workdir>/config.json`, `<workdir>/checkpoints/<step>/` with the
item `state` (a TrainState) and, for training runs, `data` (the grain iterator state); a
params-only checkpoint (written by import-hf and upcycle) has the single item `params`. Each
finished step also holds `manifest.sha256.json` (integrity.py), written once Orbax's async save
of the step is final.

Every read (train's resume, eval, generate, export-hf, upcycle) goes through `_restore_newest`:
the newest step that passes `integrity.verify` is used; a step that fails is named in one
warning line and skipped; nothing is deleted or overwritten by that. Only training, which is
about to write those step numbers again, moves failed newer steps aside to
`checkpoints/<step>.failed-<unix time>/` (Orbax does not list them) and says so.

Workdirs may be local paths or `gs://bucket/run` (etils.epath, as Orbax itself uses).
"""
from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import sys
import time
from typing import Any, Callable

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from olmoe_jax.config import ConfigError, from_json
from olmoe_jax.model import transformer
from olmoe_jax.train import integrity
from olmoe_jax.train.paths import is_remote, workdir_path

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"


def _ckpt_dir(workdir) -> epath.Path:
    return workdir_path(workdir) / CHECKPOINTS


def _note(text: str) -> None:
    """One line on stderr (process 0): a checkpoint that was skipped, moved or read unverified."""
    if jax.process_index() == 0:
        print(f"warning: {text}", file=sys.stderr, flush=True)


def save_config(workdir, cfg: ml_collections.ConfigDict) -> None:
    """Writes the resolved config to `<workdir>/config.json` (atomically; process 0 only)."""
    if jax.process_index() != 0:
        return
    path = workdir_path(workdir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    text = cfg.to_json(indent=2, sort_keys=True) + "\n"
    if not is_remote(path):
        tmp = path.parent / (CONFIG_FILE + ".tmp")
        tmp.write_text(text)
        os.replace(str(tmp), str(path))  # a crash mid-write never leaves a half-written config
    else:
        path.write_text(text)  # object stores publish whole objects only


def load_config(workdir) -> ml_collections.ConfigDict:
    """The workdir's config.json, checked against the schema; ConfigError if absent or bad."""
    path = workdir_path(workdir) / CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"{path} does not exist; is {workdir} a workdir written by `olmoe train`, "
                          "`olmoe import-hf` or `olmoe upcycle`?")
    return from_json(path.read_text(), str(path))


def step_items(workdir, step: int) -> set[str]:
    """Names of the items saved at `step` ('state', 'data', 'params'); empty if none."""
    d = _ckpt_dir(workdir) / str(step)
    return {p.name for p in d.iterdir() if p.is_dir()} if d.is_dir() else set()


@functools.cache  # once per process: Orbax's handler registry is process-wide
def _no_replica_slices_on_cpu() -> None:
    """Turns Orbax's replica-parallel saving off where jax runs on CPU.

    Replica-parallel saving has each replica of a replicated array copy a slice of it to the
    host, so replicas on several hosts share the writing. A CPU process's devices already live
    in host memory: the slices are only extra device ops (a compile for each new shape, then a
    dispatch for each slice). Measured on the tiny model on 8 CPU devices: 3 saves took 3.15 s
    with them, 0.25 s without. Orbax makes the same choice for GPUs; on TPU its default (on)
    is kept.
    """
    if jax.default_backend() == "cpu":
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def _manager(workdir, *, read_only: bool, keep: int | None = None,
             keep_every: int | None = None) -> ocp.CheckpointManager:
    directory = _ckpt_dir(workdir)
    if not read_only:
        _no_replica_slices_on_cpu()
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
    """Steps whose save Orbax finished, of any kind, ascending (integrity not yet checked;
    an integer-named directory without Orbax's metadata is no checkpoint)."""
    directory = _ckpt_dir(workdir)
    if not directory.is_dir():
        return []
    mgr = _manager(workdir, read_only=True)
    try:
        return sorted(s for s in mgr.all_steps() if (directory / str(s) / integrity.ORBAX_DONE).exists())
    finally:
        mgr.close()


def _agreed(value: int) -> int:
    """Process 0's value on every process (multi-host runs must read the same step)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _restore_newest(workdir, restore: Callable[[int], Any], *, step: int | None = None,
                    need: str | None = None, failed: list[int] | None = None) -> tuple[int, Any]:
    """(step, restore(step)) for `step`, or else the newest step that holds item `need` and
    passes integrity.verify; each step skipped is named in one warning line.

    An unverified step (no manifest) whose restore raises is skipped likewise. `failed`
    collects the skipped step numbers. ConfigError when no step is usable.
    """
    directory = _ckpt_dir(workdir)
    all_steps = [s for s in checkpoint_steps(workdir) if need is None or need in step_items(workdir, s)]
    if step is not None:
        if step not in all_steps:
            raise ConfigError(f"{workdir} has no checkpoint at step {step}; it has steps {all_steps}")
        candidates = [step]
    else:
        candidates = sorted(all_steps, reverse=True)
        if not candidates:
            raise ConfigError(f"{directory} holds no {need or 'finished'} checkpoint; train or import one first")
    skipped: list[str] = []
    for s in candidates:
        status = integrity.verify(directory / str(s)) if jax.process_index() == 0 else None
        ok = _agreed(1 if status is None or status.usable else 0)
        if not ok:
            reason = status.reason if status is not None else "it failed its check on process 0"
            skipped.append(f"checkpoint step {s} in {directory} is unusable: {reason}")
            if failed is not None:
                failed.append(s)
            continue
        if status is not None and status.status == "unverified":
            _note(f"checkpoint step {s} in {directory}: {status.reason}; reading it unverified")
        try:
            value = restore(s)
        except Exception as e:  # pylint: disable=broad-except
            if status is None or status.status != "unverified" or step is not None:
                raise
            first = (str(e).strip().splitlines() or [""])[0][:200]
            skipped.append(f"checkpoint step {s} in {directory} could not be read ({type(e).__name__}: {first})")
            if failed is not None:
                failed.append(s)
            continue
        for line in skipped:
            _note(f"{line}; using step {s}")
        return s, value
    hint = "pass another --step" if step is not None else "restore the files or start a new workdir"
    raise ConfigError(f"no intact checkpoint in {directory}: " + "; ".join(skipped)
                      + f". Nothing was changed; {hint}")


class Checkpointer:
    """Full training checkpoints of one workdir: the TrainState and the data iterator.

    `save` writes when `step` is a multiple of `save_every` or when forced (the last step), and
    returns while the arrays are written in the background (Orbax async checkpointing). Once
    Orbax has finished a step (seen by `poll`, the next `save` or `close`), process 0 hashes it
    into its manifest in a background thread. `close` waits for both. The `keep` newest
    checkpoints are kept, and every one at a multiple of `keep_every` (milestones, e.g. for the
    routing-saturation analysis).
    """

    def __init__(self, workdir, *, keep: int, save_every: int, keep_every: int | None = None):
        self._workdir = workdir
        self._dir = _ckpt_dir(workdir)
        self._save_every = save_every
        self._mgr = _manager(workdir, read_only=False, keep=keep, keep_every=keep_every)
        self._unsealed: list[int] = []  # saved steps whose manifest is not yet written
        self._sealer = concurrent.futures.ThreadPoolExecutor(1) if jax.process_index() == 0 else None
        self._sealing: concurrent.futures.Future | None = None
        self.hashed_bytes, self.hash_s = 0, 0.0
        self._closed = False

    def latest_step(self) -> int | None:
        """The newest finished step holding a train state (params-only checkpoints do not count)."""
        steps = [s for s in checkpoint_steps(self._workdir) if "state" in step_items(self._workdir, s)]
        return max(steps) if steps else None

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` without force writes: every `save_every` steps."""
        return step % self._save_every == 0

    def save(self, step: int, state, data_iter=None, force: bool = False) -> bool:
        """Saves state (and the iterator's position) at `step`; True if it wrote."""
        if not (force or self.should_save(step)):
            return False
        self._seal(wait=True)  # the previous step is final before Orbax starts the next
        if step in self._mgr.all_steps():
            self._mgr.wait_until_finished()  # every process: a save of this step may be in flight
            # Process 0 judges the step and every process acts alike (collective save or move).
            status = integrity.verify(self._dir / str(step)) if jax.process_index() == 0 else None
            verdict = _agreed(-1 if status is None else (
                (0 if "state" in step_items(self._workdir, step) else 1) if status.usable else 2))
            if verdict == 0:
                return False  # already saved (e.g. the end of a run that stopped on a save step)
            if verdict == 1:
                raise ConfigError(f"{self._dir / str(step)} already holds a params-only "
                                  "checkpoint; move it away or train in another workdir")
            self._move_aside(step, status.reason if status is not None else "")
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        # Our own cadence decides; Orbax's interval policy would also save the first step.
        wrote = self._mgr.save(step, args=ocp.args.Composite(**items), force=True)
        if wrote and self._sealer is not None:  # process 0 hashes every process's files
            self._unsealed.append(step)
        return wrote

    def poll(self) -> None:
        """Starts the manifest of a step Orbax has finished (cheap; call once per train step)."""
        if self._unsealed and self._sealing is None and not self._mgr.is_saving_in_progress():
            self._seal(wait=False)

    def _seal(self, *, wait: bool) -> None:
        if self._sealing is None and self._unsealed:
            self._mgr.wait_until_finished()
            steps, self._unsealed = self._unsealed, []
            self._sealing = self._sealer.submit(self._write_manifests, steps)
        if wait and self._sealing is not None:
            self._sealing.result()
            self._sealing = None
            if self._unsealed:
                self._seal(wait=True)

    def _write_manifests(self, steps: list[int]) -> None:
        for step in steps:
            d = self._dir / str(step)
            if d.is_dir():  # Orbax may already have removed it (max_to_keep)
                t = time.perf_counter()
                self.hashed_bytes += integrity.write_manifest(d)
                self.hash_s += time.perf_counter() - t

    def _move_aside(self, step: int, reason: str) -> None:
        """Renames a failed step so that its number can be written again (kept for inspection)."""
        if jax.process_index() == 0:
            src = self._dir / str(step)
            dst = self._dir / f"{step}.failed-{int(time.time())}"
            src.rename(dst)
            _note(f"moved checkpoint step {step} ({reason}) to {dst}; it is kept, not deleted")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
            multihost_utils.sync_global_devices(f"olmoe_move_aside_{step}")
        self._mgr.reload()

    def restore_latest(self, abstract_state, data_iter=None) -> tuple[int, Any]:
        """(step, TrainState) of the newest intact training checkpoint, placed by the shardings
        in `abstract_state` (ShapeDtypeStructs; any mesh: Orbax reshards); `data_iter` is moved
        to the saved position in place. Failed newer steps are moved aside (see module doc)."""
        failed: list[int] = []
        step, state = _restore_newest(self._workdir, lambda s: self.restore(s, abstract_state, data_iter),
                                      need="state", failed=failed)
        for s in failed:
            if s > step:
                self._move_aside(s, "failed its integrity check")
        return step, state

    def restore(self, step: int, abstract_state, data_iter=None):
        """The TrainState at `step` (not verified here: see restore_latest)."""
        have = step_items(self._workdir, step)
        if "state" not in have:
            raise ConfigError(f"{self._dir / str(step)} holds no train state "
                              f"(items: {sorted(have) or 'none'}); delete it or use another workdir")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            if "data" not in have:
                raise ConfigError(f"{self._dir / str(step)} has no data iterator "
                                  "state, so training cannot resume its data order; use a new workdir")
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self._mgr.restore(step, args=ocp.args.Composite(**items)).state

    def close(self) -> None:
        """Waits for the writes and manifests; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._mgr.wait_until_finished()
        try:
            self._seal(wait=True)
        finally:
            self._mgr.close()
            if self._sealer is not None:
                self._sealer.shutdown()


def save_params(workdir, params, cfg, step: int = 0) -> None:
    """A params-only checkpoint plus config.json: the start point of a later `olmoe train`."""
    save_config(workdir, cfg)
    mgr = _manager(workdir, read_only=False)
    try:
        mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
        mgr.wait_until_finished()
    finally:
        mgr.close()
    if jax.process_index() == 0:
        integrity.write_manifest(_ckpt_dir(workdir) / str(step))


def newest_intact_step(workdir) -> int:
    """The step a read without an explicit step uses (skipped steps named on stderr)."""
    return _restore_newest(workdir, lambda s: None)[0]


def load_params(workdir, step: int | None = None, *, shardings: Any = None):
    """Params from a params-only or a full training checkpoint (the newest intact one when step
    is None): `load_params_and_step(...)[1]`."""
    return load_params_and_step(workdir, step, shardings=shardings)[1]


def load_params_and_step(workdir, step: int | None = None, *, shardings: Any = None) -> tuple[int, Any]:
    """(step, params) from a params-only or a full training checkpoint, verified (module doc).

    shardings: a params-shaped tree of Shardings to place them with (e.g.
    `transformer.param_shardings(cfg, mesh)`); default: all on this process's first device
    (in a multi-process run, pass shardings: a replicated or sharded layout over the mesh).
    """
    cfg = load_config(workdir)
    if not checkpoint_steps(workdir):
        raise ConfigError(f"{_ckpt_dir(workdir)} holds no checkpoint; train or import one first")
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: one, transformer.abstract_params(cfg))
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          transformer.abstract_params(cfg), shardings)
    mgr = _manager(workdir, read_only=True)

    def restore(s: int):
        if "params" in step_items(workdir, s):
            return mgr.restore(s, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
        # A training checkpoint: read only the params out of the saved TrainState.
        item = {"params": target}
        args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                      partial_restore=True)
        return mgr.restore(s, args=ocp.args.Composite(state=args)).state["params"]

    try:
        return _restore_newest(workdir, restore, step=step)
    finally:
        mgr.close()
