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
        for exp, overrides in f.variants.values():
            cfg = experiments.get(exp)
            from olmoe_jax.config import apply_overrides, validate  # pylint: disable=import-outside-toplevel
            validate(apply_overrides(cfg, list(overrides)))  # every variant is a valid config


def test_verdict_needs_a_difference_beyond_the_seed_spread():
    f = lambda a, b: {"variants": {"p": {"seeds": {"0": {"val_mean": a[0]}, "1": {"val_mean": a[1]}}},  # noqa: E731
                                   "q": {"seeds": {"0": {"val_mean": b[0]}, "1": {"val_mean": b[1]}}}}}
    assert reproduce_report.verdict(f((1.0, 1.02), (1.10, 1.11)))[0] == "yes"
    assert reproduce_report.verdict(f((1.0, 1.05), (1.03, 1.04)))[0] == "within noise"
    assert reproduce_report.verdict(f((1.2, 1.21), (1.0, 1.01)))[0] == "opposite"


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
    res = json.loads((out / "findings.json").read_text())
    variants = res["findings"]["lb_loss"]["variants"]
    assert set(variants) == {"lb 0.01", "no lb loss"}
    for v in variants.values():
        assert set(v["seeds"]) == {"0"} and all(s["step"] == 2 and s["val_mean"] > 0 for s in v["seeds"].values())
    assert (out / "lb_loss.png").stat().st_size > 1000
    page = md.read_text()
    assert "### Load-balancing loss" in page and "](results/lb_loss.png)" in page
    assert "Direction reproduced:" in page and "Layer 0's busiest expert takes" in page
    # A second --run trains nothing new (every run is at its last step).
    runs_before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("metrics.jsonl")}
    assert reproduce.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("metrics.jsonl")} == runs_before
    with pytest.raises(SystemExit):
        reproduce.main(["--run", "--only", "nope"])
