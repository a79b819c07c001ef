"""Every registered experiment validates, and its init traces (eval_shape: no memory)."""
import jax
import pytest

import experiments
from olmoe_jax.config import ConfigError
from olmoe_jax.model import transformer


def test_registry_has_the_required_experiments():
    assert {"olmoe_1b7b", "dense_1b", "tiny_moe", "tiny_dense"} <= set(experiments.names())


@pytest.mark.parametrize("name", experiments.names())
def test_every_experiment_validates_and_eval_shapes(name):
    cfg = experiments.get(name)
    assert cfg.name == name and experiments.describe(name)
    shapes = jax.eval_shape(lambda: transformer.init(cfg, jax.random.key(0)))
    total, active = transformer.count_params(cfg)
    assert total == sum(x.size for x in jax.tree.leaves(shapes)) and 0 < active <= total


@pytest.mark.parametrize("name", [n for n in experiments.names() if n.startswith("tiny")])
def test_small_experiments_run_forward(name):
    cfg = experiments.get(name)
    params = transformer.init(cfg, jax.random.key(0))
    tok = jax.numpy.zeros((1, 32), jax.numpy.int32)
    logits, _ = transformer.apply(params, tok, cfg)
    assert logits.shape == (1, 32, cfg.model.vocab_size)


def test_dense_baseline_matches_moe_active_params():
    moe = transformer.count_params(experiments.get("olmoe_1b7b"))[1]
    dense = transformer.count_params(experiments.get("dense_1b"))[0]
    router = 16 * 2048 * 64
    assert dense == moe - router


def test_unknown_experiment_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown experiment 'nope'"):
        experiments.get("nope")
