"""Downstream accuracy by log-likelihood, in the two forms the OLMoE paper's evaluations use.

- cloze (CF): each answer is scored as the continuation of the query; `acc` picks the answer
  of highest log-likelihood, `acc_norm` the highest log-likelihood per character of the answer
  (lm-eval's acc_norm; the per-character normalisation OLMES uses).
- mc (MCF): the query is followed by the lettered choices ("A. 42") and "Answer:"; the
  letters " A", " B", ... are scored and `acc` picks the most likely letter. Small models are
  near chance in this form (the paper shows it only pays off with scale).
- completion tasks: `acc` is 1 when the whole continuation is the model's greedy (argmax)
  continuation; `logprob` is its mean log-likelihood (nats).

Every metric comes with its standard error over items (sample standard deviation / sqrt(n),
as lm-eval reports it).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from olmoe_jax.eval.loglik import Scorer, encode_pair
from olmoe_jax.eval.tasks import LETTERS, Task

FORMS = ("cloze", "mc")


def mc_prompt(query: str, choices: Sequence[str]) -> str:
    """The MC form's prompt: the query, one lettered line per choice, then "Answer:"."""
    lines = [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return f"{query}\n" + "\n".join(lines) + "\nAnswer:"


def requests(task: Task, form: str) -> list[list[tuple[str, str]]]:
    """Per item, the (context, continuation) strings to score, in choice order."""
    if task.kind == "completion":
        return [[(it.query, task.delimiter + it.choices[0])] for it in task.items]
    if form == "cloze":
        return [[(it.query, task.delimiter + c) for c in it.choices] for it in task.items]
    if form == "mc":
        return [[(mc_prompt(it.query, it.choices), f" {LETTERS[i]}") for i in range(len(it.choices))]
                for it in task.items]
    raise ValueError(f"unknown form {form!r}; choose from {FORMS}")


def _mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    x = np.asarray(values, np.float64)
    if x.size < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def metrics(task: Task, form: str, scores: list[list[tuple[float, bool]]]) -> dict[str, float]:
    """Metrics of one task in one form from its per-item, per-choice (logprob, is_greedy)."""
    out: dict[str, float] = {"n": len(task.items)}
    if task.kind == "completion":
        per_item = {"acc": [float(s[0][1]) for s in scores], "logprob": [s[0][0] for s in scores]}
    else:
        acc, acc_norm = [], []
        for it, s in zip(task.items, scores):
            ll = np.array([x[0] for x in s])
            acc.append(float(int(np.argmax(ll)) == it.gold))
            acc_norm.append(float(int(np.argmax(ll / np.array([len(c) for c in it.choices], float))) == it.gold))
        per_item = {"acc": acc} if form == "mc" else {"acc": acc, "acc_norm": acc_norm}
        out["chance"] = task.chance
    for name, values in per_item.items():
        out[name], out[f"{name}_stderr"] = _mean_stderr(values)
    return out


def evaluate_tasks(scorer: Scorer, tokenizer, tasks: Sequence[Task], forms: Sequence[str] = FORMS,
                   prefix_id: int | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """{task: {form: metrics}}; completion tasks have the single form "completion".

    All requests of all tasks go to the scorer together, so batches are full.
    """
    prefix_id = tokenizer.eos_id if prefix_id is None else prefix_id
    plan = []  # (task, form, per-item request lists)
    for task in tasks:
        for form in (("completion",) if task.kind == "completion" else forms):
            plan.append((task, form, requests(task, form)))
    flat = [encode_pair(tokenizer, c, x, prefix_id) for _, _, reqs in plan for item in reqs for c, x in item]
    scores = iter(scorer.loglikelihood(flat))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for task, form, reqs in plan:
        per_item = [[tuple(next(scores)) for _ in item] for item in reqs]
        out.setdefault(task.name, {})[form] = metrics(task, form, per_item)
    return out


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A plain-text table: task, form, n, accuracy +- stderr, acc_norm, chance."""
    rows = [f"{'task':<28}{'form':<12}{'n':>5}{'acc':>16}{'acc_norm':>16}{'chance':>8}"]
    for task, forms in results.items():
        for form, m in forms.items():
            pm = lambda k: f"{m[k]:.3f} ± {m[k + '_stderr']:.3f}" if k in m else "-"  # noqa: E731
            chance = f"{m['chance']:.3f}" if m.get("chance") is not None else "-"
            rows.append(f"{task:<28}{form:<12}{int(m['n']):>5}{pm('acc'):>16}{pm('acc_norm'):>16}{chance:>8}")
    return "\n".join(rows)
