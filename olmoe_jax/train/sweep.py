"""Sweeps: many training runs, one after another, each in its own workdir under one folder.

A sweep folder holds `sweep.json` (the plan: every run's id, experiment, overrides and
config), `runs/<id>/` (an ordinary workdir of `loop.train`, plus `result.json` once finished),
and the summary: `summary.json`, `summary.md` and `loss_curves.png`. Running a sweep again
skips finished runs and resumes an interrupted one from its last checkpoint (loop.train's own
resume); a folder holding a different plan is refused.

Grid axes (`grid_points`): `KEY=V1,V2,...` is one axis; several axes multiply (every
combination); keys joined by ':' move together (a zip): `model.num_experts:model.top_k=8:1,32:4`
gives two points, (8, 1) and (32, 4).
"""
from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import ml_collections

from olmoe_jax.config import ConfigError, apply_overrides, from_json
from olmoe_jax.io import atomic_write_bytes, atomic_write_text

PLAN = "sweep.json"
RESULT = "result.json"


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep: `id` names its workdir (runs/<id>); overrides are applied in order
    to the experiment's config."""
    id: str
    experiment: str
    overrides: tuple[str, ...]
    cfg: ml_collections.ConfigDict = dataclasses.field(compare=False, repr=False)


def grid_points(axes: Sequence[str]) -> list[tuple[str, ...]]:
    """Each point of the grid as a tuple of `key=value` overrides (see the module doc)."""
    parsed = []
    for axis in axes:
        if "=" not in axis:
            raise ConfigError(f"grid axis {axis!r}: expected KEY=V1,V2 or KEY1:KEY2=A1:B1,A2:B2")
        keys, values = axis.split("=", 1)
        keys = keys.split(":")
        points = []
        for value in values.split(","):
            parts = value.split(":") if len(keys) > 1 else [value]
            if len(parts) != len(keys) or not value:
                raise ConfigError(f"grid axis {axis!r}: value {value!r} needs {len(keys)} ':'-separated parts, "
                                  f"one per key ({':'.join(keys)})")
            points.append(tuple(f"{k}={v}" for k, v in zip(keys, parts)))
        parsed.append(points)
    return [tuple(itertools.chain.from_iterable(p)) for p in itertools.product(*parsed)]


def point_id(point: Sequence[str]) -> str:
    """A workdir-safe name for a grid point: model.top_k=4 -> top_k=4."""
    return ",".join(f"{kv.split('=', 1)[0].rsplit('.', 1)[-1]}={kv.split('=', 1)[1]}" for kv in point)\
        .replace("/", "_").replace(" ", "")


def expand(bases: Sequence[tuple[str, str, ml_collections.ConfigDict]], axes: Sequence[str] = (),
           seeds: int = 1, overrides: Sequence[str] = ()) -> list[Run]:
    """Runs for every base x grid point x seed. bases: (id, experiment name, its config);
    `overrides` apply to every run first, then the point's, then train.seed (seeds > 1)."""
    runs = []
    for base_id, experiment, base_cfg in bases:
        for point in grid_points(axes):
            for seed in range(seeds):
                extra = tuple(overrides) + point + ((f"train.seed={seed}",) if seeds > 1 else ())
                rid = "__".join([base_id] + ([point_id(point)] if point else [])
                                + ([f"seed{seed}"] if seeds > 1 else []))
                cfg = apply_overrides(ml_collections.ConfigDict(base_cfg.to_dict()), extra)
                runs.append(Run(rid, experiment, extra, cfg))
    ids = [r.id for r in runs]
    if len(set(ids)) != len(ids):
        raise ConfigError("the sweep names two runs alike; give the experiments or grid values distinct names")
    return runs


def workdir(out, run: Run) -> str:
    return os.path.join(out, "runs", run.id)


def _plan_record(runs: Sequence[Run]) -> list[dict[str, Any]]:
    return [{"id": r.id, "experiment": r.experiment, "overrides": list(r.overrides)} for r in runs]


def _writer() -> bool:
    """Only process 0 writes the sweep's own files (every process of a multi-host run trains)."""
    import jax  # pylint: disable=import-outside-toplevel
    return jax.process_index() == 0


def write_plan(out, runs: Sequence[Run]) -> None:
    """Writes sweep.json, or ConfigError if `out` holds a different sweep."""
    path = Path(out) / PLAN
    plan = _plan_record(runs)
    if path.exists():
        old = json.loads(path.read_text())["runs"]
        if old != plan:
            raise ConfigError(f"{out} holds a different sweep ({len(old)} runs: "
                              f"{', '.join(r['id'] for r in old[:4])}{', ...' if len(old) > 4 else ''}); "
                              "use another --out, or the same command as before")
        return
    if not _writer():
        return
    record = {"runs": plan, "configs": {r.id: r.cfg.to_dict() for r in runs}}
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")


def load_plan(out) -> list[Run]:
    """The runs of the sweep folder `out` (ConfigError if it holds none)."""
    path = Path(out) / PLAN
    if not path.exists():
        raise ConfigError(f"{out} holds no sweep ({PLAN} is missing); start one with `olmoe sweep ... --out {out}`")
    record = json.loads(path.read_text())
    return [Run(r["id"], r["experiment"], tuple(r["overrides"]),
                from_json(json.dumps(record["configs"][r["id"]]), f"{path} run {r['id']}"))
            for r in record["runs"]]


def run_state(out, run: Run) -> tuple[str, int]:
    """('done' | 'partial' | 'pending', the newest checkpoint step or 0)."""
    from olmoe_jax.train.checkpoint import checkpoint_steps  # pylint: disable=import-outside-toplevel
    wd = workdir(out, run)
    steps = checkpoint_steps(wd)
    if os.path.exists(os.path.join(wd, RESULT)):
        return "done", steps[-1] if steps else 0
    return ("partial", steps[-1]) if steps else ("pending", 0)


def run_sweep(out, runs: Sequence[Run], train_fn: Callable[[Any, str], dict], *,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Trains every run not yet finished, in order, with `train_fn(cfg, workdir)` (loop.train);
    writes each run's result.json and refreshes the summary after each. Returns the summary rows."""
    write_plan(out, runs)
    for i, run in enumerate(runs, start=1):
        state, step = run_state(out, run)
        if state == "done":
            continue
        wd = workdir(out, run)
        cfg = ml_collections.ConfigDict(run.cfg.to_dict())
        cfg.train.workdir = wd
        log(f"sweep {out}: run {i}/{len(runs)} {run.id}" + (f" (resuming at step {step})" if step else ""))
        summary = train_fn(cfg, wd)
        if _writer():
            atomic_write_text(os.path.join(wd, RESULT), json.dumps(summary, default=float, indent=1) + "\n")
            write_summary(out, runs)
    return write_summary(out, runs) if _writer() else summary_rows(out, runs)


def _records(wd: str) -> list[dict]:
    path = os.path.join(wd, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def summary_rows(out, runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per run: state, step, final validation loss per domain (nats/token) and their mean,
    final training cross-entropy, tokens/s of the last session that trained, wall seconds of all sessions, diverged
    (a non-finite train or validation loss anywhere), the curve [(step, cross-entropy)]."""
    rows = []
    for run in runs:
        state, step = run_state(out, run)
        records = _records(workdir(out, run))
        # Cross-entropy, not the total: arms with other router-loss weights compare fairly.
        train = [(r["step"], r.get("ce_loss", r["loss"])) for r in records if r.get("kind") == "train"]
        evals = [r for r in records if r.get("kind") == "eval"]
        sessions = [r for r in records if r.get("kind") == "summary"]
        val = evals[-1]["val_loss"] if evals else {}
        diverged = any(not _finite(loss) for _, loss in train) or any(
            not _finite(v) for r in evals for v in r["val_loss"].values())
        timed = [r for r in sessions if r.get("tokens_per_s")]  # a session with steps to time
        last = timed[-1] if timed else {}
        rows.append({
            "id": run.id, "experiment": run.experiment, "overrides": list(run.overrides), "state": state,
            "step": step, "steps": run.cfg.train.steps, "val_loss": val,
            "val_loss_mean": sum(val.values()) / len(val) if val else None,
            "train_ce": train[-1][1] if train else None, "tokens_per_s": last.get("tokens_per_s"),
            "wall_s": sum(r.get("wall_s") or 0.0 for r in sessions), "diverged": diverged, "curve": train,
        })
    return rows


def _fmt(x, spec=".4f") -> str:
    return "-" if x is None else ("nan" if not _finite(x) else format(x, spec))


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The summary table: one line per run, validation loss per domain."""
    domains = sorted({d for r in rows for d in r["val_loss"]})
    head = ["run", "state", "step"] + [f"val {d}" for d in domains] + ["val mean", "tok/s", "wall s", "diverged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["id"], r["state"], f"{r['step']}/{r['steps']}"] + [_fmt(r["val_loss"].get(d)) for d in domains]
        cells += [_fmt(r["val_loss_mean"]), _fmt(r["tokens_per_s"], ",.0f"), _fmt(r["wall_s"], ".0f"),
                  "yes" if r["diverged"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(rows: Sequence[dict[str, Any]], path: str) -> None:
    """Training cross-entropy against step, one line per run, overlaid (PNG)."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if r["curve"]:
            steps, losses = zip(*r["curve"])
            ax.plot(steps, losses, label=r["id"], linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    if any(r["curve"] for r in rows):
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())


def write_summary(out, runs: Sequence[Run]) -> list[dict[str, Any]]:
    """summary.json (rows without the curves' points), summary.md and loss_curves.png in `out`."""
    rows = summary_rows(out, runs)
    plain = [{k: v for k, v in r.items() if k != "curve"} for r in rows]
    atomic_write_text(os.path.join(out, "summary.json"), json.dumps(plain, indent=1, default=float) + "\n")
    atomic_write_text(os.path.join(out, "summary.md"), markdown(rows))
    plot_curves(rows, os.path.join(out, "loss_curves.png"))
    return rows
