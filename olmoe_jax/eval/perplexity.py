"""Validation loss (perplexity) of a model: per-domain token cross-entropy over eval batches.

`evaluate` is what the training loop calls every `train.eval_every` steps; `checkpoint_loss`
is the same measurement on a saved checkpoint (`olmoe eval`), with the mesh, shardings and
data built here so the command stays a thin layer.
"""
from __future__ import annotations

from typing import Sequence

import jax

from olmoe_jax.train import step as step_lib


def evaluate(eval_step, params, eval_batches, mesh) -> dict[str, float]:
    """{domain: mean token cross-entropy (nats)} over each domain's batches.

    eval_step: `step.make_eval_step(...)`; eval_batches: {domain: [host batches]} as made by
    `data.make_eval_batches` (this process's share of each batch).
    """
    out = {}
    for domain, batches in eval_batches.items():
        sums = [eval_step(params, step_lib.global_batch(b, mesh)) for b in batches]
        total = jax.device_get(sums)
        tokens = sum(float(s["tokens"]) for s in total)
        out[domain] = sum(float(s["ce_sum"]) for s in total) / max(tokens, 1.0)
    return out


def format_val_table(val: dict[str, float], entropy: dict[str, float]) -> str:
    """Validation loss per domain beside the domain's unigram entropy (nats/token): a
    model that learnt nothing beyond token frequencies scores the entropy."""
    rows = [f"{'domain':<14}{'val loss':>10}{'unigram H':>11}"]
    for d, v in val.items():
        h = entropy.get(d)
        rows.append(f"{d:<14}{v:>10.4f}{h:>11.4f}" if h is not None else f"{d:<14}{v:>10.4f}{'-':>11}")
    return "validation loss (nats/token)\n" + "\n".join(rows)


def checkpoint_loss(cfg, workdir, steps: Sequence[int]) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
    """({step: {domain: nats}}, {domain: unigram entropy}) of `workdir`'s checkpoints.

    cfg: the workdir's config (validated for this device count; data.* and mesh.* may differ
    from training). The data is checked and built once, the eval step compiled once.
    """
    # pylint: disable=import-outside-toplevel
    from olmoe_jax import data as data_lib
    from olmoe_jax.model import transformer
    from olmoe_jax.parallel.mesh import make_mesh
    from olmoe_jax.train import checkpoint

    data_lib.check_data(cfg)
    tok = data_lib.make_tokenizer(cfg)
    batches = data_lib.make_eval_batches(cfg, tok, process_index=jax.process_index(),
                                         process_count=jax.process_count())
    entropy = data_lib.unigram_entropy(cfg, tok)
    mesh = make_mesh(cfg)
    shardings = transformer.param_shardings(cfg, mesh)
    eval_step = step_lib.make_eval_step(cfg, mesh, shardings)
    out = {}
    for s in steps:
        params = checkpoint.load_params(workdir, s, shardings=shardings)
        out[s] = evaluate(eval_step, params, batches, mesh)
    return out, entropy
