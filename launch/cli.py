"""The `olmoe` console script: one subcommand per module in launch/.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`. Modules are
imported only when their subcommand runs, so `olmoe --help` and bad input answer fast.
A user error (`ConfigError`, `DataError`, `UsageError`: ValueError subclasses carrying a
user-facing message; or a `FileNotFoundError`) becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "train": ("launch.train", "train an experiment (resumes from the workdir's last checkpoint)"),
    "eval": ("launch.evaluate", "validation loss per domain of a checkpoint"),
    "generate": ("launch.generate", "generate text from a checkpoint (KV cache, greedy or sampling)"),
    "export-hf": ("launch.export_hf", "write a checkpoint as a Hugging Face folder (OLMoE, or Llama / OLMo for dense)"),
    "import-hf": ("launch.import_hf", "import a Hugging Face OLMoE (or Llama / OLMo dense) folder into a workdir"),
    "upcycle": ("launch.upcycle", "turn a dense checkpoint into an MoE (sparse upcycling)"),
    "experiments": ("launch.experiments_cmd", "list the experiment registry, print configs and parameter counts"),
}


class UsageError(ValueError):
    """Bad command-line input; exit code 2."""


def _user_errors():
    # pylint: disable=import-outside-toplevel
    from olmoe_jax.config import ConfigError
    from olmoe_jax.data.errors import DataError
    return ConfigError, DataError, UsageError, FileNotFoundError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="olmoe", description="OLMoE in JAX: train, evaluate, convert.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    if name not in COMMANDS:
        print(f"olmoe: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"olmoe {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    try:
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
    entry()
