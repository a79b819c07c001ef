"""`olmoe launch {local,tpu,slurm} [options] -- COMMAND ...`: run any olmoe command line (a run,
a sweep) on N local processes, on every host of a TPU pod slice, or as a SLURM job.

  olmoe launch local --processes 2 --devices-per-process 4 -- train --experiment tiny_moe --workdir W
  olmoe launch tpu --tpu NAME --zone Z [--project P] [--dry-run] -- train --experiment olmoe_1b7b ...
  olmoe launch slurm --nodes 4 --gpus-per-node 8 [--partition P --time 24:00:00] [--dry-run] -- train ...

Several runs: `--commands FILE` (one olmoe command line per line; `#` comments). They run one
after another on the whole job, or side by side: `--sub-slices K` (local: K process groups;
slurm: K node groups) or several TPU slices (`--tpu A --tpu B`), each running its share
(commands dealt round-robin) in turn. `--dry-run` prints, as a bash script, exactly what
would run, and runs nothing.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from launch import launcher_cluster as cluster
from launch import launcher_local as local
from launch.cli import COMMANDS, UsageError

DISTRIBUTED = False  # this command starts processes; it does not join a run itself


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="where", metavar="WHERE", required=True)
    lp = sub.add_parser("local", help="N processes on this machine, CPU devices, collectives over gloo")
    lp.add_argument("--processes", type=int, required=True, help="processes in total")
    lp.add_argument("--devices-per-process", type=int, default=None,
                    help="CPU devices each process simulates (XLA_FLAGS=--xla_force_host_platform_device_count)")
    lp.add_argument("--port", type=int, default=None,
                    help="coordinator port of process group 0 (group g: PORT+g; default: a free port per run)")
    lp.add_argument("--init-timeout", type=int, default=60,
                    help="seconds every process may take to join (default 60)")
    tp = sub.add_parser("tpu", help="every host of a Cloud TPU slice, over gcloud compute tpus tpu-vm ssh")
    tp.add_argument("--tpu", action="append", required=True, metavar="NAME",
                    help="TPU VM (slice) name; repeat (or comma-separate) for slices running side by side")
    tp.add_argument("--zone", required=True)
    tp.add_argument("--project", default=None)
    sp = sub.add_parser("slurm", help="an sbatch job: srun, one process per GPU")
    sp.add_argument("--nodes", type=int, required=True)
    sp.add_argument("--gpus-per-node", type=int, required=True)
    sp.add_argument("--partition", default=None)
    sp.add_argument("--account", default=None)
    sp.add_argument("--time", dest="time_limit", default=None, metavar="HH:MM:SS")
    sp.add_argument("--cpus-per-task", type=int, default=None)
    sp.add_argument("--job-name", default="olmoe")
    sp.add_argument("--script", default=None, help="where to write the sbatch script (default: <job-name>.sbatch)")
    for p in (tp, sp):
        p.add_argument("--olmoe", default="olmoe", help="how the hosts invoke olmoe (default: olmoe)")
        p.add_argument("--remote-dir", default=None, help="cd here on the hosts first (a shared checkout)")
        p.add_argument("--setup", default=None, help="shell run on the hosts first, e.g. 'source venv/bin/activate'")
    for p in (lp, tp):
        p.add_argument("--log-dir", default=None,
                       help="where output goes that is not shown here (other processes, slices; default: a temp dir)")
    for p in (lp, sp):
        p.add_argument("--sub-slices", type=int, default=1, metavar="K",
                       help="split the processes (local) or nodes (slurm) into K groups running commands side by side")
    for p in (lp, tp, sp):
        p.add_argument("--commands", default=None, metavar="FILE", help="one olmoe command line per line")
        p.add_argument("--dry-run", action="store_true", help="print what would run, as a bash script; run nothing")
        p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...: the olmoe command line to run")


def parse_commands(command: list[str], commands_file: str | None) -> list[list[str]]:
    """The olmoe command lines to run (each without the leading `olmoe`); UsageError when
    there are none, both sources are given, or one names an unknown or nested command."""
    command = command[1:] if command[:1] == ["--"] else command
    if bool(command) == bool(commands_file):
        raise UsageError("give the olmoe command to run after `--` (e.g. -- train --experiment tiny_moe), "
                         "or --commands FILE, not both")
    if commands_file:
        text = Path(commands_file).read_text(encoding="utf-8")
        try:
            lines = [shlex.split(line, comments=True) for line in text.splitlines()]
        except ValueError as e:
            raise UsageError(f"{commands_file}: {e}") from None
        cmds = [c for c in lines if c]
    else:
        cmds = [command]
    cmds = [c[1:] if c[0] == "olmoe" else c for c in cmds]
    for c in cmds:
        where = f" in {commands_file}" if commands_file else ""
        if not c or c[0] not in COMMANDS or c[0] == "launch":
            raise UsageError(f"{shlex.join(c)!r}{where} is not an olmoe command; start it with one of "
                             + ", ".join(k for k in COMMANDS if k != "launch"))
    if not cmds:
        raise UsageError(f"{commands_file} holds no command")
    return cmds


def _groups(n: int, k: int, what: str, commands: list[list[str]]) -> None:
    if k < 1 or n % k:
        raise UsageError(f"--sub-slices {k} must divide {what} {n}")
    if k > len(commands):
        raise UsageError(f"--sub-slices {k} but only {len(commands)} command(s): a group would idle")


def _log_dir(args) -> str:
    """--log-dir, else a fresh folder name under the temp dir (created when a process starts)."""
    return args.log_dir or str(Path(tempfile.gettempdir()) / f"olmoe-launch-{os.getpid()}")


def local_queues(args, commands: list[list[str]]) -> list[list[list[local.Proc]]]:
    """The local launcher's queues: one per process group, a job of processes per command."""
    if args.processes < 1:
        raise UsageError(f"--processes {args.processes} must be at least 1")
    if args.devices_per_process is not None and args.devices_per_process < 1:
        raise UsageError(f"--devices-per-process {args.devices_per_process} must be at least 1")
    _groups(args.processes, args.sub_slices, "--processes", commands)
    log_dir = _log_dir(args)
    per_group = args.processes // args.sub_slices
    free = iter(local.free_ports(0 if args.port else len(commands)))
    queues = []
    for g, queue in enumerate(cluster.deal(commands, args.sub_slices)):
        jobs = []
        for j, cmd in enumerate(queue):
            port = args.port + g if args.port else next(free)
            # One run: its process 0 talks to this terminal. Otherwise every process logs.
            jobs.append(local.local_job(cmd, processes=per_group, devices_per_process=args.devices_per_process,
                                        port=port, init_timeout_s=args.init_timeout,
                                        log_prefix=str(Path(log_dir) / f"group{g}.run{j}"),
                                        terminal=len(commands) == 1))
        queues.append(jobs)
    return queues


def tpu_queues(args, commands: list[list[str]]) -> list[list[list[local.Proc]]]:
    """One queue per slice, holding one job: the gcloud ssh that runs the slice's commands."""
    names = [n for t in args.tpu for n in t.split(",") if n]
    if len(set(names)) != len(names):
        raise UsageError(f"--tpu names a slice twice: {', '.join(names)}")
    if len(names) > len(commands):
        raise UsageError(f"{len(names)} TPU slices but only {len(commands)} command(s): a slice would idle")
    queues = []
    for name, queue in zip(names, cluster.deal(commands, len(names))):
        remote = cluster.tpu_remote_command(queue, olmoe=args.olmoe, remote_dir=args.remote_dir, setup=args.setup)
        log = None if len(names) == 1 else str(Path(_log_dir(args)) / f"{name}.log")
        queues.append([[local.Proc(tuple(cluster.tpu_argv(name, args.zone, args.project, remote)), (), log)]])
    return queues


def _need(program: str, how: str) -> None:
    if shutil.which(program) is None:
        raise UsageError(f"`{program}` is not on PATH; {how}, or print the commands with --dry-run")


def run(args) -> int:
    commands = parse_commands(args.command, args.commands)
    if args.where == "slurm":
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise UsageError("--nodes and --gpus-per-node must be at least 1")
        _groups(args.nodes, args.sub_slices, "--nodes", commands)
        script = cluster.slurm_script(
            commands, nodes=args.nodes, gpus_per_node=args.gpus_per_node, sub_slices=args.sub_slices,
            job_name=args.job_name, partition=args.partition, account=args.account, time_limit=args.time_limit,
            cpus_per_task=args.cpus_per_task, olmoe=args.olmoe, remote_dir=args.remote_dir, setup=args.setup)
        path = args.script or f"{args.job_name}.sbatch"
        if args.dry_run:
            print(cluster.slurm_submit_text(script, path), end="")
            return 0
        _need("sbatch", "run on a SLURM login node")
        Path(path).write_text(script, encoding="utf-8")
        return subprocess.run(["sbatch", path], check=False).returncode
    queues = local_queues(args, commands) if args.where == "local" else tpu_queues(args, commands)
    if args.dry_run:
        print(local.as_shell(queues), end="")
        return 0
    if args.where == "tpu":
        _need("gcloud", "install the Google Cloud CLI")
    logs = sorted({str(Path(p.log).parent) for q in queues for j in q for p in j if p.log})
    if logs:
        print(f"olmoe launch: logs in {', '.join(logs)}", file=sys.stderr)

    def done(qi: int, ji: int, code: int) -> None:
        if len(commands) > 1:
            cmd = cluster.deal(commands, len(queues))[qi][ji]
            print(f"olmoe launch: {'done' if code == 0 else f'FAILED (exit {code})'}: {shlex.join(cmd)}",
                  file=sys.stderr, flush=True)

    try:
        code = local.run_queues(queues, done)
    except KeyboardInterrupt:  # run_queues has stopped every process it started
        print("olmoe launch: interrupted; stopped all processes", file=sys.stderr)
        return 130
    if code and len(commands) == 1 and logs:
        print(f"olmoe launch: a process failed (exit {code}); see the logs in {logs[0]}", file=sys.stderr)
    return code
