"""`olmoe eval --workdir W [--step N] [--set k=v ...]`: validation loss per domain of a checkpoint.

Reads W's config.json and its newest checkpoint (or step N; a training or params-only one),
evaluates data.eval_batches batches of each validation domain and prints the mean token
cross-entropy (nats) beside the domain's unigram entropy. --set changes the evaluation setup
(e.g. mesh.* for another device count, data.eval_batches), not the model.
"""
from __future__ import annotations

import argparse
import json

from launch.cli import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", "-w", required=True, help="a run or import folder with config.json")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a data or mesh setting, e.g. --set data.eval_batches=16")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")


def run(args) -> int:
    # pylint: disable=import-outside-toplevel
    import jax

    from olmoe_jax import data as data_lib
    from olmoe_jax.config import apply_overrides, validate
    from olmoe_jax.model import transformer
    from olmoe_jax.parallel.mesh import make_mesh
    from olmoe_jax.train import checkpoint, loop
    from olmoe_jax.train import step as step_lib

    model_keys = [o for o in args.overrides if o.strip().startswith("model.")]
    if model_keys:
        raise UsageError(f"--set {model_keys[0]}: the model is fixed by the checkpoint; only data.* and mesh.* "
                         "may change for evaluation")
    cfg = validate(apply_overrides(checkpoint.load_config(args.workdir), args.overrides),
                   num_devices=jax.device_count())
    steps = checkpoint.checkpoint_steps(args.workdir)
    if not steps:
        raise UsageError(f"{args.workdir} holds no checkpoint yet; train or import one first")
    step = steps[-1] if args.step is None else args.step
    if step not in steps:
        raise UsageError(f"--step {step}: {args.workdir} has checkpoints at steps {steps}")
    data_lib.check_data(cfg)

    tok = data_lib.make_tokenizer(cfg)
    batches = data_lib.make_eval_batches(cfg, tok, process_index=jax.process_index(),
                                         process_count=jax.process_count())
    entropy = data_lib.unigram_entropy(cfg, tok)
    mesh = make_mesh(cfg)
    shardings = transformer.param_shardings(cfg, mesh)
    params = checkpoint.load_params(args.workdir, step, shardings=shardings)
    val = loop.evaluate(step_lib.make_eval_step(cfg, mesh, shardings), params, batches, mesh)
    if args.json:
        print(json.dumps({"workdir": args.workdir, "step": step, "val_loss": val, "unigram_entropy": entropy}))
    else:
        print(f"{args.workdir} step {step}")
        print(loop.format_val_table(val, entropy))
    return 0
