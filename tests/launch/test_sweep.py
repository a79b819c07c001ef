"""`olmoe sweep` end to end on a tiny grid (two runs on a .npy token file), its status, the
rerun that has nothing left to do, an interrupted run resumed; grid parsing."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from launch.cli import main
from olmoe_jax.config import ConfigError
from olmoe_jax.train.sweep import grid_points

TINY = ["model.vocab_size=128", "model.d_model=32", "model.num_layers=2", "model.num_heads=2",
        "model.num_kv_heads=2", "model.num_experts=4", "model.expert_dim=32", "data.seq_len=16",
        "data.batch_size=8", "data.eval_batches=1", "train.steps=4", "train.log_every=2",
        "train.eval_every=100", "train.ckpt_every=2", "optim.warmup_steps=2"]


def _olmoe(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _mtimes(folder):
    return {os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns
            for r, _, fs in os.walk(folder) for f in fs}


@pytest.fixture(scope="module")
def npy_sets(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "part-0.npy"
    rng = np.random.default_rng(0)
    np.concatenate([np.append(rng.integers(1, 128, rng.integers(20, 200)), 0) for _ in range(300)]) \
        .astype(np.uint16).tofile(path)
    sets = TINY + ["data.source=npy", "data.tokenizer=none", "data.eos_id=0", f"data.path={path}"]
    return [a for s in sets for a in ("--set", s)]


def test_two_run_sweep_status_rerun_and_resume(npy_sets, tmp_path, capsys):
    out = str(tmp_path / "sweep")
    argv = ["sweep", "tiny_moe", "model.top_k=1,2", "--out", out, *npy_sets]
    code, stdout, err = _olmoe(capsys, *argv)
    assert code == 0, err
    ids = ["tiny_moe__top_k=1", "tiny_moe__top_k=2"]
    rows = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert [r["id"] for r in rows] == ids
    for r in rows:
        assert r["state"] == "done" and r["step"] == 4 and not r["diverged"]
        assert set(r["val_loss"]) == {"npy"} and np.isfinite(r["val_loss"]["npy"])
        assert r["tokens_per_s"] > 0 and r["wall_s"] > 0
        saved = json.loads((tmp_path / "sweep" / "runs" / r["id"] / "config.json").read_text())
        assert saved["model"]["top_k"] == int(r["id"][-1]) and saved["model"]["d_model"] == 32
    md = (tmp_path / "sweep" / "summary.md").read_text()
    assert "| tiny_moe__top_k=1 | done | 4/4 |" in md and "val npy" in md
    assert (tmp_path / "sweep" / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code, stdout, err = _olmoe(capsys, "sweep", "--status", out)
    assert code == 0 and "2 of 2 runs done" in stdout and "tiny_moe__top_k=2 | done" in stdout, err

    # Again: nothing left to do, no run touched.
    runs_before = _mtimes(os.path.join(out, "runs"))
    code, stdout, err = _olmoe(capsys, *argv)
    assert code == 0 and "run 1/2" not in stdout and "run 2/2" not in stdout, err
    assert _mtimes(os.path.join(out, "runs")) == runs_before

    # An interrupted run (no result yet, checkpoints at 2): resumed from its checkpoint, alone.
    second = os.path.join(out, "runs", ids[1])
    os.remove(os.path.join(second, "result.json"))
    os.system(f"rm -rf {os.path.join(second, 'checkpoints', '4')}")
    code, stdout, err = _olmoe(capsys, "sweep", "--status", out)
    assert "1 of 2 runs done; 1 left" in stdout and "| tiny_moe__top_k=2 | partial | 2/4 |" in stdout
    code, stdout, err = _olmoe(capsys, *argv)
    assert code == 0 and "run 2/2 tiny_moe__top_k=2 (resuming at step 2)" in stdout and "run 1/2" not in stdout, err
    result = json.loads(open(os.path.join(second, "result.json"), encoding="utf-8").read())
    assert result["start_step"] == 2 and result["step"] == 4

    # A different sweep into the same folder is refused, before anything runs.
    code, _, err = _olmoe(capsys, "sweep", "tiny_moe", "model.top_k=3", "--out", out, *npy_sets)
    assert code == 2 and "holds a different sweep" in err


def test_grid_points_product_and_zip():
    assert grid_points(["a.x=1,2", "b.y=3"]) == [("a.x=1", "b.y=3"), ("a.x=2", "b.y=3")]
    assert grid_points(["m.e:m.k=8:1,32:4", "t.s=5,6"]) == [
        ("m.e=8", "m.k=1", "t.s=5"), ("m.e=8", "m.k=1", "t.s=6"),
        ("m.e=32", "m.k=4", "t.s=5"), ("m.e=32", "m.k=4", "t.s=6")]
    assert grid_points([]) == [()]
    with pytest.raises(ConfigError, match="needs 2 ':'-separated parts"):
        grid_points(["m.e:m.k=8"])
    with pytest.raises(ConfigError, match="expected KEY=V1,V2"):
        grid_points(["m.e"])


def test_sweep_usage_errors(capsys, tmp_path):
    code, _, err = _olmoe(capsys, "sweep", "--status", str(tmp_path))
    assert code == 2 and "holds no sweep" in err
    code, _, err = _olmoe(capsys, "sweep", "granularity", "--seeds", "0")
    assert code == 2 and "--seeds 0" in err
    code, _, err = _olmoe(capsys, "sweep", "granularity")
    assert code == 2 and "--out" in err
