"""Run routing analyses on a workdir's checkpoints and write `<name>.json` + `<name>.png`.

Text: the built-in corpus's validation split (four domains), tokenized with the workdir's
own tokenizer, or any labelled JSONL file ({"text", "domain"} lines), so an imported HF
OLMoE (a params-only workdir with the GPT-NeoX tokenizer) is analysed the same way.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from olmoe_jax.analysis import analyses, plots, routing
from olmoe_jax.data.errors import DataError

ANALYSES = ("saturation", "coactivation", "domain", "vocab")


def _documents(cfg, data_path: str | None) -> list[tuple[str, str]]:
    if data_path:
        return routing.read_labelled_jsonl(data_path)
    from olmoe_jax.data import corpus  # pylint: disable=import-outside-toplevel
    return corpus.read_split(cfg.data.data_dir, "validation")


def write(result: dict, out_dir: str, name: str) -> tuple[str, str]:
    """Writes <out_dir>/<name>.json and draws <name>.png; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, png = out / f"{name}.json", out / f"{name}.png"
    js.write_text(json.dumps(result, indent=1) + "\n")
    getattr(plots, {"domain": "domain_specialisation", "vocab": "vocab_specialisation"}.get(name, name))(result, str(png))
    return str(js), str(png)


def analyze(workdir: str, which: Sequence[str], out_dir: str, *, step: int | None = None,
            data_path: str | None = None, tokens_per_domain: int = 16384, seq_len: int = 0,
            min_count: int = 8, batch_size: int = 8) -> dict[str, dict]:
    """Runs the named analyses (ANALYSES) on `workdir` at `step` (default: the newest; the
    saturation analysis uses every checkpoint up to it); returns {name: result}."""
    # pylint: disable=import-outside-toplevel
    from olmoe_jax.data import make_tokenizer
    from olmoe_jax.train import checkpoint

    bad = [w for w in which if w not in ANALYSES]
    if bad:
        raise DataError(f"unknown analysis {bad[0]!r}; choose from {', '.join(ANALYSES)} or all")
    cfg = checkpoint.load_config(workdir)
    if cfg.model.ffn_type != "moe":
        raise DataError(f"{workdir} holds a dense model (model.ffn_type=dense): the routing analyses need an MoE")
    steps = checkpoint.checkpoint_steps(workdir)
    if not steps:
        raise DataError(f"{workdir} holds no checkpoint yet; train or import one first")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise DataError(f"--step {step}: {workdir} has checkpoints at steps {steps}")
    if "saturation" in which and len([s for s in steps if s <= step]) < 2:
        raise DataError(f"router saturation compares checkpoints over training; {workdir} has only "
                        f"step(s) {steps}. Train with a smaller train.ckpt_every and a larger train.keep_ckpts")
    tok = make_tokenizer(cfg)
    rows = routing.labelled_rows(tok, _documents(cfg, data_path), seq_len or min(cfg.data.seq_len, cfg.model.max_seq_len),
                                 tokens_per_domain)
    if not rows:
        raise DataError("no label has enough text for one row; lower --seq-len or give more text")
    worst = max(int(r.max()) for r in rows.values())
    if worst >= cfg.model.vocab_size or min(int(r.min()) for r in rows.values()) < 0:
        raise DataError(f"token id {worst} of the analysis text is outside model.vocab_size={cfg.model.vocab_size}")
    E = cfg.model.num_experts

    def routed_at(s):
        params = checkpoint.load_params(workdir, s)
        return {label: routing.collect(params, cfg, r, batch_size) for label, r in rows.items()}

    final = routed_at(step)
    results = {}
    if "saturation" in which:
        pooled = {s: analyses.pooled(routed_at(s) if s != step else final)
                  for s in steps if s <= step}
        results["saturation"] = analyses.saturation(pooled, step)
    if "coactivation" in which:
        results["coactivation"] = analyses.coactivation(final, E)
    if "domain" in which:
        results["domain"] = analyses.domain_specialisation(final, E)
    if "vocab" in which:
        results["vocab"] = analyses.vocab_specialisation(final, E, min_count=min_count,
                                                         decode=lambda i: tok.decode([i]))
    for name, res in results.items():
        res.update(workdir=str(workdir), step=int(step))
        write(res, out_dir, name)
    return results
