"""`olmoe upcycle (--from W | --hf DIR) --workdir NEW --num-experts 8 --top-k 2`: sparse upcycling.

A dense checkpoint (ours, or an HF OLMo / Llama dense folder) becomes a MoE whose experts are all
copies of the dense FFN, with a fresh router (olmoe_jax/interop/upcycle.py says what is preserved).
"""

from __future__ import annotations

import argparse

import jax

from launch.cli import UsageError
from launch.common import add_config_arguments
from launch.import_hf import base_config, ensure_new_workdir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="source", help="dense workdir to upcycle")
    src.add_argument("--hf", help="HF dense folder (OLMo or Llama) to upcycle")
    parser.add_argument("--workdir", required=True, help="new workdir for the MoE")
    parser.add_argument(
        "--step", type=int, default=None, help="checkpoint step of --from (default: newest)"
    )
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument(
        "--norm-topk-prob",
        action="store_true",
        help="renormalise the top-k weights (then the MoE starts equal to the dense model)",
    )
    parser.add_argument(
        "--noise",
        type=float,
        default=0.0,
        help="fraction of expert weights re-initialised (the paper tried 0.5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="router init and noise")
    add_config_arguments(parser)


def run(args) -> int:
    # pylint: disable=import-outside-toplevel
    from olmoe_jax.config import apply_overrides, validate
    from olmoe_jax.interop import hf_tokenizer
    from olmoe_jax.interop.hf_import import import_hf
    from olmoe_jax.interop.upcycle import upcycle, upcycle_config
    from olmoe_jax.model.transformer import count_params
    from olmoe_jax.train.checkpoint import load_config, load_params, save_params

    ensure_new_workdir(args.workdir)
    if not 0.0 <= args.noise <= 1.0:  # before an --hf source is read
        raise UsageError(f"--noise {args.noise} must be a fraction in [0, 1]")
    if args.hf and args.step is not None:
        raise UsageError("--step applies to a --from workdir; an --hf folder has one set of weights")
    if args.source and args.experiment:
        raise UsageError(
            "--experiment applies to --hf sources; a --from workdir has its own config"
        )
    _refuse_shape_overrides(args.overrides, args.num_experts, args.top_k)
    if args.source:
        dense_cfg = load_config(args.source)
    else:
        dense_cfg, params = import_hf(args.hf, base_config(args))
    moe_cfg = upcycle_config(
        dense_cfg,
        num_experts=args.num_experts,
        top_k=args.top_k,
        norm_topk_prob=args.norm_topk_prob,
    )
    validate(apply_overrides(moe_cfg, args.overrides))
    if args.source:
        params = load_params(args.source, args.step)
    moe = upcycle(params, moe_cfg, jax.random.PRNGKey(args.seed), noise=args.noise)
    note = hf_tokenizer.copy_hf_tokenizer(args.hf, args.workdir, moe_cfg) if args.hf else None
    save_params(args.workdir, moe, moe_cfg)
    total, active = count_params(moe_cfg)
    print(
        f"upcycled {args.source or args.hf} into {args.workdir}: "
        f"{args.num_experts} experts top-{args.top_k}, "
        f"{total:,} params ({active:,} active), noise {args.noise}"
    )
    if note:
        print(note)
    return 0


def _refuse_shape_overrides(overrides, num_experts: int, top_k: int) -> None:
    """The upcycled model copies the dense weights, so no --set may change a weight's shape or
    which weights exist (found by loop.param_shape_changes on an upcycled default model, before
    the source is read); experts and top-k come from --num-experts / --top-k."""
    # pylint: disable=import-outside-toplevel
    from olmoe_jax.config import apply_overrides, default_config
    from olmoe_jax.interop.upcycle import upcycle_config
    from olmoe_jax.train.loop import param_shape_changes

    dense = default_config()
    dense.model.ffn_type = "dense"
    base = upcycle_config(dense, num_experts=num_experts, top_k=top_k, norm_topk_prob=False)
    for assignment in overrides:
        changed = apply_overrides(base.copy_and_resolve_references(), [assignment])
        if param_shape_changes(base, changed, dtypes=False):  # upcycle casts to param_dtype
            key = assignment.split("=", 1)[0].strip()
            raise UsageError(
                f"--set {key}: upcycling copies the dense weights, so their shapes come from the "
                "source; use --num-experts / --top-k for the experts, and --set only for "
                "routing, losses, data, optim, train or mesh keys")
