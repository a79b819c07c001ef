"""docs/reproduction.md from the committed results of `python -m experiments.reproduce --run`.

Every number in the report is read from the JSON files in the results folder; nothing is
typed in by hand, so `--report` after a new `--run` rewrites the whole page consistently.
"""
from __future__ import annotations

import json
from pathlib import Path

NOISE_FLOOR = 0.005  # nats: below this a difference is not called a direction, even with one seed


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _spread(finding: dict) -> float:
    """The largest max - min over seeds of the validation loss of any variant (0 with one seed)."""
    per = [[s["val_mean"] for s in v["seeds"].values()] for v in finding["variants"].values()]
    return max((max(v) - min(v) for v in per if len(v) > 1), default=0.0)


def seed_spread(findings: dict) -> float:
    """The largest seed spread of any variant of any finding: the noise a one-seed finding's
    difference is held to (its own run cannot show how far another seed would land)."""
    return max((_spread(f) for f in findings.values()), default=0.0)


def verdict(finding: dict, floor: float = NOISE_FLOOR) -> tuple[str, dict]:
    """('yes' | 'opposite' | 'within noise', numbers) for a finding: does the variant the
    paper's finding predicts to be better at this budget (the first) reach a lower mean
    validation loss than every other, by more than the noise: the finding's own seed spread
    or `floor` (the reproduction's largest seed spread), whichever is larger?"""
    per = {label: [s["val_mean"] for s in v["seeds"].values()] for label, v in finding["variants"].items()}
    means = {label: _mean(vals) for label, vals in per.items()}
    spread = _spread(finding)
    noise = max(spread, floor)
    first, *others = list(means)
    diffs = [means[o] - means[first] for o in others]
    if all(d > noise for d in diffs):
        call = "yes"
    elif any(d < -noise for d in diffs):
        call = "opposite"
    else:
        call = "within noise"
    return call, {"means": means, "spread": spread, "noise": noise, "diffs": dict(zip(others, diffs))}


def _finding_section(key: str, f: dict, rel: str, floor: float) -> str:
    call, nums = verdict(f, floor)
    lines = [f"### {f['title']}", "", f"**Paper:** {f['claim']}.", "",
             "| variant | experiment | val loss (mean of domains) per seed | mean | train loss | tokens/s |",
             "|---|---|---|---|---|---|"]
    for label, v in f["variants"].items():
        seeds = v["seeds"]
        per = ", ".join(f"{s['val_mean']:.4f}" for s in seeds.values())
        train = _mean([s["train_loss"] for s in seeds.values()])
        tps = _mean([s["tokens_per_s"] for s in seeds.values()])
        over = f"`{v['experiment']}`"
        lines.append(f"| {label} | {over} | {per} | {nums['means'][label]:.4f} | "
                     f"{train:.4f} | {tps:,.0f} |" if train is not None and tps else
                     f"| {label} | {over} | {per} | {nums['means'][label]:.4f} | - | - |")
    lines.append("")
    diffs = "; ".join(f"{o}: {d:+.4f}" for o, d in nums["diffs"].items())
    noise = (f"seed spread {nums['spread']:.4f}, noise {nums['noise']:.4f}" if nums["spread"] else
             f"one seed; noise {nums['noise']:.4f}, the largest seed spread of this reproduction")
    lines.append(f"**Ours:** validation loss of each other variant minus the one the paper's finding favours: {diffs} "
                 f"nats ({noise}). **Direction reproduced: {call}.**")
    if f.get("extra") == "layer0_max_load":
        loads = {label: _mean([s.get("layer0_max_load") for s in v["seeds"].values()])
                 for label, v in f["variants"].items()}
        uni = next(iter(next(iter(f["variants"].values()))["seeds"].values())).get("uniform_load")
        lines.append("Layer 0's busiest expert takes " + ", ".join(
            f"{loads[label]:.3f} ({label})" for label in loads) + f" of the routed slots (uniform {uni:.3f}).")
    if f.get("extra") == "tokens_per_s":
        tps = {label: _mean([s["tokens_per_s"] for s in v["seeds"].values()]) for label, v in f["variants"].items()}
        first, *others = list(tps)
        lines.append("Throughput: " + ", ".join(f"{label} {tps[label] / tps[first]:.2f}x" for label in others)
                     + f" the tokens/s of {first} (CPU, shared machine: a rough measure).")
    if call != "yes" and f.get("why_not"):
        lines.append(f"Likely reason it does not show here: {f['why_not']}.")
    lines += ["", f"![{f['title']}]({rel}/{key}.png)", ""]
    return "\n".join(lines)


def _downstream(d: dict) -> str:
    steps = sorted(d["steps"], key=int)
    tasks = list(d["steps"][steps[-1]])
    lines = ["| task | form | chance | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|---|---|" + "---|" * len(steps)]
    for t in tasks:
        for form, m in d["steps"][steps[-1]][t].items():
            metric = "acc_norm" if form == "cloze" else "acc"
            cells = [f"{d['steps'][s][t][form][metric]:.3f} ± {d['steps'][s][t][form][metric + '_stderr']:.3f}"
                     for s in steps]
            chance = f"{m['chance']:.2f}" if m.get("chance") is not None else "-"
            lines.append(f"| {t} | {form} ({metric}) | {chance} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _analyses(out: Path, rel: str) -> str:
    parts = []
    sat = out / "saturation.json"
    if sat.exists():
        s = json.loads(sat.read_text())
        first = s["steps"][0]
        vals = ", ".join(f"layer {i} {100 * v:.0f}%" for i, v in enumerate(s["saturation"][str(first)]))
        parts += ["### Router saturation", "",
                  "**Paper:** about 60% of the final top-k routing is in place after 1% of training; "
                  "later layers saturate later.", "",
                  f"**Ours:** at step {first} ({100 * first / s['final_step']:.0f}% of training) the top-{s['k']} "
                  f"overlap with the final checkpoint is {vals}.", "", f"![saturation]({rel}/saturation.png)", ""]
    dom = out / "domain.json"
    if dom.exists():
        d = json.loads(dom.read_text())
        rows = [f"| {label} | " + " | ".join(f"{v:.3f}" for v in m) + " |" for label, m in d["max_share"].items()]
        n = len(next(iter(d["max_share"].values())))
        parts += ["### Domain specialisation", "",
                  "**Paper:** experts specialise on domains (arXiv, GitHub far above uniform k/E); "
                  "general text (C4) stays close to uniform.", "",
                  f"**Ours:** the largest share of a domain's tokens routed to one expert, per layer "
                  f"(uniform k/E = {d['uniform']:.3f}):", "",
                  "| domain | " + " | ".join(f"layer {i}" for i in range(n)) + " |", "|---|" + "---|" * n, *rows, "",
                  f"![domain specialisation]({rel}/domain.png)", ""]
    voc = out / "vocab.json"
    if voc.exists():
        v = json.loads(voc.read_text())
        fmt = lambda xs: ", ".join(f"{x:.3f}" for x in xs)  # noqa: E731
        parts += ["### Vocabulary specialisation", "",
                  "**Paper:** later layers specialise more on the predicted (output) token ids; "
                  "input ids specialise in early layers.", "",
                  f"**Ours:** mean share of a token id's occurrences routed to its top expert, per layer "
                  f"(ids seen at least {v['min_count']} times; uniform k/E = {v['uniform']:.3f}): input "
                  f"{fmt(v['input']['mean_share'])}; predicted {fmt(v['predicted']['mean_share'])}.", "",
                  f"![vocabulary specialisation]({rel}/vocab.png)", ""]
    co = out / "coactivation.json"
    if co.exists():
        c = json.loads(co.read_text())
        tops = "; ".join(f"layer {i}: " + ", ".join(f"E{a}->E{b} {r:.2f}" for a, b, r in layer["top_pairs"][:3])
                         for i, layer in enumerate(c["layers"]))
        parts += ["### Expert co-activation", "",
                  "**Paper:** little co-activation overall (experts are not redundant); a few pairs "
                  "co-activate strongly, most in later layers.", "",
                  f"**Ours:** strongest N(Ei, Ej) / N(Ei) per layer: {tops}.", "",
                  f"![co-activation]({rel}/coactivation.png)", ""]
    return "\n".join(parts) if parts else "Not run (`--skip-eval`)."


def render(out_dir: str, rel: str) -> str:
    """The markdown page; `rel` is the results folder relative to the page."""
    out = Path(out_dir)
    if (out / "findings.json").exists():
        data = json.loads((out / "findings.json").read_text())
    else:  # only the baseline's evaluation and analyses are there so far
        data = {"meta": {"steps": None, "wall_s": None}, "findings": {}}
    meta, findings = data["meta"], data["findings"]
    floor = max(NOISE_FLOOR, seed_spread(findings))
    walls = {v.get("runs", {}).get(seed, f"{k}/{label}/{seed}"): s["wall_s"] for k, f in findings.items()
             for label, v in f["variants"].items() for seed, s in v["seeds"].items()}  # a shared run once
    calls = {k: verdict(f, floor)[0] for k, f in findings.items()}
    summary = ["| finding | paper | reproduced here? |", "|---|---|---|"]
    summary += [f"| [{f['title']}](#{f['title'].lower().replace(' ', '-')}) | {f['claim']} | {calls[k]} |"
                for k, f in findings.items()]
    down = out / "downstream.json"
    sets = " ".join(f"--set {s}" for s in meta.get("sets") or [])
    page = [
        "# Reproducing the OLMoE paper at CPU scale", "",
        "Generated by `python -m experiments.reproduce --report` from the results in "
        f"`{rel}/` (written by `python -m experiments.reproduce --run`{' ' + sets if sets else ''}"
        + (f"; {meta['steps']} steps per run, {len(walls)} runs, {sum(walls.values()) / 60:.0f} minutes of "
           "training on 2 CPU cores" if meta["steps"] else "")
        + "). Do not edit by hand.", "",
        "Every run is a tiny_moe-sized model (4 layers, d_model 128, vocab 4096) trained on the built-in "
        "corpus, a scale about 10^5 times smaller in compute than the paper's ablations: a direction "
        "that reproduces here is evidence, one that does not is not a refutation. A direction counts "
        "as reproduced when the variant the paper's finding favours (at this token budget) has the "
        "lower mean validation loss (mean of the four domains, nats/token) by more than the spread between seeds: its own, and at least the "
        "largest seen in any variant here"
        + (f" ({floor:.4f} nats)" if findings else "") + ", since one seed cannot show its own.", "",
        "## Summary", "", *(summary if findings else ["No findings run yet."]), "",
        "## Findings", "",
        *([_finding_section(k, f, rel, floor) for k, f in findings.items()] if findings else
          ["Not run yet: the ablation runs of `python -m experiments.reproduce --run` (about an hour on "
           "2 cores) have not been made; the sections below are from one tiny_moe run.", ""]),
        *(["## Not run at this scale", "",
            *[f"- **{n['title']}.** Paper: {n['claim']}. Not run: {n['why']}. Entries: "
              + ", ".join(f"`{e}`" for e in n["entries"]) + "." for n in data.get("not_run", [])], ""]
          if data.get("not_run") else []),
        "## Downstream accuracy of tiny_moe over training", "",
        ("Built-in tasks (held-out items in the formats of the corpus's arithmetic and records domains; "
         "`olmoe eval --tasks builtin --step N ...`), accuracy ± standard error over 200 items; cloze form "
         "per-character normalised, MC form the answer letter. Model: "
         f"{json.loads(down.read_text()).get('run', '')}.\n\n" + _downstream(json.loads(down.read_text()))
         if down.exists() else "Not run (`--skip-eval`)."), "",
        "## Routing analyses of tiny_moe (paper section 5)", "",
        "`olmoe analyze all --workdir W`: the built-in corpus's validation split, 16,384 tokens per "
        "domain, final checkpoint (saturation: every checkpoint against it).", "",
        _analyses(out, rel), "",
    ]
    return "\n".join(page)
