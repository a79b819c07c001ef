"""`olmoe import-hf --hf DIR --workdir W`: an HF OLMoE (or Llama / OLMo dense) folder -> a workdir.

The workdir gets config.json (the model from the HF config; other sections from --experiment or
the defaults, then --set) and a params-only checkpoint that `olmoe train`, `eval` and `generate`
start from; the folder's tokenizer files are copied to <workdir>/tokenizer/. The whole folder is
validated before anything is written.
"""

from __future__ import annotations

import argparse
import os

from launch.cli import UsageError
from launch.common import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hf", required=True, help="Hugging Face model folder (config.json + safetensors)"
    )
    parser.add_argument("--workdir", required=True, help="new workdir to create")
    add_config_arguments(parser)


def ensure_new_workdir(workdir: str) -> None:
    """Import and upcycle write a fresh workdir; refuse one that already holds a run."""
    for name in ("config.json", "checkpoints"):
        if os.path.exists(os.path.join(workdir, name)):
            raise UsageError(
                f"--workdir {workdir} already holds a run ({name}); choose a new folder"
            )


def base_config(args):
    import experiments  # pylint: disable=import-outside-toplevel
    from olmoe_jax.config import default_config  # pylint: disable=import-outside-toplevel

    return experiments.get(args.experiment) if args.experiment else default_config()


def run(args) -> int:
    from olmoe_jax.config import validate  # pylint: disable=import-outside-toplevel
    from olmoe_jax.interop import hf_tokenizer  # pylint: disable=import-outside-toplevel
    from olmoe_jax.interop.hf_import import import_hf  # pylint: disable=import-outside-toplevel
    from olmoe_jax.model.transformer import count_params  # pylint: disable=import-outside-toplevel
    from olmoe_jax.train.checkpoint import save_params  # pylint: disable=import-outside-toplevel

    ensure_new_workdir(args.workdir)
    cfg, params = import_hf(args.hf, base_config(args), overrides=args.overrides)
    validate(cfg)
    note = hf_tokenizer.copy_hf_tokenizer(args.hf, args.workdir, cfg)  # checks before it writes
    save_params(args.workdir, params, cfg)
    total, active = count_params(cfg)
    print(
        f"imported {args.hf} ({cfg.model.ffn_type}, {total:,} params, {active:,} active) "
        f"into {args.workdir}"
    )
    print(note or "no tokenizer files in the HF folder; data.tokenizer is left as configured")
    return 0
