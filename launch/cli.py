"""The `olmoe` console script: one subcommand per module in launch/.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`. Modules are
imported only when their subcommand runs, so `olmoe --help` and bad input answer fast.
A user error (`ConfigError`, `DataError`, `UsageError`: ValueError subclasses carrying a
user-facing message; or a `FileNotFoundError`) becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import os
import pkgutil
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "train": ("launch.train", "train an experiment (resumes from the workdir's last checkpoint)"),
    "eval": ("launch.evaluate", "validation loss per domain, downstream tasks (--tasks) or lm-eval tasks (--harness)"),
    "generate": ("launch.generate", "generate text from a checkpoint (KV cache, greedy or sampling)"),
    "export-hf": ("launch.export_hf", "write a checkpoint as a Hugging Face folder (OLMoE, or Llama / OLMo for dense)"),
    "import-hf": ("launch.import_hf", "import a Hugging Face OLMoE (or Llama / OLMo dense) folder into a workdir"),
    "upcycle": ("launch.upcycle", "turn a dense checkpoint into an MoE (sparse upcycling)"),
    "analyze": ("launch.analyze", "routing analyses (saturation, co-activation, domain and vocabulary specialisation)"),
    "plot": ("launch.plot", "plot loss curves of one or several runs from metrics.jsonl"),
    "experiments": ("launch.experiments_cmd", "list the experiment registry, print configs and parameter counts"),
    "launch": ("launch.launch", "run an olmoe command on N local processes, a TPU pod slice or a SLURM job"),
    "compile": ("launch.compile", "compile the train step for a TPU slice from this host: memory, collectives, est. MFU"),
    "sweep": ("launch.sweep", "run a family of experiments or a grid, one run after another (resumable)"),
}

# Global flags before COMMAND: this process's place in a multi-process run
# (olmoe_jax/parallel/distributed.py; `olmoe launch` sets the same through the environment).
DISTRIBUTED_FLAGS = ("--coordinator", "--num-processes", "--process-id")


class UsageError(ValueError):
    """Bad command-line input; exit code 2."""


def _user_errors():
    # pylint: disable=import-outside-toplevel
    from olmoe_jax.config import ConfigError
    from olmoe_jax.data.errors import DataError
    return ConfigError, DataError, UsageError, FileNotFoundError


def _pop_distributed_flags(argv: list[str]) -> tuple[list[str], dict]:
    """Splits leading `--coordinator H:P --num-processes N --process-id I` (or `--flag=value`)
    off argv: (the rest, {coordinator, num_processes, process_id} given)."""
    dist = {}
    while argv and argv[0].split("=")[0] in DISTRIBUTED_FLAGS:
        flag, eq, value = argv[0].partition("=")
        if not eq:
            if len(argv) < 2:
                raise UsageError(f"{flag} needs a value")
            value, argv = argv[1], argv[1:]
        argv = argv[1:]
        key = flag[2:].replace("-", "_")
        dist[key] = value if key == "coordinator" else _parse_int(flag, value)
    return argv, dist


def _parse_int(flag: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{flag} {value!r} is not an integer") from None


def _platforms_without_tpu() -> None:
    """On a host without TPU devices, keep jax from starting libtpu (when installed, its
    start-up prints warnings and takes a lockfile, then jax falls back anyway): set
    JAX_PLATFORMS to this host's other platforms, unless the user set it. Only `olmoe
    compile` needs libtpu, as a compiler, and opens it itself."""
    if "JAX_PLATFORMS" in os.environ or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/*"):
        return
    # A listed platform that fails to start is an error: list a GPU platform only with both
    # its device files and its jax plugin (jax_cuda12_plugin, jax_rocm7_plugin, ...) present.
    plugins = {m.name for m in pkgutil.iter_modules() if m.name.startswith(("jax_cuda", "jax_rocm"))}
    platforms = []
    if glob.glob("/dev/nvidia[0-9]*") and any(p.startswith("jax_cuda") for p in plugins):
        platforms.append("cuda")
    if os.path.exists("/dev/kfd") and any(p.startswith("jax_rocm") for p in plugins):
        platforms.append("rocm")
    os.environ["JAX_PLATFORMS"] = ",".join(platforms + ["cpu"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="olmoe", description="OLMoE in JAX: train, evaluate, convert.",
        epilog="multi-process: olmoe --coordinator HOST:PORT --num-processes N --process-id I COMMAND ... "
               "(TPU pods and SLURM job steps are detected; see `olmoe launch`)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        argv, dist = _pop_distributed_flags(argv)
    except UsageError as e:
        print(f"olmoe: error: {e}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    if name not in COMMANDS:
        print(f"olmoe: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    # Not for compile (it opens libtpu as a compiler) nor launch (which runs no jax here, and
    # whose jobs may inherit this environment, e.g. through sbatch, on hosts with accelerators).
    if name not in ("compile", "launch"):
        _platforms_without_tpu()
    module = importlib.import_module(COMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"olmoe {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    try:
        if getattr(module, "DISTRIBUTED", True):  # `launch` starts processes; it joins none
            from olmoe_jax.parallel import distributed  # pylint: disable=import-outside-toplevel
            distributed.initialize_from_env_or_flags(**dist)
        return int(module.run(args) or 0)
    except _user_errors() as e:
        print(f"olmoe {name}: error: {e}", file=sys.stderr)
        return 2


def entry() -> None:
    """The console script: main() in a process with huge pages for malloc (host_memory.py)."""
    from launch.host_memory import reexec_with_huge_pages  # pylint: disable=import-outside-toplevel

    reexec_with_huge_pages()
    sys.exit(main())


if __name__ == "__main__":
    # `python -m launch.cli` (how `olmoe launch` starts processes): run the imported module, whose
    # UsageError is the one the subcommands raise, not this __main__ copy's.
    from launch import cli  # pylint: disable=import-self
    cli.entry()
