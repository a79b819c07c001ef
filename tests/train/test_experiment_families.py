"""The ablation families: full-scale configs validate and print their parameter counts, variants
compared at equal compute have equal (active) expert parameters, and every CPU twin trains.

The twins train 3 steps each with their widths shrunk (d_model 32, vocab 128, seq 16; layer
layout, routing, norms, losses and optimizer kept) on the synthetic stream, so the test costs
one small compile per distinct train step.
"""
from __future__ import annotations

import math

import jax
import pytest

import experiments
from launch.cli import main
from olmoe_jax.config import validate
from olmoe_jax.model import transformer
from olmoe_jax.parallel.mesh import make_mesh
from olmoe_jax.train import step as step_lib

ABLATIONS = [f for f in experiments.families() if f not in ("olmoe_1b7b", "tiny")]
FULL = [e.name for f in ABLATIONS for e in experiments.family_entries(f, "full")]
TWINS = [e.name for f in ABLATIONS for e in experiments.family_entries(f, "tiny")]


def test_every_family_has_full_and_tiny_arms_for_each_variant():
    assert len(ABLATIONS) >= 13
    for family in ABLATIONS:
        full = [e.name for e in experiments.family_entries(family, "full")]
        tiny = [e.name for e in experiments.family_entries(family, "tiny")]
        assert len(full) >= 2 and tiny == [f"{n}-tiny" for n in full], family
        for name in full + tiny:
            assert f"olmoe train --experiment {name}" in experiments.entry(name).doc


def test_full_scale_configs_validate_and_print_parameter_counts(capsys):
    for name in FULL:
        assert main(["experiments", "--params", name]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        total, active = transformer.count_params(experiments.get(name))
        assert first == f"{name}: total {total:,} parameters, active per token {active:,}"
        assert total > 1e9 and active > 1e9


def _routers(cfg) -> int:
    specs = transformer.param_specs(cfg)
    return math.prod(specs["layers"]["moe"]["router"].shape) if "moe" in specs["layers"] else 0


def _without_routers(name):
    cfg = experiments.get(name)
    total, active = transformer.count_params(cfg)
    return total - _routers(cfg), active - _routers(cfg)


@pytest.mark.parametrize("suffix", ["", "-tiny"])
def test_equal_compute_where_the_paper_compares_at_equal_compute(suffix):
    arms = lambda fam: [_without_routers(e.name) for e in experiments.family_entries(fam)  # noqa: E731
                        if e.name.endswith(suffix) and (suffix or not e.name.endswith("-tiny"))]
    for family in ("granularity", "shared_expert", "layer_shared", "expert_choice"):
        counts = arms(family)
        assert len(set(counts)) == 1, (family, counts)  # equal total and active, routers aside
    moe, dense = arms("moe_vs_dense")
    assert moe[1] == dense[1] and moe[0] > 4 * dense[0] // 2  # equal active; the MoE holds more


def _smoke(cfg):
    """The twin with its widths shrunk: what it computes stays the same kind of model. Keys the
    train step does not read (data source and mixture, the init) are set to one value, so twins
    that differ only there share one compiled step (the data side is tested in tests/data,
    init in tests/model)."""
    m = cfg.model
    m.update(vocab_size=128, d_model=32, num_heads=2, num_kv_heads=2, max_seq_len=16,
             expert_dim=max(8, m.expert_dim // 8), mlp_dim=max(16, m.mlp_dim // 8), init="truncated_normal")
    cfg.data.update(seq_len=16, batch_size=8, mixture="", eval_path="")
    cfg.optim.warmup_steps = 2
    cfg.name = "smoke"
    return cfg


def _programs():
    """{shrunk config as JSON: the twins that give it}, so each distinct step compiles once."""
    out: dict[str, list[str]] = {}
    for name in TWINS:
        out.setdefault(_smoke(experiments.get(name)).to_json(sort_keys=True), []).append(name)
    return out


def test_every_twin_is_minutes_on_this_cpu_and_its_mixture_fits_the_corpus():
    from olmoe_jax.config import parse_mixture  # pylint: disable=import-outside-toplevel
    from olmoe_jax.data.corpus import DOMAINS  # pylint: disable=import-outside-toplevel
    for name in TWINS:
        cfg = experiments.get(name)
        assert cfg.train.steps <= 400 and cfg.data.source == "builtin" and cfg.model.d_model <= 128, name
        assert set(parse_mixture(cfg.data.mixture)) <= set(DOMAINS) if cfg.data.mixture else True


@pytest.mark.parametrize("program", list(_programs().values()), ids=lambda names: "+".join(names))
def test_every_cpu_twin_trains_three_steps(program, synthetic, random_params):
    """Three AdamW steps of the twin's train step (the loop itself is tested in
    test_train_loop): the loss is finite and falls on the learnable synthetic stream."""
    cfg = validate(_smoke(experiments.get(program[0])), num_devices=jax.device_count())
    mesh = make_mesh(cfg)
    shardings = step_lib.state_shardings(cfg, mesh)
    params = jax.device_put(random_params(cfg, std=0.02), shardings.params)
    state = step_lib.state_from_params(cfg, params, shardings)
    train_step, stream = step_lib.make_train_step(cfg, mesh, shardings), synthetic.data(cfg).train_iter
    losses = []
    for _ in range(3):
        state, metrics = train_step(state, step_lib.global_batch(next(stream), mesh))
        losses.append(float(metrics["loss"]))
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert int(state.step) == 3
