"""`olmoe eval --workdir W`: evaluate checkpoints of a workdir.

Three measurements (olmoe_jax/eval/):
- default: validation loss per domain beside each domain's unigram entropy (perplexity.py);
  --set changes the evaluation setup (mesh.*, data.eval_batches), not the model;
- `--tasks builtin | NAME | file.jsonl [...]`: downstream accuracy by log-likelihood in the
  cloze and MC forms (downstream.py; tasks and the task file format: tasks.py);
- `--harness TASK | file.jsonl [...] [--include-path DIR]`: lm-evaluation-harness tasks through
  the adapter (harness.py; needs lm-eval), offline.
Downstream results are added to W/eval/<tasks|harness>_step<N>.json (accuracy with standard errors).
--step N (repeatable) or --all-steps choose checkpoints (default: the newest).
"""
from __future__ import annotations

import argparse
import json
import os

from launch.cli import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", "-w", required=True, help="a run or import folder with config.json")
    parser.add_argument("--step", type=int, action="append", default=[],
                        help="checkpoint step (repeatable; default: the newest)")
    parser.add_argument("--all-steps", action="store_true", help="every checkpoint of the workdir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a data or mesh setting, e.g. --set data.eval_batches=16")
    parser.add_argument("--tasks", action="append", default=[],
                        help="downstream tasks: builtin (all built-in), a built-in name, or a .jsonl task file")
    parser.add_argument("--forms", default="cloze,mc", help="multiple-choice forms: cloze, mc or both")
    parser.add_argument("--items", type=int, default=200, help="items per built-in task")
    parser.add_argument("--harness", action="append", default=[],
                        help="lm-evaluation-harness task names (from --include-path) or .jsonl task files")
    parser.add_argument("--include-path", default=None, help="folder of harness task YAMLs")
    parser.add_argument("--harness-defaults", action="store_true",
                        help="also offer the harness's bundled tasks (their data must be cached locally)")
    parser.add_argument("--limit", type=int, default=None, help="harness: at most this many items per task")
    parser.add_argument("--tokens-per-batch", type=int, default=8192,
                        help="rows x length per forward pass when scoring")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")


def _steps(args) -> list[int]:
    from olmoe_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
    have = checkpoint.checkpoint_steps(args.workdir)
    if not have:
        raise UsageError(f"{args.workdir} holds no checkpoint yet; train or import one first")
    if args.all_steps:
        return have
    for s in args.step:
        if s not in have:
            raise UsageError(f"--step {s}: {args.workdir} has checkpoints at steps {have}")
    # Default: the newest intact step (a step failing its checksums is named and skipped).
    return sorted(set(args.step)) or [checkpoint.newest_intact_step(args.workdir)]


def _write(args, name: str, step: int, results: dict) -> str:
    """Adds results {task: ...} to W/eval/<name>_step<N>.json (tasks scored before are kept)."""
    path = os.path.join(args.workdir, "eval", f"{name}_step{step}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f).get(name, {})
    with open(path + ".tmp", "w") as f:
        json.dump({"workdir": args.workdir, "step": step, name: {**old, **results}}, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def _validation(args, cfg, steps) -> int:
    from olmoe_jax.eval import perplexity  # pylint: disable=import-outside-toplevel
    by_step, entropy = perplexity.checkpoint_loss(cfg, args.workdir, steps)
    for step, val in by_step.items():
        if args.json:
            print(json.dumps({"workdir": args.workdir, "step": step, "val_loss": val, "unigram_entropy": entropy}))
        else:
            print(f"{args.workdir} step {step}")
            print(perplexity.format_val_table(val, entropy))
    return 0


def _downstream(args, cfg, steps) -> int:
    # pylint: disable=import-outside-toplevel
    from olmoe_jax.data import make_tokenizer
    from olmoe_jax.eval import downstream, tasks
    from olmoe_jax.eval.loglik import Scorer
    from olmoe_jax.train import checkpoint

    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    if not forms or any(f not in downstream.FORMS for f in forms):
        raise UsageError(f"--forms {args.forms}: choose from {', '.join(downstream.FORMS)}")
    if args.items < 1:
        raise UsageError("--items must be at least 1")
    task_list = tasks.resolve_tasks(args.tasks, args.items)
    tok = make_tokenizer(cfg)
    for step in steps:
        scorer = Scorer(checkpoint.load_params(args.workdir, step), cfg, tokens_per_batch=args.tokens_per_batch)
        res = downstream.evaluate_tasks(scorer, tok, task_list, forms)
        path = _write(args, "tasks", step, res)
        if args.json:
            print(json.dumps({"workdir": args.workdir, "step": step, "tasks": res}))
        else:
            print(f"{args.workdir} step {step} ({path})")
            print(downstream.format_table(res))
    return 0


def _harness(args, cfg, steps) -> int:
    # pylint: disable=import-outside-toplevel
    import tempfile

    from olmoe_jax.data import make_tokenizer
    from olmoe_jax.eval import tasks
    from olmoe_jax.eval import harness  # imports lm_eval
    from olmoe_jax.train import checkpoint

    names = [n.strip() for spec in args.harness for n in spec.split(",") if n.strip()]
    files = [n for n in names if n.endswith(".jsonl")]
    if len(files) < len(names) and not (args.include_path or args.harness_defaults):
        raise UsageError("--harness TASK needs --include-path DIR (a folder of task YAMLs) or --harness-defaults")
    tok = make_tokenizer(cfg)
    with tempfile.TemporaryDirectory(prefix="olmoe_harness_tasks_") as tmp:
        include = [args.include_path] if args.include_path else []
        if files:  # local task files become harness YAMLs in a scratch folder
            names = [harness.task_yaml(tasks.load_jsonl_task(n), n, tmp) if n.endswith(".jsonl") else n
                     for n in names]
            include.append(tmp)
        for step in steps:
            lm = harness.OlmoeLM(checkpoint.load_params(args.workdir, step), cfg, tok,
                                 tokens_per_batch=args.tokens_per_batch)
            res = harness.run_harness(lm, names, include, limit=args.limit,
                                      include_defaults=args.harness_defaults)
            path = _write(args, "harness", step, res)
            print(json.dumps({"workdir": args.workdir, "step": step, "harness": res}) if args.json
                  else f"{args.workdir} step {step} ({path})\n" + json.dumps(res, indent=1))
    return 0


def run(args) -> int:
    # pylint: disable=import-outside-toplevel
    import jax

    from olmoe_jax.config import apply_overrides, validate
    from olmoe_jax.train import checkpoint

    model_keys = [o for o in args.overrides if o.strip().startswith("model.")]
    if model_keys:
        raise UsageError(f"--set {model_keys[0]}: the model is fixed by the checkpoint; only data.* and mesh.* "
                         "may change for evaluation")
    if args.tasks and args.harness:
        raise UsageError("give --tasks or --harness, not both (run the command twice)")
    if args.tokens_per_batch < 1:
        raise UsageError("--tokens-per-batch must be positive")
    cfg = validate(apply_overrides(checkpoint.load_config(args.workdir), args.overrides),
                   num_devices=jax.device_count())
    steps = _steps(args)
    if args.tasks:
        return _downstream(args, cfg, steps)
    if args.harness:
        return _harness(args, cfg, steps)
    return _validation(args, cfg, steps)
