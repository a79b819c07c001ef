"""The training loop end to end on the synthetic stream: learning, metrics, resume, params start."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from olmoe_jax.config import ConfigError
from olmoe_jax.parallel.mesh import make_mesh
from olmoe_jax.train import checkpoint, loop
from olmoe_jax.train import step as step_lib

CKPT_EVERY = 10


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic):
    """30 steps in one go (checkpoints at 10, 20, 30): the reference for the other tests."""
    cfg = synthetic.tiny_config(**{"train.ckpt_every": CKPT_EVERY})
    wd = tmp_path_factory.mktemp("uninterrupted")
    data = synthetic.data(cfg)
    summary = loop.train_on(cfg, str(wd), data)
    return cfg, str(wd), data, summary


def _records(wd, kind):
    with open(os.path.join(wd, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def _tree(wd):
    """Every file under wd with its size and mtime: to show that nothing was written."""
    out = {}
    for root, _, files in os.walk(wd):
        for name in files:
            st = os.stat(os.path.join(root, name))
            out[os.path.join(root, name)] = (st.st_size, st.st_mtime_ns)
    return out


def test_loss_falls_on_learnable_stream(uninterrupted):
    cfg, wd, _, summary = uninterrupted
    train = _records(wd, "train")
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    # The next token is a fixed function of the current one; at init the loss is about ln V.
    assert train[0]["loss"] > 3.0
    assert train[-1]["loss"] < train[0]["loss"] - 1.5
    h = summary["unigram_entropy"]["synthetic"]
    assert summary["val_loss"]["synthetic"] < 0.5 * h
    assert summary["step"] == 30 and summary["start_step"] == 0


def test_metrics_are_logged(uninterrupted):
    cfg, wd, _, summary = uninterrupted
    last = _records(wd, "train")[-1]
    for key in ("loss", "ce_loss", "lb_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "dropped_frac"):
        assert np.isfinite(last[key]), key
    load = np.array(last["expert_load_per_layer"])
    assert load.shape == (cfg.model.num_layers, cfg.model.num_experts)
    np.testing.assert_allclose(load.sum(axis=1), 1.0, rtol=1e-6)
    assert len(last["dropped_frac_per_layer"]) == cfg.model.num_layers
    # warmup 5 of a 30-step cosine to 0.1 x peak: the last update runs at the final lr
    assert last["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.final_lr_ratio, rel=1e-6)
    assert _records(wd, "eval")[-1]["val_loss"] == summary["val_loss"]
    with open(os.path.join(wd, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert {r["kind"] for r in records} == {"start", "setup", "train", "eval", "summary"}
    assert all("step" in r and "time" in r for r in records)  # docs/interfaces.md
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(wd, "tb")))
    assert summary["tokens_per_s"] > 0 and 0 < summary["mfu"] < 1


def test_resume_after_crash_is_bit_exact(uninterrupted, synthetic, tmp_path):
    cfg, ref_wd, ref_data, _ = uninterrupted
    wd = str(tmp_path / "crashy")
    # Crash while fetching batch 17: steps 11-16 are lost, the checkpoint at 10 survives.
    with pytest.raises(synthetic.CrashAt):
        loop.train_on(cfg, wd, synthetic.data(cfg, fail_at_batch=16))
    assert checkpoint.checkpoint_steps(wd) == [CKPT_EVERY]

    data = synthetic.data(cfg)
    summary = loop.train_on(cfg, wd, data)
    assert summary["start_step"] == CKPT_EVERY and summary["step"] == 30
    got, want = checkpoint.load_params(wd), checkpoint.load_params(ref_wd)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))
    # The restored iterator went on from where the checkpoint was: the same next batch.
    nxt, ref_nxt = next(data.train_iter), next(ref_data.train_iter)
    for k in ("inputs", "targets", "loss_mask"):
        np.testing.assert_array_equal(nxt[k], ref_nxt[k])


def test_changed_config_is_refused_before_writing(uninterrupted, synthetic):
    cfg, wd, _, _ = uninterrupted
    before = _tree(wd)
    changed = synthetic.tiny_config(**{"train.ckpt_every": CKPT_EVERY, "model.d_model": 64, "optim.lr": 1e-3})
    with pytest.raises(ConfigError, match=r"model\.d_model.*optim\.lr"):
        loop.train_on(changed, wd, synthetic.data(changed))
    assert _tree(wd) == before


def test_bad_mesh_fails_before_writing(synthetic, tmp_path):
    cfg = synthetic.tiny_config(**{"mesh.data": 3})
    with pytest.raises(ConfigError, match="mesh sizes multiply to 3 but there are 8 devices"):
        loop.train_on(cfg, str(tmp_path / "wd"), synthetic.data(cfg))
    assert not (tmp_path / "wd").exists()


def test_start_from_params_only_checkpoint(uninterrupted, synthetic, tmp_path):
    cfg, ref_wd, _, _ = uninterrupted
    params = checkpoint.load_params(ref_wd)
    wd = str(tmp_path / "imported")
    checkpoint.save_params(wd, params, cfg)

    other = synthetic.tiny_config(**{"model.num_experts": 8})
    with pytest.raises(ConfigError, match="model.num_experts"):
        loop.train_on(other, wd, synthetic.data(other))

    # The same config as the reference run, so every program but the params-to-state one is
    # already compiled.
    summary = loop.train_on(cfg, wd, synthetic.data(cfg))
    assert summary["start_step"] == 0 and summary["step"] == cfg.train.steps

    # Expected: the same steps from exactly those params with a fresh optimizer.
    mesh = make_mesh(cfg)
    sh = step_lib.state_shardings(cfg, mesh)
    state = step_lib.state_from_params(cfg, jax.device_put(params, sh.params), sh)
    train_step, stream = step_lib.make_train_step(cfg, mesh, sh), synthetic.data(cfg).train_iter
    for _ in range(cfg.train.steps):
        state, _ = train_step(state, step_lib.global_batch(next(stream), mesh))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(checkpoint.load_params(wd)),
                 jax.device_get(state.params))
