"""The four analyses from routing data to JSON-ready dicts (plots.py draws them).

Each takes `Routed` data (routing.py) of one checkpoint, per label (domain) where the
analysis is per domain, and the model's expert count; all numbers are plain Python floats.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from olmoe_jax.analysis import metrics
from olmoe_jax.analysis.routing import Routed


def pooled(routed: dict[str, Routed]) -> Routed:
    parts = list(routed.values())
    return Routed(np.concatenate([r.experts_LNk for r in parts], axis=1),
                  np.concatenate([r.inputs_N for r in parts]), np.concatenate([r.predicted_N for r in parts]))


def saturation(by_step: dict[int, Routed], final_step: int) -> dict:
    """{steps, final_step, k, tokens, saturation {str(step): [L]}}: top-k overlap with the final
    checkpoint's routing of the same tokens, per layer (1.0 at the final step)."""
    final = by_step[final_step].experts_LNk
    sat = {str(s): metrics.saturation(r.experts_LNk, final).tolist() for s, r in sorted(by_step.items())}
    return {"steps": sorted(int(s) for s in by_step), "final_step": int(final_step), "k": int(final.shape[-1]),
            "tokens": int(final.shape[1]), "saturation": sat}


def coactivation(routed: dict[str, Routed], num_experts: int, top: int = 5) -> dict:
    """{num_experts, tokens, layers: [{ratio [E][E], top_pairs [[i, j, ratio]]}]} over all labels."""
    r = pooled(routed)
    layers = []
    for experts_Nk in r.experts_LNk:
        ratio, _ = metrics.coactivation(experts_Nk, num_experts)
        flat = np.argsort(-ratio, axis=None, kind="stable")[:top]
        pairs = [[int(i), int(j), float(ratio[i, j])] for i, j in zip(*np.unravel_index(flat, ratio.shape))]
        layers.append({"ratio": ratio.tolist(), "top_pairs": pairs})
    return {"num_experts": num_experts, "tokens": int(r.inputs_N.size), "layers": layers}


def domain_specialisation(routed: dict[str, Routed], num_experts: int) -> dict:
    """{num_experts, k, uniform = k/E, tokens {label: N}, share {label: [L][E]}, max_share
    {label: [L]}}: share of each label's tokens routed to each expert, per layer."""
    k = next(iter(routed.values())).experts_LNk.shape[-1]
    share = {label: [metrics.expert_share(e, num_experts).tolist() for e in r.experts_LNk]
             for label, r in routed.items()}
    return {"num_experts": num_experts, "k": int(k), "uniform": k / num_experts,
            "tokens": {label: int(r.inputs_N.size) for label, r in routed.items()}, "share": share,
            "max_share": {label: [max(layer) for layer in s] for label, s in share.items()}}


def vocab_specialisation(routed: dict[str, Routed], num_experts: int, *, min_count: int = 8,
                         decode: Callable[[int], str] | None = None, top: int = 5) -> dict:
    """{uniform, min_count, input / predicted: {mean_share [L] (over token ids with at least
    min_count occurrences), ids [L], top_tokens [L][E] (the `top` ids most specialised
    to each expert: [id, text, share, count])}}."""
    r = pooled(routed)
    k = r.experts_LNk.shape[-1]
    out = {"num_experts": num_experts, "k": int(k), "uniform": k / num_experts, "min_count": min_count,
           "tokens": int(r.inputs_N.size)}
    for kind, ids in (("input", r.inputs_N), ("predicted", r.predicted_N)):
        mean, n_ids, tops = [], [], []
        for experts_Nk in r.experts_LNk:
            v = metrics.vocab_specialisation(experts_Nk, ids, num_experts, min_count)
            mean.append(float(v["share"].mean()) if v["share"].size else float("nan"))
            n_ids.append(int(v["ids"].size))
            per_expert = []
            for e in range(num_experts):
                sel = np.flatnonzero(v["top_expert"] == e)
                sel = sel[np.argsort(-v["share"][sel], kind="stable")][:top]
                per_expert.append([[int(v["ids"][i]), decode(int(v["ids"][i])) if decode else "",
                                    float(v["share"][i]), int(v["count"][i])] for i in sel])
            tops.append(per_expert)
        out[kind] = {"mean_share": mean, "ids": n_ids, "top_tokens": tops}
    return out
