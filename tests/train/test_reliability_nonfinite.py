"""Non-finite steps: a batch whose loss mask holds a NaN (a corrupted data record) makes the
loss and every gradient NaN; the step must leave the state untouched and the loop apply
train.nonfinite (skip, up to train.max_skips in a row, or stop)."""
from __future__ import annotations

import json
import os

import grain
import jax
import numpy as np
import pytest

from olmoe_jax.parallel.mesh import make_mesh
from olmoe_jax.train import checkpoint, loop
from olmoe_jax.train import step as step_lib
from olmoe_jax.train.loop import Data


def _poisoned(synthetic, cfg, bad: set[int]) -> Data:
    """The synthetic stream with NaN in one loss-mask entry of the batches numbered in `bad`
    (batch n feeds step n + 1)."""
    base = synthetic.dataset(cfg)

    def batch(i):
        b = dict(base[i])
        if i in bad:
            b["loss_mask"] = b["loss_mask"].copy()
            b["loss_mask"][0, 3] = np.nan
        return b

    clean = synthetic.data(cfg)
    stream = grain.MapDataset.range(len(base)).map(batch).to_iter_dataset()
    return Data(train_iter=iter(stream), eval_batches=clean.eval_batches, unigram_entropy=clean.unigram_entropy)


def _records(wd, kind):
    with open(os.path.join(wd, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def test_step_leaves_the_state_untouched_on_a_nan_batch(synthetic):
    cfg = synthetic.tiny_config(**{"train.ckpt_every": 10})
    mesh = make_mesh(cfg)
    sh = step_lib.state_shardings(cfg, mesh)
    train_step = step_lib.make_train_step(cfg, mesh, sh)
    data = _poisoned(synthetic, cfg, {1})
    state, m = train_step(step_lib.init_state(cfg, sh), step_lib.global_batch(next(data.train_iter), mesh))
    assert int(m["nonfinite"]) == 0 and np.isfinite(float(m["loss"]))
    before = jax.device_get(state)  # the step donates its input state
    state, m = train_step(state, step_lib.global_batch(next(data.train_iter), mesh))
    assert int(m["nonfinite"]) == 1 and not np.isfinite(float(m["loss"]))
    after = jax.device_get(state)
    assert int(after.step) == 2  # the step counter follows the data, which consumed the batch
    jax.tree.map(np.testing.assert_array_equal, (after.params, after.opt_state), (before.params, before.opt_state))


def test_skip_policy_skips_counts_and_stops_after_max_skips(synthetic, tmp_path):
    cfg = synthetic.tiny_config(**{"train.ckpt_every": 10})  # nonfinite=skip, max_skips=5
    wd = str(tmp_path / "one")
    summary = loop.train_on(cfg, wd, _poisoned(synthetic, cfg, {12}))
    assert summary["step"] == 30 and np.isfinite(summary["train_loss"])
    train = _records(wd, "train")
    assert [r["skipped_steps"] for r in train] == [0, 0, 1, 0, 0, 0] and train[-1]["skipped_total"] == 1
    assert all(np.isfinite(r["loss"]) for r in train)  # skipped steps are left out of the means
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(jax.device_get(checkpoint.load_params(wd))))

    # Steps 13..19 in a row: the sixth, step 18, exceeds max_skips=5; nothing after it is saved.
    wd = str(tmp_path / "many")
    with pytest.raises(step_lib.NonFiniteError, match=r"step 18 .*6 in a row exceed train.max_skips=5"):
        loop.train_on(cfg, wd, _poisoned(synthetic, cfg, set(range(12, 19))))
    assert checkpoint.checkpoint_steps(wd) == [10]


def test_stop_policy_stops_at_the_first_and_keeps_the_last_good_checkpoint(synthetic, tmp_path):
    cfg = synthetic.tiny_config(**{"train.ckpt_every": 10, "train.nonfinite": "stop"})
    wd = str(tmp_path / "stop")
    with pytest.raises(step_lib.NonFiniteError, match=r"step 13 .*train.nonfinite=stop") as e:
        loop.train_on(cfg, wd, _poisoned(synthetic, cfg, {12}))
    assert "\n" not in str(e.value)
    assert checkpoint.checkpoint_steps(wd) == [10]
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(jax.device_get(checkpoint.load_params(wd))))
