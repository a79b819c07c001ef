"""`olmoe eval --tasks` and `olmoe plot` end to end; their input errors exit with code 2."""
import json

import pytest

from launch.cli import main
from olmoe_jax.config import default_config, validate
from olmoe_jax.data import make_tokenizer
from olmoe_jax.eval import downstream, tasks
from olmoe_jax.eval.loglik import Scorer
from olmoe_jax.train import checkpoint


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, random_params, hf_tokenizer_path):
    """A params-only workdir of a small random MoE with the OLMoE tokenizer (as import-hf writes)."""
    c = default_config()
    c.name = "eval_cmd"
    c.model.update(vocab_size=50304, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2, max_seq_len=64,
                   num_experts=4, top_k=2, expert_dim=16, compute_dtype="float32")
    c.data.update(seq_len=64, tokenizer="hf", tokenizer_path=hf_tokenizer_path)
    cfg = validate(c)
    wd = tmp_path_factory.mktemp("eval_cmd") / "wd"
    checkpoint.save_params(str(wd), random_params(cfg, seed=0, std=0.5), cfg)
    return str(wd), cfg


def test_eval_tasks_writes_what_the_evaluator_computes(workdir, tmp_path, capsys):
    wd, cfg = workdir
    path = tmp_path / "capitals.jsonl"
    rows = [{"query": f"The capital of {a} is", "choices": [b, "Paris", "a large river", "7"], "gold": 0}
            for a, b in (("Peru", "Lima"), ("Norway", "Oslo"), ("Ghana", "Accra"), ("Japan", "Tokyo"))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", "--workdir", wd, "--tasks", str(path), "--forms", "cloze,mc",
                 "--tokens-per-batch", "256"]) == 0
    assert "capitals" in capsys.readouterr().out
    with open(f"{wd}/eval/tasks_step0.json") as f:
        written = json.load(f)["tasks"]
    expect = downstream.evaluate_tasks(Scorer(checkpoint.load_params(wd), cfg, tokens_per_batch=256),
                                       make_tokenizer(cfg), [tasks.load_jsonl_task(str(path))])
    assert written == expect


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "nope"], "not a built-in task"),
    (["--tasks", "builtin", "--forms", "essay"], "--forms essay"),
    (["--tasks", "builtin", "--step", "7"], "--step 7"),
    (["--set", "model.d_model=8"], "the model is fixed"),
])
def test_eval_input_errors(workdir, capsys, argv, message):
    assert main(["eval", "--workdir", workdir[0], *argv]) == 2
    assert message in capsys.readouterr().err


def test_plot_draws_runs_from_metrics(tmp_path, capsys):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        wd = tmp_path / name
        wd.mkdir()
        recs = [{"kind": "train", "step": s, "loss": scale * 5 / s} for s in (1, 2, 3, 4)]
        recs.append({"kind": "eval", "step": 4, "val_loss": {"code": 2.0 * scale, "prose": 3.0 * scale}})
        (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "loss.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--metric", "val/mean"]) == 0
    assert "b: val/mean 5.0000 at step 4" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "a"), "--out", str(out), "--metric", "nonsense"]) == 2
    assert "no values of 'nonsense'" in capsys.readouterr().err
