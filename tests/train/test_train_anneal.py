"""The annealing phase: a run resumed with an anneal continues bit for bit up to the switch, then
its lr falls linearly to 0; milestone checkpoints survive keep_ckpts; bad anneals are refused."""
from __future__ import annotations

import json
import os

import pytest

from olmoe_jax.config import ConfigError
from olmoe_jax.train import checkpoint, loop
from olmoe_jax.train.optimizer import make_schedule


def _train_records(wd):
    with open(os.path.join(wd, "metrics.jsonl"), encoding="utf-8") as f:
        return {r["step"]: r for r in map(json.loads, f) if r["kind"] == "train"}


def test_anneal_continues_bit_exactly_then_decays_linearly_to_zero(synthetic, tmp_path):
    common = {"train.log_every": 1, "optim.decay_steps": 30}
    # The reference: 30 steps of warmup + cosine, no anneal.
    ref_cfg = synthetic.tiny_config(**common, **{"train.steps": 30})
    loop.train_on(ref_cfg, str(tmp_path / "ref"), synthetic.data(ref_cfg))
    ref = _train_records(str(tmp_path / "ref"))

    # The same run stopped at 20 (milestones every 10 kept beyond keep_ckpts=1) ...
    wd = str(tmp_path / "annealed")
    first = synthetic.tiny_config(**common, **{"train.steps": 20, "train.ckpt_every": 5,
                                               "train.keep_ckpts": 1, "train.keep_every": 10})
    loop.train_on(first, wd, synthetic.data(first))
    assert checkpoint.checkpoint_steps(wd) == [10, 20]

    # ... then resumed with a 10-step anneal from step 20: only the anneal keys and steps change.
    anneal = synthetic.tiny_config(**common, **{"train.steps": 30, "train.ckpt_every": 5, "train.keep_ckpts": 1,
                                                "train.keep_every": 10, "optim.anneal_start_step": 20,
                                                "optim.anneal_steps": 10})
    summary = loop.train_on(anneal, wd, synthetic.data(anneal))
    assert summary["start_step"] == 20 and summary["step"] == 30
    assert checkpoint.checkpoint_steps(wd) == [10, 20, 30]
    got = _train_records(wd)

    # Up to the switch: the same losses, bit for bit. (The first step of each session compiles
    # and is not logged: steps 1 and 21.)
    for s in range(2, 21):
        assert got[s]["loss"] == ref[s]["loss"], s
        assert got[s]["lr"] == ref[s]["lr"], s
    # After it: linear from the schedule's lr at update 20 to 0 at update 30.
    lr20 = float(make_schedule(ref_cfg)(19))
    assert got[20]["lr"] == pytest.approx(lr20, rel=1e-6)
    for s in range(22, 31):
        assert got[s]["lr"] == pytest.approx(lr20 * (1 - (s - 20) / 10), rel=1e-5, abs=1e-12), s
    assert got[30]["lr"] == 0.0 and ref[30]["lr"] > 0.5 * ref_cfg.optim.lr * ref_cfg.optim.final_lr_ratio
    assert got[30]["loss"] != ref[30]["loss"]

    # An anneal that would change updates already done is refused before anything is written.
    early = synthetic.tiny_config(**common, **{"train.steps": 40, "train.ckpt_every": 5, "train.keep_ckpts": 1,
                                               "train.keep_every": 10, "optim.anneal_start_step": 25,
                                               "optim.anneal_steps": 15})
    with pytest.raises(ConfigError, match=r"is at step 30.*change the lr of update 21"):
        loop.train_on(early, wd, synthetic.data(early))


def test_anneal_config_errors(synthetic):
    with pytest.raises(ConfigError, match="optim.anneal_start_step=10 needs optim.anneal_steps > 0"):
        synthetic.tiny_config(**{"optim.anneal_start_step": 10})
    with pytest.raises(ConfigError, match="train.keep_every=15 must be a multiple of train.ckpt_every=10"):
        synthetic.tiny_config(**{"train.ckpt_every": 10, "train.keep_every": 15})
