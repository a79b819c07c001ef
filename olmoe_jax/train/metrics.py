"""Training metrics: JSONL, TensorBoard event files, a progress bar; model FLOPs and MFU.

MFU = achieved model FLOP/s / peak FLOP/s. Model FLOPs per token follow PaLM (appendix B):
6 x the parameters a token multiplies by (active params, minus the input embedding, which
is a lookup, not a matmul) plus 12 x layers x heads x head_dim x seq_len for attention
scores and values (forward + backward, the full T x T, as PaLM counts it).

Peak FLOP/s: $OLMOE_PEAK_FLOPS (FLOP/s of all devices of the run together) when set; else
measured once at start with a square GEMM in the compute dtype on this process's first
device. On CPU the devices forced by --xla_force_host_platform_device_count share the same
cores, so the one-device measurement is the host's peak, multiplied by the process count
(one process per host); on accelerators it is multiplied by the device count. A measured GEMM is below the vendor's spec sheet, so this MFU reads higher
than one against spec-sheet peak; set OLMOE_PEAK_FLOPS to compare with published numbers.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from olmoe_jax.config import head_dim
from olmoe_jax.model import transformer
from olmoe_jax.train import paths


def model_flops_per_token(cfg) -> float:
    """Training FLOPs (forward + backward) per token of cfg's model at seq_len data.seq_len."""
    m = cfg.model
    _, active = transformer.count_params(cfg)
    lookup = 0 if m.tie_embeddings else m.vocab_size * m.d_model  # tied: it is also the head
    attention = 12 * m.num_layers * m.num_heads * head_dim(cfg) * cfg.data.seq_len
    return 6.0 * (active - lookup) + attention


def peak_flops(cfg) -> tuple[float, str]:
    """(peak FLOP/s of the run's devices, how it was obtained)."""
    env = os.environ.get("OLMOE_PEAK_FLOPS")
    if env:
        return float(env), "OLMOE_PEAK_FLOPS"
    device = jax.local_devices()[0]  # jax.devices()[0] belongs to process 0 only
    n = 1024 if device.platform == "cpu" else 8192
    dtype = jnp.dtype(cfg.model.compute_dtype)
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()  # compile
    reps = 5
    t = time.perf_counter()
    for _ in range(reps):
        out = matmul(a)
    out.block_until_ready()
    per_device = reps * 2 * n ** 3 / (time.perf_counter() - t)
    if device.platform == "cpu":
        hosts = jax.process_count()
        return per_device * hosts, f"measured {n}^3 {dtype.name} GEMM, host CPU" + (f" x {hosts} processes"
                                                                                    if hosts > 1 else "")
    return per_device * jax.device_count(), f"measured {n}^3 {dtype.name} GEMM x {jax.device_count()} devices"


def summarize(step_metrics: list[dict]) -> tuple[dict[str, float], dict[str, list]]:
    """Means over the steps of a log interval: (scalars, per-layer lists).

    Scalars: loss, ce_loss, lb_loss, z_loss, grad_norm, dropped_frac (mean of layers) and the
    lr of the last step. Per layer: expert_load [L][E] (share of routed slots), dropped_frac,
    lb_loss and z_loss [L].
    """
    host = jax.device_get(step_metrics)
    mean = lambda k: np.mean([h[k] for h in host], axis=0)  # noqa: E731
    scalars = {k: float(mean(k)) for k in ("loss", "ce_loss", "lb_loss", "z_loss", "grad_norm")
               if k in host[0]}
    scalars["lr"] = float(host[-1]["lr"])
    layers: dict[str, list] = {}
    if "expert_load" in host[0]:
        layers["expert_load"] = mean("expert_load").tolist()
        layers["dropped_frac"] = mean("dropped_frac").tolist()
        layers["lb_loss"] = mean("lb_loss_per_layer").tolist()
        layers["z_loss"] = mean("z_loss_per_layer").tolist()
        scalars["dropped_frac"] = float(np.mean(layers["dropped_frac"]))
    return scalars, layers


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch where torch is not loaded yet.

    tensorboardX imports torch whenever it is installed, only to accept torch tensors (we log
    numpy): 3.4 of a tiny CPU run's 16 s here. While `sys.modules["torch"]` is None, `import
    torch` raises ImportError, which tensorboardX catches; torch imports normally afterwards.
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Writes `<workdir>/metrics.jsonl` and `<workdir>/tb/` and shows progress (process 0 only).

    On a terminal: a tqdm bar (step, loss, tokens/s, ETA). Otherwise: one plain line per log.
    """

    def __init__(self, workdir, *, total_steps: int, start_step: int):
        self._on = jax.process_index() == 0
        self._total = total_steps
        if not self._on:
            return
        SummaryWriter = _summary_writer_class()  # pylint: disable=invalid-name
        workdir = paths.workdir_path(workdir)  # gs:// too
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = paths.open_append(workdir / "metrics.jsonl")
        self._tb = SummaryWriter(str(workdir / "tb"))
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm  # pylint: disable=import-outside-toplevel
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.record({"kind": "start", "step": start_step, "total_steps": total_steps})

    def record(self, obj: dict[str, Any]) -> None:
        """Appends one JSON line; every line carries its wall-clock time (unix seconds)."""
        if self._on:
            self._jsonl.write(json.dumps({**obj, "time": time.time()}) + "\n")
            self._jsonl.flush()

    def train(self, step: int, scalars: dict[str, float], layers: dict[str, list]) -> None:
        """One log point: scalars (incl. tokens_per_s, mfu, eta_s) and per-layer lists."""
        if not self._on:
            return
        self.record({"kind": "train", "step": step, **scalars, **{f"{k}_per_layer": v for k, v in layers.items()}})
        for k, v in scalars.items():
            self._tb.add_scalar(f"train/{k}", v, step)
        for layer, load in enumerate(layers.get("expert_load", [])):
            load = np.asarray(load)
            # Max share x E: 1.0 is perfectly balanced, E means one expert takes every slot.
            self._tb.add_histogram(f"expert_load/layer_{layer}", load, step)
            self._tb.add_scalar(f"expert_load_max/layer_{layer}", float(load.max() * load.size), step)
        for layer, frac in enumerate(layers.get("dropped_frac", [])):
            self._tb.add_scalar(f"dropped_frac/layer_{layer}", frac, step)
        line = (f"loss {scalars['loss']:.4f}  {scalars.get('tokens_per_s', 0):,.0f} tok/s  "
                f"mfu {scalars.get('mfu', 0):.1%}  lr {scalars['lr']:.2e}")
        if self._bar is not None:
            self._bar.set_postfix_str(line, refresh=False)
            self._bar.update(step - self._bar.n)
        else:
            eta = scalars.get("eta_s")
            eta_txt = f"  eta {_hms(eta)}" if eta is not None else ""
            print(f"step {step}/{self._total}  {line}{eta_txt}", flush=True)

    def eval(self, step: int, losses: dict[str, float]) -> None:
        if not self._on:
            return
        self.record({"kind": "eval", "step": step, "val_loss": losses})
        for domain, loss in losses.items():
            self._tb.add_scalar(f"val/{domain}", loss, step)
        self.message(f"step {step}  val loss " + "  ".join(f"{d} {v:.4f}" for d, v in losses.items()))

    def message(self, text: str) -> None:
        if not self._on:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self._on:
            return
        if self._bar is not None:
            self._bar.close()
        self._tb.close()
        self._jsonl.close()


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
