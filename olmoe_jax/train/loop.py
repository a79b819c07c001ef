"""The training loop: `train(cfg, workdir)` runs or resumes one training run in a workdir.

Everything that can be wrong with the input (config, mesh vs devices, data, an incompatible
workdir) is checked before anything compiles or writes. A workdir holding a training
checkpoint is resumed from its newest one (train state and data iterator); one holding only
a params checkpoint (import-hf, upcycle) starts from those params with a fresh optimizer.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterator

import jax
import ml_collections
from jax.experimental import multihost_utils
import numpy as np

from olmoe_jax.config import ConfigError, validate
from olmoe_jax.eval.perplexity import evaluate, format_val_table  # noqa: F401  (loop.evaluate kept)
from olmoe_jax.model import transformer
from olmoe_jax.parallel.mesh import make_mesh
from olmoe_jax.train import checkpoint as ckpt_lib
from olmoe_jax.train import metrics as metrics_lib
from olmoe_jax.train import preemption
from olmoe_jax.train import step as step_lib
from olmoe_jax.train.optimizer import first_schedule_difference, schedule_length

# Keys that may change between a run and its resumption: how long, how often, where and on
# which mesh (Orbax reshards the state; data.batch_size, global, stays, so the data iterator's
# position means the same batches), not what is trained; and the anneal (the recipe's last
# phase), as long as the updates already done keep their lr. Changes are recorded in metrics.jsonl.
SCHEDULE_KEYS = frozenset({"optim.anneal_start_step", "optim.anneal_steps", "optim.decay_steps"})
RESUMABLE_KEYS = frozenset({
    "train.steps", "train.log_every", "train.eval_every", "train.ckpt_every", "train.keep_ckpts",
    "train.keep_every", "train.workdir", "train.nonfinite", "train.max_skips", "train.microbatches",
    "mesh.data", "mesh.fsdp", "mesh.expert", "mesh.tensor",
}) | SCHEDULE_KEYS


@dataclasses.dataclass
class Data:
    """What the loop consumes. train_iter: a grain DatasetIterator of this process's batches
    {inputs, targets int32 [B, T], loss_mask float32 [B, T]} (checkpointed with the state);
    eval_batches: {domain: [batches]}; unigram_entropy: {domain: nats/token}, for reference."""
    train_iter: Iterator[dict[str, np.ndarray]]
    eval_batches: dict[str, list[dict[str, np.ndarray]]]
    unigram_entropy: dict[str, float]


def _flat(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> list[str]:
    """Dotted keys whose values differ, as 'key: old -> new', sorted."""
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def workdir_mode(cfg, workdir) -> str:
    """'resume' (a training checkpoint exists), 'params' (only a params checkpoint) or 'new'.

    ConfigError, before anything is written, when resuming would change anything but the
    cadence keys (RESUMABLE_KEYS), or when the params checkpoint's shapes do not fit cfg.
    """
    wd = ckpt_lib.workdir_path(workdir)
    if wd.exists() and not wd.is_dir():
        raise ConfigError(f"workdir {workdir} is a file; pass a directory with --workdir")
    steps = ckpt_lib.checkpoint_steps(workdir)
    if not steps:
        return "new"  # a config.json without checkpoints (a run stopped early) is overwritten
    old = ckpt_lib.load_config(workdir)
    full = [s for s in steps if "state" in ckpt_lib.step_items(workdir, s)]
    if full:
        diff = [d for d in config_diff(old, cfg) if d.split(":")[0] not in RESUMABLE_KEYS]
        if diff:
            raise ConfigError(
                f"{workdir} holds a run with a different config, so it cannot be resumed: "
                + "; ".join(diff) + ". Use a new --workdir, or only change "
                + ", ".join(sorted(RESUMABLE_KEYS - {'train.workdir'})))
        changed = {d.split(":")[0] for d in config_diff(old, cfg)}
        if changed & SCHEDULE_KEYS:
            _check_schedule_change(old, cfg, max(full), workdir)
        return "resume"
    diff = param_shape_changes(old, cfg)
    if diff:
        raise ConfigError(f"the params checkpoint in {workdir} does not fit this model: "
                          + "; ".join(diff) + ". Set these model keys to the checkpoint's values")
    return "params"


def param_shape_changes(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict, *,
                        dtypes: bool = True) -> list[str]:
    """The model keys ('key: old -> new') whose change makes params of `old` not fit `new`
    (another shape, set of weights, or with `dtypes` dtype), found by applying each change
    alone to `old`; [] when the params fit. The one source for every "these keys would change
    the weights" check (resuming from a params checkpoint, upcycling)."""
    def _param_shapes(cfg):
        return jax.tree.map(lambda s: (s.shape, s.dtype) if dtypes else s.shape, transformer.abstract_params(cfg))

    ref = _param_shapes(old)
    model_diff = [d for d in config_diff(old, new) if d.startswith("model.")]
    out = []
    for d in model_diff:
        key = d.split(":")[0].split(".")[1]
        probe = ml_collections.ConfigDict(old.to_dict())
        with probe.model.ignore_type():
            probe.model[key] = new.model[key]
        if _param_shapes(probe) != ref:
            out.append(d)
    if not out and _param_shapes(new) != ref:
        return model_diff  # only changes together alter the weights: name them all
    return out


def _check_schedule_change(old, cfg, done: int, workdir) -> None:
    """ConfigError unless the new schedule gives every update already done its old lr."""
    first = first_schedule_difference(old, cfg, done)
    if first is None:
        return
    hint = (f"the run decayed over {schedule_length(old)} steps and this config over "
            f"{schedule_length(cfg)}: set optim.decay_steps={schedule_length(old)}"
            if schedule_length(old) != schedule_length(cfg) else
            f"start the anneal at or after step {done} (optim.anneal_start_step)")
    raise ConfigError(f"{workdir} is at step {done}, but the new optim.anneal_*/decay_steps change the lr of "
                      f"update {first + 1}, which is already done; {hint}")


def _preflight(cfg, workdir) -> tuple[ml_collections.ConfigDict, str]:
    cfg = validate(cfg, num_devices=jax.device_count())
    return cfg, workdir_mode(cfg, workdir)


def train(cfg, workdir) -> dict[str, Any]:
    """Trains (or resumes) `cfg` in `workdir` on the configured data; returns train_on's summary."""
    cfg, _ = _preflight(cfg, workdir)
    from olmoe_jax import data as data_lib  # pylint: disable=import-outside-toplevel
    data_lib.check_data(cfg)
    tok = data_lib.make_tokenizer(cfg)
    where = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    data = Data(train_iter=data_lib.make_train_iterator(cfg, tok, **where),
                eval_batches=data_lib.make_eval_batches(cfg, tok, **where),
                unigram_entropy=data_lib.unigram_entropy(cfg, tok))
    return train_on(cfg, workdir, data)


def train_on(cfg, workdir, data: Data) -> dict[str, Any]:
    """The loop, on given data. Returns {step, start_step, train_loss, val_loss {domain: nats},
    unigram_entropy, tokens_per_s (excluding the first step's compile), mfu, wall_s}."""
    t_start = time.perf_counter()
    cfg, mode = _preflight(cfg, workdir)
    if jax.process_count() > 1:
        # Every process must judge the workdir before any of them writes to it: the Orbax
        # managers made per what it holds are collective (barriers), and must match.
        multihost_utils.sync_global_devices("olmoe_jax:workdir_mode")
    t = cfg.train
    mesh = make_mesh(cfg)
    shardings = step_lib.state_shardings(cfg, mesh)
    ckpt = ckpt_lib.Checkpointer(workdir, keep=t.keep_ckpts, save_every=t.ckpt_every,
                                 keep_every=t.keep_every or None)
    writer = None
    changes: list[str] = []
    try:
        if mode == "resume":
            changes = config_diff(ckpt_lib.load_config(workdir), cfg)  # only RESUMABLE_KEYS here
            _, state = ckpt.restore_latest(step_lib.abstract_state(cfg, shardings), data.train_iter)
        elif mode == "params":
            params = ckpt_lib.load_params(workdir, shardings=shardings.params)
            state = step_lib.state_from_params(cfg, params, shardings)
        else:
            state = step_lib.init_state(cfg, shardings)
        ckpt_lib.save_config(workdir, cfg)
        writer = metrics_lib.MetricsWriter(workdir, total_steps=t.steps,
                                           start_step=int(jax.device_get(state.step)))
        if changes:
            writer.record({"kind": "config_change", "step": int(jax.device_get(state.step)), "changes": changes})
        with preemption.PreemptionWatch() as watch:
            return _loop(cfg, workdir, data, mesh, shardings, state, ckpt, writer, t_start, watch)
    finally:  # also on a crash mid-run: the progress bar and metric files are closed
        if writer is not None:
            writer.close()
        ckpt.close()


def _loop(cfg, workdir, data: Data, mesh, shardings, state, ckpt, writer, t_start, watch) -> dict[str, Any]:
    t = cfg.train
    train_step = step_lib.make_train_step(cfg, mesh, shardings)
    eval_step = step_lib.make_eval_step(cfg, mesh, shardings.params)
    start = int(jax.device_get(state.step))
    flops_per_token = metrics_lib.model_flops_per_token(cfg)
    peak, peak_how = metrics_lib.peak_flops(cfg)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    writer.record({"kind": "setup", "step": start, "mesh": dict(mesh.shape),
                   "params": transformer.count_params(cfg), "model_flops_per_token": flops_per_token,
                   "peak_flops": peak, "peak_flops_source": peak_how})
    if start:
        writer.message(f"resumed from step {start} in {workdir}")

    if start >= t.steps:
        writer.message(f"{workdir} is at step {start}, train.steps={t.steps}: nothing to train; "
                       "raise train.steps to continue")

    pending: list[dict] = []
    timed_steps, timed_s = 0, 0.0  # steps after the first (compile) one, for throughput
    t_log, last_log = None, start
    paused = 0.0  # seconds of evaluation and checkpointing inside the current log interval
    scalars: dict[str, float] = {}
    val: dict[str, float] = {}
    skips = _Skips(t)
    for s in range(start + 1, t.steps + 1):
        try:
            host_batch = next(data.train_iter)
        except StopIteration:
            from olmoe_jax.data.errors import DataError  # pylint: disable=import-outside-toplevel
            raise DataError(f"the training data ran out at step {s} of train.steps={t.steps}; "
                            "lower train.steps or add data") from None
        state, m = train_step(state, step_lib.global_batch(host_batch, mesh))
        pending.append(m)
        skips.add(s, m)
        ckpt.poll()
        log_now = t_log is not None and (s % t.log_every == 0 or s == t.steps)
        if t_log is None:  # the first step compiles: start the clock after it
            jax.block_until_ready(m)
            t_log, last_log, pending = time.perf_counter(), s, []
        elif log_now:
            skipped = skips.check()  # device_get: waits for the steps
            scalars, layers = metrics_lib.summarize(skips.finite(pending))
            scalars.update(skipped_steps=skipped, skipped_total=skips.total)
            now = time.perf_counter()
            n, dt = s - last_log, now - t_log - paused
            timed_steps, timed_s = timed_steps + n, timed_s + dt
            tps = n * tokens_per_step / dt
            scalars.update(tokens_per_s=tps, mfu=tps * flops_per_token / peak,
                           eta_s=(t.steps - s) * dt / n, step_s=dt / n)
            writer.train(s, scalars, layers)
            t_log, last_log, pending, paused = now, s, [], 0.0
        if watch.should_stop(s, sync_point=log_now):
            skips.check()  # a skipped-step limit passed before the signal still stops with its error
            ckpt.save(s, state, data.train_iter, force=True)
            ckpt.close()  # bounded exit: the write and its manifest finish here
            writer.message(f"stopped by {watch.signal_name} after step {s}; saved it in {workdir}. "
                           "Run the same command to resume")
            writer.record({"kind": "preempted", "step": s, "signal": watch.signal_name})
            return {"step": s, "start_step": start, "preempted": watch.signal_name,
                    "wall_s": time.perf_counter() - t_start}
        do_eval = s % t.eval_every == 0 and s != t.steps and bool(data.eval_batches)
        if do_eval or ckpt.should_save(s):
            # Let the dispatched train steps finish first, so only eval / save time is paused.
            jax.block_until_ready(state)
            skips.check()  # never save after a step that must stop the run
            t0 = time.perf_counter()
            if do_eval:
                writer.eval(s, evaluate(eval_step, state.params, data.eval_batches, mesh))
            ckpt.save(s, state, data.train_iter)
            paused += time.perf_counter() - t0
    skips.check()
    ckpt.save(int(jax.device_get(state.step)), state, data.train_iter, force=True)
    if data.eval_batches:
        val = evaluate(eval_step, state.params, data.eval_batches, mesh)
        writer.eval(int(jax.device_get(state.step)), val)
        writer.message(format_val_table(val, data.unigram_entropy))
    tps = timed_steps * tokens_per_step / timed_s if timed_s else None
    summary = {
        "step": int(jax.device_get(state.step)), "start_step": start,
        "train_loss": scalars.get("loss"), "val_loss": val, "unigram_entropy": dict(data.unigram_entropy),
        "tokens_per_s": tps, "mfu": tps * flops_per_token / peak if tps else None,
        "wall_s": time.perf_counter() - t_start,
    }
    writer.record({"kind": "summary", **summary})
    return summary


class _Skips:
    """train.nonfinite applied on the host: each step's `nonfinite` flag stays on the device
    until the loop syncs anyway (log and checkpoint steps, the end), so no step waits for it."""

    def __init__(self, t):
        self._t = t
        self._flags: list[tuple[int, Any]] = []
        self.total = 0
        self.run = 0  # consecutive skipped steps up to the last checked one

    def add(self, step: int, metrics: dict) -> None:
        self._flags.append((step, metrics["nonfinite"]))

    def check(self) -> int:
        """Reads the unchecked flags; returns how many of those steps were skipped. Raises
        NonFiniteError when train.nonfinite=stop or the run of skips exceeds train.max_skips."""
        flags, self._flags = jax.device_get(self._flags), []
        skipped = 0
        for step, bad in flags:
            if not bad:
                self.run = 0
                continue
            skipped, self.total, self.run = skipped + 1, self.total + 1, self.run + 1
            if self._t.nonfinite == "stop" or self.run > self._t.max_skips:
                why = ("train.nonfinite=stop" if self._t.nonfinite == "stop"
                       else f"{self.run} in a row exceed train.max_skips={self._t.max_skips}")
                raise step_lib.NonFiniteError(
                    f"step {step} had a non-finite loss or gradient ({why}); its update was not applied "
                    "and nothing after it was saved, so the newest checkpoint is the last good state. "
                    "Look at the data near that step, lower optim.lr, or set train.nonfinite=skip")
        return skipped

    @staticmethod
    def finite(pending: list[dict]) -> list[dict]:
        """The steps' metrics without the skipped ones (their loss is NaN); all if none is left."""
        kept = [m for m in pending if not int(jax.device_get(m["nonfinite"]))]
        return kept or pending

