"""`olmoe train` and `olmoe eval` end to end on real data files (pre-tokenized .npy)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from launch.cli import main

TINY = ["model.vocab_size=128", "model.d_model=32", "model.num_layers=2", "model.num_heads=2",
        "model.num_kv_heads=2", "model.num_experts=4", "model.top_k=2", "model.expert_dim=32",
        "data.seq_len=16", "data.batch_size=8", "data.eval_batches=2", "train.steps=4",
        "train.log_every=2", "train.eval_every=100", "train.ckpt_every=2", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def npy_overrides(npy_tokens):
    """tiny_moe shrunk, on a .npy token file (OLMo memmap format, EOS 0 between documents)."""
    return TINY + ["data.source=npy", "data.tokenizer=none", "data.eos_id=0", f"data.path={npy_tokens}"]


def _olmoe(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def _files(wd):
    return {os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns for r, _, fs in os.walk(wd) for f in fs}


def test_train_resume_eval_and_refusal(npy_overrides, tmp_path, capsys):
    wd = str(tmp_path / "run")
    code, out, err = _olmoe(capsys, "train", "--experiment", "tiny_moe", "--workdir", wd, *_sets(npy_overrides))
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["step"] == 4 and summary["start_step"] == 0
    assert set(summary["val_loss"]) == {"npy"} and np.isfinite(summary["val_loss"]["npy"])
    assert sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints"))) == [2, 4]
    with open(os.path.join(wd, "config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["name"] == "tiny_moe" and saved["model"]["d_model"] == 32 and saved["train"]["workdir"] == wd

    # eval: the newest checkpoint by default, or a given step; the same loss the run reported
    code, out, err = _olmoe(capsys, "eval", "--workdir", wd, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["step"] == 4
    assert result["val_loss"]["npy"] == pytest.approx(summary["val_loss"]["npy"], rel=1e-6)
    code, out, err = _olmoe(capsys, "eval", "--workdir", wd, "--step", "2")
    assert code == 0 and "step 2" in out and "npy" in out, err
    code, _, err = _olmoe(capsys, "eval", "--workdir", wd, "--step", "3")
    assert code == 2 and "--step 3" in err and "[2, 4]" in err

    # Without --experiment the workdir's config is used: a run that is done resumes at its end
    # (a longer train.steps would continue; the loop tests check resuming bit for bit).
    code, out, err = _olmoe(capsys, "train", "--workdir", wd)
    assert code == 0, err
    again = json.loads(out.strip().splitlines()[-1])
    assert again["start_step"] == 4 and again["step"] == 4

    # a different model is refused before anything is written
    before = _files(wd)
    code, out, err = _olmoe(capsys, "train", "--workdir", wd, "--set", "model.d_model=64")
    assert code == 2 and "model.d_model: 32 -> 64" in err and len(err.strip().splitlines()) == 1, err
    assert _files(wd) == before


def test_usage_errors(tmp_path, capsys):
    code, _, err = _olmoe(capsys, "train")
    assert code == 2 and "--experiment" in err
    code, _, err = _olmoe(capsys, "eval", "--workdir", str(tmp_path))
    assert code == 2 and "config.json does not exist" in err
