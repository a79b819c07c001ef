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

FINDINGS is the one table of (finding, variants). A variant is a CPU twin of the registry's
ablation families (e.g. granularity/e64k8-tiny) or an upcycled dense run; variants whose
configs are equal (every family's baseline arm is tiny_moe) train once.
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
STEPS = 150  # per run (600k tokens): the 16 distinct runs below take about an hour on 2 cores
BASE = "tiny_moe"  # the main job; the baseline whose checkpoints are evaluated and analysed


@dataclasses.dataclass(frozen=True)
class Upcycled:
    """A variant made by `olmoe upcycle --from <source's run>` and then trained like the others."""
    source: str  # the registry entry of the dense run it starts from
    num_experts: int = 8
    top_k: int = 2

    def describe(self) -> str:
        return (f"olmoe upcycle --from <{self.source} run> --num-experts {self.num_experts} "
                f"--top-k {self.top_k}")


@dataclasses.dataclass(frozen=True)
class Finding:
    key: str
    title: str
    claim: str  # the paper's finding (OLMOE_FACTS.md, "Ablations in the paper")
    variants: dict  # label -> registry entry (a family's CPU twin) or Upcycled; the first is the
    #                 one the paper's finding predicts to be better at this token budget
    seeds: tuple = (0,)  # two seeds where the paper's difference is small (and to measure the
    #                      seed spread that every finding's verdict is held to: reproduce_report)
    extra: str = ""  # a second measurement: "layer0_max_load" | "tokens_per_s"
    why_not: str = ""  # the likely reason when the direction does not reproduce at this scale


FINDINGS = (
    Finding("moe_vs_dense", "MoE vs dense at equal active compute",
            "MoE reaches the dense model's quality with about 3x fewer tokens",
            {"MoE 16 experts top-4": "moe_vs_dense/moe-tiny", "dense (SwiGLU 512)": "moe_vs_dense/dense-tiny"},
            why_not="in 600k tokens each expert trains on a quarter of the tokens the dense FFN sees; the "
                    "MoE's advantage comes once its experts are trained, over billions of tokens"),
    Finding("lb_loss", "Load-balancing loss",
            "with the loss (0.01) quality is better; without it early layers collapse onto 1-2 experts",
            {"lb 0.01": "lb_loss/on-tiny", "no lb loss": "lb_loss/off-tiny"},
            seeds=(0, 1), extra="layer0_max_load",
            why_not="collapse grows over hundreds of billions of tokens; 150 steps are too early"),
    Finding("z_loss", "Router z-loss",
            "z-loss 0.001 gives fewer loss spikes and better quality",
            {"z 0.001": "z_loss/on-tiny", "no z-loss": "z_loss/off-tiny"}, seeds=(0, 1),
            why_not="its benefit is stability at scale (logit growth over long runs); tiny routers stay small"),
    Finding("granularity", "Expert granularity at equal compute",
            "finer experts (32 top-4) beat coarse (8 top-1); 64 top-8 adds 1-2%",
            {"64 experts top-8 (F 64)": "granularity/e64k8-tiny", "32 experts top-4 (F 128)": "granularity/e32k4-tiny",
             "8 experts top-1 (F 512)": "granularity/e8k1-tiny"},
            why_not="finer routing pays off with more tokens per expert than 150 steps give 64 experts"),
    Finding("shared_expert", "Shared expert",
            "a shared expert (31 routed top-3 + 1 shared) is slightly worse than 32 routed top-4",
            {"32 routed top-4": "shared_expert/routed-tiny", "31 routed top-3 + 1 shared": "shared_expert/shared-tiny"},
            why_not="the always-on expert trains on every token, which early in training outweighs the "
                    "routing flexibility the paper's gap comes from (its gap is small and appears late)"),
    Finding("expert_choice", "Token choice vs expert choice",
            "token choice is better; expert choice is about 20% faster",
            {"token choice top-2": "expert_choice/token_choice-tiny",
             "expert choice (capacity 2)": "expert_choice/expert_choice-tiny"}, extra="tokens_per_s",
            why_not="expert choice picks tokens over the whole batch, so a token's routing depends on later "
                    "tokens, in training and in this validation alike: the comparison favours expert choice"),
    Finding("upcycling", "Sparse upcycling vs from scratch",
            "upcycling a dense model starts ahead; from scratch catches up only after about 500B tokens "
            "(so OLMoE trains from scratch)",
            {"upcycled from dense": Upcycled("upcycling/dense-tiny"), "from scratch": "upcycling/scratch-tiny"},
            why_not="the upcycled model's head start is the dense run's 150 steps; at this budget it should show"),
    Finding("adam_eps", "AdamW epsilon",
            "eps 1e-8 is significantly better than 1e-5",
            {"eps 1e-8": "adam_eps/eps1e-8-tiny", "eps 1e-5": "adam_eps/eps1e-5-tiny"},
            why_not="eps matters once gradients are small relative to it (late in long runs)"),
)

# Findings of the paper left out of the hour's runs: what they need is far beyond CPU scale.
# The report lists them with the registry entries that run them.
NOT_RUN = (
    {"title": "Truncated normal vs normal init", "claim": "normal init diverges after about 450B tokens; "
     "truncated normal stays stable", "entries": ["init/truncated-tiny", "init/normal-tiny"],
     "why": "the divergence appears after 450B tokens; at 600k tokens both inits train alike"},
    {"title": "QK-norm", "claim": "QK-norm is more stable and better (about 10% slower)",
     "entries": ["qk_norm/on-tiny", "qk_norm/off-tiny"],
     "why": "QK-norm guards against attention-logit growth over long runs at scale; a 4-layer "
            "model over 150 steps has no such growth to guard against"},
)


def _config_key(entry: str, sets: list[str]) -> str:
    """What a run trains, as text: two entries whose configs are equal (say lb_loss/on-tiny and
    z_loss/on-tiny, both tiny_moe) share one run."""
    import experiments  # pylint: disable=import-outside-toplevel
    from olmoe_jax.config import apply_overrides  # pylint: disable=import-outside-toplevel
    d = apply_overrides(experiments.get(entry), list(sets)).to_dict()
    d.pop("name", None)
    return json.dumps(d, sort_keys=True, default=str)


def plan_runs(findings, seeds_cap: int | None, sets: list[str], *, base: bool = True) -> dict:
    """{(variant, seed): run name} for every variant of `findings` (and the baseline), in training
    order: a distinct config trains once, named after its first entry; an upcycled variant comes
    after its dense source."""
    names, by_key = {}, {}

    def add(variant, seed):
        if (variant, seed) in names:
            return
        if isinstance(variant, Upcycled):
            add(variant.source, seed)
            names[(variant, seed)] = f"upcycled{variant.num_experts}k{variant.top_k}-{names[(variant.source, seed)]}"
            return
        key = (_config_key(variant, sets), seed)
        by_key.setdefault(key, f"{variant.replace('/', '-')}-s{seed}")
        names[(variant, seed)] = by_key[key]

    if base:
        add(BASE, 0)
    for f in findings:
        for variant in f.variants.values():
            for seed in f.seeds[:seeds_cap]:
                add(variant, seed)
    return names


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


def _cli(argv: list[str], what: str) -> None:
    from launch.cli import main  # pylint: disable=import-outside-toplevel
    if main(argv) != 0:
        raise SystemExit(f"{what} failed; see above")


def train_runs(plan: dict, runs: str, steps: int, extra_sets: list[str]) -> dict:
    """Trains each run of `plan` once (in this process), skipping those already at `steps`;
    returns {run name: summary}. The baseline keeps ten checkpoints (saturation over training)."""
    from olmoe_jax.train.checkpoint import checkpoint_steps  # pylint: disable=import-outside-toplevel
    done = {}
    for (variant, seed), name in plan.items():
        if name in done:
            continue
        wd = os.path.join(runs, name)
        s = _summary(wd)
        if s is None or s["step"] < steps:
            every = steps // 10 if name == plan.get((BASE, 0)) else steps // 2
            sets = [f"train.seed={seed}", f"train.steps={steps}", f"train.eval_every={steps}",
                    f"train.ckpt_every={max(every, 1)}", "train.keep_ckpts=12"]
            print(f"=== {name}", flush=True)
            if isinstance(variant, Upcycled):
                if not checkpoint_steps(wd):
                    _cli(["upcycle", "--from", os.path.join(runs, plan[(variant.source, seed)]), "--workdir", wd,
                          "--num-experts", str(variant.num_experts), "--top-k", str(variant.top_k),
                          "--seed", str(seed)], f"upcycling into {name}")
                # model.* overrides went into the source; the upcycled model's shapes are its own
                argv = ["train", "--workdir", wd, *[s for s in extra_sets if not s.startswith("model.")], *sets]
            else:
                argv = ["train", "--experiment", variant, "--workdir", wd, *extra_sets, *sets]
            _cli(argv[:argv.index(wd) + 1] + [a for o in argv[argv.index(wd) + 1:] for a in ("--set", o)],
                 f"training {name}")
            s = _summary(wd)
        done[name] = s
    return done


def collect(findings, plan: dict, runs: str, summaries: dict, seeds_cap: int | None, out: str) -> dict:
    """findings.json: per finding and variant, the per-seed summaries; one loss-curve PNG each."""
    from olmoe_jax.analysis import curves, plots  # pylint: disable=import-outside-toplevel
    result = {}
    for f in findings:
        entry = {"title": f.title, "claim": f.claim, "extra": f.extra, "why_not": f.why_not, "variants": {}}
        series = []
        for label, variant in f.variants.items():
            seeds = f.seeds[:seeds_cap]
            entry["variants"][label] = {
                "experiment": variant.describe() if isinstance(variant, Upcycled) else variant,
                "runs": {str(s): plan[(variant, s)] for s in seeds},
                "seeds": {str(s): summaries[plan[(variant, s)]] for s in seeds}}
            steps, loss = curves.series(os.path.join(runs, plan[(variant, seeds[0])]), "loss")
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


def evaluate_baseline(runs: str, name: str, out: str, items: int, steps_per_run: int) -> None:
    """Built-in task accuracy at four checkpoints of the baseline run `name` (early to final),
    and the routing analyses."""
    from olmoe_jax.train.checkpoint import checkpoint_steps  # pylint: disable=import-outside-toplevel
    wd = os.path.join(runs, name)
    have = checkpoint_steps(wd)
    picks = sorted({have[0], have[len(have) // 4], have[len(have) // 2], have[-1]})  # early to final
    steps = [a for s in picks for a in ("--step", str(s))]
    _cli(["eval", "--workdir", wd, *steps, "--tasks", "builtin", "--items", str(items)], "evaluating the baseline")
    collect_downstream(wd, out, f"the {BASE} run of this reproduction (seed 0, {steps_per_run} steps)")
    _cli(["analyze", "all", "--workdir", wd, "--out", out], "the routing analyses")


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
        plan = plan_runs(findings, args.seeds, args.sets, base=not args.skip_eval)
        summaries = train_runs(plan, args.runs, args.steps, args.sets)
        result = collect(findings, plan, args.runs, summaries, args.seeds, args.out)
        if not args.skip_eval:
            evaluate_baseline(args.runs, plan[(BASE, 0)], args.out, args.items, args.steps)
        meta = {"steps": args.steps, "sets": args.sets, "wall_s": time.time() - t0,
                "command": " ".join(["python -m experiments.reproduce", *sys.argv[1:]]) if argv is None else None}
        Path(args.out, "findings.json").write_text(
            json.dumps({"meta": meta, "findings": result, "not_run": list(NOT_RUN)}, indent=1) + "\n")
    if args.report:
        from experiments import reproduce_report  # pylint: disable=import-outside-toplevel
        Path(args.md).write_text(reproduce_report.render(args.out, os.path.relpath(args.out, os.path.dirname(args.md) or ".")))
        print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
