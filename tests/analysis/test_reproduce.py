"""The reproduction machinery end to end on 2-step runs: --run trains every variant of a
finding and writes its results, --report turns them into the markdown page."""
import json

import numpy as np
import pytest

from experiments import reproduce, reproduce_report

TINY = ["model.vocab_size=128", "model.d_model=32", "model.num_layers=2", "model.num_heads=2",
        "model.num_kv_heads=2", "model.num_experts=4", "model.top_k=2", "model.expert_dim=32",
        "data.seq_len=16", "data.batch_size=8", "data.eval_batches=1", "optim.warmup_steps=1",
        "train.log_every=1"]


def test_findings_table_is_well_formed():
    import experiments  # pylint: disable=import-outside-toplevel
    assert len(reproduce.FINDINGS) >= 6 and len({f.key for f in reproduce.FINDINGS}) == len(reproduce.FINDINGS)
    for f in reproduce.FINDINGS:
        assert len(f.variants) >= 2 and f.claim
        for v in f.variants.values():  # every variant is a registered CPU twin (or upcycles one)
            entry = experiments.entry(v.source if isinstance(v, reproduce.Upcycled) else v)
            assert entry.scale == "tiny", entry.name


def test_equal_configs_train_once_and_upcycled_runs_follow_their_source():
    plan = reproduce.plan_runs(reproduce.FINDINGS, None, [])
    names = list(plan.values())
    # every family's baseline arm is tiny_moe: one run per seed
    assert plan[("lb_loss/on-tiny", 0)] == plan[("z_loss/on-tiny", 0)] == plan[(reproduce.BASE, 0)]
    assert plan[("lb_loss/on-tiny", 1)] == plan[("z_loss/on-tiny", 1)]
    assert plan[("lb_loss/off-tiny", 0)] != plan[("lb_loss/off-tiny", 1)]
    up = next(v for f in reproduce.FINDINGS for v in f.variants.values() if isinstance(v, reproduce.Upcycled))
    assert names.index(plan[(up.source, 0)]) < names.index(plan[(up, 0)])
    assert plan[(up.source, 0)] == plan[("moe_vs_dense/dense-tiny", 0)]


def test_verdict_needs_a_difference_beyond_the_seed_spread():
    f = lambda a, b: {"variants": {"p": {"seeds": {"0": {"val_mean": a[0]}, "1": {"val_mean": a[1]}}},  # noqa: E731
                                   "q": {"seeds": {"0": {"val_mean": b[0]}, "1": {"val_mean": b[1]}}}}}
    assert reproduce_report.verdict(f((1.0, 1.02), (1.10, 1.11)))[0] == "yes"
    assert reproduce_report.verdict(f((1.0, 1.05), (1.03, 1.04)))[0] == "within noise"
    assert reproduce_report.verdict(f((1.2, 1.21), (1.0, 1.01)))[0] == "opposite"
    # One seed is held to the reproduction's largest seed spread, not to the floor alone.
    one = {"variants": {"p": {"seeds": {"0": {"val_mean": 1.0}}}, "q": {"seeds": {"0": {"val_mean": 1.02}}}}}
    assert reproduce_report.verdict(one)[0] == "yes"
    assert reproduce_report.verdict(one, reproduce_report.seed_spread({"a": f((1.0, 1.05), (1.0, 1.0))}))[0] \
        == "within noise"


def test_run_then_report_on_two_step_runs(tmp_path):
    tokens = tmp_path / "part-0.npy"
    rng = np.random.default_rng(0)
    np.concatenate([np.append(rng.integers(1, 128, rng.integers(20, 200)), 0) for _ in range(300)]) \
        .astype(np.uint16).tofile(tokens)
    sets = TINY + ["data.source=npy", "data.tokenizer=none", "data.eos_id=0", f"data.path={tokens}"]
    out, md = tmp_path / "results", tmp_path / "reproduction.md"
    argv = ["--run", "--report", "--only", "lb_loss", "--steps", "2", "--seeds", "1", "--skip-eval", "--runs",
            str(tmp_path / "runs"), "--out", str(out), "--md", str(md), *[a for s in sets for a in ("--set", s)]]
    assert reproduce.main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["lb_loss-off-tiny-s0", "lb_loss-on-tiny-s0"]
    res = json.loads((out / "findings.json").read_text())
    variants = res["findings"]["lb_loss"]["variants"]
    assert set(variants) == {"lb 0.01", "no lb loss"}
    for v in variants.values():
        assert set(v["seeds"]) == {"0"} and all(s["step"] == 2 and s["val_mean"] > 0 for s in v["seeds"].values())
    assert (out / "lb_loss.png").stat().st_size > 1000
    page = md.read_text()
    assert "### Load-balancing loss" in page and "](results/lb_loss.png)" in page
    assert "Direction reproduced:" in page and "Layer 0's busiest expert takes" in page
    assert "## Not run at this scale" in page and "`init/normal-tiny`" in page
    # A second --run trains nothing new (every run is at its last step).
    runs_before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("metrics.jsonl")}
    assert reproduce.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("metrics.jsonl")} == runs_before
    with pytest.raises(SystemExit):
        reproduce.main(["--run", "--only", "nope"])
