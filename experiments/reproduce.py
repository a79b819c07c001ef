"""The CPU-scale reproduction of the OLMoE paper's findings: run it, then write the report.

    python -m experiments.reproduce --run      # trains every variant of FINDINGS, evaluates
                                               # the baseline on the built-in tasks over training
                                               # and runs the routing analyses (about an hour
                                               # on 2 CPU cores); small JSON + PNG go to
                                               # docs/reproduction/
    python -m experiments.reproduce --report   # rebuilds docs/reproduction.md from those files

Run folders (checkpoints) go to --runs (default runs/reproduce, not committed); a run whose
workdir already holds its last step is not retrained, so an interrupted --run continues.
--only FINDING limits the findings, --steps / --seeds / --set shrink everything (smoke tests).

FINDINGS is the one table of (finding, variants). A variant is (experiment, overrides) of
the registry; when the ablation families land in experiments/, each row's variants become
their family names (one line per row).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

OUT = "docs/reproduction"
REPORT = "docs/reproduction.md"
STEPS = 250  # per run: 17 runs of tiny_moe-sized models fit in about an hour on 2 cores
BASE = ("tiny_moe", ())


@dataclasses.dataclass(frozen=True)
class Finding:
    key: str
    title: str
    claim: str  # the paper's finding (OLMOE_FACTS.md, "Ablations in the paper")
    variants: dict  # label -> (experiment, overrides); the first is the one the paper prefers
    seeds: tuple = (0,)  # two seeds where the paper's difference is small
    extra: str = ""  # a second measurement: "layer0_max_load" | "tokens_per_s"
    why_not: str = ""  # the likely reason when the direction does not reproduce at this scale


FINDINGS = (
    Finding("moe_vs_dense", "MoE vs dense at equal active compute",
            "MoE reaches the dense model's quality with about 3x fewer tokens",
            {"MoE 16 experts top-4": BASE, "dense (SwiGLU 512)": ("tiny_dense", ())}),
    Finding("lb_loss", "Load-balancing loss",
            "with the loss (0.01) quality is better; without it early layers collapse onto 1-2 experts",
            {"lb 0.01": BASE, "no lb loss": ("tiny_moe", ("model.lb_loss_weight=0",))},
            seeds=(0, 1), extra="layer0_max_load",
            why_not="collapse grows over hundreds of billions of tokens; 250 steps may be too early"),
    Finding("z_loss", "Router z-loss",
            "z-loss 0.001 gives fewer loss spikes and better quality",
            {"z 0.001": BASE, "no z-loss": ("tiny_moe", ("model.z_loss_weight=0",))}, seeds=(0, 1),
            why_not="its benefit is stability at scale (logit growth over long runs); tiny routers stay small"),
    Finding("granularity", "Expert granularity at equal compute",
            "finer experts (32 top-4) beat coarse (8 top-1); 64 top-8 adds 1-2%",
            {"16 experts top-4 (F 128)": BASE,
             "4 experts top-1 (F 512)": ("tiny_moe", ("model.num_experts=4", "model.top_k=1", "model.expert_dim=512")),
             "32 experts top-8 (F 64)": ("tiny_moe", ("model.num_experts=32", "model.top_k=8", "model.expert_dim=64"))}),
    Finding("shared_expert", "Shared expert",
            "a shared expert (31 routed top-3 + 1 shared) is slightly worse than 32 routed top-4",
            {"16 routed top-4": BASE,
             "15 routed top-3 + 1 shared": ("tiny_moe", ("model.num_experts=15", "model.top_k=3",
                                                         "model.num_shared_experts=1"))}, seeds=(0, 1),
            why_not="the paper's gap is small (flexibility of routing); at 250 steps it is within noise"),
    Finding("expert_choice", "Token choice vs expert choice",
            "token choice is better; expert choice is about 20% faster",
            {"token choice top-4": BASE,
             "expert choice (capacity 1)": ("tiny_moe", ("model.router_type=expert_choice", "model.moe_impl=capacity",
                                                         "model.capacity_factor=1.0"))}, extra="tokens_per_s",
            why_not="expert choice sees the whole batch (future tokens): its training loss leaks, its "
                    "validation loss is the honest measure"),
    Finding("init", "Truncated normal vs normal init",
            "normal init diverges after about 450B tokens; truncated normal stays stable",
            {"truncated normal": BASE, "normal": ("tiny_moe", ("model.init=normal",))}, seeds=(0, 1),
            why_not="the paper's divergence appears after 450B tokens; 250 steps cannot show it"),
    Finding("qk_norm", "QK-norm",
            "QK-norm is more stable and better",
            {"QK-norm": BASE, "no QK-norm": ("tiny_moe", ("model.qk_norm=false",))}, seeds=(0, 1),
            why_not="QK-norm guards against attention-logit growth in long runs at high learning rates"),
    Finding("adam_eps", "AdamW epsilon",
            "eps 1e-8 is significantly better than 1e-5",
            {"eps 1e-8": BASE, "eps 1e-5": ("tiny_moe", ("optim.eps=1e-5",))}, seeds=(0, 1),
            why_not="eps matters once gradients are small relative to it (late in long runs)"),
)


def run_name(variant: tuple, seed: int) -> str:
    """A folder name per distinct (experiment, overrides, seed): shared variants train once."""
    exp, overrides = variant
    tag = "-".join(o.replace("model.", "").replace("optim.", "").replace("=", "") for o in overrides)
    return f"{exp}{'-' + tag if tag else ''}-s{seed}"


def _summary(workdir: str) -> dict | None:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return None
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    summ = [r for r in recs if r.get("kind") == "summary"]
    train = [r for r in recs if r.get("kind") == "train"]
    if not summ:
        return None
    s = summ[-1]
    out = {"step": s["step"], "val_loss": s["val_loss"], "train_loss": s["train_loss"],
           "val_mean": sum(s["val_loss"].values()) / max(len(s["val_loss"]), 1) if s["val_loss"] else None,
           "tokens_per_s": s["tokens_per_s"], "wall_s": s["wall_s"]}
    if train and "expert_load_per_layer" in train[-1]:
        out["layer0_max_load"] = max(train[-1]["expert_load_per_layer"][0])
        out["uniform_load"] = 1.0 / len(train[-1]["expert_load_per_layer"][0])
    return out


def train_runs(findings, runs: str, steps: int, seeds_cap: int | None, extra_sets: list[str]) -> dict:
    """Trains each distinct run once (in this process); returns {run name: summary}."""
    from launch.cli import main  # pylint: disable=import-outside-toplevel
    done = {}
    for f in findings:
        for variant in f.variants.values():
            for seed in f.seeds[:seeds_cap]:
                name = run_name(variant, seed)
                if name in done:
                    continue
                wd = os.path.join(runs, name)
                s = _summary(wd)
                if s is None or s["step"] < steps:
                    sets = [*extra_sets, *variant[1], f"train.seed={seed}", f"train.steps={steps}",
                            f"train.eval_every={max(steps // 5, 1)}", f"train.ckpt_every={max(steps // 10, 1)}",
                            "train.keep_ckpts=12"]
                    print(f"=== {name}", flush=True)
                    argv = ["train", "--experiment", variant[0], "--workdir", wd]
                    if main(argv + [a for o in sets for a in ("--set", o)]) != 0:
                        raise SystemExit(f"training {name} failed; see above")
                    s = _summary(wd)
                done[name] = s
    return done


def collect(findings, runs: str, summaries: dict, seeds_cap: int | None, out: str) -> dict:
    """findings.json: per finding and variant, the per-seed summaries; one loss-curve PNG each."""
    from olmoe_jax.analysis import curves, plots  # pylint: disable=import-outside-toplevel
    result = {}
    for f in findings:
        entry = {"title": f.title, "claim": f.claim, "extra": f.extra, "why_not": f.why_not, "variants": {}}
        series = []
        for label, variant in f.variants.items():
            seeds = f.seeds[:seeds_cap]
            entry["variants"][label] = {
                "experiment": variant[0], "overrides": list(variant[1]),
                "seeds": {str(s): summaries[run_name(variant, s)] for s in seeds}}
            steps, loss = curves.series(os.path.join(runs, run_name(variant, seeds[0])), "loss")
            series.append((label, steps, loss))
        plots.curves(series, os.path.join(out, f"{f.key}.png"), ylabel="training loss (nats/token)",
                     title=f"{f.title} (seed {f.seeds[0]})")
        result[f.key] = entry
    return result


def collect_downstream(workdir: str, out: str, how: str) -> None:
    """<out>/downstream.json: the task results of every step `olmoe eval --tasks` scored in
    `workdir`, and `how` the run was made (shown in the report)."""
    by_step = {}
    for p in sorted(Path(workdir, "eval").glob("tasks_step*.json")):
        d = json.loads(p.read_text())
        by_step[str(d["step"])] = d["tasks"]
    Path(out, "downstream.json").write_text(json.dumps({"run": how, "steps": by_step}, indent=1) + "\n")


def evaluate_baseline(runs: str, out: str, items: int, steps_per_run: int) -> None:
    """Built-in task accuracy at each checkpoint of the baseline run, and the routing analyses."""
    from launch.cli import main  # pylint: disable=import-outside-toplevel
    from olmoe_jax.train.checkpoint import checkpoint_steps  # pylint: disable=import-outside-toplevel
    wd = os.path.join(runs, run_name(BASE, 0))
    have = checkpoint_steps(wd)
    picks = sorted({have[0], have[len(have) // 4], have[len(have) // 2], have[-1]})  # early to final
    steps = [a for s in picks for a in ("--step", str(s))]
    if main(["eval", "--workdir", wd, *steps, "--tasks", "builtin", "--items", str(items)]) != 0:
        raise SystemExit("evaluating the baseline failed; see above")
    collect_downstream(wd, out, f"the tiny_moe run of this reproduction (seed 0, {steps_per_run} steps)")
    if main(["analyze", "all", "--workdir", wd, "--out", out]) != 0:
        raise SystemExit("the routing analyses failed; see above")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="store_true", help="train, evaluate and analyse into --out")
    ap.add_argument("--report", action="store_true", help="rebuild the markdown (--md) from --out")
    ap.add_argument("--out", default=OUT, help="folder of the committed JSON and PNG results")
    ap.add_argument("--md", default=REPORT, help="the report to write")
    ap.add_argument("--runs", default="runs/reproduce", help="run folders (checkpoints; not committed)")
    ap.add_argument("--only", action="append", default=[], help="finding key (repeatable); default all")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--seeds", type=int, default=None, help="at most this many seeds per finding")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="override for every run")
    ap.add_argument("--skip-eval", action="store_true", help="no downstream tasks / routing analyses")
    ap.add_argument("--items", type=int, default=200, help="items per built-in task")
    args = ap.parse_args(argv)
    keys = {f.key for f in FINDINGS}
    unknown = [k for k in args.only if k not in keys]
    if unknown or not (args.run or args.report):
        ap.error(f"unknown finding {unknown[0]} (have {', '.join(sorted(keys))})" if unknown
                 else "pass --run and/or --report")
    findings = [f for f in FINDINGS if not args.only or f.key in args.only]
    if args.run:
        t0 = time.time()
        os.makedirs(args.out, exist_ok=True)
        summaries = train_runs(findings, args.runs, args.steps, args.seeds, args.sets)
        result = collect(findings, args.runs, summaries, args.seeds, args.out)
        if not args.skip_eval:
            evaluate_baseline(args.runs, args.out, args.items, args.steps)
        meta = {"steps": args.steps, "sets": args.sets, "wall_s": time.time() - t0,
                "command": " ".join(["python -m experiments.reproduce", *sys.argv[1:]]) if argv is None else None}
        Path(args.out, "findings.json").write_text(json.dumps({"meta": meta, "findings": result}, indent=1) + "\n")
    if args.report:
        from experiments import reproduce_report  # pylint: disable=import-outside-toplevel
        Path(args.md).write_text(reproduce_report.render(args.out, os.path.relpath(args.out, os.path.dirname(args.md) or ".")))
        print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
