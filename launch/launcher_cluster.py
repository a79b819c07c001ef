"""`olmoe launch tpu` and `olmoe launch slurm`: the commands and job scripts they run, as text.

Both start `olmoe COMMAND ...` once per host (TPU) or per GPU (SLURM) with
OLMOE_JAX_DISTRIBUTED=jax, so every process joins the run through jax's own cluster
detection (olmoe_jax/parallel/distributed.py): on a Cloud TPU VM the slice's worker list from
the VM metadata, under srun the SLURM_* variables of the job step.

A sweep is a list of commands. Side by side ("sub-slices"):
- TPU: one queue per TPU slice named with --tpu (e.g. several queued resources); each slice
  runs its share of the commands one after another on all of its hosts. One slice is never
  split: jax on a Cloud TPU slice joins every host of it.
- SLURM: the job's nodes split into K equal groups; each group runs its share one after
  another, as `srun` job steps on its nodes (`--exclusive`: steps get disjoint nodes).
"""
from __future__ import annotations

import shlex

from olmoe_jax.parallel import distributed

JOIN = f"{distributed.ENV_MODE}=jax"


def deal(commands: list[list[str]], k: int) -> list[list[list[str]]]:
    """Commands dealt round-robin into k queues: queue g gets commands g, g+k, g+2k, ..."""
    return [commands[g::k] for g in range(k)]


def cd(directory: str) -> str:
    """`cd DIR`, quoted for the shell, keeping a leading ~/ expandable."""
    if directory.startswith("~/"):
        return f"cd ~/{shlex.quote(directory[2:])}"
    return f"cd {shlex.quote(directory)}"


def sequence(lines: list[str]) -> str:
    """Shell text running the lines one after another, every one even after a failure, and
    exiting with the last nonzero status (0 if all succeeded)."""
    if len(lines) == 1:
        return lines[0]
    return "; ".join(["rc=0"] + [f"{line} || rc=$?" for line in lines] + ["exit $rc"])


def tpu_remote_command(commands: list[list[str]], *, olmoe: str = "olmoe", remote_dir: str | None = None,
                       setup: str | None = None) -> str:
    """The shell command every worker of one slice runs: its commands one after another."""
    runs = sequence([f"{JOIN} {olmoe} {shlex.join(c)}" for c in commands])
    prefix = [cd(remote_dir)] if remote_dir else []
    prefix += [setup] if setup else []
    return " && ".join(prefix + [runs if len(commands) == 1 else f"( {runs} )"])


def tpu_argv(tpu: str, zone: str, project: str | None, remote: str) -> list[str]:
    """`gcloud compute tpus tpu-vm ssh` running `remote` on every worker of the slice."""
    argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}"]
    if project:
        argv.append(f"--project={project}")
    return argv + ["--worker=all", "--command", remote]


def slurm_script(commands: list[list[str]], *, nodes: int, gpus_per_node: int, sub_slices: int = 1,
                 job_name: str = "olmoe", partition: str | None = None, account: str | None = None,
                 time_limit: str | None = None, cpus_per_task: int | None = None, olmoe: str = "olmoe",
                 remote_dir: str | None = None, setup: str | None = None, output: str = "%x-%j.out") -> str:
    """An sbatch script running the commands on `nodes` nodes, one process per GPU, the nodes
    split into `sub_slices` groups that each run their share of the commands in turn."""
    n = nodes // sub_slices
    head = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={nodes}",
            f"#SBATCH --ntasks-per-node={gpus_per_node}", f"#SBATCH --gpus-per-node={gpus_per_node}"]
    for key, value in (("cpus-per-task", cpus_per_task), ("partition", partition), ("account", account),
                       ("time", time_limit)):
        if value:
            head.append(f"#SBATCH --{key}={value}")
    head += [f"#SBATCH --output={output}",
             "# Written by `olmoe launch slurm`. One process per GPU: jax's SLURM detection takes the",
             "# process count from SLURM_NTASKS, the rank from SLURM_PROCID, the GPU from SLURM_LOCALID",
             "# and the coordinator from the step's first node.",
             "set -u"]
    if remote_dir:
        head.append(cd(remote_dir))
    if setup:
        head.append(setup)
    head.append(f"export {JOIN}")
    step = (f"srun --nodes={n} --ntasks-per-node={gpus_per_node} --gpus-per-node={gpus_per_node}"
            + (" --exclusive" if sub_slices > 1 else "") + f" {olmoe} ")
    queues = deal(commands, sub_slices)
    if sub_slices == 1:
        body = ["status=0"] + [f"{step}{shlex.join(c)} || status=$?" for c in queues[0]]
    else:
        body = ["status=0", "pids=()"]
        for g, queue in enumerate(queues):
            body += [f"(  # nodes group {g}: {len(queue)} run(s)", "  rc=0"]
            body += [f"  {step}{shlex.join(c)} || rc=$?" for c in queue]
            body += ["  exit $rc", ") &", "pids+=($!)"]
        body.append('for pid in "${pids[@]}"; do wait "$pid" || status=$?; done')
    return "\n".join(head + body + ["exit $status"]) + "\n"


def slurm_submit_text(script: str, path: str) -> str:
    """What `olmoe launch slurm` does, as shell: write the script to `path`, submit it."""
    return f"cat > {shlex.quote(path)} <<'OLMOE_SBATCH'\n{script}OLMOE_SBATCH\nsbatch {shlex.quote(path)}\n"
