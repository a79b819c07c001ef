"""Training curves from a workdir's metrics.jsonl: the training loss and validation losses
by step, for `olmoe plot` and the reproduction report."""
from __future__ import annotations

import json
from pathlib import Path

from olmoe_jax.data.errors import DataError


def read_metrics(workdir: str) -> list[dict]:
    """The records of `<workdir>/metrics.jsonl` of the latest run in it (a resumed run appends
    a new `start` record; steps recorded twice keep the later value)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist; is {workdir} a training workdir?")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}:{n}: not JSON; the file is damaged") from None
    return out


def series(workdir: str, metric: str = "loss") -> tuple[list[int], list[float]]:
    """(steps, values) of one metric: a key of the `train` records (loss, ce_loss, lb_loss,
    z_loss, grad_norm, lr, ...) or `val/<domain>` / `val/mean` from the `eval` records."""
    by_step: dict[int, float] = {}
    for rec in read_metrics(workdir):
        if metric.startswith("val/") and rec.get("kind") == "eval":
            val = rec["val_loss"]
            domain = metric[4:]
            v = sum(val.values()) / len(val) if domain == "mean" and val else val.get(domain)
        elif rec.get("kind") == "train":
            v = rec.get(metric)
        else:
            continue
        if isinstance(v, (int, float)):
            by_step[int(rec["step"])] = float(v)
    if not by_step:
        raise DataError(f"{workdir}/metrics.jsonl has no values of {metric!r}; try loss, ce_loss, "
                        "lb_loss, grad_norm or val/<domain>, val/mean")
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]
