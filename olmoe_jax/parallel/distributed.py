"""Joining a multi-process JAX run: `initialize_from_env_or_flags`, before the backend starts.

JAX's multi-controller runtime runs one process per host (TPU pods) or per GPU (SLURM); all
processes run the same program and `jax.devices()` lists every device of every process.
`jax.distributed.initialize` must come before anything touches the backend
(`jax.devices()`, a first array); importing jax alone does not.

How a process learns its place, first match wins:
1. explicit: `--coordinator HOST:PORT --num-processes N --process-id I` (the `olmoe` flags), or
   the same three in OLMOE_JAX_COORDINATOR / OLMOE_JAX_NUM_PROCESSES / OLMOE_JAX_PROCESS_ID
   (what `olmoe launch local` sets). On CPU the collectives go through gloo.
2. OLMOE_JAX_DISTRIBUTED=off: a single process, whatever the environment says;
   OLMOE_JAX_DISTRIBUTED=jax: `jax.distributed.initialize()` and jax's own detection
   (GKE, Kubernetes, Open MPI, ...).
3. a SLURM job step of more than one task (srun): jax's SLURM detection (coordinator on the
   step's first node, one process per task; each task sees GPU number SLURM_LOCALID).
4. a Cloud TPU VM (TPU chips on the PCI bus): jax's TPU detection (the slice's worker list
   from the VM metadata; every host of the slice joins).
5. otherwise a single process: nothing to do.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax

from olmoe_jax.config import ConfigError

ENV_COORDINATOR = "OLMOE_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "OLMOE_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "OLMOE_JAX_PROCESS_ID"
ENV_MODE = "OLMOE_JAX_DISTRIBUTED"  # off | jax | unset (detect)
ENV_TIMEOUT = "OLMOE_JAX_INIT_TIMEOUT"  # seconds to wait for every process to join (default 300)
MODES = ("off", "jax")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process joins. how: single | explicit | slurm | tpu | jax; the three fields
    are set for `explicit` only (the detected kinds leave them to jax)."""
    how: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not an integer") from None


def _tpu_chips() -> int:
    """TPU chips on this host's PCI bus (no backend start, no network)."""
    try:
        from jax._src import hardware_utils  # pylint: disable=import-outside-toplevel
        return hardware_utils.num_available_tpu_chips_and_device_id()[0]
    except Exception:  # pylint: disable=broad-except  # a private API: treat a change as "no TPU"
        return 0


def plan(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
         env: Mapping[str, str] | None = None, tpu_chips: int | None = None) -> Plan:
    """Decides how this process joins (module docstring), from flags and `env` (default:
    os.environ); `tpu_chips` overrides the PCI probe. ConfigError for a half-given or
    inconsistent explicit setting."""
    env = os.environ if env is None else env
    given = {
        "--coordinator": coordinator if coordinator is not None else env.get(ENV_COORDINATOR),
        "--num-processes": num_processes if num_processes is not None else env.get(ENV_NUM_PROCESSES),
        "--process-id": process_id if process_id is not None else env.get(ENV_PROCESS_ID),
    }
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ConfigError(f"a multi-process run needs --coordinator, --num-processes and --process-id "
                              f"(or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); "
                              f"missing {', '.join(missing)}")
        addr = str(given["--coordinator"])
        host, _, port = addr.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--coordinator {addr!r} is not HOST:PORT (e.g. 127.0.0.1:12345)")
        n = _int(given["--num-processes"], "--num-processes")
        i = _int(given["--process-id"], "--process-id")
        if n < 1 or not 0 <= i < n:
            raise ConfigError(f"--process-id {i} must be in [0, --num-processes {n})")
        return Plan("single") if n == 1 else Plan("explicit", addr, n, i)
    mode = env.get(ENV_MODE, "")
    if mode and mode not in MODES:
        raise ConfigError(f"{ENV_MODE}={mode!r}; use one of {', '.join(MODES)} or leave it unset")
    if mode == "off":
        return Plan("single")
    if mode == "jax":
        return Plan("jax")
    if env.get("SLURM_STEP_NODELIST") and _int(env.get("SLURM_NTASKS", "1"), "SLURM_NTASKS") > 1:
        return Plan("slurm")
    platforms = env.get("JAX_PLATFORMS", "")
    if (not platforms or "tpu" in platforms) and (_tpu_chips() if tpu_chips is None else tpu_chips) > 0:
        return Plan("tpu")
    return Plan("single")


def initialize(p: Plan, *, timeout_s: int | None = None) -> None:
    """Joins the run as `p` says (a no-op for a single process). Must run before the
    backend starts; ConfigError if it already has (nothing can be joined then)."""
    if p.how == "single":
        return
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    if xla_bridge.backends_are_initialized():
        raise ConfigError(f"jax.distributed cannot start ({p.how}): the JAX backend is already running; "
                          "initialize before anything calls jax.devices() or creates an array")
    timeout_s = timeout_s or _int(os.environ.get(ENV_TIMEOUT, "300"), ENV_TIMEOUT)
    if p.how == "explicit":
        # Explicit runs include N processes on one CPU host (`olmoe launch local`); on other
        # platforms this setting is unused.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=p.coordinator, num_processes=p.num_processes,
                                   process_id=p.process_id, initialization_timeout=timeout_s)
    else:  # slurm, tpu, jax: jax's cluster detection fills in all three
        jax.distributed.initialize(initialization_timeout=timeout_s)


def initialize_from_env_or_flags(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> Plan:
    """`initialize(plan(...))`: the one call the `olmoe` command makes before its subcommand
    runs. Returns the plan it followed."""
    p = plan(coordinator, num_processes, process_id)
    initialize(p)
    return p
